"""The planning scale curve: discovery and planning time and memory against counts.

    python bench/bench_planning.py                         # ZeRO-2 and ZeRO-3, the default grid
    python bench/bench_planning.py --stages 2 --repeats 1  # one stage, one run per point
    python bench/bench_planning.py --quick                 # DP 16-64, 200-1,000 params
    python bench/bench_planning.py --stages --layers 100 200 400 800   # the pipeline curve only

Issue 16's target: planning for 1,024 DP ranks x 20,000 parameters in under 10 s and under 1 GB,
growing linearly. The checkpoints are synthetic (make_synthetic.py: DeepSpeed's exact files, tiny
tensors), cached in WORKDIR/synthetic/<name> (a directory counts once its synthetic.json exists).
The grid is two sweeps through one corner: DP at the largest parameter count, parameters at the
largest DP. Every point runs three probes, each a fresh process started by _measure's launcher
(exact peak RSS from wait4): discovery alone (``dsckpt.open_checkpoint``), discovery + the
to-fp32 plan (``dsckpt.api.consolidation.plan_for``), discovery + the reshape plan
(``dsckpt.plan.zero_source.plan_reshape`` to half the DP). A probe prints its own phase timings, so
start-up (interpreter, imports) is not counted as planning. The slopes of each sweep give the
cost per rank file (at the largest parameter count) and per parameter (at the largest DP).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _measure import DEFAULT_WORKDIR, MB, child_env, median, render_table, run_measured

HERE = Path(__file__).resolve().parent
TARGET_S, TARGET_BYTES = 10.0, 1_000_000_000
PROBES = ("discover", "to-fp32", "reshape")


def probe(ckpt: str, what: str) -> None:
    """Runs in the measured child: time discovery, then one plan; print JSON."""
    started, started_cpu = time.perf_counter(), time.process_time()
    from dsckpt.discover.layout import open_checkpoint

    layout = open_checkpoint(ckpt)
    found, found_cpu = time.perf_counter(), time.process_time()
    if what == "to-fp32":
        from dsckpt.api.consolidation import plan_for

        plan_for(layout)
    elif what == "reshape" and layout.kind == "pipeline":
        from dsckpt.plan.pipeline_reshape import plan_pipeline

        plan_pipeline(layout, tp=1, pp=1, dp=1)  # merge every stage and TP slice
    elif what == "reshape":
        from dsckpt.plan.zero_source import plan_reshape

        plan_reshape(layout, max(1, layout.dp // 2))
    done, done_cpu = time.perf_counter(), time.process_time()
    # CPU seconds beside wall seconds: on a shared machine the wall clock also counts the time
    # spent waiting for a core, which is not planning's cost.
    print(
        json.dumps(
            {
                "discover_s": found - started,
                "plan_s": done - found,
                "discover_cpu_s": found_cpu - started_cpu,
                "plan_cpu_s": done_cpu - found_cpu,
            }
        )
    )


def ensure(workdir: Path, stage: int, dp: int, params: int) -> Path:
    sys.path.insert(0, str(HERE))
    from make_synthetic import Spec, make

    path = workdir / "synthetic" / f"z{stage}-dp{dp}-p{params}"
    if not (path / "synthetic.json").exists():
        made = make(Spec(stage=stage, dp=dp, params=params), path, force=True)
        print(
            f"  made {path.name}: {made.files} files, {made.bytes / MB:,.0f} MB "
            f"in {made.seconds:.0f} s",
            flush=True,
        )
    return path


def ensure_pipeline(workdir: Path, layers: int) -> Path:
    sys.path.insert(0, str(HERE))
    from make_synthetic import PipeSpec, make_pipeline

    path = workdir / "synthetic" / f"pipe-pp2-tp2-L{layers}"
    if not (path / "synthetic.json").exists():
        made = make_pipeline(PipeSpec(layers=layers), path, force=True)
        print(f"  made {path.name}: {made.files} files in {made.seconds:.0f} s", flush=True)
    return path / "ckpt"


def pipeline_curve(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Discovery and plans against the layer-file count (PP 2 x TP 2, DeepSpeed's own saves)."""
    rows, results = [], []
    for layers in args.layers:
        path = ensure_pipeline(args.workdir, layers)
        files = (layers + 2) * 2
        res: dict[str, Any] = {"kind": "pipeline", "layers": layers, "layer_files": files}
        cells = ["pipeline", f"{layers:,}", f"{files:,}"]
        for what in args.probes:
            ms = [
                measure(
                    path,
                    what,
                    args.workdir / "logs" / f"plan-pipe-{layers}-{what}-{r}.log",
                    args.tree,
                )
                for r in range(args.repeats)
            ]
            v = res[what] = {k: median([m[k] for m in ms]) for k in ms[0]}
            total = v["discover_s"] + (v["plan_s"] if what != "discover" else 0)
            cpu = v["discover_cpu_s"] + (v["plan_cpu_s"] if what != "discover" else 0)
            cells += [f"{total:.2f} ({cpu:.2f})", f"{v['peak_rss'] / MB:,.0f}"]
        rows.append(cells)
        results.append(res)
        print("  " + "  ".join(cells), flush=True)
    headers = ["kind", "layers", "layer files"]
    for what in args.probes:
        headers += [f"{what} s (cpu s)", f"{what} MB"]
    print()
    print(render_table(headers, rows))
    for what in args.probes:
        xs = [r["layer_files"] for r in results]

        def cpu(r: dict[str, Any], w: str = what) -> float:
            v = r[w]
            return v["discover_cpu_s"] + (v["plan_cpu_s"] if w != "discover" else 0)

        per = slope(xs, [cpu(r) for r in results])
        if per is not None:
            print(f"pipeline {what}: {per * 1e3:.2f} ms cpu per layer file")
    return results


