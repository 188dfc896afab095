"""Real DeepSpeed resumes reshaped MoE checkpoints at the new DP (and EP) size as if never stopped.

Each case takes a committed MoE fixture (saved after 3 steps at DP A, see
tests/fixtures/moe/FORMAT-NOTES.md), reshapes it to DP B, with the expert-parallel size kept
(``CASES``) or changed to M (``EP_CASES``, ``reshape --ep``), in-process with dsckpt only, and
resumes it in unmodified DeepSpeed at B (the model built with EP M) for 3 more steps with
``engine.load_checkpoint``, the same model and config (tests/fixtures/train_moe.py). It is
compared with two runs that were never interrupted:

* at A: the fixture resumed at its own size (bitwise steps 4-6 of a straight 6-step run, as
  the fixture's ``resume_check`` shows; its losses are ``resume_check.straight_losses[3:]``);
* at B: a straight 6-step run from scratch at B (and EP M), which also saves after 3 steps:
  the reshaped files must carry that save's keys, bookkeeping and shapes.

Losses do not depend on DP or EP, so the resumed run must land on both, within the drift
between A and B themselves (the order of the gradient reductions changes with DP). Lost or
misplaced expert state misses by orders more (the tests show it on deliberately broken
checkpoints: the expert groups' Adam moments of two EP ranks swapped; after an EP change, the
experts laid out EP rank by EP rank instead of layer by layer).

Cost: this module is also the torchrun driver. One launch per world size (2, 4 and 8) runs
every engine of that size one after another: three launches in all (about 2-3 minutes on 2
cores), in a session-scoped fixture. Set
``DSCKPT_MOE_RESUME_RUNS=DIR`` to keep the runs and check them again without relaunching.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
MOE = FIXTURES / "moe"
STEPS = 3  # the fixtures were saved after 3 steps; 3 more are resumed

# name -> target DP. Shrink and grow, ZeRO-1 and ZeRO-2, fp32, bf16 (ZeRO-2 and
# BF16_Optimizer), EP 1, a residual MoE, and AutoEP on a tiny Mixtral.
CASES: dict[str, int] = {
    "z1-fp32-ep2-dp4": 2,  # shrink: the expert groups go from EDP 2 to EDP 1
    "z2-fp32-ep2-dp2": 4,  # grow: EDP 1 -> 2
    "z2-bf16-ep2-dp2": 4,
    "z1-bf16-ep2-dp2": 4,  # BF16_Optimizer
    "z2-fp32-ep1-dp2": 4,  # EP 1: the expert groups span every rank
    "z2-fp32-ep2-dp4-residual": 2,
    "autoep-z2-fp32-ep2-dp2": 4,
    "autoep-z2-bf16-ep2-dp4": 2,
    # Two EP sizes (2 and 4), expert groups with padding: DP 8 is the first size both divide.
    "z2-fp32-ep2x4-dp4-mixed": 8,
}
# name -> (target DP, target EP): `reshape --ep`, native MoE with one EP size. EP 2 -> 1 and
# 2 -> 4 (ZeRO-1, ZeRO-2, bf16, BF16_Optimizer), 4 -> 2 while shrinking (the 8-ranks-at-EP-8 to
# 4-ranks story at fixture size), 1 -> 2 while growing, and a residual MoE.
EP_CASES: dict[str, tuple[int, int]] = {
    "z2-fp32-ep2-dp2": (2, 1),
    "z1-fp32-ep2-dp4": (4, 4),
    "z2-fp32-ep4-dp4-top2": (2, 2),
    "z2-bf16-ep2-dp2": (4, 4),
    "z1-bf16-ep2-dp2": (2, 1),
    "z2-fp32-ep1-dp2": (4, 2),
    "z2-fp32-ep2-dp4-residual": (4, 1),
}
# A broken reshape for the control: the expert groups' moments of EP ranks 0 and 1 swapped.
CONTROL = "z2-fp32-ep2-dp2"
# The EP-change control: EP 4 -> 2 with each EP rank's experts laid out source EP rank by source
# EP rank (layer 0 expert 0, layer 1 expert 0, layer 0 expert 1, ...) instead of module order.
EP_CONTROL = "z2-fp32-ep4-dp4-top2"


def _target(name: str, ep: bool) -> tuple[int, int | None]:
    """(target DP, target EP or None when kept) of a case."""
    return EP_CASES[name] if ep else (CASES[name], None)


def _label(name: str, ep: bool) -> str:
    """The case's reshaped checkpoint and straight run are ``<label>`` and
    ``<label>-straight``: ``z2-fp32-ep2-dp2-to-dp4``, ``z2-fp32-ep2-dp2-to-dp2-ep1``."""
    b, m = _target(name, ep)
    return f"{name}-to-dp{b}" + (f"-ep{m}" if m is not None else "")


def _facts(name: str) -> dict[str, Any]:
    return json.loads((MOE / name / "facts.json").read_text())


def _train_args(name: str, ep: int | None = None) -> list[str]:
    """The fixture's own training arguments, without its step count; with ``ep``, the model
    built at that expert-parallel size."""
    args = list(_facts(name)["train_args"])
    at = args.index("--steps")
    args = args[:at] + args[at + 2 :]
    if ep is not None:
        assert "--ep2" not in args
        args[args.index("--ep") + 1] = str(ep)
    return args


# --------------------------------------------------------------------------------------------
# The torchrun side
# --------------------------------------------------------------------------------------------


def _drive(spec_path: str) -> None:
    """Run the jobs of a spec file, one DeepSpeed engine after another, in this torchrun world."""
    import gc

    import deepspeed
    import torch.distributed as dist

    sys.path.insert(0, str(FIXTURES))
    import train_moe as tm

    spec = json.loads(Path(spec_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    for job in spec["jobs"]:
        args = tm.parse_args([*job["train_args"], "--steps", str(job["steps"])])
        args.weights_out = Path(job["result"]).with_suffix(".weights.pt")
        args.optim_out = Path(job["result"]).with_suffix(".optim.pt")
        engine = tm.build_engine(args)
        if job.get("load"):
            path, _ = engine.load_checkpoint(
                job["load"], load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise RuntimeError(f"nothing loaded from {job['load']}")
        losses = []
        if job.get("save"):  # the straight run also saves where the fixture was saved
            args.steps = STEPS
            losses += tm.train(engine, args)
            engine.save_checkpoint(job["save"])
            args.steps = job["steps"] - STEPS
        losses += tm.train(engine, args)
        tm.write_references(engine, args)
        if dist.get_rank() == 0:
            Path(job["result"]).write_text(
                json.dumps({"losses": losses, "global_steps": engine.global_steps})
            )
        dist.barrier()
        engine.destroy()
        del engine
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _drive(sys.argv[1])
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# The pytest side
# --------------------------------------------------------------------------------------------

from conftest import ResumeRuns  # noqa: E402


class Runs(ResumeRuns):
    """The runs' results, loaded lazily by the tests."""

    def result(self, label: str) -> dict[str, Any]:
        import torch

        where = self.work / label / "result.json"
        out = json.loads(where.read_text())
        out["weights"] = torch.load(where.with_suffix(".weights.pt"), weights_only=True)
        out["optim"] = torch.load(where.with_suffix(".optim.pt"), weights_only=True)
        return dict(out)


