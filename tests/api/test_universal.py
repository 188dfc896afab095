"""Universal checkpoints (DeepSpeed's ds_to_universal output): inspect and to-fp32.

The fixtures under tests/fixtures/universal/ were written by DeepSpeed's own ds_to_universal from
the native fixtures; the expected values are the source fixture's ground truth (the live run's
fp32 masters) and what DeepSpeed's own load_universal put in the model (ref_universal_load.pt).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, RunsAShellCommand, ckpt, facts, load_output
from safetensors.torch import load_file

from dsckpt.discover.layout import open_checkpoint

UNIVERSAL = sorted(p.parent.name for p in (FIXTURES / "universal").glob("*/facts.json"))
ZERO_UNIVERSAL = [n for n in UNIVERSAL if facts("universal", n)["source"].startswith("zero/")]
FORMATS = ["model.safetensors", "model.bin", "shards"]


def _as_out(ref: torch.Tensor) -> torch.Tensor:
    return ref.float() if ref.is_floating_point() else ref


def _tag_dir(name: str) -> Path:
    return ckpt("universal", name) / facts("universal", name)["tag"]


def _digest(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_every_fixture_was_written_by_ds_to_universal() -> None:
    assert len(ZERO_UNIVERSAL) >= 5 and any("z3" in n for n in UNIVERSAL)
    for name in UNIVERSAL:
        f = facts("universal", name)
        assert "deepspeed.checkpoint.ds_to_universal" in f["ds_to_universal"]
        assert (ckpt("universal", name) / "latest_universal").read_text() == f["tag"]
        assert (_tag_dir(name) / "zero" / "optimizer_state.pt").is_file()


def test_latest_universal_names_the_tag_when_there_is_no_latest(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(ckpt("universal", "u-z2-fp32-dp2"), root)
    shutil.copytree(ckpt("zero", "z2-fp32-dp2") / "global_step3", root / "global_step3")
    assert open_checkpoint(root).kind == "universal"
    (root / "latest").write_text("global_step3")  # `latest` wins: it is the native save
    assert open_checkpoint(root).kind == "zero"
    assert open_checkpoint(root, "global_step3_universal").kind == "universal"
    (root / "latest").unlink()
    (root / "latest_universal").write_text("global_step9_universal")
    with pytest.raises(Exception, match="names tag 'global_step9_universal'"):
        open_checkpoint(root)


# --- inspect -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNIVERSAL)
def test_inspect_reads_the_folders_and_the_model_files(cli, name: str) -> None:
    f = facts("universal", name)
    src_kind, src_name = f["source"].split("/")
    src = open_checkpoint(ckpt(src_kind, src_name))
    result = cli("inspect", ckpt("universal", name), "--json", "--params")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "universal" and data["master_dtype"] == "float32"
    assert data["iteration"] == src.iteration
    assert (data["topology"]["pp"], data["topology"]["dp"]) == (src.pp, src.dp)
    errors = [x for x in data["findings"] if x["level"] == "error"]
    assert errors == []
    # The same parameters as the source checkpoint, each trainable one with its zero/ folder.
    kinds = {p["name"]: p["kind"] for p in data["params"]}
    assert kinds == {t.name: t.kind for t in src.tensors}
    held = {p["name"]: p for p in data["universal"]["params"] if p["trainable"]}
    assert set(held) == {t.name for t in src.tensors if t.kind == "trainable"}
    for p in held.values():
        assert {"fp32", "exp_avg", "exp_avg_sq"} <= set(p["states"]), p
        # ds_to_universal writes step.pt for ZeRO-1/2 sources only (ZeRO-3's is in
        # zero/optimizer_state.pt).
        assert (p["step"] == src.iteration) if src.zero_stage < 3 else (p["step"] is None)
    assert data["universal"]["source_zero_stage"] == src.zero_stage


def test_inspect_table_names_the_states(cli) -> None:
    result = cli("inspect", ckpt("universal", "u-z2-fp32-dp2"), "--params")
    assert result.exit_code == 0, result.output
    for text in (
        "universal checkpoint",
        "8 parameters (exp_avg exp_avg_sq fp32 step) + 5 module copies",
        "zero/: fp32 exp_avg exp_avg_sq, step 3",
        "alias of embed.weight",
        "No problems found.",
    ):
        assert text in result.stdout, text


# --- to-fp32 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ZERO_UNIVERSAL)
def test_to_fp32_equals_the_source_run_and_deepspeeds_universal_load(
    cli, tmp_path: Path, name: str, fmt: str
) -> None:
    f = facts("universal", name)
    out = tmp_path / fmt
    shards = ["--max-shard-size", "1KB"] if fmt == "shards" else []
    result = cli("to-fp32", ckpt("universal", name), out, *shards)
    assert result.exit_code == 0, result.output
    assert "universal checkpoint" in result.stdout
    got = load_output(out)
    live = torch.load(FIXTURES / f["source_ref_live"], weights_only=True)
    assert set(got) == set(live)  # buffers, frozen weights and tied aliases included
    for key, value in live.items():
        assert got[key].dtype == _as_out(value).dtype, key
        assert torch.equal(got[key], _as_out(value)), key
    # What DeepSpeed's own load_universal put in the fp32 masters, bit for bit.
    assert f["ref_universal_load"], f["ref_universal_load_failure"]
    loaded = torch.load(FIXTURES / "universal" / name / "ref_universal_load.pt", weights_only=True)
    src = open_checkpoint(ckpt(*f["source"].split("/")))
    for t in src.tensors:
        if t.kind == "trainable":
            assert torch.equal(got[t.name], loaded[t.name]), t.name


def test_to_fp32_ignores_the_lossy_fp32_copies_of_module_tensors(tmp_path: Path) -> None:
    # ds_to_universal gives `perm` (an int64 buffer) a float32 folder: the value written comes
    # from the model file, in its own dtype.
    from dsckpt.api.consolidation import consolidate

    copy = _tag_dir("u-z2-fp32-dp2") / "zero" / "perm" / "fp32.pt"
    assert torch.load(copy, weights_only=True)["param"].dtype == torch.float32
    out = tmp_path / "m.safetensors"
    consolidate(ckpt("universal", "u-z2-fp32-dp2"), out)
    assert load_file(out)["perm"].dtype == torch.int64


def test_pipeline_to_fp32_matches_the_native_consolidation(cli, tmp_path: Path) -> None:
    f = facts("universal", "u-p2t1d1-z1-fp32")
    native, universal = tmp_path / "native.safetensors", tmp_path / "universal.safetensors"
    assert cli("to-fp32", ckpt("pipe", "p2t1d1-z1-fp32"), native).exit_code == 0
    result = cli("to-fp32", ckpt("universal", "u-p2t1d1-z1-fp32"), universal)
    assert result.exit_code == 0, result.output
    a, b = load_file(native), load_file(universal)
    assert set(a) == set(b)
    truth = torch.load(FIXTURES / f["source_ref_live"], weights_only=True)
    stale = "tied_modules.embed.position_embeddings.weight"
    for key in a:
        if key == stale:
            continue
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(truth[key][: b[key].shape[0]], b[key]), key
    # ds_to_universal saved the embedding without its vocabulary padding (52 -> 50 rows) ...
    assert b["tied_modules.embed.word_embeddings.weight"].shape[0] == 50
    # ... and the tied module's untied parameter from the last stage: DeepSpeed's loader loads
    # that copy, so dsckpt writes it, and inspect warns.
    assert not torch.equal(truth[stale], b[stale])
    saved = torch.load(_tag_dir("u-p2t1d1-z1-fp32") / "zero" / stale / "fp32.pt", weights_only=True)
    assert torch.equal(saved["param"], b[stale])
    shown = cli("inspect", ckpt("universal", "u-p2t1d1-z1-fp32"))
    assert shown.exit_code == 0 and "pipeline_replicated_parameter_patterns" in shown.stdout
    data = json.loads(cli("inspect", ckpt("universal", "u-p2t1d1-z1-fp32"), "--json").stdout)
    recorded = data["universal"]["universal_checkpoint_info"]
    assert recorded["original_vocab_size"] == 50 and recorded["padded_vocab_size"] == 52
    assert recorded["vocabulary_parameter_patterns"] == [
        r"tied_modules\.embed\.word_embeddings\.weight"
    ]


def test_keeping_vocab_padding_is_refused_when_the_rows_are_gone(cli, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = cli("to-fp32", ckpt("universal", "u-p2t1d1-z1-fp32"), out, "--keep-vocab-padding")
    assert result.exit_code == 1
    assert "without its vocabulary padding" in result.stderr and not out.exists()


# --- damaged universal checkpoints: a finding for inspect, a one-line refusal for to-fp32 -------


def _damaged(tmp_path: Path, name: str, damage) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path / name
    shutil.copytree(ckpt("universal", name), root)
    damage(root / facts("universal", name)["tag"])
    return root


def _remove_folder(tag: Path) -> None:
    shutil.rmtree(tag / "zero" / "fc1.weight")


def _extra_folder(tag: Path) -> None:
    shutil.copytree(tag / "zero" / "fc1.weight", tag / "zero" / "decoder.weight")


def _extra_file(tag: Path) -> None:
    (tag / "zero" / "fc1.weight" / "notes.txt").write_text("hi")


def _wrong_shape(tag: Path) -> None:
    shutil.copyfile(tag / "zero" / "fc1.bias" / "fp32.pt", tag / "zero" / "fc1.weight" / "fp32.pt")


def _missing_fp32(tag: Path) -> None:
    (tag / "zero" / "fc1.weight" / "fp32.pt").unlink()


def _mixed_steps(tag: Path) -> None:
    torch.save(torch.tensor(7.0), tag / "zero" / "fc1.weight" / "step.pt")


def _bf16_state(tag: Path) -> None:
    path = tag / "zero" / "fc1.weight" / "fp32.pt"
    saved = torch.load(path, weights_only=True)
    torch.save({"param": saved["param"].bfloat16(), "cat_dim": 0}, path)


def _fused(tag: Path) -> None:
    path = tag / "zero" / "fc1.weight" / "fp32.pt"
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "param_n_sub_params": 2}, path)


def _linked_folder(tag: Path) -> None:
    os.symlink(tag / "zero" / "fc1.weight", tag / "zero" / "fc9.weight")


def _missing_rank(tag: Path) -> None:
    (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()


def _truncated(tag: Path) -> None:
    path = tag / "zero" / "fc1.weight" / "exp_avg.pt"
    path.write_bytes(path.read_bytes()[:300])


def _no_model_files(tag: Path) -> None:
    (tag / "mp_rank_00_model_states.pt").unlink()


def _missing_stage(tag: Path) -> None:
    (tag / "mp_rank_01_model_states.pt").unlink()


def _native_file_beside(tag: Path) -> None:
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copyfile(ckpt("zero", "z2-fp32-dp2") / "global_step3" / name, tag / name)


def _short_frozen(tag: Path) -> None:
    path = tag / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=True)
    state["frozen_param_fragments"]["adapter.bias"] = torch.zeros(3)
    torch.save(state, path)


DAMAGE = {
    "missing-folder": ("u-z2-fp32-dp2", _remove_folder, "missing-param-folder", "fc1.weight"),
    "extra-folder": ("u-z2-fp32-dp2", _extra_folder, "extra-param-folder", "decoder.weight"),
    "extra-file": ("u-z2-fp32-dp2", _extra_file, "extra-param-file", "notes.txt"),
    "wrong-shape": ("u-z2-fp32-dp2", _wrong_shape, "bad-metadata", "shape [5, 7]"),
    "missing-fp32": ("u-z3-fp32-dp2", _missing_fp32, "missing-param-folder", "fp32.pt"),
    "mixed-steps": ("u-z2-fp32-dp2", _mixed_steps, "mixed-runs", "step 7"),
    "bf16-state": ("u-z2-bf16-dp2", _bf16_state, "bad-metadata", "bfloat16"),
    "fused": ("u-z2-fp32-dp2", _fused, "unsupported-universal", "param_n_sub_params"),
    "linked-folder": ("u-z2-fp32-dp2", _linked_folder, "extra-param-file", "fc9.weight"),
    "missing-rank": ("u-z3-fp32-dp2", _missing_rank, "missing-rank-file", "zero_pp_rank_1"),
    "truncated": ("u-z2-fp32-dp2", _truncated, "corrupt-file", "exp_avg.pt"),
    "missing-stage": ("u-p2t1d1-z1-fp32", _missing_stage, "missing-rank-file", "mp_rank_01"),
    "native-beside": ("u-z2-fp32-dp2", _native_file_beside, "unrelated-files", "two"),
    "short-frozen": ("u-z2-fp32-dp2", _short_frozen, "short-partition", "adapter.bias"),
    "no-model-files": ("u-z2-fp32-dp2", _no_model_files, "missing-rank-file", "model-states"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_a_finding_and_refuses_writing(cli, tmp_path: Path, case: str) -> None:
    name, damage, code, text = DAMAGE[case]
    root = _damaged(tmp_path, name, damage)
    before = _digest(root)
    result = cli("inspect", root, "--json")
    assert result.exit_code == 1, result.output
    found = [x for x in json.loads(result.stdout)["findings"] if x["level"] == "error"]
    assert any(x["code"] == code and text in x["message"] for x in found), found
    out = tmp_path / "out.safetensors"
    result = cli("to-fp32", root, out)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists() and _digest(root) == before
    result = cli("reshape", root, tmp_path / "resharded", "--dp", "3")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "resharded").exists() and _digest(root) == before


def test_missing_moments_are_a_warning_only(cli, tmp_path: Path) -> None:
    root = _damaged(
        tmp_path, "u-z2-fp32-dp2", lambda t: (t / "zero" / "fc1.weight" / "exp_avg.pt").unlink()
    )
    result = cli("inspect", root)
    assert result.exit_code == 0 and "no exp_avg.pt" in result.stdout, result.output
    assert cli("to-fp32", root, tmp_path / "m.safetensors").exit_code == 0


def test_missing_optimizer_state_is_a_warning_only(cli, tmp_path: Path) -> None:
    root = _damaged(
        tmp_path, "u-z3-fp32-dp2", lambda t: (t / "zero" / "optimizer_state.pt").unlink()
    )
    result = cli("inspect", root)
    assert result.exit_code == 0 and "optimizer_state.pt is missing" in result.stdout
    assert cli("to-fp32", root, tmp_path / "m.safetensors").exit_code == 0


def test_a_state_file_that_runs_code_is_refused_and_nothing_runs(cli, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def plant(tag: Path) -> None:
        torch.save({"param": RunsAShellCommand(marker)}, tag / "zero" / "fc1.weight" / "fp32.pt")

    root = _damaged(tmp_path, "u-z2-fp32-dp2", plant)
    for args in (("inspect", root), ("to-fp32", root, tmp_path / "m.safetensors")):
        result = cli(*args)
        assert result.exit_code == 1 and "`posix.system`" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


# --- reshape: a native ZeRO checkpoint at any DP -----------------------------------------------
#
# The expected files are dsckpt's native reshape of the fixture the universal checkpoint was
# converted from (itself proven against DeepSpeed: tests/api/test_reshape_dp.py and the resume
# proofs): the same rank files, the same pickled structures, every tensor bit for bit. The one
# exception is ZeRO-3's padding at the source's own DP, which DeepSpeed leaves uninitialised
# (the native reshape copies those bytes, a universal checkpoint never had them: zeros).


def _same(ours, native, at: str, padding: set[int] | None = None) -> None:  # type: ignore[no-untyped-def]
    if isinstance(ours, torch.Tensor):
        assert isinstance(native, torch.Tensor), at
        assert (type(ours), ours.dtype, ours.shape, ours.requires_grad) == (
            type(native), native.dtype, native.shape, native.requires_grad), at  # fmt: skip
        differ = (ours.view(-1).view(torch.uint8) != native.view(-1).view(torch.uint8)).nonzero()
        if ours.dim() == 1 and padding is not None:
            item = ours.element_size()
            where = sorted({int(i) // item for i in differ.flatten()})
            # only padding differs, and there the output holds zeros
            assert set(where) <= padding and not ours[where].any(), (at, where[:5])
        else:
            assert not len(differ), at
        assert vars(ours) == vars(native), at  # (ds_id of ZeRO-3 flat tensors)
    elif isinstance(ours, dict):
        assert type(ours) is type(native) and list(ours) == list(native), at
        for k in ours:
            _same(ours[k], native[k], f"{at}/{k}", padding)
    elif isinstance(ours, (list, tuple)):
        assert type(ours) is type(native) and len(ours) == len(native), at
        for i, (x, y) in enumerate(zip(ours, native, strict=True)):
            _same(x, y, f"{at}[{i}]", padding)
    elif hasattr(ours, "__dict__") and not isinstance(ours, type):
        assert type(ours) is type(native) and vars(ours) == vars(native), at
    else:
        assert ours == native, at


def _padding(plan, rank: int) -> set[int]:  # type: ignore[no-untyped-def]
    """ZeRO-3 flat positions of rank ``rank`` no parameter element fills (over all groups:
    checked per tensor only where it differs, so a union is enough)."""
    out: set[int] = set()
    for group in plan.groups:
        part = group.partitions[rank]
        covered = {r.dst_start + i for r in part.runs for i in range(r.length)}
        out |= set(range(part.numel)) - covered
    return out


RESHAPE_CASES = [(n, dp) for n in ZERO_UNIVERSAL for dp in (1, 2, 3, 5)]


@pytest.mark.parametrize(
    ("name", "dp"), RESHAPE_CASES, ids=[f"{n}-to-dp{d}" for n, d in RESHAPE_CASES]
)
def test_reshape_writes_what_deepspeed_saves_at_that_dp(tmp_path: Path, name: str, dp: int) -> None:
    from dsckpt.api.reshaping import reshape

    source = facts("universal", name)["source"]
    before = _digest(ckpt("universal", name))
    ours = reshape(ckpt("universal", name), tmp_path / "ours", dp=dp)
    native = reshape(ckpt(*source.split("/")), tmp_path / "native", dp=dp)
    assert ours.written and ours.from_universal and ours.plan.kind == native.plan.kind
    assert (tmp_path / "ours" / "latest").read_text() == facts("universal", name)["tag"]
    ours_dir, native_dir = tmp_path / "ours" / ours.tag, tmp_path / "native" / native.tag
    names = sorted(p.name for p in ours_dir.iterdir())
    assert names == sorted(p.name for p in native_dir.iterdir())
    assert len([n for n in names if "optim_states" in n]) == dp
    zero3_at_source_dp = ours.plan.kind == "zero3" and dp == facts("universal", name)["dp"]
    for file in names:
        got = torch.load(ours_dir / file, weights_only=False)
        rank = int(file.split("zero_pp_rank_")[1].split("_")[0]) if "zero_pp_rank_" in file else 0
        padding = _padding(ours.plan, rank) if zero3_at_source_dp and "optim" in file else None
        _same(got, torch.load(native_dir / file, weights_only=False), file, padding)
    assert _digest(ckpt("universal", name)) == before


@pytest.mark.parametrize("name", ZERO_UNIVERSAL)
def test_reshaped_masters_and_moments_are_the_universal_files_bit_for_bit(
    tmp_path: Path, name: str
) -> None:
    """Independently of the native reshape: the fp32 masters and Adam's moments the output
    holds, consolidated by dsckpt, are the zero/<name>/*.pt tensors themselves."""
    from dsckpt.api.consolidation import consolidate
    from dsckpt.api.reshaping import reshape

    reshape(ckpt("universal", name), tmp_path / "out", dp=3)
    consolidate(tmp_path / "out", tmp_path / "m.safetensors", optimizer=True)
    weights = load_file(tmp_path / "m.safetensors")
    moments = load_file(tmp_path / "m.optimizer.safetensors")
    trainable = [t.name for t in open_checkpoint(ckpt("universal", name)).tensors
                 if t.kind == "trainable"]  # fmt: skip
    assert trainable
    for key in trainable:
        for state, got in (("fp32", weights[key]), ("exp_avg", moments[f"{key}.exp_avg"]),
                           ("exp_avg_sq", moments[f"{key}.exp_avg_sq"])):  # fmt: skip
            saved = torch.load(_tag_dir(name) / "zero" / key / f"{state}.pt", weights_only=True)
            saved = saved["param"] if isinstance(saved, dict) else saved
            assert torch.equal(got.view(-1), saved.view(-1)), (key, state)


def test_reshape_dry_run_json_has_the_native_plan_shape(cli, tmp_path: Path) -> None:
    got = cli("reshape", ckpt("universal", "u-z2-fp32-dp2"), tmp_path / "a", "--dp", "3",
              "--dry-run", "--json")  # fmt: skip
    native = cli("reshape", ckpt("zero", "z2-fp32-dp2"), tmp_path / "b", "--dp", "3",
                 "--dry-run", "--json")  # fmt: skip
    assert got.exit_code == 0 and native.exit_code == 0, got.output + native.output
    ours, theirs = json.loads(got.stdout), json.loads(native.stdout)
    assert ours.keys() == theirs.keys() and ours["plan"].keys() == theirs["plan"].keys()
    assert (ours["source"], ours["target"]) == (theirs["source"], theirs["target"])
    assert [f["name"].split("/")[-1] for f in ours["plan"]["files"]] == [
        f["name"].split("/")[-1] for f in theirs["plan"]["files"]
    ]
    assert ours["dry_run"] and not (tmp_path / "a").exists()
    # every copy reads a universal file: the parameters' folders or the model file
    sources = {op["source"] for f in ours["plan"]["files"] for op in f["ops"] if "source" in op}
    assert sources and all("/zero/" in s or s.endswith("model_states.pt") for s in sources)
    table = cli("reshape", ckpt("universal", "u-z2-fp32-dp2"), tmp_path / "a", "--dp", "3",
                "--dry-run")  # fmt: skip
    assert table.exit_code == 0 and "embed.weight[54:91]->0" in table.stdout, table.output
    assert "universal checkpoint -> native ZeRO-2 DP 2 -> 3" in table.stdout
    assert (
        table.stdout.splitlines()[0].rstrip() == "universal checkpoint -> native ZeRO-2: DP 2 -> 3"
    )


def test_pipeline_universal_reshape_is_refused_naming_what_is_missing(cli, tmp_path: Path) -> None:
    result = cli("reshape", ckpt("universal", "u-p2t1d1-z1-fp32"), tmp_path / "out", "--dp", "2")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "2-stage pipeline" in lines[0], result.stderr
    assert "layer files" in lines[0] and "vocabulary padding rows" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "text"),
    [(("--dp", "2", "--tp", "2"), "--dp only"), ((), "--dp N")],
)
def test_reshape_universal_takes_dp_only(cli, tmp_path: Path, args, text: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("reshape", ckpt("universal", "u-z2-fp32-dp2"), tmp_path / "out", *args)
    assert result.exit_code != 0 and text in result.output, result.output
    assert not (tmp_path / "out").exists()


def _set_stage(stage: int | None):  # type: ignore[no-untyped-def]
    def damage(tag: Path) -> None:
        path = tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=True)
        if stage is None:
            del state["ds_config"]["zero_optimization"]["stage"]
        else:
            state["ds_config"]["zero_optimization"]["stage"] = stage
        torch.save(state, path)

    return damage


def _set_elastic(value: object):  # type: ignore[no-untyped-def]
    def damage(tag: Path) -> None:
        path = tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=True)
        state["ds_config"]["zero_optimization"]["elastic_checkpoint"] = value
        torch.save(state, path)

    return damage


def test_elastic_checkpoint_reads_as_deepspeed_reads_it(cli, tmp_path: Path) -> None:
    """A saved "false" is false, as DeepSpeed's config model reads it; "true" is refused."""
    off = _damaged(tmp_path / "off", "u-z2-fp32-dp2", _set_elastic("false"))
    assert cli("reshape", off, tmp_path / "out", "--dp", "3").exit_code == 0
    on = _damaged(tmp_path / "on", "u-z2-fp32-dp2", _set_elastic("true"))
    result = cli("reshape", on, tmp_path / "out2", "--dp", "3")
    assert result.exit_code == 1 and "elastic_checkpoint" in result.stderr, result.output


def _drop_moment(tag: Path) -> None:
    (tag / "zero" / "fc2.bias" / "exp_avg_sq.pt").unlink()


def _drop_optimizer_state(tag: Path) -> None:
    (tag / "zero" / "optimizer_state.pt").unlink()


def _optimizer_state(tag: Path) -> dict:
    """zero/optimizer_state.pt loaded with torch: it pickles DeepSpeed's classes, so this needs
    DeepSpeed (test-only; the case is skipped without it)."""
    pytest.importorskip("deepspeed")
    return torch.load(tag / "zero" / "optimizer_state.pt", weights_only=False)


def _one_param_group(tag: Path) -> None:
    path = tag / "zero" / "optimizer_state.pt"
    state = _optimizer_state(tag)
    state["param_groups"] = state["param_groups"][:1]
    torch.save(state, path)


def _sharded_entry(tag: Path) -> None:
    path = tag / "zero" / "optimizer_state.pt"
    state = _optimizer_state(tag)
    state["single_partition_of_fp32_groups"] = [torch.zeros(3)]
    torch.save(state, path)


def _amsgrad_state(tag: Path) -> None:
    path = tag / "zero" / "optimizer_state.pt"
    state = _optimizer_state(tag)
    entry = state["optimizer_state_dict"]["state"][0]
    entry["max_exp_avg_sq"] = entry["exp_avg_sq"].clone()
    torch.save(state, path)


REFUSED = {
    "state-without-folders": ("u-z3-fp32-dp2", _amsgrad_state, "'max_exp_avg_sq' per element"),
    "param-groups-disagree": ("u-z2-fp32-dp2", _one_param_group, "`param_groups` lists [[0]]"),
    "sharded-entries": ("u-z2-fp32-dp2", _sharded_entry, "single_partition_of_fp32_groups"),
    "stage-disagrees": ("u-z2-fp32-dp2", _set_stage(1), "ds_config describes ZeRO stage 1"),
    "bf16-optimizer-disagrees": ("u-z1-bf16-dp2", _set_stage(2), "written by BF16_Optimizer"),
    "missing-moment": ("u-z2-fp32-dp2", _drop_moment, "no exp_avg_sq.pt for 1 trainable"),
    "missing-optimizer-state": ("u-z3-fp32-dp2", _drop_optimizer_state, "optimizer_state.pt"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_reshape_refuses_what_it_cannot_write_faithfully(cli, tmp_path: Path, case: str) -> None:
    name, damage, text = REFUSED[case]
    root = _damaged(tmp_path, name, damage)
    before = _digest(root)
    result = cli("reshape", root, tmp_path / "out", "--dp", "3")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and _digest(root) == before


def test_reshape_output_inside_the_checkpoint_or_existing_is_refused(cli, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(ckpt("universal", "u-z2-fp32-dp2"), root)
    before = _digest(root)
    inside = root / facts("universal", "u-z2-fp32-dp2")["tag"] / "zero" / "out"
    result = cli("reshape", root, inside, "--dp", "3")
    assert result.exit_code == 1 and not inside.exists(), result.output
    assert cli("reshape", root, tmp_path / "out", "--dp", "3").exit_code == 0
    again = cli("reshape", root, tmp_path / "out", "--dp", "2")
    assert again.exit_code == 1 and "--force" in again.stderr, again.output
    assert cli("reshape", root, tmp_path / "out", "--dp", "2", "--force").exit_code == 0
    ranks = sorted(p.name for p in (tmp_path / "out").rglob("*optim_states.pt"))
    assert len(ranks) == 2 and _digest(root) == before


def test_without_a_recorded_stage_the_optimizer_state_decides(tmp_path: Path) -> None:
    from dsckpt.api.reshaping import reshape

    root = _damaged(tmp_path, "u-z1-fp32-dp2", _set_stage(None))
    result = reshape(root, tmp_path / "out", dp=3)
    assert (result.plan.kind, result.plan.stage) == ("zero", 1)


# --- to-fp32 --optimizer -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("name", UNIVERSAL)
def test_optimizer_export_is_the_zero_folders_and_the_source_runs_state(
    tmp_path: Path, name: str, fmt: str
) -> None:
    """Each ``<name>.exp_avg`` / ``.exp_avg_sq`` is the folder's file bit for bit, the steps
    are its step.pt, and the whole export (groups, order, values) is the native export of
    the fixture it was converted from, except what ds_to_universal itself changed: a pipeline's
    tied position embeddings, taken from the last stage (see the fixture's manifest)."""
    from safetensors import safe_open

    from dsckpt.api.consolidation import consolidate

    kind, source = facts("universal", name)["source"].split("/")
    stale = {"tied_modules.embed.position_embeddings.weight"} if kind == "pipe" else set()
    ours, theirs = tmp_path / "u", tmp_path / "n"
    result = consolidate(ckpt("universal", name), ours, optimizer=True, optimizer_format=fmt)
    consolidate(ckpt(kind, source), theirs, optimizer=True, optimizer_format=fmt)
    assert result.optimizer is not None and result.optimizer.keys == ("exp_avg", "exp_avg_sq")
    if fmt == "torch":
        got = torch.load(ours / "optimizer.pt", weights_only=True)
        native = torch.load(theirs / "optimizer.pt", weights_only=True)
        assert got["param_groups"] == native["param_groups"]
        assert got["state"].keys() == native["state"].keys()
        for i, entry in got["state"].items():
            assert entry.keys() == native["state"][i].keys()
            for key, value in entry.items():
                assert torch.equal(value, native["state"][i][key]) or stale, (i, key)
        return
    with (
        safe_open(ours / "optimizer.safetensors", "pt") as f,
        safe_open(theirs / "optimizer.safetensors", "pt") as g,
    ):
        keys = list(f.keys())
        assert keys == list(g.keys()) and keys
        meta, native_meta = f.metadata(), g.metadata()
        for key in keys:
            param, _, state = key.rpartition(".")
            saved = torch.load(_tag_dir(name) / "zero" / param / f"{state}.pt", weights_only=True)
            saved = saved["param"] if isinstance(saved, dict) else saved
            assert torch.equal(f.get_tensor(key).view(-1), saved.view(-1)), key
            if param not in stale:
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
    assert {k: v for k, v in meta.items() if k != "dsckpt.source"} == {
        k: v for k, v in native_meta.items() if k != "dsckpt.source"
    }
    groups = json.loads(meta["dsckpt.optimizer.param_groups"])
    for group in groups:
        for param in group["params"]:
            step_file = _tag_dir(name) / "zero" / param / "step.pt"
            if step_file.exists():  # (ZeRO-3 sources keep it in optimizer_state.pt)
                assert group["step"] == torch.load(step_file, weights_only=True).item()
        assert group["step"] == facts(kind, source)["global_steps"]  # one step per iteration


@pytest.mark.parametrize(
    ("damage", "text"),
    [
        (lambda t: (t / "zero" / "optimizer_state.pt").unlink(), "param groups are nowhere else"),
        (lambda t: (t / "zero" / "fc1.bias" / "exp_avg.pt").unlink(), "fc1.bias/exp_avg.pt"),
    ],
    ids=["no-optimizer-state", "no-moment"],
)
def test_optimizer_export_refuses_what_the_folders_lack(cli, tmp_path: Path, damage, text) -> None:  # type: ignore[no-untyped-def]
    root = _damaged(tmp_path, "u-z2-fp32-dp2", damage)
    out = tmp_path / "out.safetensors"
    result = cli("to-fp32", root, out, "--optimizer")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "out.optimizer.safetensors").exists()


@pytest.mark.parametrize("name", ["u-z2-fp32-dp2", "u-p2t1d1-z1-fp32"])
def test_show_map_says_there_are_no_ranks_to_map(cli, name: str) -> None:
    result = cli("show-map", ckpt("universal", name))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no rank partitions to map" in lines[0], result.output


def test_verify_checks_an_output_and_refuses_a_checkpoint_pair(cli, tmp_path: Path) -> None:
    src = ckpt("universal", "u-z3-fp32-dp2")
    out = tmp_path / "m.safetensors"
    assert cli("to-fp32", src, out).exit_code == 0
    result = cli("verify", src, out)
    assert result.exit_code == 0 and result.stdout.startswith("equal"), result.output
    # A weight changed behind dsckpt's back is caught.
    from safetensors.torch import save_file

    tensors = load_file(out)
    tensors["fc1.bias"] = tensors["fc1.bias"] + 1
    save_file(tensors, out, metadata={"format": "pt"})
    assert cli("verify", src, out).exit_code == 1
    result = cli("verify", src, ckpt("zero", "z3-fp32-dp2"))
    assert result.exit_code == 1 and "is a universal checkpoint" in result.stderr, result.output


# --- DeepSpeed's own load_universal, live, at another DP size ------------------------------------

LIVE = [("u-z2-bf16-dp2", 3), ("u-z3-fp32-dp2", 3)]


@pytest.mark.deepspeed
@pytest.mark.parametrize(("name", "dp"), LIVE, ids=[f"{n}-at-dp{d}" for n, d in LIVE])
def test_to_fp32_is_what_load_universal_loads_at_another_dp(
    tmp_path: Path, name: str, dp: int
) -> None:
    """A universal checkpoint loads at any DP; whatever the DP, DeepSpeed's loader puts the
    to-fp32 values in the fp32 masters (ref_universal_load.pt covers the source DP)."""
    pytest.importorskip("deepspeed")
    import socket
    import subprocess
    import sys

    from dsckpt.api.consolidation import consolidate

    kind, source = facts("universal", name)["source"].split("/")
    src = facts(kind, source)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = list(src["train_args"])
    args[args.index("--steps") + 1] = "0"
    loaded = tmp_path / "loaded.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dp),
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           "tests/fixtures/train_zero.py", *args, "--load", str(ckpt("universal", name)),
           "--load-universal", "--weights-out", str(loaded)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[2])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "m.safetensors"
    consolidate(ckpt("universal", name), out)
    got = load_file(out)
    live = torch.load(loaded, weights_only=True)
    trainable = [t.name for t in open_checkpoint(ckpt("universal", name)).tensors
                 if t.kind == "trainable"]  # fmt: skip
    assert trainable
    for key in trainable:
        assert torch.equal(got[key], live[key]), key
