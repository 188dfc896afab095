"""Unmodified DeepSpeed resumes a universal checkpoint reshaped to native files, no load_universal.

Each fixture under tests/fixtures/universal/ is DeepSpeed's ds_to_universal of a native fixture
saved after K=3 steps. ``dsckpt reshape`` writes it as a native ZeRO checkpoint at DP B; a plain
``engine.load_checkpoint`` resumes it at B for M=3 more steps, which must continue the
uninterrupted run of the source fixture: the same training run (its arguments, seed 1234) for
K+M steps at the source's DP A, and at B, within the drift between those two (the tolerance of
tests/api/test_reshape_resume.py, whose torchrun driver and check this reuses). At B == A the
resumed run must be, bit for bit, the native fixture itself resumed at A: the committed fixtures
are not reproduced bitwise by a new run (the first loss differs in its last bits, so the weights
after K+M steps differ by an ulp), so that resume, not the new run, is the bitwise reference.

Cost: one torchrun launch per world size (2 and 3), each running that size's uninterrupted runs
and its resumes, one engine after another; a session-scoped fixture runs them once.
``DSCKPT_RESUME_RUNS=DIR`` keeps the runs for later sessions, as in test_reshape_resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_reshape_resume as harness
from conftest import ResumeRuns, ckpt, facts, torchrun_jobs

K, M = 3, 3
# universal fixture -> target DP sizes (the source's own DP, and sizes that divide nothing)
CASES = {
    "u-z2-fp32-dp2": [2, 3],
    "u-z1-fp32-dp2": [3],
    "u-z2-bf16-dp2": [3],
    "u-z1-bf16-dp2": [3],
    "u-z3-fp32-dp2": [2, 3],
    "u-z3-bf16-dp2": [3],
    "u-z3-fp32-dp3": [2],  # three sub-groups at DP 3 (sub_group_size 20), other ones at DP 2
}
PAIRS = [(name, b) for name, targets in CASES.items() for b in targets]


def _train_args(name: str) -> list[str]:
    """The source fixture's training arguments (--steps is set per job by the driver)."""
    return list(facts(*facts("universal", name)["source"].split("/"))["train_args"])


def _source_dp(name: str) -> int:
    return int(facts("universal", name)["dp"])


class Runs(ResumeRuns):
    def baseline(self, name: str, dp: int) -> dict[str, Any]:
        return harness._result(self.work / name / f"uninterrupted-dp{dp}.pt")

    def resumed(self, name: str, dp: int) -> dict[str, Any]:
        return harness._result(self.work / name / f"resumed-dp{dp}.pt")

    def native_resumed(self, name: str) -> dict[str, Any]:
        return harness._result(self.work / name / "native-resumed.pt")


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    pytest.importorskip("deepspeed")
    from dsckpt.api.reshaping import reshape

    result = Runs.open(tmp_path_factory, "DSCKPT_RESUME_RUNS", "universal-resume", "universal")
    if result.kept:
        return result
    work = result.work
    jobs: dict[int, list[dict[str, Any]]] = {}
    # The uninterrupted runs: at the source's DP and at every target DP.
    for name, targets in CASES.items():
        (work / name).mkdir()
        for dp in sorted({_source_dp(name), *targets}):
            jobs.setdefault(dp, []).append(
                {
                    "train_args": _train_args(name),
                    "save_after": K,
                    "steps": K + M,
                    "result": str(work / name / f"uninterrupted-dp{dp}.pt"),
                }
            )
    # The resumes of the reshaped universal checkpoints (reshaped in-process, dsckpt only).
    for name, b in PAIRS:
        out = work / name / f"native-dp{b}"
        reshape(ckpt("universal", name), out, dp=b)
        jobs[b].append(
            {
                "train_args": _train_args(name),
                "load": str(out),
                "save_after": 0,
                "steps": M,
                "result": str(work / name / f"resumed-dp{b}.pt"),
            }
        )
    # The native fixture itself resumed at its own DP: the bitwise reference at B == A.
    for name, targets in CASES.items():
        if _source_dp(name) in targets:
            jobs[_source_dp(name)].append(
                {
                    "train_args": _train_args(name),
                    "load": str(ckpt(*facts("universal", name)["source"].split("/"))),
                    "save_after": 0,
                    "steps": M,
                    "result": str(work / name / "native-resumed.pt"),
                }
            )
    driver = Path(harness.__file__).resolve()
    for world, world_jobs in sorted(jobs.items()):
        label = f"universal-dp{world}"
        result.timings[label] = torchrun_jobs(driver, world, world_jobs, work, label)
    result.finish("universal resume")
    return result


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_uninterrupted_run_is_the_fixtures_run(runs: Runs, name: str) -> None:
    """The baseline is the run the fixture was saved from: its first K losses are the
    fixture's own (losses.json). Measured: equal but for the first step's last bits (6.7e-8
    relative); another seed or config misses by orders more. (At the source's DP the resumed
    run must equal this baseline bit for bit, which holds only if its step-K state is the
    fixture's.)"""
    kind, source = facts("universal", name)["source"].split("/")
    saved = json.loads((ckpt(kind, source).parent / "losses.json").read_text())
    got = runs.baseline(name, _source_dp(name))["losses"][:K]
    assert len(got) == len(saved) == K
    assert all(abs(x - y) <= 1e-6 * abs(y) for x, y in zip(got, saved, strict=True)), (got, saved)


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize(("name", "b"), PAIRS, ids=[f"{n}-to-dp{b}" for n, b in PAIRS])
def test_resumed_native_files_continue_like_uninterrupted(runs: Runs, name: str, b: int) -> None:
    import torch

    a = _source_dp(name)
    resumed = runs.resumed(name, b)
    at_a, at_b = runs.baseline(name, a), runs.baseline(name, b)
    assert resumed["global_steps"] == K + M
    assert len(resumed["losses"]) == M
    dtype = _train_args(name)[_train_args(name).index("--dtype") + 1]
    if a == b:
        # Same DP: the files hold the fixture's state exactly, so training goes on exactly as
        # from the fixture itself.
        native = runs.native_resumed(name)
        assert resumed["losses"] == native["losses"]
        assert resumed["weights"].keys() == native["weights"].keys()
        for key, value in resumed["weights"].items():
            assert torch.equal(value, native["weights"][key]), key
    harness.assert_continues_uninterrupted(resumed, at_a, at_b, K, dtype, f"{name} -> DP {b}")
