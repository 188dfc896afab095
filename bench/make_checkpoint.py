"""Make a large, real DeepSpeed checkpoint for the benchmarks, or reuse the cached one.

    python bench/make_checkpoint.py --stage 2 --scale 1     # 420M fp32 params, ZeRO-2, DP 2
    python bench/make_checkpoint.py --stage 2 --scale 0.5   # 210M params: half the model
    python bench/make_checkpoint.py --stage 3 --quick       # 50M params, for smoke tests

The model is a residual stack of ``Linear(h, h)`` layers plus a final LayerNorm: full size is 100
layers of hidden 2048 (202 tensors, 420M parameters); ``--scale`` multiplies the layer count, hence
the parameters and every file, without changing the tensor shapes, so a tool whose memory follows
the largest tensor stays flat while one that follows the model doubles. Scale 2 (839M) needs about
30 GB to train on two ranks (see PEAK_PER_MODEL_BYTE): more than a 24 GB machine has, where the
benchmarks show the doubling from scale 0.5 to 1 instead. DeepSpeed 0.19.8 trains one
step under torchrun (gloo, 2 ranks, fp32, ``torch.optim.AdamW`` through DeepSpeed's config, which
needs no compiled ops) and calls ``save_checkpoint``. The checkpoint, with the ``zero_to_fp32.py``
DeepSpeed copies next to it, lands in ``WORKDIR/<name>/ckpt``; ``made.json`` records how long
DeepSpeed took and the memory it used. A directory with ``made.json`` is reused as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _measure import (
    DEFAULT_WORKDIR,
    MB,
    child_env,
    fmt_mb,
    free_port,
    remove,
    run_measured,
    tree_bytes,
)

DP = 2
TAG = "global_step1"
MICRO_BATCH = 4
# DeepSpeed's default buckets (5e8 elements = 2 GB of fp32 per rank for ZeRO-2, a 1e9-element live
# parameter budget for ZeRO-3) would double the training footprint of two ranks on a 24 GB
# machine; smaller buckets change the speed of the step, never the saved checkpoint.
BUCKET = 50_000_000
# ZeRO-3 steps Adam one sub-group at a time; DeepSpeed's default (1e9 elements) makes one sub-group
# here and Adam's temporaries as large as a rank's whole partition. 1e8 gives a few sub-groups, as
# billion-parameter models have, and several fp32 flat groups per rank file for the tools to read.
SUB_GROUP = 100_000_000
# glibc's malloc raises its mmap threshold after each large free, so the 16 MB weights ZeRO-3
# gathers and frees land in heap arenas that are never returned: measured, it nearly doubled each
# rank's RSS. A fixed threshold keeps every tensor-sized block an mmap, released on free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
# Peak RSS of one rank per byte of fp32 model, measured on the full-size runs (make.json): ZeRO-2
# holds the whole model, a fp32 master copy of its half, its half of the gradients and Adam's two
# moments of that half (3x), plus Adam's temporaries; ZeRO-3 holds halves of everything. Used to
# refuse a run that would push a shared machine into the OOM killer.
PEAK_PER_MODEL_BYTE = {2: 4.1, 3: 3.4}
RANK_BASELINE = 300 * MB  # python + torch + deepspeed imported, per rank


@dataclass(frozen=True)
class Spec:
    """Which checkpoint: ZeRO stage, model scale, full or quick size."""

    stage: int
    scale: float = 1
    quick: bool = False

    @property
    def hidden(self) -> int:
        return 1024 if self.quick else 2048

    @property
    def layers(self) -> int:
        return round((48 if self.quick else 100) * self.scale)

    @property
    def params(self) -> int:
        h = self.hidden
        return self.layers * (h * h + h) + 2 * h  # Linear weights and biases, final LayerNorm

    @property
    def tensors(self) -> int:
        return 2 * self.layers + 2

    @property
    def name(self) -> str:
        return f"{'quick-' if self.quick else ''}z{self.stage}-s{self.scale:g}"

    def label(self) -> str:
        return f"ZeRO-{self.stage} {self.params / 1e6:,.0f}M"


@dataclass(frozen=True)
class Made:
    """A checkpoint on disk and what making it cost."""

    spec: Spec
    ckpt: Path  # the save_dir (holds `latest`, the tag directory and zero_to_fp32.py)
    make_s: float  # wall time of the whole torchrun, start-up included
    phases: dict[str, float]  # rank 0's init / step / save seconds
    peak_total: int  # bytes: both ranks and torchrun (sampled sum, or the ranks' peaks added)
    peak_ranks: list[int]  # bytes: each rank's exact ru_maxrss
    disk: int  # bytes under ckpt
    cached: bool = False

    @property
    def tag_dir(self) -> Path:
        return self.ckpt / TAG

    def optim_files(self) -> list[Path]:
        return sorted(self.tag_dir.glob("*optim_states.pt"))


def paths(spec: Spec, workdir: Path) -> tuple[Path, Path]:
    """(checkpoint save_dir, made.json) of a spec."""
    base = workdir / spec.name
    return base / "ckpt", base / "made.json"


def ensure_checkpoint(
    spec: Spec, workdir: Path = DEFAULT_WORKDIR, say: Any = print, check_memory: bool = True
) -> Made:
    """The cached checkpoint of ``spec``, made first with DeepSpeed if absent."""
    ckpt, record = paths(spec, workdir)
    if record.exists() and (ckpt / "latest").exists():
        data = json.loads(record.read_text())
        return Made(
            spec=spec,
            ckpt=ckpt,
            make_s=data["make_s"],
            phases=data["phases"],
            peak_total=data["peak_total"],
            peak_ranks=data["peak_ranks"],
            disk=data["disk"],
            cached=True,
        )
    if check_memory:
        _check_memory(spec)
    # A directory without made.json is a run that died half way: start over.
    remove(ckpt.parent)
    ckpt.parent.mkdir(parents=True)
    say(f"making {spec.name}: {spec.label()} params, {spec.tensors} tensors (DeepSpeed, 2 ranks)")
    made = _train_and_save(spec, ckpt)
    fields = {k: v for k, v in asdict(made).items() if k not in ("spec", "ckpt", "cached")}
    record.write_text(json.dumps({**fields, "spec": asdict(spec)}, indent=2) + "\n")
    return made


def estimated_peak(spec: Spec) -> int:
    """Bytes both ranks together are expected to need at their peak."""
    return int(DP * (PEAK_PER_MODEL_BYTE[spec.stage] * 4 * spec.params + RANK_BASELINE))


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _check_memory(spec: Spec) -> None:
    need, have = estimated_peak(spec), mem_available()
    if need > have:
        raise SystemExit(
            f"making {spec.name} ({spec.params / 1e6:,.0f}M params) needs about "
            f"{need / 1e9:.0f} GB for DeepSpeed's two ranks but only {have / 1e9:.0f} GB is "
            "available: use a smaller "
            "--scale, or --ignore-memory-check on a machine whose page cache can be reclaimed"
        )


def _train_and_save(spec: Spec, ckpt: Path) -> Made:
    base = ckpt.parent
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(DP),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--stage",
        str(spec.stage),
        "--scale",
        f"{spec.scale:g}",
        "--save",
        str(ckpt),
        "--report",
        str(base / "ranks.json"),
    ]
    if spec.quick:
        cmd.append("--quick")
    # One thread per rank: two ranks share two cores, and oversubscription only slows them.
    run = run_measured(
        cmd, base / "make.log", env=child_env({"OMP_NUM_THREADS": "1", **MALLOC_ENV})
    )
    ranks = json.loads((base / "ranks.json").read_text())
    return Made(
        spec=spec,
        ckpt=ckpt,
        make_s=run.wall_s,
        phases=ranks["phases"],
        peak_total=max(run.tree_rss, sum(ranks["peak_rss"])),
        peak_ranks=ranks["peak_rss"],
        disk=tree_bytes(ckpt),
    )


# --------------------------------------------------------------------------- the torchrun worker


def build_model(spec: Spec) -> Any:
    import torch
    from torch import nn

    class ResidualStack(nn.Module):
        """x + tanh(Wx + b) per layer: the skip path keeps gradients alive through 100+ layers."""

        def __init__(self, hidden: int, layers: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
            self.norm = nn.LayerNorm(hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = x + torch.tanh(layer(x))
            return self.norm(x)

    torch.manual_seed(0)
    return ResidualStack(spec.hidden, spec.layers)


def ds_config(spec: Spec) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": spec.stage, "reduce_bucket_size": BUCKET}
    if spec.stage == 3:
        zero |= {
            "sub_group_size": SUB_GROUP,
            "stage3_prefetch_bucket_size": BUCKET,
            "stage3_max_live_parameters": 2 * BUCKET,
            "stage3_max_reuse_distance": 2 * BUCKET,
        }
    else:
        zero["allgather_bucket_size"] = BUCKET
    return {
        "train_batch_size": MICRO_BATCH * DP,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1_000_000,
        "optimizer": {
            "type": "AdamW",
            "params": {"torch_adam": True, "lr": 1e-4, "weight_decay": 0.01},
        },
        "zero_optimization": zero,
    }


def _vm(field: str) -> int:
    """A /proc/self/status memory field (VmRSS: now, VmHWM: peak so far) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Phases:
    """Seconds, RSS and peak RSS after each phase of a rank, to see where the memory goes."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.seconds: dict[str, float] = {}
        self.rss_mb: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[f"{name}_s"] = time.perf_counter() - start
        self.rss_mb[name] = _vm("VmRSS") // MB
        self.rss_mb[f"{name}_peak"] = _vm("VmHWM") // MB
        # Printed as it happens: a run that the OOM killer ends still says how far it got.
        seconds, now = self.seconds[f"{name}_s"], self.rss_mb[name]
        peak = self.rss_mb[f"{name}_peak"]
        print(f"rank {self.rank} {name}: {seconds:.1f} s, RSS {now} MB, peak {peak} MB", flush=True)


def worker(spec: Spec, save: Path, report: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    phase = Phases(rank)
    with phase("init"):
        engine, _, _, _ = deepspeed.initialize(
            model=build_model(spec), model_parameters=None, config=ds_config(spec)
        )
    with phase("backward"):
        batch = torch.randn(MICRO_BATCH, spec.hidden, generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(batch).pow(2).mean())
    with phase("step"):
        engine.step()
    with phase("save"):
        engine.save_checkpoint(str(save), tag=TAG)

    peaks: list[Any] = [None] * dist.get_world_size()
    # VmHWM, not ru_maxrss: the latter also counts torchrun's memory at the fork that made the rank.
    dist.all_gather_object(peaks, _vm("VmHWM"))
    if rank == 0:
        report.write_text(
            json.dumps({"phases": phase.seconds, "peak_rss": peaks, "rss_mb": phase.rss_mb}) + "\n"
        )
    dist.barrier()
    dist.destroy_process_group()  # a rare gloo abort at exit was seen without it


# --------------------------------------------------------------------------------- command line


def describe(made: Made) -> str:
    ranks = ", ".join(fmt_mb(p) for p in made.peak_ranks)
    phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in made.phases.items())
    how = "cached" if made.cached else "made"
    return (
        f"{made.spec.name}: {how}; DeepSpeed took {made.make_s:.1f} s ({phases} s on rank 0), "
        f"peak {fmt_mb(made.peak_total)} MB for both ranks (per rank {ranks} MB), "
        f"{made.disk / MB:,.0f} MB on disk at {made.ckpt}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", type=int, choices=(2, 3), default=2)
    p.add_argument(
        "--scale",
        type=float,
        choices=(0.5, 1, 2),
        default=1,
        help="multiplies the layer count (default 1: 420M params)",
    )
    p.add_argument("--quick", action="store_true", help="a 50M-parameter model instead of 420M")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--force", action="store_true", help="remake even if cached")
    p.add_argument(
        "--ignore-memory-check",
        action="store_true",
        help="make it even if the estimated peak exceeds MemAvailable",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = Spec(stage=args.stage, scale=args.scale, quick=args.quick)
    if args.worker:
        worker(spec, args.save, args.report)
        return
    if args.force:
        remove(paths(spec, args.workdir)[0].parent)
    print(
        describe(ensure_checkpoint(spec, args.workdir, check_memory=not args.ignore_memory_check))
    )


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
