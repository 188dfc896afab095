"""Time dsckpt's torch-free reader (``load_saved``) against the torch-based one (``load_meta``).

Both read a file's structure and tensor locations without tensor data. In-process times are
medians over ``--repeat`` warm runs on the largest fixture files and, when present, on the big
checkpoints ``bench/make_checkpoint.py`` leaves in ``/tmp/dsckpt-bench``. A fresh process per
reader then shows what a command pays in all: ``load_meta`` needs ``import torch`` first.

    .venv/bin/python bench/bench_unpickle.py [--repeat 7] [--files 5] [--no-big]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsckpt.io.unpickle import SavedTensor, load_saved  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"


def _median_ms(load: Callable[[Path], Any], path: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        load(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _count_tensors(value: Any) -> int:
    if isinstance(value, SavedTensor):
        return 1
    if isinstance(value, dict):
        return sum(_count_tensors(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_count_tensors(v) for v in value)
    return 0


def _fresh_process_ms(code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per file (median printed)")
    parser.add_argument("--files", type=int, default=5, help="how many of the largest fixtures")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsckpt-bench"))
    parser.add_argument("--no-big", action="store_true", help="skip the checkpoints in --workdir")
    parser.add_argument(
        "--synthetic",
        type=int,
        default=5000,
        metavar="N",
        help="also time a file of N small tensors (per-tensor cost); 0 skips it",
    )
    parser.add_argument(
        "--no-fresh", action="store_true", help="skip the fresh-process timings (import costs)"
    )
    args = parser.parse_args()

    files = sorted(FIXTURES.rglob("*.pt"), key=lambda p: p.stat().st_size, reverse=True)
    files = files[: args.files]
    if not args.no_big and args.workdir.is_dir():
        files += sorted(p for p in args.workdir.glob("*/ckpt/*/*.pt"))

    start = time.perf_counter()
    import torch  # noqa: F401  (load_meta needs it; its import time is reported apart)

    import_torch_ms = (time.perf_counter() - start) * 1000
    from dsckpt.io.load import load_meta

    print(f"import torch (in process, once): {import_torch_ms:.0f} ms")
    header = f"{'file':<72} {'MB':>8} {'tensors':>7} {'load_saved':>11} {'load_meta':>10} {'x':>6}"
    print(header)
    print("-" * len(header))
    if args.synthetic:
        scratch = Path(tempfile.mkdtemp(prefix="bench-unpickle-"))
        synthetic = scratch / f"{args.synthetic}_tensors.pt"
        torch.save(
            {f"layer.{i}.weight": torch.zeros(4, 4) for i in range(args.synthetic)}, synthetic
        )
        files.append(synthetic)
    for path in files:
        load_saved(path)  # warm the page cache and numpy's import
        ours = _median_ms(load_saved, path, args.repeat)
        theirs = _median_ms(load_meta, path, args.repeat)
        shown = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        print(
            f"{shown[-72:]:<72} {path.stat().st_size / 1e6:>8.1f} "
            f"{_count_tensors(load_saved(path)):>7} {ours:>9.2f}ms {theirs:>8.2f}ms "
            f"{theirs / ours:>5.1f}x"
        )

    if args.synthetic:
        files.remove(synthetic)
        shutil.rmtree(scratch)
    if args.no_fresh:
        return
    # The biggest model-states file: many tensors, the common case for a command's first read.
    path = max(files, key=lambda p: ("model_states" in p.name, p.stat().st_size))
    repeat = max(1, min(3, args.repeat))
    ours = _fresh_process_ms(
        f"from dsckpt.io.unpickle import load_saved; load_saved({str(path)!r})", repeat
    )
    theirs = _fresh_process_ms(
        "from pathlib import Path; from dsckpt.io.load import load_meta; "
        f"load_meta(Path({str(path)!r}))",
        repeat,
    )
    print(
        f"fresh process, import + read {path.name}: load_saved {ours:.0f} ms, "
        f"load_meta {theirs:.0f} ms (median of {repeat})"
    )


if __name__ == "__main__":
    main()
