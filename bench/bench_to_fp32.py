"""Benchmark ``dsckpt to-fp32`` against DeepSpeed's own ``zero_to_fp32.py``.

    python bench/bench_to_fp32.py                 # ZeRO-2 210M and 420M, ZeRO-3 420M; warm cache
    python bench/bench_to_fp32.py --cold          # also with the page cache dropped before each run
    python bench/bench_to_fp32.py --quick         # 25M / 50M params: a smoke test

For each checkpoint (made and cached by make_checkpoint.py) everything runs in rounds, each round
once: ``zero_to_fp32``, ``dsckpt to-fp32``, the machine's I/O bound for the same bytes, and the
cost of importing each tool's stack. Tools are child processes measured for wall time and peak
memory (see _measure.py). The I/O bound moves the fp32 master partitions (exactly the byte
ranges of ``single_partition_of_fp32_groups`` / ``fp32_flat_groups`` in the optimizer files,
which any converter must read) into one new file, without fsync as neither tool fsyncs, two ways:
``pread`` + ``pwrite``, and a kernel-side ``copy_file_range``; the faster is the bound. Both
tools' outputs are then compared tensor by tensor with ``torch.equal``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from _measure import (
    DEFAULT_WORKDIR,
    MB,
    REPO,
    Measurement,
    alternating,
    bin_path,
    drop_caches,
    dsckpt_has,
    fmt_mb,
    fmt_ratio,
    median,
    remove,
    render_table,
    run_measured,
    tree_bytes,
)
from make_checkpoint import Made, Spec, describe, ensure_checkpoint

if TYPE_CHECKING:
    from torch import Tensor

DEEPSPEED = "zero_to_fp32"
DSCKPT = "dsckpt to-fp32"
IO_RW = "I/O read+write"
IO_COPY = "I/O kernel copy"
# What each tool costs before its first byte of I/O, measured in the same rounds: importing
# DeepSpeed's stack (torch included), and dsckpt's whole run on the bundled 196-parameter sample
# (interpreter, CLI and discovery; its copy is a few KB).
IMPORT_DEEPSPEED = "import deepspeed"
DSCKPT_STARTUP = "dsckpt start-up"
FLOORS = (IMPORT_DEEPSPEED, DSCKPT_STARTUP)
SAMPLE = REPO / "tests" / "fixtures" / "zero" / "z2-fp32-dp2" / "ckpt"
CHUNK = 16 << 20  # bytes per read/write in the I/O bound: large enough to be bandwidth-bound
CONFIGS = {f"z{stage}-s{scale:g}": Spec(stage, scale) for stage in (2, 3) for scale in (0.5, 1, 2)}
# Scale 2 (839M) cannot be trained by two ranks in 24 GB (make_checkpoint.py), so the doubling that
# shows whether memory follows the model is 210M -> 420M here; add z2-s2 on a larger machine.
DEFAULT_CONFIGS = "z2-s0.5,z2-s1,z3-s1"
# The targets of the to-fp32 issue.
TARGET_SPEEDUP = 4.0
TARGET_RSS_FRACTION = 1 / 8
TARGET_IO_FACTOR = 1.5
TARGET_GROWTH = 0.10


@dataclass
class Result:
    """Every run of one checkpoint in one cache mode."""

    config: str
    label: str
    mode: str  # "warm" or "cold"
    stage: int
    params: int
    runs: dict[str, list[Measurement]] = field(default_factory=dict)
    io_read_s: list[float] = field(default_factory=list)
    io_write_s: list[float] = field(default_factory=list)
    io_copy_s: list[float] = field(default_factory=list)
    io_bytes: int = 0
    identical: str = "not checked"

    def wall(self, tool: str) -> float | None:
        runs = self.runs.get(tool)
        return median([m.wall_s for m in runs]) if runs else None

    def mem(self, tool: str) -> float | None:
        runs = self.runs.get(tool)
        # Both converters are single processes: the exact ru_maxrss is their peak. (dsckpt's
        # ctypes.util.find_library forks ldconfig for a moment; the fork shares its pages.)
        return median([m.peak_rss for m in runs]) if runs else None

    def anon(self, tool: str) -> float | None:
        runs = self.runs.get(tool)
        return median([m.peak_anon for m in runs]) if runs else None

    def io_rw(self) -> float:
        return median(self.io_read_s) + median(self.io_write_s)

    def io_bound(self) -> float:
        """The faster way to move the bytes: user-space read+write, or a kernel-side copy."""
        return min(self.io_rw(), median(self.io_copy_s))


# ------------------------------------------------------------------------------------ the tools


def deepspeed_command(made: Made, out: Path, fmt: str) -> list[str]:
    """The converter DeepSpeed copies into every save_dir: what users are told to run."""
    script = made.ckpt / "zero_to_fp32.py"
    cmd = (
        [sys.executable, str(script)]
        if script.exists()
        else [sys.executable, "-m", "deepspeed.utils.zero_to_fp32"]
    )
    cmd += [str(made.ckpt), str(out)]
    return cmd + (["--safe_serialization"] if fmt == "safetensors" else [])


def dsckpt_command(base: list[str], made: Made, out: Path) -> list[str]:
    return [*base, str(made.ckpt), str(out), "--force", "--quiet"]


def output_paths(workdir: Path, config: str) -> dict[str, Path]:
    root = workdir / "out" / config
    return {DEEPSPEED: root / "deepspeed", DSCKPT: root / "dsckpt.safetensors"}


# ------------------------------------------------------------------------------- the I/O bound


def fp32_ranges(made: Made) -> list[tuple[Path, int, int]]:
    """(file, offset, nbytes) of every fp32 master partition in the optimizer files.

    Located with a meta-device load, which reads the pickle but no tensor data. DeepSpeed is
    installed for the benchmark anyway, so the plain (not weights-only) unpickler is fine for
    checkpoints this script made itself.
    """
    import torch

    ranges = []
    for path in made.optim_files():
        state = torch.load(path, map_location="meta", weights_only=False)["optimizer_state_dict"]
        key = (
            "single_partition_of_fp32_groups"
            if "single_partition_of_fp32_groups" in state
            else "fp32_flat_groups"
        )
        for t in state[key]:
            offset = t.untyped_storage()._checkpoint_offset + t.storage_offset() * t.element_size()
            ranges.append((path, offset, t.numel() * t.element_size()))
    return ranges


def time_reads(ranges: list[tuple[Path, int, int]]) -> float:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    for path, offset, nbytes in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            end = offset + nbytes
            while offset < end:
                n = os.preadv(fd, [view[: min(CHUNK, end - offset)]], offset)
                if n == 0:
                    raise OSError(f"{path}: short read at {offset}")
                offset += n
        finally:
            os.close(fd)
    return time.perf_counter() - start


def time_write(path: Path, nbytes: int) -> float:
    """Write ``nbytes`` to a new file with no fsync, as the tools do; the file is then removed.

    The file is preallocated first: on this machine's ext4 that makes the same writes up to 10x
    faster (1.68 GB: 0.5 s against 6-9 s appended), and a bound must be the fastest way.
    """
    data = memoryview(os.urandom(CHUNK))  # not zeros: no shortcut for data that compresses
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, data[: min(CHUNK, nbytes - done)], done)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def time_copy(ranges: list[tuple[Path, int, int]], path: Path) -> float:
    """Copy the ranges into one new preallocated file kernel-side (``copy_file_range``).

    No byte enters user space: on this machine's ext4 that is several times faster than ``pwrite``
    for large outputs (the kernel throttles ``pwrite`` once ~0.8 GB is dirty), so it is the bound
    for a converter that moves fp32 bytes without changing them.
    """
    total = sum(r[2] for r in ranges)
    start = time.perf_counter()
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(out, 0, total)
        dst = 0
        for src_path, offset, nbytes in ranges:
            src = os.open(src_path, os.O_RDONLY)
            try:
                end = offset + nbytes
                while offset < end:
                    n = os.copy_file_range(src, out, end - offset, offset, dst)
                    if n == 0:
                        raise OSError(f"{src_path}: short copy at {offset}")
                    offset += n
                    dst += n
            finally:
                os.close(src)
    finally:
        os.close(out)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


# ---------------------------------------------------------------------------------- comparison


def iter_output(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of a safetensors file, a torch .bin, or a directory of either, lazily."""
    import torch
    from safetensors import safe_open

    files = (
        sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else [path]
    )
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, fh.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", mmap=True, weights_only=True).items()


