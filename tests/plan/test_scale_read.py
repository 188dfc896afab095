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

The checkpoints are bench/make_synthetic.py's (DeepSpeed's exact files, tiny tensors): ZeRO-2,
where every rank file holds per-parameter data (``param_alignment_paddings``), and ZeRO-3,
where every rank's model-states file holds one placeholder tensor per parameter (the format's
own ``dp x params``, which discovery reads at C speed: see dsckpt/io/zipshape.py and
bench/README.md "Planning at scale").
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from make_synthetic import Spec, make  # noqa: E402

import dsckpt  # noqa: E402
from dsckpt.api.consolidation import plan_for  # noqa: E402
from dsckpt.discover.layout import open_checkpoint  # noqa: E402
from dsckpt.plan.zero_reshape import plan_from_facts, slice_mapping  # noqa: E402
from dsckpt.plan.zero_source import plan_reshape  # noqa: E402

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


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("scale3")
    return {
        (dp, p): make(Spec(stage=3, dp=dp, params=p), root / f"z3-{dp}-{p}").path
        for dp in (FEW_DP, MANY_DP)
        for p in (FEW_PARAMS, MANY_PARAMS)
    }


def test_zero3_discovery_is_linear(zero3: dict[tuple[int, int], Path]) -> None:
    """Each rank's model-states file (a placeholder per parameter) costs the same at few and
    many parameters: its zip is compared with a sibling's at C speed and its data.pkl parse is
    shared. Without those shortcuts the dp x params term is 55% of the work at 64 x 1,000
    (measured), with them 0.8%."""
    share, work = interaction(lambda dp, p: count_work(lambda: open_checkpoint(zero3[dp, p])))
    assert share < MAX_SHARE, (share, work)


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


