"""What the CLI says at the edges (issue 12, second part), through the CLI on copies of real
fixtures: ZeRO-3's own model-state names in show-map, fp32 pipelines without ZeRO consolidated
from their layer files, inspect of a damaged checkpoint, `--tag` naming CKPT itself, checkpoints
suggested below a folder that holds none, missing rank and layer files, the root help's examples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ckpt, facts, tag_dir
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dsckpt.cli.app import app

Z2 = ("zero", "z2-fp32-dp2")
Z3 = ("zero", "z3-fp32-dp2")
PIPE_Z0 = ("pipe", "p2t1d1-z0-fp32")
PIPE_TP2 = ("pipe", "p2t2d1-z1-fp32")
NODE_LOCAL = "multi-node runs that save to node-local disks leave each node's files on that node"


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):
    """The CLI in-process, colour off; ``width=None`` is a pipe, a number a terminal that wide."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("DSCKPT_DEBUG", raising=False)

    def invoke(*args: str | Path, width: int | None = None):
        if width is None:
            monkeypatch.delenv("DSCKPT_WIDTH", raising=False)
        else:
            monkeypatch.setenv("DSCKPT_WIDTH", str(width))
        monkeypatch.setenv("COLUMNS", "100")
        return CliRunner().invoke(app, [str(a) for a in args])

    return invoke


