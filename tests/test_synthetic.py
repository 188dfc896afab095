"""bench/make_synthetic.py: DeepSpeed's exact files without DeepSpeed, at any count.

The synthetic checkpoints stand in for 1,024-rank runs in the planning benchmark, so they must be
what DeepSpeed writes: the same keys in the same order and the same types at every level as the
real fixtures, the same storage sharing, and values that dsckpt (and DeepSpeed's own
zero_to_fp32) consolidate to exactly the known function of parameter and element.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_synthetic import Spec, expected_state_dict, make  # noqa: E402

import dsckpt  # noqa: E402
from dsckpt.io.load import _allowed_globals  # noqa: E402

DP, PARAMS = 8, 200
SPECS = {
    "z2-fp32": Spec(stage=2, dp=DP, params=PARAMS),
    "z2-bf16": Spec(stage=2, dp=DP, params=PARAMS, dtype="bf16"),
    "z3-fp32": Spec(stage=3, dp=DP, params=PARAMS),
    "z3-bf16": Spec(stage=3, dp=DP, params=PARAMS, dtype="bf16"),
    # Sub-groups of ~40 elements per rank: several fp32 flat groups per optimizer file.
    "z3-fp32-sub": Spec(stage=3, dp=DP, params=PARAMS, sub_group_size=40),
    "z1-fp32": Spec(stage=1, dp=DP, params=PARAMS),
}
# Dicts keyed by parameter name (or group index): their keys are data, not structure.
NAME_KEYED = {
    "module",
    "param_shapes[*]",
    "frozen_param_shapes",
    "frozen_param_fragments",
    "shared_params",
    "optimizer_state_dict.param_slice_mappings[*]",
    "optimizer_state_dict.base_optimizer_state.state",
    "optimizer_state_dict.optimizer_state_dict.state",
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {name: make(spec, root / name).path for name, spec in SPECS.items()}


def load(path: Path) -> Any:
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(path, weights_only=True, map_location="cpu")


def skeleton(
    obj: Any, path: str = "", out: set[tuple[Any, ...]] | None = None
) -> set[tuple[Any, ...]]:
    """Every (path, type[, keys in order]) of a pickled structure; tensors by their class,
    requires_grad and attribute names (DeepSpeed's ``ds_id``)."""
    out = set() if out is None else out
    if isinstance(obj, torch.Tensor):
        out.add((path, type(obj).__name__, obj.requires_grad, tuple(sorted(vars(obj)))))
    elif isinstance(obj, dict):
        if path in NAME_KEYED:
            out.add((path, type(obj).__qualname__))
            for value in obj.values():
                skeleton(value, f"{path}.<name>", out)
        else:
            out.add((path, type(obj).__qualname__, tuple(obj)))
            for key, value in obj.items():
                skeleton(value, f"{path}.{key}" if path else str(key), out)
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        out.add((path, type(obj).__qualname__))
        for value in obj:
            skeleton(value, f"{path}[*]", out)
    else:
        out.add((path, f"{type(obj).__module__}.{type(obj).__qualname__}"))
    return out


def real(fixture: str, name: str) -> Path:
    return FIXTURES / "zero" / fixture / "ckpt" / "global_step3" / name


def synthetic(made: dict[str, Path], key: str, name: str) -> Path:
    return made[key] / SPECS[key].tag / name


# Synthetic file -> the real DeepSpeed file it must mirror. Rank 0 and a later rank each: ZeRO-3
# keeps shared_params on rank 0 only, ZeRO-1/2's last rank holds the tail padding.
PAIRS = [
    ("z2-fp32", "mp_rank_00_model_states.pt", "z2-fp32-dp2", "mp_rank_00_model_states.pt"),
    (
        "z2-fp32",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "z2-fp32-dp2",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ),
    (
        "z2-fp32",
        "zero_pp_rank_7_mp_rank_00_optim_states.pt",
        "z2-fp32-dp2",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    ("z2-bf16", "mp_rank_00_model_states.pt", "z2-bf16-dp2", "mp_rank_00_model_states.pt"),
    (
        "z2-bf16",
        "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "z2-bf16-dp2",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    ("z1-fp32", "mp_rank_00_model_states.pt", "z1-fp32-dp2", "mp_rank_00_model_states.pt"),
    (
        "z1-fp32",
        "zero_pp_rank_5_mp_rank_00_optim_states.pt",
        "z1-fp32-dp2",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    (
        "z3-fp32",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "z3-fp32-dp2",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
    ),
    (
        "z3-fp32",
        "zero_pp_rank_6_mp_rank_00_model_states.pt",
        "z3-fp32-dp2",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ),
    (
        "z3-fp32",
        "zero_pp_rank_6_mp_rank_00_optim_states.pt",
        "z3-fp32-dp2",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    (
        "z3-bf16",
        "zero_pp_rank_2_mp_rank_00_model_states.pt",
        "z3-bf16-dp2",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ),
    (
        "z3-bf16",
        "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "z3-bf16-dp2",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    (
        "z3-fp32-sub",
        "zero_pp_rank_4_mp_rank_00_optim_states.pt",
        "z3-fp32-dp3",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
]


@pytest.mark.parametrize(
    ("key", "ours", "fixture", "theirs"), PAIRS, ids=[f"{p[0]}:{p[1]}" for p in PAIRS]
)
def test_same_structure_as_deepspeed(
    made: dict[str, Path], key: str, ours: str, fixture: str, theirs: str
) -> None:
    mine, real_one = load(synthetic(made, key, ours)), load(real(fixture, theirs))
    a, b = skeleton(mine), skeleton(real_one)
    # ds_config is the user's JSON: compare the parts the fixture's run set.
    assert sorted(a - b, key=str) == [] and sorted(b - a, key=str) == []


def test_same_pickled_globals_as_deepspeed(made: dict[str, Path]) -> None:
    """DeepSpeed's classes are written under DeepSpeed's paths, with nothing of dsckpt's."""

    def globals_of(path: Path) -> set[str]:
        import pickletools

        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
        return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}

    for key, ours, fixture, theirs in PAIRS:
        assert globals_of(synthetic(made, key, ours)) == globals_of(real(fixture, theirs)), ours


def test_zero2_storage_sharing_matches(made: dict[str, Path]) -> None:
    """Module weights are views of one flat buffer per group, the tied alias is its canonical,
    frozen fragments are the module's own tensors, the last rank's lean fp32 partition is a view
    of its padded one: as in DeepSpeed's files."""

    def facts(states: Any, last_optim: Any) -> dict[str, Any]:
        module = states["module"]
        groups = states["param_shapes"]
        storages = [{module[n].untyped_storage().data_ptr() for n in g} for g in groups]
        alias, canonical = next(iter(states["shared_params"].items()))
        osd = last_optim["optimizer_state_dict"]
        lean = osd["single_partition_of_fp32_groups"][0]
        return {
            "one storage per group": [len(s) for s in storages] == [1] * len(groups),
            "alias is canonical": module[alias].untyped_storage().data_ptr()
            == module[canonical].untyped_storage().data_ptr()
            and module[alias].storage_offset() == module[canonical].storage_offset(),
            "frozen fragments are module tensors": all(
                t.untyped_storage().data_ptr() == module[n].untyped_storage().data_ptr()
                for n, t in states["frozen_param_fragments"].items()
            ),
            "lean view of padded": lean.untyped_storage().nbytes()
            == osd["base_optimizer_state"]["state"][0]["exp_avg"].nbytes
            and osd["group_paddings"][0] > 0,
        }

    ours = facts(
        load(synthetic(made, "z2-fp32", "mp_rank_00_model_states.pt")),
        load(synthetic(made, "z2-fp32", f"zero_pp_rank_{DP - 1}_mp_rank_00_optim_states.pt")),
    )
    theirs = facts(
        load(real("z2-fp32-dp2", "mp_rank_00_model_states.pt")),
        load(real("z2-fp32-dp2", "zero_pp_rank_1_mp_rank_00_optim_states.pt")),
    )
    assert ours == theirs == dict.fromkeys(theirs, True)


@pytest.mark.parametrize("key", sorted(SPECS))
def test_consolidates_to_the_known_values(made: dict[str, Path], key: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = SPECS[key]
    out = tmp_path / "model.safetensors"
    result = dsckpt.consolidate(made[key], out)
    got = load_file(out)
    # to-fp32 gives every floating tensor in fp32 (bf16 frozen weights upcast, exactly).
    expected = {
        n: t.float() if t.is_floating_point() else t for n, t in expected_state_dict(spec).items()
    }
    if spec.stage == 1:  # ZeRO-1 frozen weights are in `module` only: still there, same values
        assert result.tensors + result.aliases == len(expected)
    assert sorted(got) == sorted(expected)
    wrong = [
        n for n, t in expected.items() if got[n].dtype != t.dtype or not torch.equal(got[n], t)
    ]
    assert wrong == []


@pytest.mark.parametrize("key", ["z2-fp32", "z3-bf16", "z3-fp32-sub"])
def test_inspect(made: dict[str, Path], key: str, cli) -> None:
    spec = SPECS[key]
    result = cli("inspect", made[key], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["topology"] == {"pp": 1, "tp": 1, "dp": DP, "world_size": DP}
    assert data["zero_stage"] == spec.stage
    assert data["counts"]["trainable"]["tensors"] == PARAMS
    assert data["counts"]["frozen"]["tensors"] == spec.frozen
    assert data["counts"]["tied"]["tensors"] == 1
    assert not [f for f in data["findings"] if f["level"] == "error"]


def test_stamped_files_are_what_torch_save_writes(tmp_path: Path) -> None:
    """ZeRO-3 model files stamped from a template (renamed zip folder, patched frozen
    fragments and CRCs) equal torch.save's, record for record, but for the per-save id; ranks
    10+ use the two-digit template."""
    spec = Spec(stage=3, dp=12, params=60, dtype="bf16", frozen=3)
    fast, slow = make(spec, tmp_path / "fast").path, make(spec, tmp_path / "slow", stamp=False).path
    for rank in range(spec.dp):
        name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        with (
            zipfile.ZipFile(fast / spec.tag / name) as a,
            zipfile.ZipFile(slow / spec.tag / name) as b,
        ):
            assert a.namelist() == b.namelist()
            assert a.testzip() is None  # every CRC-32 right
            for record in a.namelist():
                if not record.endswith(".data/serialization_id"):
                    assert a.read(record) == b.read(record), (name, record)
        a_bytes = (fast / spec.tag / name).read_bytes()
        assert len(a_bytes) == (slow / spec.tag / name).stat().st_size


def test_deepspeed_reads_the_same_values(made: dict[str, Path]) -> None:
    """DeepSpeed's own zero_to_fp32 consolidates the synthetic files to the known values."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for key in ("z2-fp32", "z3-fp32-sub", "z2-bf16"):
        state = get_fp32_state_dict_from_zero_checkpoint(str(made[key]))
        expected = expected_state_dict(SPECS[key])
        assert sorted(state) == sorted(expected)
        wrong = [n for n, t in expected.items() if not torch.equal(state[n], t.to(state[n].dtype))]
        assert wrong == [], key


@pytest.mark.deepspeed
def test_a_pipeline_of_many_layers_is_deepspeeds_own_save(tmp_path: Path) -> None:
    """make_synthetic --layers trains the pipe fixtures' model with real DeepSpeed: its layer
    files are as many as the spec says and read like the fixtures' (same layer-file keys)."""
    pytest.importorskip("deepspeed")
    from make_synthetic import PipeSpec, make_pipeline

    spec = PipeSpec(layers=6)
    made = make_pipeline(spec, tmp_path / "pipe")
    layout = dsckpt.open_checkpoint(made.path)
    assert layout.kind == "pipeline" and (layout.pp, layout.tp, layout.dp) == (2, 2, 1)
    layer_files = [f for f in layout.dir.iterdir() if f.name.startswith("layer_")]
    assert len(layer_files) == spec.layer_files == 16
    assert not [f for f in layout.findings if f.level == "error"]
    fixture = dsckpt.open_checkpoint(FIXTURES / "pipe" / "p2t2d1-z1-fp32" / "ckpt")
    assert {t.name.split(".", 1)[1] for t in layout.tensors} == {
        t.name.split(".", 1)[1] for t in fixture.tensors
    }