def test_zero3_reshape_plan_is_linear(zero3: dict[tuple[int, int], Path]) -> None:
    """A ZeRO-3 plan keeps each sub-group's partitions as their rule (the parameters' pieces):
    listing every target rank's runs of every parameter was a ranks x parameters loop (10
    million runs at 512 x 20,000)."""
    layouts = {key: open_checkpoint(path) for key, path in zero3.items()}
    plan_reshape(layouts[FEW_DP, FEW_PARAMS], 2)
    share, work = interaction(
        lambda dp, p: count_work(lambda: plan_reshape(layouts[dp, p], dp // 2))
    )
    assert share < MAX_SHARE, (share, work)


@pytest.mark.parametrize("stage", [2, 3])
def test_reshape_planning_reads_two_files_and_none_with_torch(
    stage: int,
    zero2: dict[tuple[int, int], Path],
    zero3: dict[tuple[int, int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's unpickler is not dsckpt's code, so the count above does not see it: reshape
    planning must read rank 0's model and optimizer files again, not every rank file (reading
    them all with torch was half of its time at 1,024 ranks), and none with torch (importing it
    and its unpickler took 4.5 s of a ZeRO-3 plan at 1,024 x 20,000: the writer loads its
    templates when it writes)."""
    from dsckpt.plan import zero_source

    layout = open_checkpoint((zero2 if stage == 2 else zero3)[MANY_DP, FEW_PARAMS])
    by_torch: list[str] = []
    by_dsckpt: list[str] = []
    torch_load, own_load = zero_source.load_meta, zero_source.load_saved
    monkeypatch.setattr(
        zero_source, "load_meta", lambda path: by_torch.append(Path(path).name) or torch_load(path)
    )
    monkeypatch.setattr(
        zero_source,
        "load_saved",
        lambda path: by_dsckpt.append(Path(path).name) or own_load(path),
    )
    plan_reshape(layout, MANY_DP // 2)
    assert by_torch == []
    model = (
        "mp_rank_00_model_states.pt" if stage == 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    )
    assert sorted(by_dsckpt) == [model, "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


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
            lambda: [
                slice_mapping(names, numels, None, r, max(1, len(names) // dp)) for r in range(dp)
            ]
        )

    share, work = interaction(rank_by_rank)
    assert share > 0.5, (share, work)
    # ...while the plan made from the same facts is additive.
    share, work = interaction(
        lambda dp, p: count_work(lambda: plan_from_facts(facts[dp, p], dp // 2))
    )
    assert share < MAX_SHARE, (share, work)


# -- the C-speed paths give the values and verdicts of the element-by-element ones -------------


def _read_pickle(tmp_path: Path, data: bytes) -> Any:
    from dsckpt.io.unpickle import load_saved

    path = tmp_path / "file.pt"
    with zipfile.ZipFile(path, "w") as archive:  # laid out as torch.save lays it out
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
    return load_saved(path)


INT_LISTS = {
    "bytes": list(range(256)) * 5,
    "two-byte": [256, 65535, 300] * 400,
    "four-byte": [-(2**31), 2**31 - 1, -1, 65536] * 300,
    "mixed": [0, 255, 256, 65535, 65536, -1, 7, 7, 70000, 3] * 250,
    "one": [5],
    "nested": [[1, 2, 3], (4, 500, -6), {"a": [9] * 3000}],
}


@pytest.mark.parametrize("name", sorted(INT_LISTS))
def test_int_runs_read_as_pickle_reads_them(tmp_path: Path, name: str) -> None:
    data = pickle.dumps(INT_LISTS[name], protocol=2)
    assert _read_pickle(tmp_path, data) == pickle.loads(data) == INT_LISTS[name]


def test_an_int_run_cut_short_is_corrupt(tmp_path: Path) -> None:
    from dsckpt.errors import CorruptFile

    data = pickle.dumps([1, 2, 3], protocol=2)  # ... K\x01 K\x02 K\x03 e .
    cut = data[: data.index(b"K\x03") + 1]  # the last BININT1 without its byte
    with pytest.raises(CorruptFile, match="unreadable pickle"):
        _read_pickle(tmp_path, cut)


def test_an_int_run_is_charged_to_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsckpt.errors import UnsafeCheckpoint
    from dsckpt.io import bounds

    data = pickle.dumps([0] * 3000, protocol=2)
    assert _read_pickle(tmp_path, data) == [0] * 3000
    monkeypatch.setattr(bounds, "MAX_OP_UNITS", 2000)  # fewer units than the run has opcodes
    with pytest.raises(UnsafeCheckpoint, match="takes more than 2000 steps"):
        _read_pickle(tmp_path, data)


def test_a_list_of_leaves_is_measured_like_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsckpt.errors import UnsafeCheckpoint
    from dsckpt.io import bounds

    deep: Any = [1, 2]  # leaves only, at the bottom of a deep nest
    for _ in range(9):
        deep = [deep]
    data = pickle.dumps(deep, protocol=2)
    assert _read_pickle(tmp_path, data) == deep
    monkeypatch.setattr(bounds, "MAX_DEPTH", 9)
    with pytest.raises(UnsafeCheckpoint, match="nests containers more than 9 deep"):
        _read_pickle(tmp_path, data)
    monkeypatch.setattr(bounds, "MAX_DEPTH", 100)
    monkeypatch.setattr(bounds, "MAX_EXPANDED", 100)
    with pytest.raises(UnsafeCheckpoint, match="over 100 objects"):
        _read_pickle(tmp_path, pickle.dumps([[0] * 200], protocol=2))


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ([1, True, 3], "`x[1]` is True where an integer belongs"),
        ([1, 2.0], "`x[1]` is 2.0 where an integer belongs"),
        ([4, -1], "`x[1]` is -1, outside 0..281474976710656"),
        ([0, 2**49], "`x[1]` is 562949953421312, outside"),
    ],
)
def test_int_list_names_the_bad_value(values: list[Any], problem: str) -> None:
    from dsckpt.discover import checks

    with pytest.raises(checks.BadMetadata, match=re.escape(problem)):
        checks.int_list(values, checks.At(Path("f.pt"), "x"))
    with pytest.raises(checks.BadMetadata, match=re.escape(problem.replace("`x[1]`", "`s[1]`"))):
        checks.shape(values, checks.At(Path("f.pt"), "s"))


def test_int_list_takes_what_it_took_before() -> None:
    from dsckpt.discover import checks

    class Count(int):
        pass

    at = checks.At(Path("f.pt"), "x")
    assert checks.int_list([0, 5, 2**48], at) == [0, 5, 2**48]
    assert checks.int_list((), at) == []
    taken = checks.int_list([Count(3)], at)  # an int subclass: accepted as a plain int
    assert taken == [3] and type(taken[0]) is int
    assert checks.shape([2, Count(3)], at) == (2, 3)
