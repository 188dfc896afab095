"""``--workers N`` against one process, side by side: to-fp32 (shards, fp32 and a bf16 cast) and
reshape, on a real DeepSpeed checkpoint (``make_checkpoint.py``), medians of alternating rounds.

    PYTHONPATH=. .venv/bin/python bench/bench_workers.py [--ckpt DIR] [--workers 1 2 4]

Every output is compared with the one-process output byte for byte. The page cache stays warm
(the first round warms it): what is measured is the work, not the disk.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
from pathlib import Path

from _measure import (
    DEFAULT_WORKDIR,
    alternating,
    bin_path,
    median,
    remove,
    render_table,
    run_measured,
)

JOBS = {
    "to-fp32 shards": ["to-fp32", "{ckpt}", "{out}", "--max-shard-size", "500MB"],
    "to-fp32 bf16 shards": [
        "to-fp32",
        "{ckpt}",
        "{out}",
        "--max-shard-size",
        "500MB",
        "--dtype",
        "bf16",
    ],
    "to-fp32 one file": ["to-fp32", "{ckpt}", "{out}.safetensors"],
    "reshape --dp 4": ["reshape", "{ckpt}", "{out}", "--dp", "4"],
}


def _same(a: Path, b: Path) -> bool:
    if a.is_file():
        return filecmp.cmp(a, b, shallow=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, default=DEFAULT_WORKDIR / "z2-s0.5" / "ckpt")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "workers")
    args = p.parse_args()
    dsckpt = bin_path("dsckpt")
    rows = []
    for job, template in JOBS.items():
        times: dict[int, list[float]] = {n: [] for n in args.workers}
        outs = {n: args.workdir / f"w{n}" for n in args.workers}
        for _, n in alternating(args.workers, args.repeats + 1):
            remove(outs[n]), remove(outs[n].with_suffix(".safetensors"))
            cmd = [dsckpt, *(a.format(ckpt=args.ckpt, out=outs[n]) for a in template), "-q",
                   "--workers", str(n)]  # fmt: skip
            m = run_measured(cmd, args.workdir / f"{n}.log")
            times[n].append(m.wall_s)
        base = args.workers[0]
        suffix = ".safetensors" if template[2].endswith(".safetensors") else ""
        same = all(
            _same(Path(f"{outs[base]}{suffix}"), Path(f"{outs[n]}{suffix}")) for n in args.workers
        )
        first = median(times[base][1:])  # round 0 warms the cache
        cells = [f"{median(times[n][1:]):.2f} s ({first / median(times[n][1:]):.2f}x)"
                 for n in args.workers]  # fmt: skip
        rows.append([job, *cells, "yes" if same else "NO"])
        for n in args.workers:
            remove(outs[n]), remove(outs[n].with_suffix(".safetensors"))
    print(render_table(["job", *(f"--workers {n}" for n in args.workers), "same bytes"], rows))
    sys.exit(0 if all(r[-1] == "yes" for r in rows) else 1)


if __name__ == "__main__":
    main()
