"""Benchmark ``dsckpt reshape --dp`` against DeepSpeed's universal-checkpoint converter.

    python bench/bench_reshape.py                   # ZeRO-2, DP 2, 420M params -> DP 4 and DP 1
    python bench/bench_reshape.py --scales 0.5 1    # 210M and 420M: does memory grow?
    python bench/bench_reshape.py --quick           # 50M params: a smoke test

DeepSpeed cannot load a ZeRO checkpoint at another data-parallel size; its route is
``ds_to_universal`` (one conversion into a per-parameter "universal" checkpoint that a run started
with ``load_universal`` reads at any DP). dsckpt writes the target DP's own checkpoint directly.
Both are run alternately on the same checkpoint (made by make_checkpoint.py), A B C A B C ...,
each measured for wall time and peak memory. ``ds_to_universal`` fans out to worker processes, so
its memory is the sampled sum over its process tree (see _measure.py). The reshaped checkpoints
are then checked with DeepSpeed's own reader: ``zero_to_fp32`` on each must give bit-identical
weights to ``zero_to_fp32`` on the original.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _measure import (
    DEFAULT_WORKDIR,
    MB,
    Measurement,
    alternating,
    bin_path,
    child_env,
    dsckpt_has,
    fmt_mb,
    fmt_ratio,
    median,
    remove,
    render_table,
    run_measured,
    tree_bytes,
)
from bench_to_fp32 import check_deepspeed_cli, compare_outputs, deepspeed_command, prepare_run
from make_checkpoint import TAG, Made, Spec, describe, ensure_checkpoint

UNIVERSAL = "ds_to_universal"
TARGET_SPEEDUP = 3.0  # issue 5: at least 3x faster than ds_to_universal
TARGET_GROWTH = 0.10  # "memory that does not grow with the model": < 10% when it doubles


@dataclass
class Runs:
    """Every timed run of every tool, and what each output turned out to be."""

    by_tool: dict[str, list[Measurement]] = field(default_factory=dict)
    out_bytes: dict[str, int] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)

    def wall(self, tool: str) -> float:
        return median([m.wall_s for m in self.by_tool[tool]])

    def mem(self, tool: str) -> float:
        # ds_to_universal fans out to worker processes: the tree's sum is the fair figure.
        return median([m.tree_rss for m in self.by_tool[tool]])


def universal_command(made: Made, out: Path, args: argparse.Namespace) -> list[str]:
    # --inject_missing_state: a checkpoint from a plain DeepSpeed run (no Megatron) lacks the
    # universal_checkpoint_info the converter asserts on; the flag fills in defaults.
    return [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(made.ckpt / TAG),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        str(args.extract_workers),
        "--num_merge_workers",
        str(args.merge_workers),
        "--inject_missing_state",
    ]


def reshape_flags() -> list[str]:
    """--force / --quiet where the installed reshape command has them."""
    done = subprocess.run(
        [bin_path("dsckpt"), "reshape", "--help"],
        capture_output=True,
        text=True,
        env=child_env({"COLUMNS": "200"}),
    )
    return [flag for flag in ("--force", "--quiet") if flag in done.stdout]


def dsckpt_command(made: Made, out: Path, dp: int, flags: list[str]) -> list[str]:
    return [bin_path("dsckpt"), "reshape", str(made.ckpt), str(out), "--dp", str(dp), *flags]


def tool_commands(made: Made, args: argparse.Namespace) -> dict[str, tuple[list[str], Path]]:
    """Every tool's command and its output directory."""
    root = args.workdir / "out-reshape" / made.spec.name
    out = root / "universal"
    tools = {UNIVERSAL: (universal_command(made, out, args), out)}
    if dsckpt_has("reshape"):
        flags = reshape_flags()
        for dp in args.dp:
            out = root / f"dp{dp}"
            tools[f"dsckpt reshape --dp {dp}"] = (dsckpt_command(made, out, dp, flags), out)
    else:
        print("dsckpt reshape not available: timing ds_to_universal only")
    return tools


def run_all(made: Made, args: argparse.Namespace) -> tuple[Runs, dict[str, Path]]:
    tools = tool_commands(made, args)
    runs = Runs()
    logs = args.workdir / "logs" / f"reshape-{made.spec.name}"
    for round_no, tool in alternating(list(tools), args.repeats):
        cmd, out = tools[tool]
        remove(out)
        prepare_run(cold=False)
        run = run_measured(cmd, logs / f"{tool.replace(' ', '_')}-{round_no}.log")
        runs.by_tool.setdefault(tool, []).append(run)
        runs.out_bytes[tool] = tree_bytes(out)
        print(
            f"  {tool:<24} run {round_no + 1}: {run.wall_s:6.1f} s, peak {fmt_mb(run.tree_rss)} "
            f"MB (largest process {fmt_mb(run.peak_rss)} MB)",
            flush=True,
        )
    return runs, {tool: out for tool, (_, out) in tools.items()}


