"""How to get real CRC-32s into reshape's zip records without losing its speed.

    python bench/bench_crc.py                       # 512 MB, 5 alternating rounds
    python bench/bench_crc.py --sizes 256 1024      # MB
    python bench/bench_crc.py --quick               # 64 MB, 3 rounds: a smoke test
    python bench/bench_crc.py --reshape CKPT        # also whole `reshape --dp 4` runs of CKPT

Two tables, one run, every variant measured in alternating rounds (A B C A B C ...), medians:

1. **CRC alone** over an in-memory buffer: ``zlib.crc32`` (the system zlib), ``binascii.crc32``
   (CPython links it to the same zlib), and, when importable, ``isal.isal_zlib.crc32`` (Intel
   ISA-L, PyPI ``isal``) and ``zlib_ng.zlib_ng.crc32`` (PyPI ``zlib-ng``); on 1 and 2 threads
   (each thread CRCs half; the halves are combined with ``crc32_combine``).
2. **Copy + CRC** of a warm-cache file into a new one, what ``save_torch`` does per storage:

   - ``copy_file_range``: the kernel copy dsckpt used with CRC zero (the baseline);
   - ``cfr + reread``: the kernel copy, then the written bytes read back and CRC'd (the old
     ``crc32=True`` path, serial here);
   - ``cfr + src crc``: the kernel copy of each chunk while a pool CRCs the same chunk of the
     source (warm in the page cache: the kernel just read it);
   - ``pread/crc/pwrite``: chunks read into a reused buffer, CRC'd while in hand, written:
     the bytes cross into user space once.

   with each CRC implementation and 1 or 2 worker threads (chunks spread over the pool,
   combined in order).

3. With ``--reshape CKPT`` (e.g. the checkpoint ``make_checkpoint.py --quick`` makes): the whole
   ``dsckpt reshape CKPT OUT --dp N`` with zero CRCs (before), and real CRCs with ``zlib`` and
   with ``isal`` (after), in alternating rounds, each a fresh process.

Figures are printed as medians with the ratio to the baseline. Files go to
``WORKDIR/crc`` (``/tmp/dsckpt-bench`` unless ``--workdir``) and are removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsckpt.execute.formats.crc import crc32_combine  # noqa: E402

DEFAULT_WORKDIR = Path("/tmp/dsckpt-bench")
CHUNK = 8 << 20

Crc = Callable[..., int]


def implementations() -> dict[str, Crc]:
    import binascii

    impls: dict[str, Crc] = {"zlib": zlib.crc32, "binascii": binascii.crc32}
    try:
        from isal import isal_zlib

        impls["isal"] = isal_zlib.crc32
    except ImportError:
        print("isal not importable: pip install isal to include it", file=sys.stderr)
    try:
        from zlib_ng import zlib_ng

        impls["zlib-ng"] = zlib_ng.crc32
    except ImportError:
        print("zlib-ng not importable: pip install zlib-ng to include it", file=sys.stderr)
    return impls


def crc_threads(crc: Crc, view: memoryview, threads: int, pool: ThreadPoolExecutor) -> int:
    if threads == 1:
        return crc(view)
    step = -(-len(view) // threads)
    parts = [view[i : i + step] for i in range(0, len(view), step)]
    result = 0
    for part, value in zip(parts, pool.map(crc, parts), strict=True):
        result = crc32_combine(result, value, len(part))
    return result


def chunks(nbytes: int) -> list[tuple[int, int]]:
    return [(off, min(CHUNK, nbytes - off)) for off in range(0, nbytes, CHUNK)]


def copy_kernel(src: int, dst: int, nbytes: int) -> None:
    off = 0
    while off < nbytes:
        n = os.copy_file_range(src, dst, nbytes - off, off, off)
        if n <= 0:
            raise OSError("short copy")
        off += n


def read_crc(crc: Crc, fd: int, off: int, n: int, buf: bytearray) -> int:
    view = memoryview(buf)[:n]
    got = os.preadv(fd, [view], off)
    if got != n:
        raise OSError("short read")
    return crc(view)


def combine(parts: list[tuple[int, int]]) -> int:
    result = 0
    for value, n in parts:
        result = crc32_combine(result, value, n)
    return result


class Copier:
    """One copy strategy, with its thread pool and reused per-thread buffers."""

    def __init__(self, strategy: str, crc: Crc | None, threads: int) -> None:
        self.strategy, self.crc, self.threads = strategy, crc, threads
        self.pool = ThreadPoolExecutor(threads)
        self._buffers: dict[int, bytearray] = {}

    def _buf(self) -> bytearray:
        import threading

        key = threading.get_ident()
        if key not in self._buffers:
            self._buffers[key] = bytearray(CHUNK)
        return self._buffers[key]

    def run(self, src: int, dst: int, nbytes: int) -> int:
        crc = self.crc
        if self.strategy == "copy_file_range":
            copy_kernel(src, dst, nbytes)
            return 0
        assert crc is not None
        if self.strategy == "cfr + reread":
            copy_kernel(src, dst, nbytes)
            return combine([(read_crc(crc, dst, o, n, self._buf()), n) for o, n in chunks(nbytes)])
        if self.strategy == "cfr + src crc":
            futures = []
            for o, n in chunks(nbytes):
                off = o
                while off < o + n:
                    off += os.copy_file_range(src, dst, o + n - off, off, off)
                futures.append(
                    (self.pool.submit(lambda o=o, n=n: read_crc(crc, src, o, n, self._buf())), n)
                )
            return combine([(f.result(), n) for f, n in futures])
        if self.strategy == "pread/crc/pwrite":

            def one(o: int, n: int) -> int:
                buf = self._buf()
                value = read_crc(crc, src, o, n, buf)
                view = memoryview(buf)[:n]
                while view:
                    w = os.pwrite(dst, view, o)
                    view, o = view[w:], o + w
                return value

            futures = [(self.pool.submit(one, o, n), n) for o, n in chunks(nbytes)]
            return combine([(f.result(), n) for f, n in futures])
        raise ValueError(self.strategy)


def median_table(title: str, rows: dict[str, list[float]], nbytes: int, base: str) -> None:
    print(f"\n{title}")
    print(f"| variant | median s | GB/s | vs {base} |")
    print("|---|---|---|---|")
    ref = statistics.median(rows[base])
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {nbytes / med / 1e9:.2f} | {med / ref:.2f}x |")


def bench_crc_only(size: int, rounds: int, impls: dict[str, Crc]) -> None:
    buf = bytearray(os.urandom(1 << 20)) * (size >> 20)
    view = memoryview(buf)
    pool = ThreadPoolExecutor(2)
    expected = zlib.crc32(view)
    rows: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, crc in impls.items():
            for threads in (1, 2):
                t = time.perf_counter()
                value = crc_threads(crc, view, threads, pool)
                rows.setdefault(f"{name}, {threads} thread(s)", []).append(time.perf_counter() - t)
                assert value == expected, name
    median_table(
        f"CRC-32 of {size >> 20} MB in memory ({rounds} rounds)", rows, size, "zlib, 1 thread(s)"
    )


def bench_copy(size: int, rounds: int, impls: dict[str, Crc], workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    src_path, dst_path = workdir / "src.bin", workdir / "dst.bin"
    block = os.urandom(1 << 20)
    with open(src_path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    expected = 0
    with open(src_path, "rb") as f:
        while piece := f.read(CHUNK):
            expected = zlib.crc32(piece, expected)
    copiers = {"copy_file_range": Copier("copy_file_range", None, 1)}
    for strategy in ("cfr + reread", "cfr + src crc", "pread/crc/pwrite"):
        for name, crc in impls.items():
            if name == "binascii":
                continue  # the same zlib code as zlib.crc32
            for threads in (1, 2) if strategy != "cfr + reread" else (1,):
                copiers[f"{strategy}, {name}, {threads}t"] = Copier(strategy, crc, threads)
    rows: dict[str, list[float]] = {}
    src = os.open(src_path, os.O_RDONLY)
    try:
        for _ in range(rounds):
            for label, copier in copiers.items():
                dst_path.unlink(missing_ok=True)
                dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.ftruncate(dst, size)
                    t = time.perf_counter()
                    value = copier.run(src, dst, size)
                    rows.setdefault(label, []).append(time.perf_counter() - t)
                finally:
                    os.close(dst)
                if label != "copy_file_range":
                    assert value == expected, label
    finally:
        os.close(src)
        src_path.unlink(missing_ok=True)
        dst_path.unlink(missing_ok=True)
    median_table(
        f"copy {size >> 20} MB file -> new file, warm cache ({rounds} rounds)",
        rows,
        size,
        "copy_file_range",
    )


_RESHAPE_VARIANTS = {
    "CRC zero (before)": "import dsckpt.execute.formats.deepspeed_files as z; "
    "z.STREAM_CRC32 = False",
    "real CRC, zlib": "import zlib, dsckpt.execute.formats.crc as c, "
    "dsckpt.execute.formats.torch_writer as t; c.crc32 = t._crc32 = zlib.crc32",
    "real CRC, isal": "import dsckpt.execute.formats.crc as c; "
    "assert c.crc_impl == 'isal', c.crc_impl",
}


def bench_reshape(ckpt: Path, dp: int, rounds: int, workdir: Path, isal: bool) -> None:
    import shutil
    import subprocess

    out = workdir / "crc-reshape-out"
    variants = {k: v for k, v in _RESHAPE_VARIANTS.items() if isal or "isal" not in k}
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    rows: dict[str, list[float]] = {}
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    for _ in range(rounds):
        for label, setup in variants.items():
            shutil.rmtree(out, ignore_errors=True)
            code = (
                f"{setup}; import sys; from dsckpt.cli.app import main; "
                f"sys.argv = ['dsckpt', 'reshape', {str(ckpt)!r}, {str(out)!r}, "
                f"'--dp', '{dp}', '-q']; main()"
            )
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL
            )
            rows.setdefault(label, []).append(time.perf_counter() - t)
    shutil.rmtree(out, ignore_errors=True)
    median_table(
        f"dsckpt reshape --dp {dp} of {ckpt} ({size / 1e6:.0f} MB, {rounds} rounds, "
        "each a new process)",
        rows,
        size,
        "CRC zero (before)",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="MB")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--reshape", type=Path, metavar="CKPT", help="also time whole reshapes of CKPT")
    p.add_argument("--dp", type=int, default=4, help="target DP of --reshape (default 4)")
    p.add_argument("--skip-micro", action="store_true", help="only the --reshape runs")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.rounds = [64], 3
    impls = implementations()
    print(
        f"python {sys.version.split()[0]}, zlib {zlib.ZLIB_RUNTIME_VERSION}, "
        f"{os.cpu_count()} CPUs; implementations: {', '.join(impls)}"
    )
    for size_mb in [] if args.skip_micro else args.sizes:
        size = size_mb << 20
        bench_crc_only(size, args.rounds, impls)
        bench_copy(size, args.rounds, impls, args.workdir / "crc")
    if args.reshape is not None:
        bench_reshape(args.reshape, args.dp, args.rounds, args.workdir, "isal" in impls)


if __name__ == "__main__":
    main()
