"""`dsckpt inspect`: the report, JSON, and every bad input getting one line and exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, PIPE, ZERO, RunsAShellCommand, ckpt, facts


def test_help_and_version(cli) -> None:
    assert cli("--help").exit_code == 0
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.startswith("dsckpt ")


def test_cli_layer_does_not_import_torch() -> None:
    code = "import sys, dsckpt.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ZERO)
def test_inspect_reports_topology_and_counts(cli, name: str) -> None:
    f = facts("zero", name)
    result = cli("inspect", ckpt("zero", name), "--json", "--params")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["topology"] == {"pp": 1, "tp": 1, "dp": f["dp"], "world_size": f["dp"]}
    assert data["zero_stage"] == f["zero_stage"]
    assert data["iteration"] == f["global_steps"]
    assert data["counts"]["buffer"]["numel"] == f["numel"]["buffers"]
    assert data["counts"]["tied"]["tensors"] == len(f["tied_aliases"])
    if f["zero_stage"]:
        assert data["counts"]["trainable"]["numel"] == f["numel"]["trainable"]
        assert data["counts"]["frozen"]["numel"] == f["numel"]["frozen"]
    assert {p["name"] for p in data["params"]} == set(f["state_dict_keys"])
    assert sorted(x["name"] for x in data["files"]) == sorted(
        Path(p).name for p in f["files"] if p.startswith(f"ckpt/{f['tag']}/")
    )


def test_inspect_tables(cli) -> None:
    result = cli("inspect", ckpt("zero", "z2-fp32-dp2"), "--params")
    assert result.exit_code == 0
    for text in (
        "ZeRO stage 2",
        "TP 1 x PP 1 x DP 2",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "alias of embed.weight",
        "No problems found.",
    ):
        assert text in result.stdout


@pytest.mark.parametrize("name", PIPE)
def test_inspect_pipeline(cli, name: str) -> None:
    f = facts("pipe", name)
    result = cli("inspect", ckpt("pipe", name), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "pipeline"
    assert (data["topology"]["pp"], data["topology"]["tp"], data["topology"]["dp"]) == (
        f["pp"],
        f["tp"],
        f["dp"],
    )
    layer_files = [x for x in data["files"] if x["role"] == "layer"]
    assert len(layer_files) == len(f["layer_files"])
    assert "Layer files" in cli("inspect", ckpt("pipe", name)).stdout


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_path(cli, tmp_path: Path) -> None:
    assert "does not exist" in _one_error_line(cli("inspect", tmp_path / "nope"))


def test_file_instead_of_directory(cli, tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    f.write_text("x")
    assert "is a file" in _one_error_line(cli("inspect", f))


def test_empty_directory(cli, tmp_path: Path) -> None:
    assert "is empty" in _one_error_line(cli("inspect", tmp_path))


def test_unrelated_files(cli, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data").mkdir()
    assert "no DeepSpeed checkpoint files" in _one_error_line(cli("inspect", tmp_path))


def test_latest_names_a_missing_tag(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    (root / "latest").write_text("global_step99")
    line = _one_error_line(cli("inspect", root))
    assert "global_step99" in line and "global_step3" in line


def test_several_tags_without_latest_lists_them(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    (root / "latest").unlink()
    (root / "global_step3").rename(root / "global_step2")
    import shutil

    shutil.copytree(root / "global_step2", root / "global_step4")
    line = _one_error_line(cli("inspect", root))
    assert "global_step2, global_step4" in line and "--tag" in line
    assert cli("inspect", root, "--tag", "global_step4").exit_code == 0


def _tag(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def test_truncated_file(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    victim = _tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    line = _one_error_line(cli("inspect", root))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in line and "truncated" in line


def test_not_a_zip(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    (_tag(root) / "mp_rank_00_model_states.pt").write_text("just text")
    line = _one_error_line(cli("inspect", root))
    assert "mp_rank_00_model_states.pt" in line and "not a torch zip" in line


def test_missing_rank_file(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z1-fp32-dp3")
    (_tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    line = _one_error_line(cli("inspect", root))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in line
    assert "3 data-parallel ranks" in line


def test_stale_rank_file(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    tag = _tag(root)
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(
        (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes()
    )
    line = _one_error_line(cli("inspect", root))
    assert "zero_pp_rank_2_mp_rank_00_optim_states.pt" in line and "stale" in line


def test_mixed_prefixes(cli, copy_fixture) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    tag = _tag(root)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").rename(
        tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    assert "prefixes" in _one_error_line(cli("inspect", root))


def test_disallowed_global(cli, copy_fixture, tmp_path: Path) -> None:
    root = copy_fixture("zero", "z2-fp32-dp2")
    marker = tmp_path / "pwned"
    torch.save(
        {"module": {}, "evil": RunsAShellCommand(marker)}, _tag(root) / "mp_rank_00_model_states.pt"
    )
    line = _one_error_line(cli("inspect", root))
    assert "system" in line and "allow-list" in line
    assert not marker.exists()


def test_debug_variable_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "DSCKPT_DEBUG": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "dsckpt", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_works_with_deepspeed_unimportable() -> None:
    """Every fixture inspects in a process where `import deepspeed` fails."""
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "from typer.testing import CliRunner\n"
        "from dsckpt.cli.app import app\n"
        "bad = []\n"
        "for path in sys.argv[1:]:\n"
        "    r = CliRunner().invoke(app, ['inspect', path, '--json'])\n"
        "    if r.exit_code: bad.append((path, r.output))\n"
        "try:\n"
        "    import deepspeed\n"
        "    bad.append('deepspeed imported')\n"
        "except ImportError:\n"
        "    pass\n"
        "print(bad)\n"
    )
    paths = [str(ckpt("zero", n)) for n in ZERO] + [str(ckpt("pipe", n)) for n in PIPE]
    out = subprocess.run(
        [sys.executable, "-c", code, *paths],
        capture_output=True,
        text=True,
        cwd=FIXTURES.parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
