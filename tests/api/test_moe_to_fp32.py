"""`to-fp32` on every MoE fixture: bit for bit the live fp32 master (ref_live.pt, gathered at save
time), every format, verify agreeing, strict loads into the model class; --optimizer against the
live optimizer state; AutoEP --hf-names into transformers' Mixtral."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, MOE, ckpt, facts, load_output
from safetensors.torch import load_file

from dsckpt.api.consolidation import consolidate
from dsckpt.api.verify import verify_output
from dsckpt.errors import UnsupportedLayout

MOE_DIR = FIXTURES / "moe"
READABLE = MOE
NATIVE = [n for n in READABLE if facts("moe", n)["kind"] == "native"]
AUTOEP = [n for n in READABLE if facts("moe", n)["kind"] == "autoep"]
FORMATS = ["model.safetensors", "model.bin", "shards"]


def _ref(name: str) -> dict[str, torch.Tensor]:
    return torch.load(MOE_DIR / name / "ref_live.pt", weights_only=True)


def _assert_bitwise(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key].dtype == torch.float32, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value.float()), key


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", READABLE)
def test_every_moe_fixture_bitwise(tmp_path: Path, name: str, fmt: str) -> None:
    out = tmp_path / fmt if fmt != "shards" else tmp_path / "hf"
    consolidate(ckpt("moe", name), out, max_shard_size="4KB")
    got = load_output(out)
    ref = _ref(name)
    assert set(ref) == set(facts("moe", name)["state_dict_keys"])
    _assert_bitwise(got, ref)
    result = verify_output(ckpt("moe", name), out)
    assert result.equal, result.summary()


def test_sharded_moe_output_has_several_shards(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    consolidate(ckpt("moe", "z2-fp32-ep2-dp4-residual"), out, max_shard_size="2KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2


def test_verify_sees_a_wrong_expert(tmp_path: Path) -> None:
    """verify can fail: two experts swapped in the output are reported."""
    out = tmp_path / "m.safetensors"
    consolidate(ckpt("moe", "z2-fp32-ep2-dp2"), out)
    sd = load_file(out)
    a = "moe1.deepspeed_moe.experts.deepspeed_experts.1.up.weight"
    b = "moe1.deepspeed_moe.experts.deepspeed_experts.2.up.weight"
    sd[a], sd[b] = sd[b].clone(), sd[a].clone()
    from safetensors.torch import save_file

    save_file(sd, out)
    result = verify_output(ckpt("moe", "z2-fp32-ep2-dp2"), out)
    assert not result.equal
    assert {d.name for d in result.differences} == {a, b}


@pytest.mark.parametrize("name", NATIVE)
def test_native_output_loads_strictly_into_the_model(tmp_path: Path, name: str) -> None:
    pytest.importorskip("deepspeed")  # the model holds deepspeed.moe layers
    sys.path.insert(0, str(FIXTURES))
    import tiny_moe

    f = facts("moe", name)
    out = tmp_path / "m.safetensors"
    consolidate(ckpt("moe", name), out)
    model = tiny_moe.build_model(
        f["seed"], (1, 1), k=f["top_k"], residual=f["residual"], expert_hidden=f["expert_hidden"]
    )
    model.load_state_dict(load_output(out), strict=True)
    state = model.state_dict()
    ref = _ref(name)
    assert all(torch.equal(state[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", [n for n in READABLE if facts("moe", n)["zero_stage"] > 0])
def test_optimizer_state_is_the_live_one(tmp_path: Path, name: str) -> None:
    out = tmp_path / "m.safetensors"
    consolidate(ckpt("moe", name), out, optimizer=True)
    got = load_file(tmp_path / "m.optimizer.safetensors")
    live = torch.load(MOE_DIR / name / "ref_live_optim.pt", weights_only=True)
    compared = 0
    for param, state in live.items():
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            assert torch.equal(got[f"{param}.{key}"].reshape(value.shape), value.float()), (
                param,
                key,
            )
            compared += 1
    experts = [p for p in live if "experts" in p]
    assert experts and compared >= 2 * len(live)


def test_zero0_optimizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedLayout, match="keyed by position"):
        consolidate(ckpt("moe", "z0-fp32-ep2-dp2"), tmp_path / "m.safetensors", optimizer=True)
    assert not list(tmp_path.iterdir())


# --- AutoEP: Hugging Face names ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["model.safetensors", "shards"])
@pytest.mark.parametrize("name", AUTOEP)
def test_autoep_hf_names_load_into_mixtral(tmp_path: Path, name: str, fmt: str) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(FIXTURES))
    import tiny_moe
    from transformers import MixtralForCausalLM

    out = tmp_path / fmt if fmt != "shards" else tmp_path / "hf"
    consolidate(ckpt("moe", name), out, hf_names=True)
    got = load_output(out)
    expected = tiny_moe.autoep_to_hf(_ref(name))
    _assert_bitwise(got, expected)
    assert verify_output(ckpt("moe", name), out).equal
    model = MixtralForCausalLM(tiny_moe.mixtral_config())
    model.load_state_dict(got, strict=True)
    model.eval()
    # the reference: the live master through the fixture's own AutoEP -> HF mapping
    reference = MixtralForCausalLM(tiny_moe.mixtral_config())
    reference.load_state_dict(expected, strict=True)
    reference.eval()
    tokens = torch.arange(16).reshape(2, 8) % tiny_moe.MIXTRAL_VOCAB
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    if fmt == "shards":
        tiny_moe.mixtral_config().save_pretrained(out)
        loaded = MixtralForCausalLM.from_pretrained(out)
        weights = loaded.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in expected.items())
        loaded.eval()
        # from_pretrained may pick another attention kernel than the eager reference
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits)


def test_autoep_keys_as_autoep_names_them(tmp_path: Path) -> None:
    """Without --hf-names: AutoEP's own names, the router master also under its alias."""
    out = tmp_path / "m.safetensors"
    consolidate(ckpt("moe", "autoep-z2-bf16-ep2-dp4"), out)
    got = load_file(out)
    _assert_bitwise(got, _ref("autoep-z2-bf16-ep2-dp4"))
    for layer in (0, 1):
        block = f"model.layers.{layer}.mlp"
        assert torch.equal(got[f"{block}.gate.gate.weight"], got[f"{block}.router.gate.weight"])


