"""`dsckpt to-fp32 ... --hf` and `dsckpt.hf.export` on the real Trainer runs in tests/fixtures/hf:
the folder loads with `from_pretrained` (no missing or unexpected keys), its values are the live
fp32 master weights bit for bit, it gives the reference logits, its keys are those a real
`save_pretrained` writes for that config, and the copied files are the Trainer's unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

HF = Path(__file__).parents[1] / "fixtures" / "hf"
TRAINER = [
    "trainer-z2-bf16-untied",
    "trainer-z2-fp32-tied",
    "trainer-z3-bf16-tied",
    "trainer-z3-fp32-untied",
]
COPIED = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]
transformers = pytest.importorskip("transformers")


def facts(name: str) -> dict[str, Any]:
    return json.loads((HF / name / "facts.json").read_text())


def newest(name: str) -> dict[str, Any]:
    return max(facts(name)["checkpoints"], key=lambda c: c["step"])


def ref(name: str, what: str) -> Any:
    return torch.load(HF / name / "refs" / newest(name)["name"] / what, weights_only=True)


def saved_keys(folder: Path) -> set[str]:
    """Tensor names in a folder of safetensors files, as from_pretrained reads them."""
    keys: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    return keys


def save_pretrained_keys(config_folder: Path, tmp_path: Path) -> set[str]:
    """What a real save_pretrained writes for this config (a fresh model of it)."""
    config = transformers.AutoConfig.from_pretrained(config_folder)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "save_pretrained")
    return saved_keys(tmp_path / "save_pretrained")


def load(folder: Path) -> Any:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


@pytest.mark.parametrize("name", TRAINER)
def test_from_pretrained_gives_the_live_weights_and_logits(cli, tmp_path: Path, name: str) -> None:
    output_dir = HF / name / "output_dir"
    out = tmp_path / "hf-model"
    result = cli("to-fp32", output_dir, out, "--hf", "-q")
    assert result.exit_code == 0, result.output
    assert "Hugging Face folder (--hf)" in result.output
    checkpoint = output_dir / newest(name)["name"]
    # Keys exactly as save_pretrained writes them for this config (tied lm_head left out).
    assert saved_keys(out) == save_pretrained_keys(checkpoint, tmp_path)
    assert ("lm_head.weight" in saved_keys(out)) is not facts(name)["tied"]
    model = load(out)
    live = ref(name, "ref_live.pt")
    got = model.state_dict()
    assert set(got) == set(live)
    for key, value in live.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value.float()), key
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(facts(name)["fixed_input"])).logits
    torch.testing.assert_close(logits, ref(name, "ref_logits.pt"), rtol=1e-5, atol=1e-6)
    # The model's files are copied unchanged; training state and the Trainer's 16-bit weights
    # are not.
    for file in COPIED:
        assert (out / file).read_bytes() == (checkpoint / file).read_bytes(), file
    assert sorted(p.name for p in out.iterdir()) == sorted([*COPIED, "model.safetensors"])


def test_default_when_config_json_is_there_and_no_hf_opts_out(cli, tmp_path: Path) -> None:
    output_dir = HF / "trainer-z3-bf16-tied" / "output_dir"
    result = cli("to-fp32", output_dir, tmp_path / "auto", "-q")
    assert result.exit_code == 0, result.output
    assert "Hugging Face folder (config.json found; --no-hf for the weights alone)" in (
        result.output.replace("\n", " ")
    )
    assert (tmp_path / "auto" / "config.json").exists()
    assert "lm_head.weight" not in saved_keys(tmp_path / "auto")
    result = cli("to-fp32", output_dir, tmp_path / "plain", "--no-hf", "-q")
    assert result.exit_code == 0, result.output
    assert "Hugging Face" not in result.output
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["model.safetensors"]
    assert "lm_head.weight" in saved_keys(tmp_path / "plain")  # every state-dict name, as before


def test_a_single_file_out_stays_plain_by_default(cli, tmp_path: Path) -> None:
    checkpoint = HF / "trainer-z3-bf16-tied" / "output_dir" / "checkpoint-4"
    result = cli("to-fp32", checkpoint, tmp_path / "model.safetensors", "-q")
    assert result.exit_code == 0, result.output
    assert "lm_head.weight" in saved_keys(tmp_path)
    result = cli("to-fp32", checkpoint, tmp_path / "m2.safetensors", "--hf")
    assert result.exit_code == 1
    assert "--hf writes a folder" in result.output


@pytest.mark.parametrize(
    ("name", "want"),
    [("trainer-z3-bf16-tied", torch.bfloat16), ("trainer-z3-fp32-untied", torch.float32)],
)
def test_dtype_auto_takes_the_configs(cli, tmp_path: Path, name: str, want: Any) -> None:
    out = tmp_path / "hf-model"
    result = cli("to-fp32", HF / name / "output_dir", out, "--dtype", "auto", "--json", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["dtype"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[want]
    assert record["hf"]["dtype_from_config"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {want}  # noqa: SIM118
    live = ref(name, "ref_live.pt")
    got = load(out).state_dict()
    for key, value in live.items():  # from_pretrained upcasts the stored values exactly
        assert torch.equal(got[key], value.float().to(want).float()), key


def test_dtype_auto_needs_a_hugging_face_folder(cli, tmp_path: Path) -> None:
    checkpoint = HF / "trainer-z3-bf16-tied" / "output_dir"
    result = cli("to-fp32", checkpoint, tmp_path / "m.safetensors", "--dtype", "auto")
    assert result.exit_code == 1 and "--dtype auto" in result.output
    result = cli("to-fp32", checkpoint, tmp_path / "d", "--dtype", "auto", "--no-hf")
    assert result.exit_code == 1 and "--dtype auto" in result.output
    assert not (tmp_path / "d").exists()


def test_config_without_dtype_refuses_auto(cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(HF / "trainer-z3-bf16-tied" / "output_dir" / "checkpoint-4", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    del config["dtype"]
    (ckpt / "config.json").write_text(json.dumps(config))
    result = cli("to-fp32", ckpt, tmp_path / "out", "--dtype", "auto")
    assert result.exit_code == 1
    assert "config.json names no dtype" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("ckpt", "why"),
    [
        ("accelerate-z3-bf16-2models/output_dir/step_4", "holds no config.json"),
        ("lora-z3-bf16-untied/output_dir", "PEFT adapter"),
    ],
)
def test_hf_without_a_model_config_is_refused(cli, tmp_path: Path, ckpt: str, why: str) -> None:
    extra = ["--tag", "pytorch_model"] if "accelerate" in ckpt else []
    result = cli("to-fp32", HF / ckpt, tmp_path / "out", "--hf", *extra)
    assert result.exit_code == 1
    assert why in result.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_tag_directory_finds_the_model_files_beside_it(cli, tmp_path: Path) -> None:
    tag_dir = HF / "trainer-z2-fp32-tied" / "output_dir" / "checkpoint-4" / "global_step4"
    out = tmp_path / "hf-model"
    result = cli("to-fp32", tag_dir, out, "-q")
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    load(out)


def test_shards_use_transformers_naming_and_load(cli, tmp_path: Path) -> None:
    name = "trainer-z3-fp32-untied"
    out = tmp_path / "hf-model"
    result = cli("to-fp32", HF / name / "output_dir", out, "--max-shard-size", "20KB", "-q")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert not (out / "model.safetensors").exists()
    got = load(out).state_dict()
    for key, value in ref(name, "ref_live.pt").items():
        assert torch.equal(got[key], value.float()), key


def test_force_replaces_only_what_dsckpt_writes(cli, tmp_path: Path) -> None:
    output_dir = HF / "trainer-z3-bf16-tied" / "output_dir"
    out = tmp_path / "hf-model"
    out.mkdir()
    (out / "README.md").write_text("my model card")
    (out / "config.json").write_text("{}")
    result = cli("to-fp32", output_dir, out, "-q")
    assert result.exit_code == 1 and "--force" in result.output
    assert (out / "config.json").read_text() == "{}"  # refused: nothing touched
    result = cli("to-fp32", output_dir, out, "-q", "--force")
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text() == "my model card"
    assert (out / "config.json").read_bytes() == (
        output_dir / "checkpoint-4" / "config.json"
    ).read_bytes()
    assert not [p for p in out.iterdir() if "dsckpt" in p.name]  # no temporaries left


def test_symlinks_are_not_copied_and_the_result_says_so(cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(HF / "trainer-z3-bf16-tied" / "output_dir" / "checkpoint-4", ckpt)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (ckpt / "tokenizer.json").unlink()
    os.symlink(secret, ckpt / "tokenizer.json")
    out = tmp_path / "hf-model"
    result = cli("to-fp32", ckpt, out, "--json", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["hf"]["not_copied"] == [{"name": "tokenizer.json", "why": "a symbolic link"}]
    assert not os.path.lexists(out / "tokenizer.json")
    result = cli("to-fp32", ckpt, tmp_path / "again", "-q")
    assert "not copied: tokenizer.json (a symbolic link)" in result.output.replace("\n", " ")


def test_library_export(tmp_path: Path) -> None:
    import dsckpt.hf

    name = "trainer-z2-fp32-tied"
    result = dsckpt.hf.export(HF / name / "output_dir", tmp_path / "hf-model", step=4)
    assert result.hf is not None and result.dtype == "fp32"  # auto: config.json says float32
    assert result.tied_left_out == ("lm_head.weight",)
    got = load(tmp_path / "hf-model").state_dict()
    for key, value in ref(name, "ref_live.pt").items():
        assert torch.equal(got[key], value.float()), key


# -- PEFT ------------------------------------------------------------------------------------

LORA = "lora-z3-bf16-untied"
peft = pytest.importorskip("peft")


def lora_base() -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        HF / LORA / "base", dtype=torch.float32
    )


def test_adapter_loads_in_peft_as_the_trained_fp32_adapter(cli, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = cli("to-fp32", HF / LORA / "output_dir", out, "--adapter", "-q")
    assert result.exit_code == 0, result.output
    assert "PEFT adapter 'default'" in result.output
    want = ref(LORA, "ref_adapter.pt")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(want)  # PEFT's names: no `.default`
        assert f.metadata()["format"] == "pt"
    checkpoint = HF / LORA / "output_dir" / "checkpoint-4"
    for name in ("adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes()
    assert not (out / "README.md").exists() and not (out / "config.json").exists()
    model = peft.PeftModel.from_pretrained(lora_base(), out)
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(want)
    for key, value in want.items():
        assert torch.equal(loaded[key], value), key
    # The Trainer's own adapter file is the bf16 rounding, not these values.
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        assert any(not torch.equal(f.get_tensor(k).float(), want[k]) for k in want)


def test_adapter_refusals(cli, tmp_path: Path) -> None:
    result = cli(
        "to-fp32", HF / "trainer-z3-fp32-untied" / "output_dir", tmp_path / "a", "--adapter"
    )
    assert result.exit_code == 1
    assert "not LoRA matrices" in result.output.replace("\n", " ")
    result = cli("to-fp32", HF / LORA / "output_dir", tmp_path / "a.safetensors", "--adapter")
    assert result.exit_code == 1 and "give a directory" in result.output.replace("\n", " ")
    result = cli("to-fp32", HF / LORA / "output_dir", tmp_path / "a", "--adapter", "--hf")
    assert result.exit_code == 1 and "--adapter" in result.output
    result = cli("to-fp32", HF / LORA / "output_dir", tmp_path / "a", "--hf")
    assert result.exit_code == 1 and "--adapter" in result.output.replace("\n", " ")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dora", True),
        ("bias", "lora_only"),
        ("modules_to_save", ["lm_head"]),
        ("peft_type", "IA3"),
    ],
)
def test_adapter_configs_it_does_not_write_exactly_are_refused(
    cli, tmp_path: Path, key: str, value: Any
) -> None:
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(HF / LORA / "output_dir" / "checkpoint-4", ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config[key] = value
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    result = cli("to-fp32", ckpt, tmp_path / "a", "--adapter")
    assert result.exit_code == 1
    assert key in result.output.replace("\n", " ")
    assert not (tmp_path / "a").exists()


def test_library_export_adapter(tmp_path: Path) -> None:
    import dsckpt.hf

    result = dsckpt.hf.export_adapter(HF / LORA / "output_dir", tmp_path / "adapter")
    assert result.hf.adapter_name == "default" and result.tensors == 8


def test_merge_adapter_equals_peft_merge_and_unload(cli, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = cli(
        "to-fp32", HF / LORA / "output_dir", out, "--merge-adapter", HF / LORA / "base", "-q"
    )
    assert result.exit_code == 0, result.output
    assert "merged into 4 weights" in result.output.replace("\n", " ")
    model = load(out)
    got = model.state_dict()
    want = ref(LORA, "ref_merged.pt")
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # ... and PEFT's own merge of the trained fp32 adapter, run here.
    adapter = tmp_path / "adapter"
    assert cli("to-fp32", HF / LORA / "output_dir", adapter, "--adapter", "-q").exit_code == 0
    peft_merged = peft.PeftModel.from_pretrained(lora_base(), adapter).merge_and_unload()
    for key, value in peft_merged.state_dict().items():
        assert torch.equal(got[key], value), key
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(facts(LORA)["fixed_input"])).logits
    torch.testing.assert_close(logits, ref(LORA, "ref_logits.pt"), rtol=1e-5, atol=1e-6)
    # config from the base, tokenizer from the run
    assert (out / "config.json").read_bytes() == (HF / LORA / "base" / "config.json").read_bytes()
    checkpoint = HF / LORA / "output_dir" / "checkpoint-4"
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert not (out / "adapter_config.json").exists()


def test_merge_adapter_into_a_model_it_does_not_fit_is_refused(cli, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(HF / LORA / "base", base)
    weights = load_file(base / "model.safetensors")
    weights["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(8, 8)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    result = cli("to-fp32", HF / LORA / "output_dir", tmp_path / "m", "--merge-adapter", base)
    assert result.exit_code == 1
    assert "model.layers.1.self_attn.v_proj.weight" in result.output.replace("\n", " ")
    assert not (tmp_path / "m").exists()
    result = cli(
        "to-fp32", HF / LORA / "output_dir", tmp_path / "m", "--merge-adapter", tmp_path / "nowhere"
    )
    assert result.exit_code == 1 and "config.json" in result.output


def test_merge_adapter_refuses_per_module_scaling(cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(HF / LORA / "output_dir" / "checkpoint-4", ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 2}
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    result = cli("to-fp32", ckpt, tmp_path / "m", "--merge-adapter", HF / LORA / "base")
    assert result.exit_code == 1 and "rank_pattern" in result.output
    assert not (tmp_path / "m").exists()


def test_a_symlinked_config_is_not_read(cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(HF / "trainer-z3-bf16-tied" / "output_dir" / "checkpoint-4", ckpt)
    real = tmp_path / "config.json"
    (ckpt / "config.json").rename(real)
    os.symlink(real, ckpt / "config.json")
    result = cli("to-fp32", ckpt, tmp_path / "hf", "--hf")
    assert result.exit_code == 1
    assert "is a symbolic link" in result.output.replace("\n", " ")
    assert not (tmp_path / "hf").exists()
    # by default the folder is then not a Hugging Face one: plain shards, said by no HF part
    result = cli("to-fp32", ckpt, tmp_path / "plain", "-q")
    assert result.exit_code == 0, result.output
    assert "Hugging Face" not in result.output
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["model.safetensors"]


def test_merge_adapter_dtype_auto_takes_the_bases(cli, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(HF / LORA / "base", base)
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    result = cli(
        "to-fp32",
        HF / LORA / "output_dir",
        out,
        "--merge-adapter",
        base,
        "--dtype",
        "auto",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["dtype"] == "bf16" and record["hf"]["dtype_from_config"] is True
    want = ref(LORA, "ref_merged.pt")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key, value in want.items():
            assert torch.equal(f.get_tensor(key), value.to(torch.bfloat16)), key