def _job(
    work: Path, label: str, train_args: list[str], steps: int, load: Path | None, save: bool = False
) -> dict:
    (work / label).mkdir(parents=True)
    job: dict[str, Any] = {
        "train_args": train_args,
        "steps": steps,
        "result": str(work / label / "result.json"),
    }
    if load is not None:
        job["load"] = str(load)
    if save:
        job["save"] = str(work / label / "ckpt")
    return job


def _swap_expert_moments(ckpt: Path) -> None:
    """Break a reshaped checkpoint on purpose: rank files 0 and 1 (EP ranks 0 and 1) trade
    their expert groups' Adam moments, as a reshape that misplaced EP ranks would."""
    import torch

    tag = (ckpt / "latest").read_text()
    files = [ckpt / tag / f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in (0, 1)]
    sds = [torch.load(f, weights_only=False) for f in files]
    states = [sd["optimizer_state_dict"]["base_optimizer_state"]["state"] for sd in sds]
    groups = sds[0]["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    for group in groups:
        if group.get("moe"):
            (index,) = group["params"]
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = states[0][index][key], states[1][index][key]
                states[0][index][key], states[1][index][key] = b, a
    for f, sd in zip(files, sds, strict=True):
        torch.save(sd, f)


def _interleave_experts(ckpt: Path) -> None:
    """Break an EP 4 -> 2 reshape on purpose (EDP 1: each rank file holds its EP rank's experts
    whole): lay each expert group out as a reshape that concatenated the two source EP ranks'
    buffers would (layer 0 expert 0, layer 1 expert 0, layer 0 expert 1, layer 1 expert 1)
    instead of module order (layer 0 experts 0-1, then layer 1's). The shapes all match, so
    DeepSpeed loads it; only the values are misplaced."""
    import torch

    tag = (ckpt / "latest").read_text()
    for file in sorted((ckpt / tag).glob("zero_pp_rank_*_optim_states.pt")):
        sd = torch.load(file, weights_only=False)
        osd = sd["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for g, group in enumerate(base["param_groups"]):
            if not group.get("moe"):
                continue
            (index,) = group["params"]
            tensors = [osd["single_partition_of_fp32_groups"][g]]
            tensors += [base["state"][index][k] for k in ("exp_avg", "exp_avg_sq")]
            for t in tensors:
                blocks = t.detach().view(4, -1).clone()  # [moe1 e0, moe1 e1, moe2 e0, moe2 e1]
                t.detach().view(4, -1).copy_(blocks[[0, 2, 1, 3]])
        torch.save(sd, file)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from conftest import torchrun_jobs

    from dsckpt.api.reshaping import reshape

    result = Runs.open(tmp_path_factory, "DSCKPT_MOE_RESUME_RUNS", "moe-reshape-resume")
    if result.kept:
        return result
    work = result.work
    by_world: dict[int, list[dict[str, Any]]] = {}
    resumed_at_a: set[str] = set()
    cases = [(name, False) for name in CASES] + [(name, True) for name in EP_CASES]
    for name, ep_change in cases:
        a = _facts(name)["dp"]
        b, m = _target(name, ep_change)
        label = _label(name, ep_change)
        reshaped = work / label / "ckpt"
        reshape(MOE / name / "ckpt", reshaped, dp=b, ep=m)
        args = _train_args(name, m)
        by_world.setdefault(b, []).append(_job(work, f"{label}-run", args, STEPS, reshaped))
        # Never interrupted: at A (the fixture resumed at its own size) and at B (from scratch).
        if name not in resumed_at_a:
            resumed_at_a.add(name)
            by_world.setdefault(a, []).append(
                _job(work, f"{name}-at-dp{a}", _train_args(name), STEPS, MOE / name / "ckpt")
            )
        by_world[b].append(_job(work, f"{label}-straight", args, 2 * STEPS, None, save=True))
    control = work / "control" / "ckpt"
    shutil.copytree(work / _label(CONTROL, False) / "ckpt", control)
    _swap_expert_moments(control)
    by_world[CASES[CONTROL]].append(_job(work, "control-run", _train_args(CONTROL), STEPS, control))
    ep_control = work / "ep-control" / "ckpt"
    shutil.copytree(work / _label(EP_CONTROL, True) / "ckpt", ep_control)
    _interleave_experts(ep_control)
    b, m = EP_CASES[EP_CONTROL]
    by_world[b].append(_job(work, "ep-control-run", _train_args(EP_CONTROL, m), STEPS, ep_control))
    # DeepSpeed orders a model's expert groups by iterating a set of their names: with two EP
    # sizes every process must iterate it as the run that saved did (the fixtures fix the seed).
    seed = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        for world, jobs in sorted(by_world.items()):
            result.timings[f"dp{world}"] = torchrun_jobs(
                Path(__file__).resolve(), world, jobs, work, f"moe-dp{world}"
            )
    finally:
        if seed is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = seed
    result.finish("MoE reshape resume")
    return result


def _max_abs(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k, x in a.items():
        if isinstance(x, dict):
            worst = max(worst, _max_abs(x, b[k]))
        elif x.numel():
            worst = max(worst, (x.double() - b[k].double()).abs().max().item())
    return worst


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _distances(runs: Runs, name: str, label: str, ep: bool = False) -> dict[str, float]:
    """How far the run ``label`` lands from the uninterrupted runs at A and at B (B: the case's
    target, EP changed with ``ep``), and how far those two are from each other (the drift that
    sets the tolerance)."""
    a = _facts(name)["dp"]
    at_a = runs.result(f"{name}-at-dp{a}")
    at_b = runs.result(f"{_label(name, ep)}-straight")
    got = runs.result(label)
    assert got["global_steps"] == 2 * STEPS and at_a["global_steps"] == 2 * STEPS
    straight = _facts(name)["resume_check"]["straight_losses"]
    # The fixture's own resume of itself is the straight run at A, bit for bit.
    assert at_a["losses"] == straight[STEPS:]
    return {
        "loss_vs_a": _rel(got["losses"], straight[STEPS:]),
        "loss_vs_b": _rel(got["losses"], at_b["losses"][STEPS:]),
        "loss_drift": _rel(at_a["losses"], at_b["losses"][STEPS:]),
        "weights_vs_a": _max_abs(got["weights"], at_a["weights"]),
        "weights_vs_b": _max_abs(got["weights"], at_b["weights"]),
        "weights_drift": _max_abs(at_a["weights"], at_b["weights"]),
        "optim_vs_a": _max_abs(got["optim"], at_a["optim"]),
        "optim_vs_b": _max_abs(got["optim"], at_b["optim"]),
        "optim_drift": _max_abs(at_a["optim"], at_b["optim"]),
        "largest": max(w.abs().max().item() for w in at_b["weights"].values() if w.numel()),
    }


def _tolerances(d: dict[str, float], dtype: str) -> dict[str, float]:
    """As in test_reshape_resume.py: the resumed run may differ from either uninterrupted run
    by what they differ between themselves, carried through 3 more steps (4x leaves room;
    measured: within 1x-2x). fp32 losses must also meet 1e-5. The floors (1e-7 relative in the
    loss, 1 ulp of the largest weight) apply only where A and B agree bitwise."""
    import torch

    eps = torch.finfo(torch.float32).eps * d["largest"]
    loss = max(4 * d["loss_drift"], 1e-7)
    if dtype == "fp32":
        loss = min(loss, 1e-5)
    return {
        "loss": loss,
        "weights": 4 * d["weights_drift"] if d["weights_drift"] > 0 else eps,
        "optim": 4 * d["optim_drift"] if d["optim_drift"] > 0 else eps,
    }


ALL = [(name, False) for name in CASES] + [(name, True) for name in EP_CASES]
IDS = [f"{n}-to{b}" for n, b in CASES.items()] + [
    f"{n}-to{b}-ep{m}" for n, (b, m) in EP_CASES.items()
]


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize(("name", "ep"), ALL, ids=IDS)
def test_resumed_moe_run_continues_like_uninterrupted(runs: Runs, name: str, ep: bool) -> None:
    label = _label(name, ep)
    d = _distances(runs, name, f"{label}-run", ep)
    tol = _tolerances(d, _facts(name)["dtype"])
    print(f"\n{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()), file=sys.stderr)
    assert d["loss_vs_a"] <= tol["loss"] and d["loss_vs_b"] <= tol["loss"], (d, tol)
    assert d["weights_vs_a"] <= tol["weights"] and d["weights_vs_b"] <= tol["weights"], (d, tol)
    assert d["optim_vs_a"] <= tol["optim"] and d["optim_vs_b"] <= tol["optim"], (d, tol)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_misplaced_expert_state_is_caught(runs: Runs) -> None:
    """The comparison can fail: expert moments of two EP ranks swapped miss by far more than
    the tolerance the real reshape meets."""
    d = _distances(runs, CONTROL, "control-run")
    tol = _tolerances(d, _facts(CONTROL)["dtype"])
    print("\ncontrol: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()), file=sys.stderr)
    assert d["weights_vs_a"] > 10 * tol["weights"] and d["weights_vs_b"] > 10 * tol["weights"]


@pytest.mark.deepspeed
@pytest.mark.slow
def test_experts_laid_out_in_the_wrong_order_after_an_ep_change_are_caught(runs: Runs) -> None:
    """The EP-change comparison can fail too: the right values in the wrong expert order (EP
    rank by EP rank instead of layer by layer) load without complaint and miss by far more."""
    d = _distances(runs, EP_CONTROL, "ep-control-run", ep=True)
    tol = _tolerances(d, _facts(EP_CONTROL)["dtype"])
    print("\nep control: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()), file=sys.stderr)
    assert d["weights_vs_a"] > 10 * tol["weights"] and d["weights_vs_b"] > 10 * tol["weights"]
    assert d["loss_vs_a"] > 10 * tol["loss"] and d["loss_vs_b"] > 10 * tol["loss"]


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize(("name", "ep"), ALL, ids=IDS)
def test_result_is_what_deepspeed_saves_at_that_size(runs: Runs, name: str, ep: bool) -> None:
    """Same files, keys, bookkeeping (partition counts per group, paddings, slice mappings,
    param_shapes, expert group names, AutoEP's per-layer metadata, ...) and tensor shapes as
    DeepSpeed's own save of the straight run at B (and EP M) after the same 3 steps. fp32
    values agree to 1e-3 (the runs differ only in DP and EP size); bf16 runs drift apart more,
    so there only shapes and dtypes are compared. ``ds_config`` is the run's config (the
    micro-batch size differs), kept from the input."""
    from test_reshape_dp import _same

    label = _label(name, ep)
    tag = _facts(name)["tag"]
    native = runs.work / f"{label}-straight" / "ckpt" / tag
    got = runs.work / label / "ckpt" / tag
    files = sorted(p.name for p in native.iterdir())
    assert files == sorted(p.name for p in got.iterdir())
    rtol = 1e-3 if _facts(name)["dtype"] == "fp32" else float("inf")
    for file in files:
        a = _load_full(native / file)
        c = _load_full(got / file)
        if isinstance(a, dict):
            a.pop("ds_config", None), c.pop("ds_config", None)
        _same(a, c, file, rtol=rtol)


def _load_full(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=False)