def test_hf_names_refused_on_native_moe(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedLayout, match="no AutoEP layers"):
        consolidate(ckpt("moe", "z2-fp32-ep2-dp2"), tmp_path / "m.safetensors", hf_names=True)
    assert not list(tmp_path.iterdir())


def test_hf_names_refused_on_dense(tmp_path: Path) -> None:
    dense = sorted(p.parent.name for p in (FIXTURES / "zero").glob("*/facts.json"))[0]
    with pytest.raises(UnsupportedLayout, match="--hf-names"):
        consolidate(FIXTURES / "zero" / dense / "ckpt", tmp_path / "m.safetensors", hf_names=True)


def test_cli_hf_names_and_refusal(cli, tmp_path: Path) -> None:
    ok = cli(
        "to-fp32", ckpt("moe", "autoep-z2-fp32-ep2-dp2"), tmp_path / "a.safetensors", "--hf-names"
    )
    assert ok.exit_code == 0, ok.output
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "a.safetensors")
    bad = cli("to-fp32", ckpt("moe", "z2-fp32-ep2-dp2"), tmp_path / "b.safetensors", "--hf-names")
    assert bad.exit_code == 1
    assert bad.stderr.count("\n") == 1 and "--hf-names" in bad.stderr
    assert not (tmp_path / "b.safetensors").exists()


def test_autoep_hf_folder_gets_hf_names(tmp_path: Path) -> None:
    """A from_pretrained folder (config.json beside the checkpoint) of an AutoEP run is written
    under the model's own names without asking."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(FIXTURES))
    import shutil

    import tiny_moe
    from transformers import MixtralForCausalLM

    import dsckpt.hf

    run = tmp_path / "run"
    shutil.copytree(ckpt("moe", "autoep-z2-fp32-ep2-dp2"), run)
    config = tiny_moe.mixtral_config()
    config.torch_dtype = "float32"
    config.save_pretrained(run)
    out = tmp_path / "hf"
    dsckpt.hf.export(run, out)
    loaded = MixtralForCausalLM.from_pretrained(out)
    expected = tiny_moe.autoep_to_hf(_ref("autoep-z2-fp32-ep2-dp2"))
    weights = loaded.state_dict()
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
