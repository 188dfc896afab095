"""Metadata read from pickles is checked before use (issue 10): crafted rank files.

Each case copies a fixture DeepSpeed wrote, rewrites one value of one file with torch (the test
trusts its own fixtures; DeepSpeed is importable for the classes they pickle), and asserts:
discovery records an error finding naming the file and the key (inspect can go on), and
`dsckpt to-fp32` exits 1 with one line naming them, writes nothing and leaves the input as it was.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ckpt, tag_dir

from dsckpt.discover.layout import open_checkpoint, refuse_errors
from dsckpt.errors import DsckptError, InconsistentCheckpoint

pytest.importorskip("deepspeed")  # the optimizer files pickle DeepSpeed classes

MODEL = "mp_rank_00_model_states.pt"
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
Z3_MODEL0 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
Z3_OPTIM0 = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


# --- helpers ---------------------------------------------------------------------------------


def _copy(tmp_path: Path, kind: str, name: str) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(ckpt(kind, name), dest)
    return dest


def _tag(root: Path) -> Path:
    return root / (root / "latest").read_text()


def _edit(root: Path, file: str, edit: Callable[[dict[str, Any]], None]) -> None:
    path = _tag(root) / file
    sd = torch.load(path, weights_only=False)
    edit(sd)
    torch.save(sd, path)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _error_codes(root: Path) -> dict[str, str]:
    """Error findings by code (the messages of one code joined by newlines)."""
    codes: dict[str, str] = {}
    for f in open_checkpoint(root).errors:
        codes[f.code] = f"{codes[f.code]}\n{f.message}" if f.code in codes else f.message
    return codes


def _refused(cli, root: Path, tmp_path: Path, *needles: str) -> str:
    """to-fp32 (and the API gate) refuse: exit 1, one line with the needles, nothing written."""
    before = _digest(root)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    result = cli("to-fp32", root, out_dir / "m.safetensors")
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, (needle, line)
    assert list(out_dir.iterdir()) == []
    assert _digest(root) == before
    return line


# --- 1. values type- and range-checked -------------------------------------------------------


def _set_shape(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["param_shapes"][0]["embed.weight"] = value

    return edit


@pytest.mark.parametrize(
    "value",
    [(-13, 7), (10**20, 7), ("13", 7), (13.0, 7), (2**30, 2**30)],
    ids=["negative", "huge", "string", "float", "too-many-elements"],
)
def test_bad_param_shape(cli, tmp_path: Path, value: Any) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, _set_shape(value))
    codes = _error_codes(root)
    assert "param_shapes[0].embed.weight" in codes["bad-metadata"]
    _refused(cli, root, tmp_path, MODEL, "param_shapes[0].embed.weight")


def test_param_shapes_list_where_a_dict_belongs(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd["param_shapes"].__setitem__(0, list(sd["param_shapes"][0])))
    _refused(cli, root, tmp_path, MODEL, "`param_shapes[0]`", "where a dict belongs")


def test_param_listed_in_two_groups(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd["param_shapes"][1].__setitem__("embed.weight", (13, 7)))
    _refused(cli, root, tmp_path, MODEL, "param_shapes[1]", "'embed.weight' again")


def _osd(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["optimizer_state_dict"][key] = value

    return edit


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("partition_count", [0, 0], "partition_count[0]"),
        ("partition_count", [-2, -2], "partition_count[0]"),
        ("partition_count", [10**9, 10**9], "partition_count[0]"),
        ("partition_count", "2", "partition_count"),
        ("partition_count", [2], "partition_count"),
        ("group_paddings", [-1, 0], "group_paddings[0]"),
        ("group_paddings", {"a": 1}, "group_paddings"),
        ("group_paddings", [0], "group_paddings"),
        ("param_alignment_paddings", [[0, 0], [0]], "param_alignment_paddings"),
        ("param_alignment_paddings", [[0, "x", 0], [0, 0, 0, 0, 0]], "param_alignment_paddings[0]"),
        ("zero_stage", 7, "zero_stage"),
        ("zero_stage", "two", "zero_stage"),
        ("single_partition_of_fp32_groups", [[1.0], [2.0]], "single_partition_of_fp32_groups[0]"),
        ("single_partition_of_fp32_groups", "x", "single_partition_of_fp32_groups"),
    ],
)
def test_bad_optimizer_value(cli, tmp_path: Path, key: str, value: Any, needle: str) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, OPTIM1, _osd(key, value))
    layout = open_checkpoint(root)  # inspect goes on
    assert any(OPTIM1 in f.message and needle in f.message for f in layout.errors), layout.errors
    _refused(cli, root, tmp_path, OPTIM1, needle)


def test_huge_partition_count_is_judged_quickly(tmp_path: Path) -> None:
    """A count within the bound but far from the files present: one finding, not a million."""
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    for rank in (0, 1):
        _edit(
            root,
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            _osd("partition_count", [2**20, 2**20]),
        )
    started = time.perf_counter()
    layout = open_checkpoint(root)
    assert time.perf_counter() - started < 5
    missing = [f for f in layout.errors if f.code == "missing-rank-file"]
    assert len(missing) == 1 and "and 1048571 more are missing" in missing[0].message


@pytest.mark.parametrize(
    "key, value",
    [
        ("dp_world_size", 0),
        ("mp_world_size", "1"),
        ("global_steps", -3),
        ("buffer_names", "scale"),
        ("shared_params", ["head.weight"]),
    ],
)
def test_bad_model_value(cli, tmp_path: Path, key: str, value: Any) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd.__setitem__(key, value))
    assert f"`{key}`" in _error_codes(root)["bad-metadata"]
    _refused(cli, root, tmp_path, MODEL, key)


def test_frozen_shapes_not_a_dict(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd.__setitem__("frozen_param_shapes", [(7, 7)]))
    _refused(cli, root, tmp_path, MODEL, "frozen_param_shapes")


def test_frozen_fragment_of_the_wrong_size(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(
        root,
        MODEL,
        lambda sd: sd["frozen_param_fragments"].__setitem__("adapter.weight", torch.zeros(3)),
    )
    _refused(cli, root, tmp_path, MODEL, "frozen_param_fragments.adapter.weight")


@pytest.mark.parametrize(
    "shared, needle",
    [
        ({"head.weight": "nothing.here"}, "does not hold"),
        ({"head.weight": "tail.weight", "tail.weight": "head.weight"}, "itself an alias"),
        ({"head.weight": "embed.weight", "fc1.weight": "embed.weight"}, "a tensor of its own"),
    ],
    ids=["missing-target", "cycle", "shadows-a-tensor"],
)
def test_bad_shared_params(cli, tmp_path: Path, shared: dict[str, str], needle: str) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd.__setitem__("shared_params", shared))
    assert needle in _error_codes(root)["bad-metadata"]
    _refused(cli, root, tmp_path, MODEL, "shared_params", needle)


def test_buffer_listed_but_not_saved(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd["module"].pop("scale"))
    _refused(cli, root, tmp_path, MODEL, "buffer_names", "'scale'")


def _set_step(value: Any, rank_state: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["optimizer_state_dict"]["base_optimizer_state"]["state"][rank_state]["step"] = value

    return edit


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor(math.nan),
        torch.tensor(math.inf),
        torch.tensor(-1.0),
        "ten",
        torch.zeros(2),
        -4,
        math.nan,
    ],
    ids=["nan", "inf", "negative", "string", "two-elements", "negative-int", "nan-float"],
)
def test_bad_step(cli, tmp_path: Path, value: Any) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, OPTIM1, _set_step(value))
    _refused(cli, root, tmp_path, OPTIM1, "base_optimizer_state.state[0].step")


def test_zero3_flat_groups_not_tensors(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z3-fp32-dp2")
    _edit(root, Z3_OPTIM0, _osd("fp32_flat_groups", [None]))
    _refused(cli, root, tmp_path, Z3_OPTIM0, "fp32_flat_groups[0]")


def test_zero3_partition_count_zero(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z3-fp32-dp2")
    _edit(root, Z3_OPTIM0, _osd("partition_count", 0))
    _refused(cli, root, tmp_path, Z3_OPTIM0, "partition_count")


# --- 2. keys DeepSpeed always writes ---------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, file, path, key",
    [
        ("z2-fp32-dp2", MODEL, (), "param_shapes"),
        ("z2-fp32-dp2", OPTIM1, (), "optimizer_state_dict"),
        ("z2-fp32-dp2", OPTIM1, ("optimizer_state_dict",), "single_partition_of_fp32_groups"),
        ("z2-fp32-dp2", OPTIM1, ("optimizer_state_dict",), "partition_count"),
        ("z2-fp32-dp2", OPTIM1, ("optimizer_state_dict",), "group_paddings"),
        ("z2-fp32-dp2", MODEL, (), "frozen_param_fragments"),
        ("z3-fp32-dp2", Z3_OPTIM0, ("optimizer_state_dict",), "fp32_flat_groups"),
        ("z3-fp32-dp2", Z3_MODEL0, (), "param_shapes"),
    ],
)
def test_missing_key(
    cli, tmp_path: Path, fixture: str, file: str, path: tuple[str, ...], key: str
) -> None:
    root = _copy(tmp_path, "zero", fixture)

    def drop(sd: dict[str, Any]) -> None:
        for step in path:
            sd = sd[step]
        del sd[key]

    _edit(root, file, drop)
    dotted = ".".join((*path, key))
    assert f"key `{dotted}` is missing" in _error_codes(root)["missing-key"]
    _refused(cli, root, tmp_path, file, f"`{dotted}` is missing")


def test_missing_frozen_fragment(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd["frozen_param_fragments"].pop("adapter.bias"))
    _refused(cli, root, tmp_path, MODEL, "frozen_param_fragments.adapter.bias` is missing")


def test_missing_module_is_not_a_model_file(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd.pop("module"))
    _refused(cli, root, tmp_path, MODEL, "no `module` key")


# --- 3. tensor views -------------------------------------------------------------------------


def test_transposed_view_is_its_own_tensor_not_an_alias(tmp_path: Path) -> None:
    """head.weight saved as embed.weight.t(): same storage and offset, another shape."""
    root = _copy(tmp_path, "zero", "z0-fp32-dp2")
    _edit(
        root,
        MODEL,
        lambda sd: sd["module"].__setitem__("head.weight", sd["module"]["embed.weight"].t()),
    )
    import dsckpt

    layout = open_checkpoint(root)
    head = next(t for t in layout.tensors if t.name == "head.weight")
    assert head.kind != "tied" and head.shape == (7, 13)
    sd = dsckpt.state_dict(root)
    assert torch.equal(sd["head.weight"], sd["embed.weight"].t())


def test_identical_view_is_an_alias(tmp_path: Path) -> None:
    layout = open_checkpoint(ckpt("zero", "z0-fp32-dp2"))
    head = next(t for t in layout.tensors if t.name == "head.weight")
    assert head.kind == "tied" and head.alias_of == "embed.weight" and head.shape == (13, 7)


def test_slice_of_another_tensor_is_not_an_alias(tmp_path: Path) -> None:
    """Same storage offset and numel as fc1.bias, but a different tensor: offset + numel alone
    used to call it an alias."""
    root = _copy(tmp_path, "zero", "z0-fp32-dp2")

    def edit(sd: dict[str, Any]) -> None:
        w = sd["module"]["fc1.weight"]  # [5, 7]
        sd["module"]["fc1.weight"] = w
        sd["module"]["fc1.bias"] = w.t()[0]  # 5 elements at offset 0, stride 7

    _edit(root, MODEL, edit)
    layout = open_checkpoint(root)
    bias = next(t for t in layout.tensors if t.name == "fc1.bias")
    assert bias.kind != "tied"


@pytest.mark.parametrize(
    "make",
    # Storages large enough that the reader's own check (more elements than the storage holds,
    # refused while unpickling) does not fire first: only discovery sees the overlap.
    [
        lambda sd: torch.zeros(1000).as_strided((1000,), (0,)),
        lambda sd: torch.zeros(20).as_strided((3, 3), (1, 1)),
    ],
    ids=["stride-0", "overlapping"],
)
def test_expanded_or_overlapping_view_is_refused(cli, tmp_path: Path, make: Any) -> None:
    root = _copy(tmp_path, "zero", "z0-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd["module"].__setitem__("norm.weight", make(sd)))
    assert "module.norm.weight" in _error_codes(root)["bad-metadata"]
    _refused(cli, root, tmp_path, MODEL, "module.norm.weight", "more than once")


def test_strided_fp32_partition_is_refused(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")

    def edit(sd: dict[str, Any]) -> None:
        groups = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        groups[1] = torch.zeros(2 * groups[1].numel())[::2]

    _edit(root, OPTIM1, edit)
    _refused(cli, root, tmp_path, OPTIM1, "single_partition_of_fp32_groups[1]", "contiguous")


# --- 4. the fp32 master: floating point, one dtype -------------------------------------------


def _cast_group(dtype: torch.dtype, group: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        groups = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        groups[group] = groups[group].to(dtype)

    return edit


def test_integer_master_is_refused(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, OPTIM1, _cast_group(torch.int32))
    assert OPTIM1 in _error_codes(root)["master-dtype"]
    _refused(cli, root, tmp_path, OPTIM1, "single_partition_of_fp32_groups[0]", "int32")


def test_master_of_mixed_dtypes_is_refused(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, OPTIM1, _cast_group(torch.bfloat16, 1))
    line = _refused(cli, root, tmp_path, OPTIM1, "single_partition_of_fp32_groups[1]")
    assert "bfloat16" in line and "float32" in line


def test_uniform_low_precision_master_is_a_warning(tmp_path: Path) -> None:
    """DeepSpeed's ZeRO-1/2 can keep bf16 master weights (master_weights_and_grads_dtype):
    read in that dtype, said plainly, not refused."""
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    for rank in (0, 1):
        for group in (0, 1):
            _edit(
                root,
                f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                _cast_group(torch.bfloat16, group),
            )
    layout = open_checkpoint(root)
    assert not layout.errors
    assert any(f.code == "master-dtype" and "bfloat16" in f.message for f in layout.findings)
    assert layout.master_dtype == "bfloat16"


# --- 5. files DeepSpeed writes that no layout here reads (MoE) --------------------------------


@pytest.mark.parametrize(
    "fixture, names",
    [
        (
            "z0-fp32-dp2",
            [
                "layer_0_expert_0_mp_rank_00_model_states.pt",
                "layer_0_expert_1_mp_rank_00_model_states.pt",
                "expp_rank_0_mp_rank_00_optim_states.pt",
            ],
        ),
        ("z2-fp32-dp2", ["layer_1_expert_3_mp_rank_00_model_states.pt"]),
        ("z2-fp32-dp2", ["expert_0_mp_rank_00_model_states.pt"]),
    ],
)
def test_moe_files_refuse_every_writer(cli, tmp_path: Path, fixture: str, names: list[str]) -> None:
    root = _copy(tmp_path, "zero", fixture)
    for name in names:
        shutil.copyfile(_tag(root) / MODEL, _tag(root) / name)
    layout = open_checkpoint(root)  # inspect still shows the rest
    assert layout.tensors
    # MoE files in a checkpoint whose model records no MoE layers are stale; the older
    # expert naming is a layout dsckpt does not read
    finding = next(f for f in layout.errors if f.code in ("unsupported-files", "stale-expert-file"))
    assert ("MoE" in finding.message or "mixture-of-experts" in finding.message) and names[
        0
    ] in finding.message
    with pytest.raises(DsckptError, match=names[0]):
        refuse_errors(layout)
    _refused(cli, root, tmp_path, names[0])
    if fixture != "z0-fp32-dp2":
        result = cli("reshape", root, tmp_path / "re", "--dp", "3")
        assert result.exit_code == 1 and names[0] in result.stderr, result.output
        assert not (tmp_path / "re").exists()


def test_other_deepspeed_like_names_are_errors_too(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    shutil.copyfile(_tag(root) / MODEL, _tag(root) / "zero_pp_rank_0_mp_rank_00-model_states.pt")
    (_tag(root) / "notes.txt").write_text("kept as unrelated")
    layout = open_checkpoint(root)
    codes = {f.code: f for f in layout.findings}
    assert "zero_pp_rank_0_mp_rank_00-model_states.pt" in codes["unsupported-files"].message
    assert "notes.txt" in codes["unrelated-files"].message
    _refused(cli, root, tmp_path, "of a kind dsckpt does not know")


def test_pipeline_reshape_passes_the_same_gate(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "pipe", "p2t2d1-z1-fp32")
    tag = _tag(root)
    shutil.copyfile(tag / MODEL, tag / "layer_0_expert_0_mp_rank_00_model_states.pt")
    result = cli("reshape", root, tmp_path / "re", "--tp", "1")
    assert result.exit_code == 1, result.output
    assert "layer_0_expert_0_mp_rank_00_model_states.pt" in result.stderr, result.output
    assert not (tmp_path / "re").exists()


def test_expert_groups_with_their_own_partition_count(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    for rank in (0, 1):
        _edit(
            root, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", _osd("partition_count", [2, 1])
        )
    assert "MoE" in _error_codes(root)["unsupported-moe"]
    _refused(cli, root, tmp_path, "[2, 1]", "MoE")


# --- 6. completeness -------------------------------------------------------------------------


def test_module_key_found_nowhere_else_is_missing(cli, tmp_path: Path) -> None:
    """ZeRO-2 records its frozen parameters: a module tensor that is neither a partitioned,
    frozen, buffer nor tied name would be dropped silently; refused instead."""
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, MODEL, lambda sd: sd["module"].__setitem__("ghost.weight", torch.zeros(3)))
    assert not open_checkpoint(root).errors
    _refused(cli, root, tmp_path, "misses 1 key (ghost.weight)", "`module` of " + MODEL)


def test_alias_the_model_does_not_have_is_extra(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z3-fp32-dp2")
    _edit(
        root, Z3_MODEL0, lambda sd: sd["shared_params"].__setitem__("extra.alias", "embed.weight")
    )
    _refused(cli, root, tmp_path, "adds 1 key (extra.alias)")


def test_pipeline_layer_tensor_outside_param_shapes_is_missing(cli, tmp_path: Path) -> None:
    """A buffer or frozen tensor in a layer file is not in param_shapes: consolidating from
    the optimizer partitions would drop it."""
    root = _copy(tmp_path, "pipe", "p2t2d1-z1-fp32")
    layer = sorted(p.name for p in _tag(root).glob("layer_*-model_00-model_states.pt"))[1]
    _edit(root, layer, lambda sd: sd.__setitem__("rotary.inv_freq", torch.ones(4)))
    _refused(cli, root, tmp_path, "misses 1 key", "rotary.inv_freq")


@pytest.mark.parametrize(
    "kind, name",
    [
        ("zero", "z1-fp32-dp2"),
        ("zero", "z2-bf16-dp3"),
        ("zero", "z3-fp32-dp3"),
        ("zero", "z0-fp32-dp1"),
        ("pipe", "p2t2d2-z1-fp32"),
    ],
)
def test_fixtures_record_their_keys(kind: str, name: str) -> None:
    from conftest import facts

    from dsckpt.plan.consolidation import plan_consolidation

    layout = open_checkpoint(ckpt(kind, name))
    assert layout.model_keys and layout.model_keys_from
    plan = plan_consolidation(layout)
    assert set(plan.names()) == set(layout.model_keys)
    if kind == "zero":
        assert sorted(layout.model_keys) == sorted(facts(kind, name)["state_dict_keys"])


def test_exclude_frozen_expects_no_frozen_keys(tmp_path: Path) -> None:
    from dsckpt.plan.consolidation import plan_consolidation
    from dsckpt.plan.model import ConsolidationOptions

    layout = open_checkpoint(ckpt("zero", "z2-fp32-dp2"))
    names = plan_consolidation(layout, ConsolidationOptions(exclude_frozen=True)).names()
    assert "adapter.weight" not in names and "embed.weight" in names


# --- 7. mixed runs name the files that do not belong -----------------------------------------


def test_step_minority_is_named(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z1-fp32-dp3")
    for state in (0, 1):
        _edit(root, OPTIM1, _set_step(torch.tensor(7.0), state))
    message = _error_codes(root)["mixed-runs"]
    assert message.startswith(f"{OPTIM1} is at step 7")
    assert "where the other 2 optimizer files are at step 3" in message
    assert "it comes from another save; copy one save whole" in message
    _refused(cli, root, tmp_path, OPTIM1, "is at step 7")


def test_ds_version_minority_is_named(tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp4")
    name = "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    _edit(root, name, _osd("ds_version", "0.9.0"))
    message = _error_codes(root)["mixed-runs"]
    assert message.startswith(f"{name} records ds_version=0.9.0 where the other 3 optimizer")


def test_zero3_global_steps_minority_is_named(tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z3-fp32-dp3")
    name = "zero_pp_rank_2_mp_rank_00_model_states.pt"
    _edit(root, name, lambda sd: sd.__setitem__("global_steps", 9))
    message = _error_codes(root)["mixed-runs"]
    assert message.startswith(f"{name} records global_steps=9 where the other 2 ZeRO-3")


def test_pipeline_stage_from_another_save_is_named(tmp_path: Path) -> None:
    root = _copy(tmp_path, "pipe", "p2t2d1-z1-fp32")
    _edit(root, "mp_rank_03_model_states.pt", lambda sd: sd.__setitem__("global_steps", 1))
    message = _error_codes(root)["mixed-runs"]
    assert message.startswith(
        "mp_rank_03_model_states.pt records global_steps=1 where the other 3 model-states files"
    )


def test_two_files_without_a_majority_are_both_named(tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z2-fp32-dp2")
    _edit(root, OPTIM1, _osd("partition_count", [4, 4]))
    message = _error_codes(root)["mixed-runs"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt records partition_count=[2, 2]" in message
    assert f"{OPTIM1} records partition_count=[4, 4]" in message


# --- 8. one gate; show-map sees the findings -------------------------------------------------


def test_refuse_errors_is_the_gate(tmp_path: Path) -> None:
    root = _copy(tmp_path, "zero", "z1-fp32-dp3")
    (_tag(root) / OPTIM1).unlink()
    (_tag(root) / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")
    layout = open_checkpoint(root)
    assert len(layout.errors) >= 2
    with pytest.raises(InconsistentCheckpoint, match=r"more; `dsckpt inspect` lists them"):
        refuse_errors(layout)
    refuse_errors(open_checkpoint(ckpt("zero", "z1-fp32-dp3")))  # a clean one passes


def test_topology_map_carries_the_findings(tmp_path: Path) -> None:
    from dsckpt.plan.topology_map import topology_map

    root = _copy(tmp_path, "pipe", "p2t2d1-z1-fp32")
    (_tag(root) / "layer_01-model_01-model_states.pt").unlink()
    tmap = topology_map(open_checkpoint(root))
    assert any(f.code == "missing-rank-file" for f in tmap.findings)
    assert topology_map(open_checkpoint(ckpt("pipe", "p2t2d1-z1-fp32"))).findings == ()


def test_tag_dir_helper_matches() -> None:
    assert _tag(ckpt("zero", "z2-fp32-dp2")) == tag_dir("zero", "z2-fp32-dp2")