def verify(made: Made, outputs: dict[str, Path], runs: Runs, args: argparse.Namespace) -> None:
    """zero_to_fp32 on every reshaped checkpoint against zero_to_fp32 on the original."""
    if set(outputs) == {UNIVERSAL}:  # nothing of dsckpt's to check
        return
    check = args.workdir / "out-reshape" / made.spec.name / "check"
    reference = check / "original"
    remove(check)
    run_measured(deepspeed_command(made, reference, "safetensors"), check / "original.log")
    for tool, out in outputs.items():
        if tool == UNIVERSAL:
            continue
        got = check / tool.split()[-1]
        reshaped = Made(
            spec=made.spec, ckpt=out, make_s=0, phases={}, peak_total=0, peak_ranks=[], disk=0
        )
        try:
            run_measured(deepspeed_command(reshaped, got, "safetensors"), check / f"{got.name}.log")
            runs.checks[tool] = compare_outputs(reference, got)
        except RuntimeError as exc:  # the reshaped checkpoint is what is being tested
            runs.checks[tool] = f"zero_to_fp32 FAILED on it: {str(exc).splitlines()[0]}"
    remove(check)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def summary(results: list[tuple[Made, Runs]]) -> str:
    """The issue's targets: speed against ds_to_universal per size, and memory growth."""
    lines = ["== targets =="]
    for made, runs in results:
        for tool in runs.by_tool:
            if tool == UNIVERSAL:
                continue
            ratio = runs.wall(UNIVERSAL) / runs.wall(tool)
            ok = verdict(ratio >= TARGET_SPEEDUP)
            lines.append(
                f"{made.spec.label()} params, {tool}: {ratio:.1f}x faster than "
                f"{UNIVERSAL}, target {TARGET_SPEEDUP:g}x {ok}"
            )
    by_scale = sorted(results, key=lambda r: r[0].spec.scale)
    for (small, a), (large, b) in zip(by_scale, by_scale[1:], strict=False):
        if large.spec.scale != 2 * small.spec.scale:
            continue
        for tool in a.by_tool:
            if tool not in b.by_tool:
                continue
            change = b.mem(tool) / a.mem(tool) - 1
            mark = (
                ""
                if tool == UNIVERSAL
                else f", target < {TARGET_GROWTH:.0%} {verdict(change < TARGET_GROWTH)}"
            )
            lines.append(
                f"{tool}: peak {fmt_mb(a.mem(tool))} MB at {small.spec.label()}, "
                f"{fmt_mb(b.mem(tool))} MB at {large.spec.label()} "
                f"({change:+.1%}){mark}"
            )
    return "\n".join(lines)


def report(made: Made, runs: Runs) -> str:
    base = runs.wall(UNIVERSAL), runs.mem(UNIVERSAL)
    rows = []
    for tool, measured in runs.by_tool.items():
        walls = [m.wall_s for m in measured]
        rows.append(
            [
                tool,
                f"{median(walls):.1f}",
                f"{min(walls):.1f}-{max(walls):.1f}",
                str(len(walls)),
                fmt_mb(runs.mem(tool)),
                fmt_mb(median([m.peak_rss for m in measured])),
                fmt_mb(runs.out_bytes[tool]),
                "-" if tool == UNIVERSAL else fmt_ratio(base[0] / runs.wall(tool)),
                "-" if tool == UNIVERSAL else fmt_ratio(base[1] / runs.mem(tool)),
                runs.checks.get(tool, "-"),
            ]
        )
    headers = [
        "tool",
        "wall s",
        "range",
        "runs",
        "peak MB (tree)",
        "largest proc MB",
        "out MB",
        "time DS/dsckpt",
        "RSS DS/dsckpt",
        "zero_to_fp32 on output",
    ]
    return "\n".join(
        [
            "",
            "== checkpoint ==",
            describe(made),
            "",
            f"== reshape {made.spec.label()} params, DP 2: medians ==",
            render_table(headers, rows),
            "",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="scratch dir for checkpoints, outputs and logs (default %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per tool (default 3)")
    p.add_argument("--quick", action="store_true", help="a 50M-parameter model: a smoke test")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        choices=(0.5, 1, 2),
        default=[1],
        help="model scales (make_checkpoint.py --scale), each benchmarked in turn; "
        "two that double show the memory growth (default 1: 420M)",
    )
    p.add_argument("--dp", type=int, nargs="+", default=[4, 1], help="target DP sizes (4 1)")
    p.add_argument(
        "--extract-workers",
        type=int,
        default=4,
        help="ds_to_universal --num_extract_workers (its default, 4)",
    )
    p.add_argument(
        "--merge-workers",
        type=int,
        default=2,
        help="ds_to_universal --num_merge_workers (its default, 2)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the zero_to_fp32 check")
    p.add_argument("--keep-outputs", action="store_true", help="keep the converted checkpoints")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_deepspeed_cli()
    results = []
    for scale in args.scales:
        made = ensure_checkpoint(Spec(stage=2, scale=scale, quick=args.quick), args.workdir)
        print(describe(made), flush=True)
        runs, outputs = run_all(made, args)
        if not args.no_verify:
            verify(made, outputs, runs, args)
        print(report(made, runs), flush=True)
        if not args.keep_outputs:
            remove(args.workdir / "out-reshape" / made.spec.name)
        results.append((made, runs))
    if any(tool != UNIVERSAL for _, runs in results for tool in runs.by_tool):
        print(summary(results))
    print(f"workdir {args.workdir}: {tree_bytes(args.workdir) / MB:,.0f} MB on disk")


if __name__ == "__main__":
    main()