def _copy(tmp_path: Path, kind: str, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(ckpt(kind, name), dest)
    return dest


def _tag(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def _truncate(path: Path, keep: int = 2000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _error(result) -> str:  # type: ignore[no-untyped-def]
    """The one stderr line of a failed command."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- 1. show-map names the files ZeRO-3 writes ------------------------------------------------


@pytest.mark.parametrize("width", [None, 100])
def test_show_map_zero3_names_its_own_model_state_files(run, width: int | None) -> None:
    result = run("show-map", ckpt(*Z3), width=width)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "zero_pp_rank_0..1_mp_rank_00_model_states.pt" in out
    # No bare mp_rank_00_model_states.pt: ZeRO-3 does not write one.
    assert not re.search(r"(?<![_\w])mp_rank_00_model_states\.pt", out), out


def test_show_map_json_lists_the_model_state_files_that_exist(run) -> None:
    data = json.loads(run("show-map", ckpt(*Z3), "--json").stdout)
    (rank,) = data["ranks"]
    assert rank["model_file"] is None
    assert rank["model_files"] == [
        f"zero_pp_rank_{d}_mp_rank_00_model_states.pt" for d in range(facts(*Z3)["dp"])
    ]
    assert all((tag_dir(*Z3) / name).is_file() for name in rank["model_files"])
    assert not (tag_dir(*Z3) / "mp_rank_00_model_states.pt").exists()


def test_show_map_json_outside_zero3_is_unchanged(run) -> None:
    data = json.loads(run("show-map", ckpt(*Z2), "--json").stdout)
    (rank,) = data["ranks"]
    assert rank["model_file"] == "mp_rank_00_model_states.pt"
    assert rank["model_files"] == ["mp_rank_00_model_states.pt"]
    assert (tag_dir(*Z2) / rank["model_file"]).is_file()


def test_reshape_dry_run_of_zero3_names_its_model_state_files(run, tmp_path: Path) -> None:
    result = run("reshape", ckpt(*Z3), tmp_path / "r", "--dp", "1", "--dry-run", width=100)
    assert result.exit_code == 0, result.output
    assert not re.search(r"(?<![_\w])mp_rank_00_model_states\.pt", result.stdout)


# --- 2. fp32 pipelines without ZeRO: the layer files, automatically ---------------------------


def _truth(kind: str, name: str) -> dict[str, torch.Tensor]:
    truth = torch.load(FIXTURES / kind / name / "truth.pt", weights_only=True)
    vocab = facts(kind, name)["orig_vocab_size"]
    return {k: (v[:vocab] if "word_embeddings" in k else v) for k, v in truth.items()}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("out_name", ["m.safetensors", "m.bin"])
def test_fp32_pipeline_without_zero_takes_its_layer_files_bit_for_bit(
    run, tmp_path: Path, out_name: str
) -> None:
    out = tmp_path / out_name
    result = run("to-fp32", ckpt(*PIPE_Z0), out, "-q")
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert "source: layer files (float32; without ZeRO they are the trained weights, exact)" in (
        result.stdout
    )
    got = load_file(out) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
    truth = _truth(*PIPE_Z0)
    assert set(got) == set(truth)
    for key, value in truth.items():
        assert got[key].dtype == value.dtype == torch.float32, key
        assert _bits(got[key]) == _bits(value), key


def test_fp32_pipeline_without_zero_json_source(run, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    data = json.loads(run("to-fp32", ckpt(*PIPE_Z0), out, "--json", "-q").stdout)
    assert data["source"].startswith("layer files (float32") and "exact" in data["source"]
    with safe_open(out, "pt") as f:
        assert f.metadata()["dsckpt.source"] == data["source"]


def test_explicit_from_layers_on_exact_layers_is_the_same_output(run, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("to-fp32", ckpt(*PIPE_Z0), a, "-q").exit_code == 0
    flagged = run("to-fp32", ckpt(*PIPE_Z0), b, "-q", "--from-layers")
    assert flagged.exit_code == 0 and flagged.stderr == ""
    assert a.read_bytes() == b.read_bytes()


def test_verify_checks_the_automatic_layer_consolidation(run, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert run("to-fp32", ckpt(*PIPE_Z0), out, "-q").exit_code == 0
    result = run("verify", ckpt(*PIPE_Z0), out, "-q")
    assert result.exit_code == 0 and result.stdout.startswith("equal:"), result.output


def test_pipeline_with_zero_still_reads_the_fp32_master(run, tmp_path: Path) -> None:
    result = run("to-fp32", ckpt(*PIPE_TP2), tmp_path / "m.safetensors", "-q")
    assert "source: fp32 master weights from the optimizer partitions" in result.stdout


def test_lower_precision_layers_without_zero_need_the_flag() -> None:
    """bf16/fp16 layer files round the fp32 master weights: never taken without being asked."""
    from dsckpt.api.consolidation import plan_for
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.discover.pipeline import layer_files_exact
    from dsckpt.errors import UnsupportedLayout

    layout = open_checkpoint(ckpt(*PIPE_Z0))
    assert layer_files_exact(layout)
    half = dataclasses.replace(layout, param_dtype="bfloat16")
    assert not layer_files_exact(half)
    with pytest.raises(UnsupportedLayout, match="pass --from-layers.*upcast"):
        plan_for(half)
    assert plan_for(half, from_layers=True).source == "layer files (model dtype, upcast)"
    with_zero = open_checkpoint(ckpt(*PIPE_TP2))
    assert not layer_files_exact(with_zero)


def test_a_layer_gap_without_zero_needs_the_flag(run, tmp_path: Path) -> None:
    root = _copy(tmp_path, *PIPE_Z0)
    (_tag(root) / "layer_03-model_00-model_states.pt").unlink()
    inspected = run("inspect", root)
    assert inspected.exit_code == 0 and "warning\t" in inspected.stdout
    assert "layer_03-model_00-model_states.pt" in inspected.stdout
    line = _error(run("to-fp32", root, tmp_path / "m.safetensors"))
    assert "some may be missing" in line and "--from-layers" in line
    assert not (tmp_path / "m.safetensors").exists()


# --- 3. inspect of a damaged checkpoint ---------------------------------------------------------


def _records(stdout: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in stdout.splitlines() if line.count("\t") == 1)


def test_inspect_marks_what_a_damaged_optimizer_file_hides(run, tmp_path: Path) -> None:
    root = _copy(tmp_path, *Z2)
    bad = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _truncate(_tag(root) / bad)
    result = run("inspect", root)
    line = _error(result)
    assert bad in line
    summary = _records(result.stdout)
    assert summary["dtypes"] == "params float32, master unreadable"
    assert summary["trainable"] == "unreadable"
    assert summary["tied aliases"] == "unreadable"
    assert summary["frozen"] == "2 tensors, 56 elements"  # read from the model states
    assert "?" not in summary["dtypes"] and "0 tensors" not in result.stdout
    file_lines = [x for x in result.stdout.splitlines() if bad in x and "\t" in x]
    assert len(file_lines) == 2 and file_lines[0].endswith("unreadable")
    # The error is said once: one finding (no follow-on error about the tied alias).
    findings = [x for x in result.stdout.splitlines() if x.startswith("error\t")]
    assert findings == [f"error\t{line.removeprefix('error: ')}"]


def test_inspect_json_of_a_damaged_file(run, tmp_path: Path) -> None:
    root = _copy(tmp_path, *Z3)
    bad = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _truncate(_tag(root) / bad)
    result = run("inspect", root, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["unreadable_files"] == [bad]
    assert [f["name"] for f in data["files"] if not f["readable"]] == [bad]
    assert data["counts"]["trainable"]["complete"] is False
    assert data["counts"]["buffer"]["complete"] is True
    assert [f["code"] for f in data["findings"] if f["level"] == "error"] == ["corrupt-file"]


def test_inspect_with_unreadable_model_states_still_lists_the_files(run, tmp_path: Path) -> None:
    root = _copy(tmp_path, *Z2)
    _truncate(_tag(root) / "mp_rank_00_model_states.pt")
    result = run("inspect", root, width=100)
    line = _error(result)
    assert "mp_rank_00_model_states.pt" in line
    out = result.stdout
    assert "unknown: the model states are unreadable" in out
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in out
    assert "unreadable" in next(x for x in out.splitlines() if "mp_rank_00_model_states" in x)
    assert out.count("not a torch zip file") == 1


def test_inspect_of_a_damaged_layer_file(run, tmp_path: Path) -> None:
    root = _copy(tmp_path, *PIPE_TP2)
    bad = "layer_03-model_01-model_states.pt"
    _truncate(_tag(root) / bad)
    result = run("inspect", root)
    assert bad in _error(result)
    grid = [x.split("\t") for x in result.stdout.splitlines() if x.startswith("3\t")]
    assert grid == [["3", "5.9 kB", "unreadable"]]
    # The trainable tensors come from param_shapes and the ZeRO partitions: still known.
    assert "unreadable" not in _records(result.stdout)["trainable"]


def test_to_fp32_refuses_a_damaged_file_in_one_line(run, tmp_path: Path) -> None:
    root = _copy(tmp_path, *Z2)
    _truncate(_tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    line = _error(run("to-fp32", root, tmp_path / "m.safetensors"))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in line and "(and" not in line
    assert not (tmp_path / "m.safetensors").exists()


# --- 4. --tag naming the directory CKPT already is ---------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "to-fp32"])
def test_tag_of_the_tag_directory_itself(run, tmp_path: Path, command: str) -> None:
    tag = facts(*Z2)["tag"]
    extra = [tmp_path / "m.safetensors", "-q"] if command == "to-fp32" else []
    result = run(command, tag_dir(*Z2), *extra, "--tag", tag)
    assert result.exit_code == 0, result.output
    if command == "inspect":
        assert _records(result.stdout)["path"] == f"{ckpt(*Z2)}  (tag {tag})"


def test_tag_of_the_current_directory(run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tag_dir(*Z2))
    result = run("inspect", ".", "--tag", facts(*Z2)["tag"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(ckpt(*Z2).absolute())


def test_another_tag_inside_a_tag_directory_is_still_refused(run) -> None:
    line = _error(run("inspect", tag_dir(*Z2), "--tag", "global_step9"))
    assert "has no tag 'global_step9'" in line


# --- 5. checkpoints below a folder that holds none ----------------------------------------------


def _runs(tmp_path: Path, names: list[str]) -> Path:
    top = tmp_path / "runs"
    for i, name in enumerate(names):
        dest = top / name
        shutil.copytree(ckpt(*Z2), dest)
        os.utime(dest, (1_000_000 + i, 1_000_000 + i))  # later in the list is newer
    return top


def test_a_folder_of_runs_suggests_the_checkpoints_below(run, tmp_path: Path) -> None:
    top = _runs(tmp_path, ["run-10", "nested/run-20"])
    line = _error(run("inspect", top))
    assert "holds no DeepSpeed checkpoint files" in line
    assert line.endswith(
        f"2 checkpoints below it, newest first: {top / 'nested/run-20'}, "
        f"{top / 'run-10'}: pass one of them as CKPT"
    )
    assert run("inspect", top / "nested/run-20").exit_code == 0


def test_the_suggestion_is_bounded(run, tmp_path: Path) -> None:
    top = _runs(tmp_path, [f"run-{i}" for i in range(7)])
    line = _error(run("to-fp32", top, tmp_path / "m.safetensors"))
    shown = re.findall(r"run-\d+", line)
    assert shown == [f"run-{i}" for i in (6, 5, 4, 3, 2)] and "(and 2 more)" in line


def test_no_suggestion_beyond_the_search_depth(run, tmp_path: Path) -> None:
    top = _runs(tmp_path, ["a/b/c/run-1"])
    line = _error(run("inspect", top))
    assert "below it" not in line and "pass the directory `engine.save_checkpoint` wrote" in line


def test_checkpoints_below_sorts_and_skips_links(tmp_path: Path) -> None:
    from dsckpt.discover.nearby import checkpoints_below

    top = _runs(tmp_path, ["checkpoint-9", "checkpoint-10"])
    for p in top.iterdir():
        os.utime(p, (5, 5))  # equal times: the higher step first
    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(ckpt(*Z2), tmp_path / "elsewhere" / "linked")
    (top / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (top / ".hidden").mkdir()
    shutil.copytree(ckpt(*Z2), top / ".hidden" / "ckpt")
    found = [f.path.name for f in checkpoints_below(top)]
    assert found == ["checkpoint-10", "checkpoint-9"]


# --- 6. missing rank and layer files -------------------------------------------------------------


def _missing(run, tmp_path: Path, kind: str, name: str, *gone: str) -> tuple[Path, str]:
    root = _copy(tmp_path, kind, name)
    for file in gone:
        (_tag(root) / file).unlink()
    line = _error(run("to-fp32", root, tmp_path / "m.safetensors"))
    assert not (tmp_path / "m.safetensors").exists()
    return root, line


@pytest.mark.parametrize(
    ("kind", "name", "gone"),
    [
        ("zero", "z2-fp32-dp2", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("zero", "z3-fp32-dp2", "zero_pp_rank_1_mp_rank_00_model_states.pt"),
        ("pipe", "p2t2d1-z1-fp32", "mp_rank_03_model_states.pt"),
        ("pipe", "p2t2d1-z1-fp32", "layer_03-model_01-model_states.pt"),
    ],
)
def test_a_missing_file_names_itself_its_directory_and_the_usual_cause(
    run, tmp_path: Path, kind: str, name: str, gone: str
) -> None:
    root, line = _missing(run, tmp_path, kind, name, gone)
    assert gone in line and f"missing from {_tag(root)}" in line and NODE_LOCAL in line


def test_a_layer_missing_on_every_tp_rank_is_an_error(run, tmp_path: Path) -> None:
    gone = ["layer_03-model_00-model_states.pt", "layer_03-model_01-model_states.pt"]
    root, line = _missing(run, tmp_path, *PIPE_TP2, *gone)
    assert all(g in line for g in gone) and "param_shapes lists parameters of layer 3" in line
    assert NODE_LOCAL in line
    reshape = run("reshape", root, tmp_path / "r", "--tp", "1")
    assert "layer_03-model_00-model_states.pt" in _error(reshape)
    assert not (tmp_path / "r").exists()


def test_missing_zero3_model_states_name_zero3_files(run, tmp_path: Path) -> None:
    gone = [f"zero_pp_rank_{d}_mp_rank_00_model_states.pt" for d in range(2)]
    _, line = _missing(run, tmp_path, *Z3, *gone)
    assert "zero_pp_rank_D_mp_rank_MM_model_states.pt" in line and NODE_LOCAL in line


# --- 7. the root help -----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_root_help_shows_examples_that_parse(run, flag: str) -> None:
    import typer

    out = run(flag).stdout
    examples = out[out.index("Examples:") :].splitlines()[1:]
    lines = [x.strip() for x in examples if x.strip().startswith("dsckpt ")]
    assert len(lines) >= 3 and "DSCKPT_DEBUG" in out
    group = typer.main.get_command(app)
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] == "COMMAND":
            continue
        command = group.commands[argv[0]]  # type: ignore[attr-defined]
        command.make_context(argv[0], argv[1:])  # raises on an unknown option or a bad value