def compare_outputs(reference: Path, ours: Path) -> str:
    """'OK (n tensors)' when both hold the same names with bit-identical tensors."""
    import torch

    theirs = dict(iter_output(reference))  # mmap-backed or one file: cheap to hold
    seen, bad = 0, []
    for name, tensor in iter_output(ours):
        seen += 1
        other = theirs.pop(name, None)
        if other is None:
            bad.append(f"{name} only in dsckpt")
        elif other.dtype != tensor.dtype or not torch.equal(other, tensor):
            bad.append(f"{name} differs")
    bad += [f"{name} only in DeepSpeed's output" for name in theirs]
    if bad:
        return f"MISMATCH ({len(bad)}: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return f"OK ({seen} tensors bit-identical)"


# ----------------------------------------------------------------------------------- the runs


def prepare_run(cold: bool) -> None:
    """Between runs, untimed: flush the previous run's dirty pages so its write-back does not
    land in the next run's time; in cold mode also empty the page cache."""
    os.sync()
    if cold:
        drop_caches()


def run_tool(
    tool: str,
    made: Made,
    args: argparse.Namespace,
    dsckpt: list[str] | None,
    out: Path,
    log: Path,
    show: bool,
) -> Measurement:
    if tool == IMPORT_DEEPSPEED:
        cmd = [sys.executable, "-c", "import deepspeed.utils.zero_to_fp32"]
    elif tool == DSCKPT_STARTUP:
        cmd = [
            *(dsckpt or []),
            str(SAMPLE),
            str(args.workdir / "out" / "sample.safetensors"),
            "--force",
            "--quiet",
        ]
    elif tool == DEEPSPEED:
        cmd = deepspeed_command(made, out, args.ds_format)
    else:
        cmd = dsckpt_command(dsckpt or [], made, out)
    if show:
        print(f"    $ {shlex.join(cmd)}", flush=True)
    return run_measured(cmd, log)


