"""Sanity of the Hugging Face fixtures (tests/fixtures/hf): the layout the Trainer, PEFT and
Accelerate wrote through real DeepSpeed, and references that agree with each other and with
transformers / peft: the ground truth tests/discover/test_hf_trainer.py and
tests/api/test_hf_export.py compare dsckpt's Hugging Face outputs against is what it claims to
be."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
HF = FIXTURES / "hf"
EXPECTED = {
    "accelerate-z3-bf16-2models",
    "lora-z3-bf16-untied",
    "trainer-z2-bf16-untied",
    "trainer-z2-fp32-tied",
    "trainer-z3-bf16-tied",
    "trainer-z3-fp32-untied",
}
NAMES = sorted(p.parent.name for p in HF.glob("*/facts.json"))
TRAINER = [n for n in NAMES if n.startswith(("trainer-", "lora-"))]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Committed size of the whole hf/ folder.
SIZE_LIMIT = 3 * 1024 * 1024


def facts(name: str) -> dict[str, Any]:
    return json.loads((HF / name / "facts.json").read_text())


def checkpoints(name: str) -> list[tuple[dict[str, Any], Path]]:
    return [(c, HF / name / c["path"]) for c in facts(name)["checkpoints"]]


def refs(name: str, ckpt: str, what: str) -> Any:
    return torch.load(HF / name / "refs" / ckpt / what, weights_only=True)


def zero_files(stage: int, dtype: str, dp: int) -> set[str]:
    prefix = "bf16_" if dtype == "bf16" else ""
    optim = {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(dp)}
    if stage == 3:
        return optim | {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(dp)}
    return optim | {"mp_rank_00_model_states.pt"}


def test_the_fixture_set_is_complete() -> None:
    assert set(NAMES) == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_files_on_disk_are_the_listed_ones(name: str) -> None:
    root = HF / name
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted(facts(name)["files"])


def test_committed_size_is_small() -> None:
    # What git stores: each distinct content once (DeepSpeed's copied scripts are one blob),
    # zlib-compressed.
    blobs = {}
    for path in HF.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            blobs[hashlib.sha256(data).hexdigest()] = len(zlib.compress(data))
    assert sum(blobs.values()) < SIZE_LIMIT


@pytest.mark.parametrize("name", TRAINER)
def test_trainer_checkpoint_layout(name: str) -> None:
    fx = facts(name)
    lora = fx["mode"] == "lora"
    for info, folder in checkpoints(name):
        step = info["step"]
        assert folder.name == f"checkpoint-{step}"
        assert (folder / "latest").read_text() == f"global_step{step}" == info["tag"]
        tag_files = {p.name for p in (folder / info["tag"]).iterdir()}
        assert tag_files == zero_files(fx["zero_stage"], fx["dtype"], fx["dp"])
        names = {p.name for p in folder.iterdir() if p.is_file()}
        common = {"latest", "zero_to_fp32.py", "trainer_state.json", "training_args.bin"}
        common |= {f"rng_state_{r}.pth" for r in range(fx["dp"])} | set(TOKENIZER_FILES)
        assert common <= names
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
        if lora:
            # PeftModel.save_pretrained: adapter files and a model card, no model config.
            assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
            assert "config.json" not in names
        else:
            assert {"config.json", "generation_config.json"} <= names
            config = json.loads((folder / "config.json").read_text())
            assert config["tie_word_embeddings"] is fx["tied"]
            assert config["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[fx["dtype"]]
        # ZeRO-3 without 16-bit gathering: the Trainer writes no weights (users' case);
        # ZeRO-2: it writes model.safetensors in the training dtype.
        weights = {"model.safetensors", "pytorch_model.bin"} & names
        assert weights == (set() if lora or fx["zero_stage"] == 3 else {"model.safetensors"})


def test_two_checkpoints_newest_by_step() -> None:
    fx = facts("trainer-z3-bf16-tied")
    assert [c["name"] for c in fx["checkpoints"]] == ["checkpoint-2", "checkpoint-4"]
    assert fx["newest"] == "checkpoint-4"
    folders = sorted(p.name for p in (HF / "trainer-z3-bf16-tied" / "output_dir").iterdir())
    assert folders == ["checkpoint-2", "checkpoint-4"]
    two, four = (refs("trainer-z3-bf16-tied", c, "ref_live.pt") for c in folders)
    assert any(not torch.equal(two[k], four[k]) for k in two)  # training moved the weights


def test_accelerate_save_state_layout() -> None:
    name = "accelerate-z3-bf16-2models"
    fx = facts(name)
    [(info, folder)] = checkpoints(name)
    # Each model's save_checkpoint rewrites `latest`: it names the last model, not the first.
    assert (folder / "latest").read_text() == "pytorch_model_1" == info["tag"]
    assert [(m["tag"], m["tied"]) for m in info["models"]] == [
        ("pytorch_model", True),
        ("pytorch_model_1", False),
    ]
    for tag in ("pytorch_model", "pytorch_model_1"):
        assert {p.name for p in (folder / tag).iterdir()} == zero_files(3, "bf16", 2)
    names = {p.name for p in folder.iterdir() if p.is_file()}
    assert names == {"latest", "zero_to_fp32.py", "zero_to_torch.py"} | {
        f"random_states_{r}.pkl" for r in range(fx["dp"])
    }


def models(name: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Each model saved in a checkpoint folder with its tag, ref suffix and key facts (the first
    model's key facts are the fixture's own)."""
    fx = facts(name)
    first = {k: fx[k] for k in ("state_dict_keys", "tied_aliases", "save_pretrained_keys")}
    return [first | info["models"][0]] + info["models"][1:]


