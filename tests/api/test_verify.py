"""`dsckpt verify` and the per-parameter optimizer state reader, on the real fixtures.

Equal cases: every fixture against dsckpt's own outputs in each format, its bf16 cast, and
DeepSpeed's `zero_to_fp32` output (the fixtures' ref_deepspeed.pt saved as a .bin); reshapes
against their sources. Differing cases: one flipped byte, a dropped, extra, re-typed or
re-shaped tensor, one flipped byte of an Adam moment in a reshape's rank file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, PIPE, ZERO, ckpt, facts
from safetensors.torch import load_file, save_file

import dsckpt
from dsckpt.api import verify as core
from dsckpt.api.consolidation import plan_for
from dsckpt.discover.layout import open_checkpoint
from dsckpt.errors import CorruptFile, UnsupportedLayout
from dsckpt.execute.executor import materialize
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.optim_state import plan_optimizer_state

ZERO_OPTIM = [n for n in ZERO if facts("zero", n)["zero_stage"] > 0]
PIPE_OPTIM = [n for n in PIPE if facts("pipe", n).get("zero_stage", 1) > 0 and "z0" not in n]
WITH_DS_REF = [n for n in ZERO if (FIXTURES / "zero" / n / "ref_deepspeed.pt").exists()]
FORMATS = ["model.safetensors", "model.bin", "shards"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _one_line(text: str) -> str:
    lines = text.strip("\n").splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- the optimizer state reader --------------------------------------------------------------


@pytest.mark.parametrize("name", ZERO_OPTIM)
def test_optimizer_state_is_bitwise_the_live_runs(name: str) -> None:
    layout = open_checkpoint(ckpt("zero", name))
    state = plan_optimizer_state(layout, plan_for(layout))
    ref = torch.load(FIXTURES / "zero" / name / "ref_live_optim.pt", weights_only=True)
    assert state.keys == ("exp_avg", "exp_avg_sq")
    for key in state.keys:
        got = {t.name: materialize(t) for t in state.plans[key].tensors}
        assert set(got) == set(ref)
        for param, moments in ref.items():
            assert got[param].dtype == moments[key].dtype
            assert torch.equal(_bits(got[param]), _bits(moments[key])), (key, param)
    assert set(state.steps) == set(ref)
    assert set(state.steps.values()) == {facts("zero", name)["steps"]}


@pytest.mark.parametrize("name", PIPE_OPTIM)
def test_optimizer_state_of_pipelines_merges_tp_like_the_weights(name: str) -> None:
    layout = open_checkpoint(ckpt("pipe", name))
    state = plan_optimizer_state(layout, plan_for(layout, strip_vocab_padding=False))
    truth = torch.load(FIXTURES / "pipe" / name / "truth_optim.pt", weights_only=True)
    for key in ("exp_avg", "exp_avg_sq"):
        got = {t.name: materialize(t) for t in state.plans[key].tensors}
        assert set(got) == set(truth[key])
        for param, value in truth[key].items():
            assert torch.equal(_bits(got[param]), _bits(value)), (key, param)
    assert set(state.steps.values()) == {truth["step"]}


def test_optimizer_state_of_stage_0_is_refused() -> None:
    layout = open_checkpoint(ckpt("zero", "z0-fp32-dp2"))
    with pytest.raises(UnsupportedLayout, match="keyed by position"):
        plan_optimizer_state(layout, plan_for(layout))


# --- CKPT vs OUT: equal ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ZERO)
def test_every_output_format_verifies(tmp_path: Path, name: str, fmt: str) -> None:
    out = tmp_path / fmt
    dsckpt.consolidate(ckpt("zero", name), out, max_shard_size="1KB")
    result = core.verify_output(ckpt("zero", name), out)
    assert result.equal, result.summary()
    keys = facts("zero", name)["state_dict_keys"]
    assert result.tensors == len(keys)  # tied aliases too (a .bin shares their storage)
    assert result.notes == []


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["z2-fp32-dp2", "z3-fp32-dp3", "z1-bf16-dp2", "z2-fp16-dp3"])
def test_a_cast_output_verifies_against_the_same_cast(
    tmp_path: Path, name: str, dtype: str
) -> None:
    out = tmp_path / "model.safetensors"
    dsckpt.consolidate(ckpt("zero", name), out, dtype=dtype)
    result = core.verify_output(ckpt("zero", name), out)
    assert result.equal, result.summary()
    assert "compared with the weights cast to it" in result.notes[0]
    assert core.verify_output(ckpt("zero", name), out, dtype=dtype).equal
    # Told the output is fp32, every floating tensor is a dtype difference.
    strict = core.verify_output(ckpt("zero", name), out, dtype="fp32")
    assert {d.what for d in strict.differences} == {"dtype"}


@pytest.mark.parametrize("name", WITH_DS_REF)
def test_deepspeeds_zero_to_fp32_output_verifies(tmp_path: Path, name: str) -> None:
    out = tmp_path / "pytorch_model.bin"
    torch.save(torch.load(FIXTURES / "zero" / name / "ref_deepspeed.pt", weights_only=True), out)
    zero1 = facts("zero", name)["zero_stage"] == 1
    result = core.verify_output(ckpt("zero", name), tmp_path, exclude_frozen=zero1)
    assert result.equal, result.summary()
    assert result.b_format == "torch"
    if facts("zero", name)["dtype"] != "fp32" and not zero1:
        # zero_to_fp32 keeps frozen parameters in their saved (16-bit) dtype.
        assert "adapter.weight" in " ".join(result.notes)


def test_zero_to_fp32_drops_zero1_frozen_params_and_verify_says_so(tmp_path: Path, cli) -> None:
    out = tmp_path / "pytorch_model.bin"
    ref = FIXTURES / "zero" / "z1-fp32-dp2" / "ref_deepspeed.pt"
    torch.save(torch.load(ref, weights_only=True), out)
    result = cli("verify", ckpt("zero", "z1-fp32-dp2"), out)
    assert result.exit_code == 1
    line = _one_line(result.stdout)
    assert line.startswith("differ:") and "2 missing" in line and "adapter.weight" in line


def test_deepspeeds_sharded_safetensors_output_verifies(tmp_path: Path) -> None:
    ref = torch.load(FIXTURES / "zero" / "z2-fp32-dp2" / "ref_deepspeed.pt", weights_only=True)
    # as zero_to_fp32 --safe_serialization --max_shard_size writes it (tied duplicates dropped)
    ref.pop("head.weight")
    names = list(ref)
    shards = {
        "model-00001-of-00002.safetensors": names[:6],
        "model-00002-of-00002.safetensors": names[6:],
    }
    for shard, keys in shards.items():
        save_file({k: ref[k].contiguous() for k in keys}, tmp_path / shard, {"format": "pt"})
    weight_map = {k: s for s, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    result = core.verify_output(ckpt("zero", "z2-fp32-dp2"), tmp_path)
    assert result.equal, result.summary()
    assert result.b_format == "sharded safetensors"
    assert result.notes == [
        "OUT omits 1 tied alias(es), as Hugging Face outputs do: head.weight (tied to embed.weight)"
    ]


@pytest.mark.parametrize("name", PIPE)
def test_pipeline_outputs_verify(tmp_path: Path, name: str) -> None:
    out = tmp_path / "model.safetensors"
    from_layers = "z0" in name
    dsckpt.consolidate(ckpt("pipe", name), out, from_layers=from_layers)
    assert core.verify_output(ckpt("pipe", name), out, from_layers=from_layers).equal


def test_chunked_comparison_finds_the_exact_element(tmp_path: Path, monkeypatch) -> None:
    """Windows smaller than a tensor: the count and the first index survive the chunking."""
    monkeypatch.setattr(core, "CAST_CHUNK", 5)
    out = tmp_path / "model.safetensors"
    dsckpt.consolidate(ckpt("zero", "z2-fp32-dp2"), out)
    assert core.verify_output(ckpt("zero", "z2-fp32-dp2"), out).equal
    ref = core.open_output(out).tensors["fc1.weight"]  # [5, 7]
    _flip(out, ref.offset + 4 * 23)  # element 23 = [3, 2], in the fifth window
    _flip(out, ref.offset + 4 * 31 + 3)
    result = core.verify_output(ckpt("zero", "z2-fp32-dp2"), out)
    assert [(d.name, d.what, d.detail) for d in result.differences] == [
        ("fc1.weight", "values", "2 of 35 elements differ, first at [3, 2]")
    ]


def test_progress_counts_every_byte_once(tmp_path: Path) -> None:
    out = tmp_path / "model.bin"
    dsckpt.consolidate(ckpt("zero", "z3-fp32-dp3"), out)

    class Sink(ProgressSink):
        total = done = 0

        def start(self, description: str, total: int) -> None:
            self.total = total

        def advance(self, nbytes: int) -> None:
            self.done += nbytes

    sink = Sink()
    core.verify_output(ckpt("zero", "z3-fp32-dp3"), out, progress=sink)
    assert sink.total == sink.done == sum(r.nbytes for r in core.open_output(out).tensors.values())


# --- CKPT vs OUT: differences ----------------------------------------------------------------


@pytest.fixture
def out_st(tmp_path: Path) -> Path:
    out = tmp_path / "model.safetensors"
    dsckpt.consolidate(ckpt("zero", "z2-bf16-dp2"), out)
    return out


def _rewrite(out: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = dict(load_file(out))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)


def test_one_flipped_byte_exits_1_naming_the_tensor(cli, out_st: Path) -> None:
    ref = core.open_output(out_st).tensors["fc2.weight"]
    before = out_st.read_bytes()
    _flip(out_st, ref.offset + 7)
    flipped = out_st.read_bytes()
    result = cli("verify", ckpt("zero", "z2-bf16-dp2"), out_st)
    assert result.exit_code == 1
    assert _one_line(result.stdout) == (
        f"differ: {out_st} vs {ckpt('zero', 'z2-bf16-dp2')}: 1 values: fc2.weight "
        "(values: 1 of 35 elements differ, first at [0, 1])"
    )
    assert result.stderr == ""
    assert out_st.read_bytes() == flipped != before  # verify never writes


def test_a_flipped_tied_alias_is_named(out_st: Path) -> None:
    ref = core.open_output(out_st).tensors["head.weight"]
    _flip(out_st, ref.offset)
    result = core.verify_output(ckpt("zero", "z2-bf16-dp2"), out_st)
    assert [(d.name, d.what) for d in result.differences] == [("head.weight", "values")]
    assert result.differences[0].detail.startswith("tied to embed.weight: 1 of 91")


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda t: t.pop("fc1.bias"), [("fc1.bias", "missing")]),
        (lambda t: t.update(extra=torch.zeros(3)), [("extra", "extra")]),
        (lambda t: t.update({"fc1.weight": t["fc1.weight"].bfloat16()}), [("fc1.weight", "dtype")]),
        (lambda t: t.update({"fc1.weight": t["fc1.weight"].t()}), [("fc1.weight", "shape")]),
        (lambda t: t.update({"perm": t["perm"].int()}), [("perm", "dtype")]),
        (
            lambda t: [t.pop("head.weight"), t.pop("embed.weight")],
            [("embed.weight", "missing"), ("head.weight", "missing")],
        ),
    ],
    ids=["missing", "extra", "dtype", "shape", "int-dtype", "tied-set-missing"],
)
def test_each_kind_of_difference(cli, out_st: Path, change, expected) -> None:  # type: ignore[no-untyped-def]
    _rewrite(out_st, change)
    result = core.verify_output(ckpt("zero", "z2-bf16-dp2"), out_st)
    assert [(d.name, d.what) for d in result.differences] == expected
    run = cli("verify", ckpt("zero", "z2-bf16-dp2"), out_st, "--json")
    assert run.exit_code == 1
    data = json.loads(run.stdout)
    assert data["equal"] is False
    assert [(d["name"], d["what"]) for d in data["differences"]] == expected


def test_a_lossless_widening_is_a_note_unless_the_dtype_is_given(out_st: Path) -> None:
    _rewrite(out_st, lambda t: t.update({"fc1.weight": t["fc1.weight"].double()}))
    result = core.verify_output(ckpt("zero", "z2-bf16-dp2"), out_st)
    assert result.equal, result.summary()
    assert "fc1.weight (float64)" in result.notes[0]
    strict = core.verify_output(ckpt("zero", "z2-bf16-dp2"), out_st, dtype="fp32")
    assert [(d.name, d.what) for d in strict.differences] == [("fc1.weight", "dtype")]


def test_an_omitted_canonical_is_a_note_when_its_alias_is_there(out_st: Path) -> None:
    _rewrite(out_st, lambda t: t.pop("embed.weight"))
    result = core.verify_output(ckpt("zero", "z2-bf16-dp2"), out_st)
    assert result.equal, result.summary()
    assert "embed.weight (tied to head.weight)" in result.notes[0]


def test_a_damaged_output_is_one_error_line(cli, out_st: Path) -> None:
    out_st.write_bytes(out_st.read_bytes()[:200])
    result = cli("verify", ckpt("zero", "z2-bf16-dp2"), out_st)
    assert result.exit_code == 1
    assert _one_line(result.stderr).startswith(f"error: {out_st}: ")
    with pytest.raises(CorruptFile):
        core.open_output(out_st)


def test_a_directory_without_an_output_is_refused(cli, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    result = cli("verify", ckpt("zero", "z2-fp32-dp2"), tmp_path)
    assert result.exit_code == 1
    assert "holds no model.safetensors" in _one_line(result.stderr)


# --- CKPT_A vs CKPT_B ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,dp",
    [
        ("z2-fp32-dp2", 3),
        ("z1-bf16-dp4-padrank", 3),
        ("z3-fp32-dp3", 2),
        ("z2-fp32-dp2-roundrobin", 3),
        ("z1-fp16-dp2", 1),
        ("z3-bf16-dp2", 3),
    ],
)
def test_a_reshape_verifies_against_its_source(tmp_path: Path, name: str, dp: int) -> None:
    dsckpt.reshape(ckpt("zero", name), tmp_path / "re", dp=dp)
    result = core.verify_checkpoints(ckpt("zero", name), tmp_path / "re")
    assert result.equal, result.summary()
    n = len(facts("zero", name)["state_dict_keys"]) - 1  # tied aliases are compared as names
    assert result.tensors == n + 2 * len(facts("zero", name)["trainable_params"])
    names = {c[0] for c in result.counters}
    assert {
        "global_steps",
        "param_groups[0].lr",
        "param_groups[1].weight_decay",
        "param_groups[0].betas",
        "param_groups[0].eps",
    } <= names


def test_a_pipeline_reshape_verifies_against_its_source(tmp_path: Path, cli) -> None:
    dsckpt.reshape(ckpt("pipe", "p2t2d2-z1-fp32"), tmp_path / "re", tp=1, pp=1, dp=2)
    result = cli("verify", ckpt("pipe", "p2t2d2-z1-fp32"), tmp_path / "re", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["equal"] and data["mode"] == "checkpoints"
    assert data["notes"] == ["ZeRO-1, TP 2 x PP 2 x DP 2 vs ZeRO-1, TP 1 x PP 1 x DP 2"]


def test_a_flipped_moment_byte_in_a_reshape_names_param_and_state(tmp_path: Path, cli) -> None:
    re = tmp_path / "re"
    dsckpt.reshape(ckpt("zero", "z2-fp32-dp2"), re, dp=3)
    layout = open_checkpoint(re)
    state = plan_optimizer_state(layout, plan_for(layout))
    target = next(t for t in state.plans["exp_avg_sq"].tensors if t.name == "fc2.weight")
    read = target.reads[-1]
    _flip(read.source.path, read.source.offset + read.src_start * 4 + 2)
    result = cli("verify", ckpt("zero", "z2-fp32-dp2"), re)
    assert result.exit_code == 1
    line = _one_line(result.stdout)
    assert line.startswith(f"differ: {re} vs ")
    assert (
        ": 1 values: exp_avg_sq of fc2.weight (values: 1 of 35 elements differ, first at "
        f"[{read.dst_start // 5}, {read.dst_start % 5}])" in line
    )


def test_different_runs_and_groups_differ_in_values_and_counters() -> None:
    result = core.verify_checkpoints(
        ckpt("zero", "z2-fp32-dp2"), ckpt("zero", "z2-fp32-dp4-padrank")
    )
    kinds = {d.what for d in result.differences}
    assert "counter" in kinds  # the padrank run has a third param group
    assert any(d.name.startswith("param_groups[2].") for d in result.differences)


def test_stage_0_checkpoints_compare_their_optimizer_state_by_position(tmp_path: Path) -> None:
    shutil.copytree(ckpt("zero", "z0-fp32-dp2"), tmp_path / "copy")
    result = core.verify_checkpoints(ckpt("zero", "z0-fp32-dp2"), tmp_path / "copy")
    assert result.equal
    assert result.tensors > len(facts("zero", "z0-fp32-dp2")["state_dict_keys"])


def test_zero_against_stage_0_is_refused_in_one_line(cli) -> None:
    result = cli("verify", ckpt("zero", "z2-fp32-dp2"), ckpt("zero", "z0-fp32-dp2"))
    assert result.exit_code == 1
    assert "keyed by position" in _one_line(result.stderr)


def test_output_flags_are_refused_for_two_checkpoints(cli) -> None:
    result = cli(
        "verify", ckpt("zero", "z2-fp32-dp2"), ckpt("zero", "z2-fp32-dp1"), "--dtype", "bf16"
    )
    assert result.exit_code == 1
    assert "describe an output" in _one_line(result.stderr)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_equal_prints_one_line_and_exits_0(cli, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    dsckpt.consolidate(ckpt("zero", "z3-fp32-dp3"), out, max_shard_size="1KB")
    result = cli("verify", ckpt("zero", "z3-fp32-dp3"), out)
    assert result.exit_code == 0, result.output
    line = _one_line(result.stdout)
    assert line.startswith(f"equal: {out} (sharded safetensors) matches ")
    assert " 13 tensors " in line
    data = json.loads(cli("verify", ckpt("zero", "z3-fp32-dp3"), out, "--json").stdout)
    assert data["equal"] is True and data["tensors"] == 13 and data["differences"] == []