def run_io_bound(
    tool: str, result: Result, ranges: list[tuple[Path, int, int]], scratch: Path
) -> str:
    if tool == IO_COPY:
        result.io_copy_s.append(time_copy(ranges, scratch))
        return f"{result.io_copy_s[-1]:.1f} s"
    result.io_read_s.append(time_reads(ranges))
    result.io_write_s.append(time_write(scratch, result.io_bytes))
    return f"read {result.io_read_s[-1]:.1f} s + write {result.io_write_s[-1]:.1f} s"


def bench_config(
    config: str, made: Made, args: argparse.Namespace, dsckpt: list[str] | None, mode: str
) -> Result:
    cold = mode == "cold"
    result = Result(
        config=config,
        label=made.spec.label(),
        mode=mode,
        stage=made.spec.stage,
        params=made.spec.params,
    )
    outs = output_paths(args.workdir, made.spec.name)
    outs[DEEPSPEED].parent.mkdir(parents=True, exist_ok=True)
    logs = args.workdir / "logs" / made.spec.name / mode
    ranges = fp32_ranges(made)
    result.io_bytes = sum(r[2] for r in ranges)

    # The I/O bound takes its turns in the alternation too, so it sees the same machine.
    tools = [DEEPSPEED] + ([DSCKPT] if dsckpt else []) + [IO_RW, IO_COPY, *FLOORS]
    if not cold:  # untimed: the first timed tool must not be the one that pulls files from disk
        time_reads([(p, 0, p.stat().st_size) for p in made.tag_dir.iterdir()])
    for round_no, tool in alternating(tools, args.repeats):
        prepare_run(cold)
        if tool in (IO_RW, IO_COPY):
            line = run_io_bound(tool, result, ranges, outs[DEEPSPEED].parent / "io-bound.tmp")
        else:
            if tool in outs:
                remove(outs[tool])
            log = logs / f"{tool.replace(' ', '_')}-{round_no}.log"
            run = run_tool(
                tool,
                made,
                args,
                dsckpt,
                outs.get(tool, Path()),
                log,
                show=round_no == 0 and tool not in FLOORS,
            )
            result.runs.setdefault(tool, []).append(run)
            line = (
                f"{run.wall_s:.1f} s, peak {fmt_mb(run.peak_rss)} MB "
                f"(anon {fmt_mb(run.peak_anon)} MB)"
            )
        print(f"  {mode} {config} {tool:<15} run {round_no + 1}: {line}", flush=True)
    if dsckpt:
        result.identical = compare_outputs(outs[DEEPSPEED], outs[DSCKPT])
    if not args.keep_outputs:
        for path in outs.values():
            remove(path)
    return result