def measure(path: Path, what: str, log: Path, tree: Path = HERE.parent) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(path), what]
    # The probe imports the dsckpt of ``tree`` (this checkout unless --tree says otherwise), not
    # whichever one the interpreter has installed.
    m = run_measured(cmd, log, check=True, env=child_env({"PYTHONPATH": str(tree)}))
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1])
    return {**out, "peak_rss": m.peak_rss, "wall_s": m.wall_s}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", nargs=2, metavar=("CKPT", "WHAT"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--dps", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--params", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--layers",
        type=int,
        nargs="*",
        default=[],
        help="also the pipeline curve: Megatron-DeepSpeed checkpoints of these many transformer "
        "layers (PP 2 x TP 2: 2 x (layers + 2) layer files), saved by real DeepSpeed",
    )
    ap.add_argument("--quick", action="store_true", help="DP 16-64, 200-1,000 parameters")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument(
        "--tree",
        type=Path,
        default=HERE.parent,
        help="the checkout whose dsckpt is measured (default: this one; another, e.g. an "
        "older commit's worktree, for a before/after)",
    )
    args = ap.parse_args(argv)
    if args.probe:
        probe(*args.probe)
        return 0
    if args.quick:
        args.dps, args.params = [16, 32, 64], [200, 500, 1000]
    top_dp, top_params = max(args.dps), max(args.params)
    points = sorted({(dp, top_params) for dp in args.dps} | {(top_dp, p) for p in args.params})
    rows, results = [], []
    for stage in args.stages:
        for dp, params in points:
            path = ensure(args.workdir, stage, dp, params)
            runs: dict[str, list[dict[str, float]]] = {w: [] for w in args.probes}
            for r in range(args.repeats):
                for what in args.probes:
                    log = args.workdir / "logs" / f"plan-z{stage}-{dp}-{params}-{what}-{r}.log"
                    runs[what].append(measure(path, what, log, args.tree))
            res: dict[str, Any] = {"stage": stage, "dp": dp, "params": params}
            for what, ms in runs.items():
                res[what] = {k: median([m[k] for m in ms]) for k in ms[0]}
            results.append(res)
            cells = [f"ZeRO-{stage}", f"{dp:,}", f"{params:,}"]
            for what in args.probes:
                v = res[what]
                total = v["discover_s"] + (v["plan_s"] if what != "discover" else 0)
                cpu = v["discover_cpu_s"] + (v["plan_cpu_s"] if what != "discover" else 0)
                cells += [f"{total:.2f} ({cpu:.2f})", f"{v['peak_rss'] / MB:,.0f}"]
            rows.append(cells)
            print("  " + "  ".join(cells), flush=True)
    headers = ["stage", "DP", "params"]
    for what in args.probes:
        headers += [f"{what} s (cpu s)", f"{what} MB"]
    print()
    print(render_table(headers, rows))
    print()
    for stage in args.stages:
        mine = [r for r in results if r["stage"] == stage]
        for what in args.probes:

            def total(r: dict[str, Any], w: str = what, unit: str = "s") -> float:
                v = r[w]
                return v[f"discover_{unit}"] + (v[f"plan_{unit}"] if w != "discover" else 0)

            by_dp = [r for r in mine if r["params"] == top_params]
            by_p = [r for r in mine if r["dp"] == top_dp]
            per_file = slope([r["dp"] for r in by_dp], [total(r) for r in by_dp])
            per_param = slope([r["params"] for r in by_p], [total(r) for r in by_p])
            cpu_file = slope([r["dp"] for r in by_dp], [total(r, unit="cpu_s") for r in by_dp])
            cpu_param = slope([r["params"] for r in by_p], [total(r, unit="cpu_s") for r in by_p])
            corner = next((r for r in mine if (r["dp"], r["params"]) == (top_dp, top_params)), None)
            verdict = ""
            if corner and (top_dp, top_params) == (1024, 20000):
                t, mem = total(corner), corner[what]["peak_rss"]
                ok = t < TARGET_S and mem < TARGET_BYTES
                verdict = (
                    f"; 1,024 x 20,000: {t:.1f} s ({total(corner, unit='cpu_s'):.1f} s cpu), "
                    f"{mem / MB:,.0f} MB: {'met' if ok else 'MISSED'} (target < 10 s, < 1 GB)"
                )
            f = "n/a" if per_file is None else f"{per_file * 1e3:.1f} ms"
            p = "n/a" if per_param is None else f"{per_param * 1e6:.1f} us"
            if cpu_file is not None:
                f += f" ({cpu_file * 1e3:.1f} ms cpu)"
            if cpu_param is not None:
                p += f" ({cpu_param * 1e6:.1f} us cpu)"
            print(
                f"ZeRO-{stage} {what}: {f} per rank file (at {top_params:,} params), "
                f"{p} per parameter (at DP {top_dp:,}){verdict}"
            )
    if args.layers:
        results += pipeline_curve(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