@pytest.mark.parametrize("name", NAMES)
def test_model_states_agree_with_refs(name: str) -> None:
    fx = facts(name)
    for info, folder in checkpoints(name):
        for model in models(name, info):
            live = refs(name, info["name"], f"ref_live{model['suffix']}.pt")
            if fx["mode"] != "lora":  # LoRA: the PeftModel's names; state_dict_keys: the base's
                assert list(live) == model["state_dict_keys"]
            rank0 = "mp_rank_00" if fx["zero_stage"] < 3 else "zero_pp_rank_0_mp_rank_00"
            path = folder / model["tag"] / f"{rank0}_model_states.pt"
            states = torch.load(path, weights_only=True)
            assert states["global_steps"] == info["step"]
            assert states["shared_params"] == model["tied_aliases"]
            shapes = {k: list(v) for group in states["param_shapes"] for k, v in group.items()}
            trainable = {
                k: list(v.shape) for k, v in live.items() if k not in model["tied_aliases"]
            }
            if fx["mode"] == "lora":
                # The Trainer saves PEFT models with exclude_frozen_parameters: LoRA weights only.
                trainable = {k: s for k, s in trainable.items() if ".lora_" in k}
            assert shapes == trainable
            for key in trainable:
                assert live[key].dtype == torch.float32, key
            if fx["zero_stage"] == 3:
                zero = states["ds_config"]["zero_optimization"]
                assert zero["stage3_gather_16bit_weights_on_model_save"] is False
        assert list(refs(name, info["name"], "ref_live.pt")) == info["ref_live_keys"]


@pytest.mark.parametrize("name", NAMES)
def test_deepspeed_zero_to_fp32_reproduces_ref_live(name: str) -> None:
    """Recorded at generation: DeepSpeed's own converter on the checkpoint gives exactly the live
    fp32 masters, so ref_live is what the files hold (frozen LoRA base weights are not saved)."""
    fx = facts(name)
    for info, _ in checkpoints(name):
        assert info["zero_to_fp32_refused"] is None
        cmp = info["zero_to_fp32_vs_live"]
        assert cmp["different"] == {} and cmp["extra"] == []
        if fx["mode"] == "lora":
            assert cmp["bitwise_equal"] == len(info["live_lora_keys"])
            assert set(cmp["missing"]) == set(info["ref_live_keys"]) - set(info["live_lora_keys"])
            continue
        for model in models(name, info):
            cmp = model.get("zero_to_fp32_vs_live", info["zero_to_fp32_vs_live"])
            assert model.get("zero_to_fp32_refused") is None
            assert cmp["different"] == {} and cmp["extra"] == [] and cmp["missing"] == []
            assert cmp["bitwise_equal"] == len(model["state_dict_keys"])


def test_trainer_weight_files_recorded() -> None:
    """ZeRO-2: the Trainer's model.safetensors is the live fp32 weights in the training dtype,
    and keeps the tied lm_head.weight that save_pretrained itself leaves out."""
    for name, rounded in (("trainer-z2-fp32-tied", False), ("trainer-z2-bf16-untied", True)):
        [info] = facts(name)["checkpoints"]
        cmp = info["trainer_model_vs_live"]
        assert "lm_head.weight" in info["trainer_model_file"]["keys"]
        if rounded:
            assert cmp["bitwise_equal"] == 0
            assert all(d["rounded_live"] for d in cmp["different"].values())
        else:
            assert cmp["different"] == {} and cmp["missing"] == []


# transformers and peft are test-only dependencies (pinned in constraints.txt); without them only
# the layout tests above run.
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
)
needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
    reason="peft and transformers are not installed",
)