# -------------------------------------------------------------------------------------- report


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def timing_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        name = f"{r.label} {r.mode}"
        for tool in (DEEPSPEED, DSCKPT, IO_RW, IO_COPY, *FLOORS):
            if tool in (IO_RW, IO_COPY):
                totals = (
                    [a + b for a, b in zip(r.io_read_s, r.io_write_s, strict=True)]
                    if tool == IO_RW
                    else r.io_copy_s
                )
                wall = r.io_rw() if tool == IO_RW else median(r.io_copy_s)
                rows.append(
                    [
                        name,
                        f"{tool} {r.io_bytes / 1e9:.2f} GB",
                        f"{wall:.1f}",
                        f"{min(totals):.1f}-{max(totals):.1f}",
                        str(len(totals)),
                        "-",
                        "-",
                    ]
                )
            elif tool in r.runs:
                walls = [m.wall_s for m in r.runs[tool]]
                spread = f"{min(walls):.1f}-{max(walls):.1f}"
                rows.append(
                    [
                        name,
                        tool,
                        f"{median(walls):.1f}",
                        spread,
                        str(len(walls)),
                        fmt_mb(r.mem(tool) or 0),
                        fmt_mb(r.anon(tool) or 0),
                    ]
                )
    headers = ["checkpoint", "tool", "wall s", "range", "runs", "peak RSS MB", "anon MB"]
    return render_table(headers, rows)


def above_floor(r: Result) -> float | None:
    """dsckpt's time beyond its fixed start-up; None where noise makes it meaningless (<= 0)."""
    ours, floor = r.wall(DSCKPT), r.wall(DSCKPT_STARTUP)
    return None if ours is None or floor is None or ours <= floor else ours - floor


def ratio_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        ours = r.wall(DSCKPT)
        rows.append(
            [
                f"{r.label} {r.mode}",
                fmt_ratio(div(r.wall(DEEPSPEED), ours)),
                fmt_ratio(div(r.mem(DEEPSPEED), r.mem(DSCKPT))),
                fmt_ratio(div(ours, r.io_bound())),
                fmt_ratio(div(above_floor(r), r.io_bound())),
                r.identical,
            ]
        )
    # The last ratio leaves out dsckpt's fixed start-up (interpreter, CLI, discovery).
    headers = [
        "checkpoint",
        "time DS/dsckpt",
        "RSS DS/dsckpt",
        "dsckpt/I-O bound",
        "(dsckpt-floor)/I-O",
        "outputs",
    ]
    return render_table(headers, rows)


def doublings(results: list[Result]) -> Iterator[tuple[Result, Result]]:
    """(smaller, larger) pairs of the same stage and cache mode where the model doubles."""
    for small in results:
        for large in results:
            if (small.stage, small.mode) == (large.stage, large.mode) and abs(
                large.params / small.params - 2
            ) < 0.01:
                yield small, large


def growth(small: Result, large: Result, tool: str) -> float | None:
    a, b = small.mem(tool), large.mem(tool)
    return None if not a or not b else b / a - 1


def growth_lines(results: list[Result]) -> list[str]:
    """Peak RSS of each tool when the model doubles."""
    lines = []
    for small, large in doublings(results):
        for tool in (DSCKPT, DEEPSPEED):
            change = growth(small, large, tool)
            if change is not None:
                lines.append(
                    f"ZeRO-{small.stage} {small.mode} {tool}: {fmt_mb(small.mem(tool) or 0)} MB at "
                    f"{small.params / 1e6:,.0f}M -> {fmt_mb(large.mem(tool) or 0)} MB at "
                    f"{large.params / 1e6:,.0f}M params ({change:+.1%})"
                )
    return lines


