"""`dsckpt to-fp32` on every fixture: bit for bit against DeepSpeed's references, every format."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, PIPE, ZERO, ckpt, facts, load_output, tag_dir
from safetensors import safe_open
from safetensors.torch import load_file

from dsckpt.api import consolidation as core
from dsckpt.errors import OutputError

FORMATS = ["model.safetensors", "model.bin", "shards"]


def _as_out(ref: torch.Tensor) -> torch.Tensor:
    return ref.float() if ref.is_floating_point() else ref


def _assert_bitwise(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name, value in ref.items():
        assert got[name].dtype == _as_out(value).dtype, name
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name], _as_out(value)), name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ZERO)
def test_bitwise_equal_to_deepspeed_and_to_the_live_run(
    cli, tmp_path: Path, name: str, fmt: str
) -> None:
    f = facts("zero", name)
    out = tmp_path / fmt
    shards = ["--max-shard-size", "1KB"] if fmt == "shards" else []  # refused for one file
    result = cli("to-fp32", ckpt("zero", name), out, *shards)
    assert result.exit_code == 0, result.output
    got = load_output(out)
    live = torch.load(FIXTURES / "zero" / name / "ref_live.pt", weights_only=True)
    # Every name of the model's state dict, tied aliases and ZeRO-1 frozen weights included.
    assert set(got) == set(live) == set(f["state_dict_keys"])
    _assert_bitwise(got, live)
    ds_ref = FIXTURES / "zero" / name / "ref_deepspeed.pt"
    if f["ref_deepspeed"]:
        ref = torch.load(ds_ref, weights_only=True)
        # DeepSpeed drops frozen weights of ZeRO-1 runs (they live only in `module`).
        assert set(got) - set(ref) == (
            {p["name"] for p in f["frozen_params"]} if f["zero_stage"] == 1 else set()
        )
        _assert_bitwise(got, ref)


def test_sharded_output_follows_the_cap_and_loads_strictly(cli, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(FIXTURES))
    from tiny_model import build_model  # the fixture model, rebuilt without DeepSpeed

    out = tmp_path / "hf"
    assert (
        cli("to-fp32", ckpt("zero", "z3-fp32-dp3"), out, "--max-shard-size", "400").exit_code == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    aliases = json.loads(index["metadata"][core.ALIASES_KEY])
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            # An alias travels with its canonical tensor and counts once, as in huggingface_hub.
            names = [k for k in f.keys() if k not in aliases]  # noqa: SIM118 (not a dict)
            sizes = [f.get_slice(k).get_shape() for k in names]
            assert len(sizes) == 1 or sum(4 * max(1, _numel(s)) for s in sizes) <= 400
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for k, t in load_output(out).items() if k not in aliases
    )
    model = build_model(seed=0)
    model.load_state_dict(load_output(out), strict=True)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_tied_weights_are_recorded_and_shared_in_torch_output(tmp_path: Path) -> None:
    core.consolidate(ckpt("zero", "z2-fp32-dp2"), tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert json.loads(f.metadata()[core.ALIASES_KEY]) == {"head.weight": "embed.weight"}
    core.consolidate(ckpt("zero", "z2-fp32-dp2"), tmp_path / "m.bin")
    sd = torch.load(tmp_path / "m.bin", weights_only=True)
    assert (
        sd["head.weight"].untyped_storage().data_ptr()
        == sd["embed.weight"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_casts_floating_tensors_only(
    tmp_path: Path, dtype: str, torch_dtype: torch.dtype
) -> None:
    out = tmp_path / "m.safetensors"
    core.consolidate(ckpt("zero", "z2-fp32-dp2"), out, dtype=dtype)
    got = load_file(out)
    live = torch.load(FIXTURES / "zero" / "z2-fp32-dp2" / "ref_live.pt", weights_only=True)
    for name, value in live.items():
        expected = value.to(torch_dtype) if value.is_floating_point() else value
        assert torch.equal(got[name], expected), name


def test_exclude_frozen(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    core.consolidate(ckpt("zero", "z2-fp32-dp2"), out, exclude_frozen=True)
    frozen = {p["name"] for p in facts("zero", "z2-fp32-dp2")["frozen_params"]}
    assert frozen and not frozen & set(load_file(out))


def test_library_state_dict_is_lazy_and_load_into_fills_a_module() -> None:
    import sys

    sys.path.insert(0, str(FIXTURES))
    from tiny_model import build_model

    sd = core.state_dict(ckpt("zero", "z3-fp32-dp2"))
    live = torch.load(FIXTURES / "zero" / "z3-fp32-dp2" / "ref_live.pt", weights_only=True)
    assert set(sd) == set(live)
    assert torch.equal(sd["fc1.weight"], live["fc1.weight"])
    model = build_model(seed=0)
    assert core.load_into(model, ckpt("zero", "z3-fp32-dp2")) == ([], [])
    for name, value in model.state_dict().items():
        assert torch.equal(value, _as_out(live[name]).to(value.dtype)), name


def test_load_into_a_module_that_does_not_fit_names_the_keys() -> None:
    """Strict by default: the error names the first keys each way and how many more."""
    module = torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(7)))
    with pytest.raises(OutputError) as raised:
        core.load_into(module, ckpt("zero", "z3-fp32-dp2"))
    message = str(raised.value)
    assert message.startswith("the checkpoint does not fit the module: missing 0.bias, 0.weight, ")
    assert "1.weight, 2.bias and 9 more; unexpected " in message
    missing, unexpected = core.load_into(module, ckpt("zero", "z3-fp32-dp2"), strict=False)
    assert missing == sorted(module.state_dict()) and len(missing) == 14
    assert f"unexpected {', '.join(unexpected[:5])} and {len(unexpected) - 5} more" in message


@pytest.mark.parametrize("name", PIPE)
def test_pipeline_to_fp32_equals_the_live_weights(tmp_path: Path, name: str) -> None:
    f = facts("pipe", name)
    out = tmp_path / "m.safetensors"
    # Without ZeRO (fp32) the layer files are taken automatically: no --from-layers here.
    core.consolidate(ckpt("pipe", name), out)
    got = load_file(out)
    truth = torch.load(FIXTURES / "pipe" / name / "truth.pt", weights_only=True)
    assert set(got) == set(truth)
    for key, value in truth.items():
        # Megatron records the original vocabulary size: the padding rows are stripped.
        expected = value[: f["orig_vocab_size"]] if "word_embeddings" in key else value
        assert torch.equal(got[key], expected.float()), key


def test_pipeline_keeps_vocab_padding_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    core.consolidate(ckpt("pipe", "p2t2d1-z1-fp32"), out, strip_vocab_padding=False)
    truth = torch.load(FIXTURES / "pipe" / "p2t2d1-z1-fp32" / "truth.pt", weights_only=True)
    name = "tied_modules.embed.word_embeddings.weight"
    assert torch.equal(load_file(out)[name], truth[name])


def test_fp32_pipeline_without_zero_takes_its_layer_files(cli, tmp_path: Path) -> None:
    result = cli("to-fp32", ckpt("pipe", "p2t1d1-z0-fp32"), tmp_path / "m.safetensors")
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert "source: layer files (float32; without ZeRO they are the trained weights" in (
        result.stdout
    )


def test_pipeline_without_zero_needs_from_layers_when_a_layer_may_be_missing(
    cli, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(ckpt("pipe", "p2t1d1-z0-fp32"), root)
    (root / "global_step3" / "layer_03-model_00-model_states.pt").unlink()
    result = cli("to-fp32", root, tmp_path / "m.safetensors")
    assert result.exit_code == 1 and "--from-layers" in result.stderr
    assert "some may be missing" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


# --- bad input: one line, exit 1, nothing written --------------------------------------------


def _fails_cleanly(result, out_dir: Path, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in line, line
    leftovers = [p for p in out_dir.rglob("*") if "dsckpt-tmp" in p.name or p.name.startswith("m.")]
    assert not leftovers, leftovers


def _tag(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def test_missing_optimizer_shard(cli, copy_fixture, tmp_path: Path) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    (_tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _fails_cleanly(
        cli("to-fp32", root, tmp_path / "m.safetensors"),
        tmp_path,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing",
    )


def _rewrite(path: Path, edit) -> None:
    sd = torch.load(path, weights_only=False)  # trusted test fixture, DeepSpeed installed
    edit(sd)
    torch.save(sd, path)


def test_partition_count_that_disagrees_with_the_files(cli, copy_fixture, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    root = copy_fixture("zero", "z2-fp32-dp2")
    for d in (0, 1):
        _rewrite(
            _tag(root) / f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt",
            lambda sd: sd["optimizer_state_dict"].__setitem__("partition_count", [3, 3]),
        )
    _fails_cleanly(cli("to-fp32", root, tmp_path / "m.safetensors"), tmp_path, "3")


def test_shards_from_two_runs(cli, copy_fixture, tmp_path: Path) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    other = tag_dir("zero", "z1-fp32-dp2") / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (_tag(root) / other.name).write_bytes(other.read_bytes())
    _fails_cleanly(cli("to-fp32", root, tmp_path / "m.safetensors"), tmp_path, "different runs")


def test_flat_group_shorter_than_the_shapes(cli, copy_fixture, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    root = copy_fixture("zero", "z2-fp32-dp2")

    def shorten(sd):
        groups = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        groups[0] = groups[0][:-5].clone()

    _rewrite(_tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt", shorten)
    _fails_cleanly(
        cli("to-fp32", root, tmp_path / "m.safetensors"),
        tmp_path,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    )


def test_unknown_suffix(cli, tmp_path: Path) -> None:
    _fails_cleanly(
        cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), tmp_path / "m.h5"),
        tmp_path,
        "unknown output suffix",
    )


def test_out_inside_the_checkpoint(cli, copy_fixture, tmp_path: Path) -> None:
    # Beside the tag directory is allowed (tests/execute/test_output_safety.py); inside it is not.
    root = copy_fixture("zero", "z2-fp32-dp2")
    before = sorted(p.name for p in root.rglob("*"))
    out = root / "global_step3" / "m.safetensors"
    _fails_cleanly(cli("to-fp32", root, out), tmp_path, "inside the tag directory")
    assert sorted(p.name for p in root.rglob("*")) == before


def test_existing_out_needs_force(cli, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_text("precious")
    result = cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), out)
    assert result.exit_code == 1 and "--force" in result.stderr
    assert out.read_text() == "precious"
    assert cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), out, "--force").exit_code == 0
    assert "embed.weight" in load_file(out)


def test_no_space_left_removes_the_temporary(cli, tmp_path: Path, monkeypatch) -> None:
    import ctypes

    from dsckpt.execute import atomic

    def full(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.ENOSPC)  # what fallocate(2) says on a full device
        return -1

    monkeypatch.setattr(atomic, "_fallocate_fn", full)
    _fails_cleanly(
        cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), tmp_path / "m.safetensors"),
        tmp_path,
        "no space left",
    )
    assert not list(tmp_path.iterdir())


def test_an_interrupted_run_leaves_nothing_that_looks_complete(
    cli, tmp_path: Path, monkeypatch
) -> None:
    from dsckpt.execute import executor as execute

    calls = {"n": 0}
    real = execute._copy

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "_copy", interrupt_midway)
    for name in ("m.safetensors", "m.bin", "shards"):
        calls["n"] = 0
        result = cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), tmp_path / name)
        assert result.exit_code == 130
        assert not list(tmp_path.iterdir())


def test_quiet_prints_only_the_result_line(cli, tmp_path: Path) -> None:
    result = cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), tmp_path / "m.safetensors", "--quiet")
    assert result.exit_code == 0
    assert result.stdout.startswith("wrote ") and result.stderr == ""


def test_tensor_parallel_without_layer_files_is_refused() -> None:
    """Several mp ranks but no layer files: no names to merge TP slices by, so no guessing."""
    from dataclasses import replace

    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.errors import UnsupportedLayout
    from dsckpt.plan.consolidation import plan_consolidation

    layout = replace(open_checkpoint(ckpt("zero", "z2-fp32-dp2")), tp=2)
    with pytest.raises(UnsupportedLayout, match="not supported"):
        plan_consolidation(layout)


def test_replicated_tensors_that_differ_across_tp_ranks_are_reported(
    cli, copy_fixture, tmp_path: Path
) -> None:
    pytest.importorskip("deepspeed")
    root = copy_fixture("pipe", "p2t2d1-z1-fp32")

    def perturb(sd):  # the 1-D group of stage 0, TP rank 1 holds its layer norms
        group = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][1]
        with torch.no_grad():
            group.add_(1.0)

    _rewrite(_tag(root) / "zero_pp_rank_0_mp_rank_01_optim_states.pt", perturb)
    _fails_cleanly(
        cli("to-fp32", root, tmp_path / "m.safetensors"),
        tmp_path,
        "differ across TP ranks",
        "layernorm",
    )


def test_a_user_rules_file_overrides_the_defaults(cli, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nmatch = "self_attention.dense.bias"\nkind = "split"\ndim = 0\n')
    out = tmp_path / "m.safetensors"
    result = cli("to-fp32", ckpt("pipe", "p2t2d1-z1-fp32"), out, "--rules", rules)
    assert result.exit_code == 0, result.output
    truth = torch.load(FIXTURES / "pipe" / "p2t2d1-z1-fp32" / "truth.pt", weights_only=True)
    name = next(k for k in truth if k.endswith("self_attention.dense.bias"))
    # Concatenated across the 2 TP ranks instead of taken once: the user's rule won.
    assert load_file(out)[name].shape[0] == 2 * truth[name].shape[0]


def test_safetensors_output_and_inspect_never_import_torch(tmp_path: Path) -> None:
    # `import torch` costs more than copying a large model: the common path must not pay it.
    # Every fixture, both safetensors forms, the exact bf16/fp16 -> fp32 widenings (buffers and
    # frozen weights of mixed-precision runs), pipelines with TP replicas compared.
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from dsckpt.cli.app import app\n"
        "for args in [a.split('|') for a in sys.argv[1:]]:\n"
        "    try:\n"
        "        app(args, prog_name='dsckpt')\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    runs = []
    for kind, name in [("zero", n) for n in ZERO] + [
        ("pipe", "p2t2d2-z1-fp32"),
        ("pipe", "p1t2d2-z1-bf16"),
    ]:
        src = str(ckpt(kind, name))
        runs.append(f"inspect|{src}")
        runs.append(f"to-fp32|{src}|{tmp_path / name}.safetensors|-q")
        runs.append(f"to-fp32|{src}|{tmp_path / name}|--max-shard-size|1KB|-q")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(script), *runs], check=True, capture_output=True)
    assert len(list(tmp_path.glob("*.safetensors"))) == len(runs) // 3


def test_widening_without_numpy_gives_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    # numpy is optional (neither dsckpt nor torch requires it): torch then does the widening.
    from dsckpt.execute import executor as execute

    src = ckpt("zero", "z3-bf16-dp2")  # bf16 buffers and frozen weights are widened to fp32
    core.consolidate(src, tmp_path / "numpy.safetensors")
    monkeypatch.setattr(execute, "_numpy", lambda: None)
    core.consolidate(src, tmp_path / "torch.safetensors")
    assert (tmp_path / "numpy.safetensors").read_bytes() == (
        tmp_path / "torch.safetensors"
    ).read_bytes()