def fp32_model(config_source: dict[str, Any] | Path) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(config_source, Path):
        config = LlamaConfig.from_pretrained(config_source)
    else:
        config = LlamaConfig(**config_source)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).float().eval()


@needs_transformers
@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("lora-")])
def test_ref_live_loads_strictly_and_gives_ref_logits(name: str) -> None:
    fx = facts(name)
    for info, folder in checkpoints(name):
        for m in models(name, info):
            if (folder / "config.json").exists():
                source: dict[str, Any] | Path = folder
            else:
                source = fx["model_config"] | {"tie_word_embeddings": m["tied"]}
            model = fp32_model(source)
            model.load_state_dict(refs(name, info["name"], f"ref_live{m['suffix']}.pt"))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(fx["fixed_input"])).logits
            want = refs(name, info["name"], f"ref_logits{m['suffix']}.pt")
            assert logits.shape == (2, 12, fx["model_config"]["vocab_size"])
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)


@needs_transformers
@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_keys_recorded(tied: bool, tmp_path: Path) -> None:
    from safetensors import safe_open

    name = "trainer-z3-bf16-tied" if tied else "trainer-z3-fp32-untied"
    fx = facts(name)
    fp32_model(fx["model_config"]).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys == fx["save_pretrained_keys"]
    assert ("lm_head.weight" in keys) is not tied
    assert set(keys) == set(fx["state_dict_keys"]) - set(fx["tied_aliases"])


@needs_transformers
@pytest.mark.parametrize("name", TRAINER)
def test_tokenizer_and_chat_template_load(name: str) -> None:
    from transformers import AutoTokenizer

    _, folder = checkpoints(name)[-1]
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == facts(name)["model_config"]["vocab_size"]
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert text == "<s>user w1 w2</s>"


LORA = "lora-z3-bf16-untied"


def lora_base() -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(HF / LORA / "base", dtype=torch.float32)


@needs_peft
def test_lora_adapter_reference_is_what_peft_loads(tmp_path: Path) -> None:
    import peft
    from safetensors.torch import save_file

    [(info, folder)] = checkpoints(LORA)
    adapter = refs(LORA, info["name"], "ref_adapter.pt")
    assert sorted(adapter) == info["adapter_keys"]
    assert all(".lora_" in k and ".default." not in k for k in adapter)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    # PEFT's key names are the live names minus the adapter name.
    assert sorted(k.replace(".default", "") for k in info["live_lora_keys"]) == sorted(adapter)
    shutil.copy(folder / "adapter_config.json", tmp_path / "adapter_config.json")
    save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    model = peft.PeftModel.from_pretrained(lora_base(), tmp_path)
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(adapter)
    for key, value in adapter.items():
        assert torch.equal(loaded[key], value), key
    merged = model.merge_and_unload().state_dict()
    want = refs(LORA, info["name"], "ref_merged.pt")
    assert list(merged) == list(want)
    for key, value in want.items():
        assert torch.equal(merged[key], value), key


@needs_transformers
def test_lora_merged_reference_follows_the_lora_formula() -> None:
    """ref_merged = W + (alpha / r) * B @ A on the targeted projections, base elsewhere."""
    [(info, _)] = checkpoints(LORA)
    adapter = refs(LORA, info["name"], "ref_adapter.pt")
    merged = refs(LORA, info["name"], "ref_merged.pt")
    base = lora_base().state_dict()
    assert list(merged) == list(base) == facts(LORA)["state_dict_keys"]
    scale = info["lora_config"]["lora_alpha"] / info["lora_config"]["r"]
    targeted = 0
    for key, value in merged.items():
        m = re.fullmatch(r"(.*\.(q_proj|v_proj))\.weight", key)
        if m is None:
            assert torch.equal(value, base[key]), key
            continue
        prefix = f"base_model.model.{m.group(1)}"
        delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
        assert delta.abs().max() > 0, key  # the adapter was trained
        torch.testing.assert_close(value, base[key] + scale * delta, rtol=0, atol=1e-6)
        targeted += 1
    assert targeted == 2 * facts(LORA)["model_config"]["num_hidden_layers"]


def test_lora_trainer_adapter_file_is_bf16_rounding_of_the_fp32_adapter() -> None:
    """What the Trainer itself saved under ZeRO-3: PEFT names, but the 16-bit copy."""
    from safetensors.torch import load_file

    [(info, folder)] = checkpoints(LORA)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    adapter = refs(LORA, info["name"], "ref_adapter.pt")
    assert sorted(saved) == sorted(adapter)
    for key, value in adapter.items():
        assert saved[key].dtype == torch.bfloat16
        assert torch.equal(saved[key], value.to(torch.bfloat16)), key
    assert any(not torch.equal(saved[k].float(), v) for k, v in adapter.items())