def target_lines(results: list[Result]) -> list[str]:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    for r in results:
        speed = div(r.wall(DEEPSPEED), r.wall(DSCKPT))
        rss = div(r.mem(DSCKPT), r.mem(DEEPSPEED))
        io = div(r.wall(DSCKPT), r.io_bound())
        if speed is None or rss is None or io is None:
            continue
        io_work = fmt_ratio(div(above_floor(r), r.io_bound()))
        lines.append(
            f"{r.label} {r.mode}: >= {TARGET_SPEEDUP:.0f}x faster "
            f"{verdict(speed >= TARGET_SPEEDUP)} ({speed:.1f}x); "
            f"RSS <= 1/8 {verdict(rss <= TARGET_RSS_FRACTION)} (1/{1 / rss:.1f}); "
            f"within {TARGET_IO_FACTOR}x of I/O {verdict(io <= TARGET_IO_FACTOR)} ({io:.2f}x; "
            f"{io_work} after dsckpt's fixed start-up)"
        )
    for small, large in doublings(results):
        change = growth(small, large, DSCKPT)
        if change is not None:
            lines.append(
                f"ZeRO-{small.stage} {small.mode}: dsckpt RSS growth < {TARGET_GROWTH:.0%} when "
                f"the model doubles {verdict(change < TARGET_GROWTH)} ({change:+.1%})"
            )
    return lines


def report(results: list[Result], made: list[Made]) -> str:
    parts = [
        "",
        "== checkpoints (made by DeepSpeed) ==",
        *(describe(m) for m in made),
        "",
        "== to-fp32: medians over alternating runs ==",
        timing_table(results),
        "",
        ratio_table(results),
        "",
    ]
    sizes = growth_lines(results)
    if sizes:
        parts += ["== memory against model size ==", *sizes, ""]
    targets = target_lines(results)
    if targets:
        parts += ["== targets ==", *targets, ""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="scratch dir for checkpoints, outputs and logs (default %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per tool (default 3)")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated, of {', '.join(CONFIGS)} (default {DEFAULT_CONFIGS})",
    )
    p.add_argument("--quick", action="store_true", help="25M / 50M-parameter models: a smoke test")
    p.add_argument(
        "--cold",
        action="store_true",
        help="also run with the page cache dropped before every run (needs root)",
    )
    p.add_argument(
        "--ds-format",
        choices=("safetensors", "bin"),
        default="safetensors",
        help="zero_to_fp32's output format (default safetensors, as dsckpt writes)",
    )
    p.add_argument(
        "--dsckpt",
        default=None,
        help="command to run instead of the venv's `dsckpt to-fp32` (e.g. a stub)",
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep the converted files")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    return p.parse_args(argv)


def check_deepspeed_cli() -> None:
    # zero_to_fp32's command line always passes max_shard_size, which imports huggingface_hub.
    for module in ("deepspeed", "huggingface_hub"):
        if importlib.util.find_spec(module) is None:
            pip = Path(sys.executable).parent / "pip"
            raise SystemExit(
                f"DeepSpeed's zero_to_fp32 command needs {module}: "
                f"{pip} install -c constraints.txt {module}"
            )


def dsckpt_base(args: argparse.Namespace) -> list[str] | None:
    if args.dsckpt:
        return shlex.split(args.dsckpt)
    if dsckpt_has("to-fp32"):
        return [bin_path("dsckpt"), "to-fp32"]
    print("dsckpt to-fp32 not available: timing DeepSpeed's zero_to_fp32 only")
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}: choose from {', '.join(CONFIGS)}")
    modes = ["warm"]
    if args.cold:
        if not drop_caches():
            raise SystemExit("--cold needs to write /proc/sys/vm/drop_caches (root), refused here")
        modes.append("cold")
    check_deepspeed_cli()
    dsckpt = dsckpt_base(args)

    made = []
    for config in configs:
        spec = CONFIGS[config]
        made.append(ensure_checkpoint(Spec(spec.stage, spec.scale, args.quick), args.workdir))
        print(describe(made[-1]), flush=True)
    results = []
    for mode in modes:
        for config, m in zip(configs, made, strict=True):
            results.append(bench_config(config, m, args, dsckpt, mode))
    print(report(results, made))
    print(f"workdir {args.workdir}: {tree_bytes(args.workdir) / MB:,.0f} MB on disk")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
