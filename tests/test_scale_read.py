"""Planning stays linear in rank files + parameters (issue 16), counted in work, not seconds.

Wall time on a shared 2-core machine moves by 2x and more, so these tests count what dsckpt's
own code executes: every line run in a ``dsckpt/`` frame (``sys.settrace``), which is the work a
loop does per item, while a C-speed step (``map``, ``min``, a regex run) counts once. The model is
``work(dp, params) = a * dp + b * params + c``: adding ranks must cost the same whether the
checkpoint has few or many parameters (the ``dp x params`` term, measured on a 2 x 2 grid, must
be a small share of the work). A cost of ``dp x params`` (every rank walking every
parameter, as reshape planning and the int checks once did) makes the increment grow with the
parameter count, and :func:`test_the_measure_sees_a_ranks_times_parameters_loop` shows that the
check catches exactly that.

The checkpoints are bench/make_synthetic.py's (DeepSpeed's exact files, tiny tensors), ZeRO-2,
where every rank file holds per-parameter data (``param_alignment_paddings``). ZeRO-3 is not
held to this: each of its rank files holds one placeholder tensor per parameter (the format's
own ``dp x params``), see bench/README.md "Planning at scale".
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_synthetic import Spec, make  # noqa: E402

from dsckpt.api.consolidation import plan_for  # noqa: E402
from dsckpt.discover.layout import open_checkpoint  # noqa: E402
from dsckpt.plan.zero_reshape import plan_from_facts, plan_reshape, slice_mapping  # noqa: E402

import dsckpt  # noqa: E402

DSCKPT = str(Path(dsckpt.__file__).parent)
FEW_DP, MANY_DP = 16, 64
FEW_PARAMS, MANY_PARAMS = 250, 1000
# Measured: under 0.2% for discovery and both plans; 25% for discovery and reshape planning
# before they were made linear (every rank file's int checks, per-rank loops over parameters).
MAX_SHARE = 0.05


def count_work(run: Callable[[], Any]) -> int:
    """Lines executed in dsckpt's own frames while ``run()`` runs."""
    executed = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal executed
        if event == "line":
            executed += 1
        return local

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(DSCKPT) else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(previous)
    return executed


def interaction(work: Callable[[int, int], int]) -> tuple[float, dict[str, int]]:
    """The ``dp x params`` share of the work at the larger corner: what adding ranks costs more
    at many parameters than at few, over the whole work there (0: additive; 1: all of it)."""
    w = {(dp, p): work(dp, p) for dp in (FEW_DP, MANY_DP) for p in (FEW_PARAMS, MANY_PARAMS)}
    more_ranks_at_many = w[MANY_DP, MANY_PARAMS] - w[FEW_DP, MANY_PARAMS]
    more_ranks_at_few = w[MANY_DP, FEW_PARAMS] - w[FEW_DP, FEW_PARAMS]
    share = (more_ranks_at_many - more_ranks_at_few) / w[MANY_DP, MANY_PARAMS]
    return share, {f"{dp}x{p}": n for (dp, p), n in w.items()}


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("scale")
    return {
        (dp, p): make(Spec(stage=2, dp=dp, params=p), root / f"z2-{dp}-{p}").path
        for dp in (FEW_DP, MANY_DP)
        for p in (FEW_PARAMS, MANY_PARAMS)
    }


def test_discovery_is_linear(zero2: dict[tuple[int, int], Path]) -> None:
    share, work = interaction(lambda dp, p: count_work(lambda: open_checkpoint(zero2[dp, p])))
    assert share < MAX_SHARE, (share, work)


def test_to_fp32_plan_is_linear(zero2: dict[tuple[int, int], Path]) -> None:
    layouts = {key: open_checkpoint(path) for key, path in zero2.items()}
    share, work = interaction(lambda dp, p: count_work(lambda: plan_for(layouts[dp, p])))
    assert share < MAX_SHARE, (share, work)


def test_reshape_plan_is_linear(zero2: dict[tuple[int, int], Path]) -> None:
    layouts = {key: open_checkpoint(path) for key, path in zero2.items()}
    plan_reshape(layouts[FEW_DP, FEW_PARAMS], 2)  # imports torch once, outside the count
    share, work = interaction(
        lambda dp, p: count_work(lambda: plan_reshape(layouts[dp, p], dp // 2))
    )
    assert share < MAX_SHARE, (share, work)


def test_reshape_plan_reads_two_files_with_torch(
    zero2: dict[tuple[int, int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's unpickler is not dsckpt's code, so the count above does not see it: planning
    must load rank 0's model and optimizer files with it, not every rank file (that was half of
    reshape's planning time at 1,024 ranks); discovery has read them all already."""
    from dsckpt.io import load

    loaded: list[str] = []
    real = load.load_meta
    monkeypatch.setattr(load, "load_meta", lambda path: loaded.append(Path(path).name) or real(path))
    plan_reshape(zero2[MANY_DP, FEW_PARAMS], MANY_DP // 2)
    assert sorted(loaded) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_the_measure_sees_a_ranks_times_parameters_loop(
    zero2: dict[tuple[int, int], Path],
) -> None:
    """The check is not vacuous: asking slice_mapping rank by rank (how reshape planning used to
    build param_slice_mappings) walks every parameter for every rank, and is flagged."""
    facts = {key: plan_reshape(path, 2)[0].facts for key, path in zero2.items()}

    def rank_by_rank(dp: int, p: int) -> int:
        group = facts[dp, p].groups[0]
        names = [n for n, _ in group.params]
        numels = [1] * len(names)
        return count_work(
            lambda: [slice_mapping(names, numels, None, r, max(1, len(names) // dp))
                     for r in range(dp)]
        )

    share, work = interaction(rank_by_rank)
    assert share > 0.5, (share, work)
    # ...while the plan made from the same facts is additive.
    share, work = interaction(
        lambda dp, p: count_work(lambda: plan_from_facts(facts[dp, p], dp // 2))
    )
    assert share < MAX_SHARE, (share, work)
