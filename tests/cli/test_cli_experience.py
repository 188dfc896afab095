"""The command line as a user meets it (issue 12): help with examples and readable placeholders,
`-h`, shell completion, output that survives pipes, one unit convention, PyTorch dtype names,
options that are refused where they mean nothing, `--json` results, and empty reshape ranks."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ckpt
from typer.testing import CliRunner

from dsckpt.cli.app import app
from dsckpt.render import middle_ellipsis
from dsckpt.sizes import human_bytes

COMMANDS = ["inspect", "to-fp32", "show-map", "reshape", "verify"]
Z2 = ckpt("zero", "z2-bf16-dp2")
PIPE_BF16 = ckpt("pipe", "p2t2d1-z1-bf16")
DSCKPT = Path(sys.executable).with_name("dsckpt")
ROOT = Path(__file__).parents[2]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):
    """The CLI in-process, colour off; ``width=None`` is a pipe (no DSCKPT_WIDTH), a number a
    terminal that wide. Returns the Result."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("DSCKPT_DEBUG", raising=False)

    def invoke(*args: str | Path, width: int | None = None, columns: int = 80):
        if width is None:
            monkeypatch.delenv("DSCKPT_WIDTH", raising=False)
        else:
            monkeypatch.setenv("DSCKPT_WIDTH", str(width))
        monkeypatch.setenv("COLUMNS", str(columns))
        return CliRunner().invoke(app, [str(a) for a in args])

    return invoke


def _one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_has_examples_and_readable_placeholders(run, command: str, flag: str) -> None:
    result = run(command, flag)
    assert result.exit_code == 0, result.output
    out = result.stdout
    usage = out.splitlines()[0]
    assert usage.startswith(f"Usage: dsckpt {command} [OPTIONS] CKPT"), usage
    assert "{" not in out and "<str>" not in out and "<int>" not in out and "<path>" not in out
    assert "TEXT" not in out and "INTEGER" not in out
    examples = out[out.index("Examples:") :].splitlines()[1:]
    lines = [x.strip() for x in examples if x.strip()]
    assert 2 <= len(lines) <= 4 and all(x.startswith(f"dsckpt {command} ") for x in lines)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_example_parses(command: str) -> None:
    """Each example names options the command has, with values it accepts."""
    import typer

    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    lines = [x.strip() for x in cmd.epilog.splitlines() if x.strip().startswith("dsckpt ")]
    assert lines
    for line in lines:
        argv = shlex.split(line.split("|")[0])[2:]
        ctx = cmd.make_context(command, argv)  # raises on an unknown option or a bad value
        assert ctx.params["ckpt"] is not None


@pytest.mark.parametrize("columns", [60, 80, 100])
def test_option_help_never_breaks_a_word(run, columns: int) -> None:
    out = run("reshape", "--help", columns=columns).stdout
    flat = " ".join(out.split())
    for word in ("embed@EmbeddingPipe,", "TransformerLayerPipe*24,", "engine.load_checkpoint"):
        assert word in flat, f"{word} broken at {columns} columns"
    assert "PipelineModule(partition_method=...):" in flat


def test_metavars(run) -> None:
    out = " ".join(run("to-fp32", "--help").stdout.split())
    for shown in ("--tag TAG", "--dtype DTYPE", "--max-shard-size SIZE", "--rules FILE"):
        assert shown in out
    out = " ".join(run("reshape", "--help").stdout.split())
    for shown in ("--dp N", "--tp N", "--pp N", "--layer-specs SPECS", "CKPT OUT"):
        assert shown in out


def test_root_help_offers_completion(run) -> None:
    result = run("-h")
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_show_completion_prints_a_script() -> None:
    # Typer detects the shell from the parent process, as a user typing in bash has it; `; exit $?`
    # keeps bash from exec-ing dsckpt in its place (CI runs the suite under sh).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHELL": "/bin/bash"}
    proc = subprocess.run(
        ["bash", "-c", f"'{DSCKPT}' --show-completion; exit $?"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "_DSCKPT_COMPLETE" in proc.stdout and "complete" in proc.stdout


def test_completion_lists_commands_and_dtypes() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "_DSCKPT_COMPLETE": "complete_bash",
        "COMP_WORDS": "dsckpt to-fp32 ckpt out --dtype bf",
        "COMP_CWORD": "5",
    }
    proc = subprocess.run([str(DSCKPT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"bf16", "bfloat16"}
    env.update(COMP_WORDS="dsckpt to-", COMP_CWORD="1")
    proc = subprocess.run([str(DSCKPT)], capture_output=True, text=True, env=env)
    assert proc.stdout.split() == ["to-fp32"]


# --- output that survives pipes -----------------------------------------------------------------


def test_piped_inspect_is_one_record_per_line(run) -> None:
    result = run("inspect", Z2)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert not any(x != x.rstrip() for x in lines), "trailing spaces"
    assert not any(c in result.stdout for c in "┃│┏━"), "table borders in a pipe"
    assert sum("optim_states.pt" in x for x in lines) == 2  # `grep -c optim_states.pt`
    files = lines[lines.index("# Files by rank") + 1 :]
    assert files[0] == "pp\ttp\tdp\tfile\tsize"
    assert files[1].split("\t") == ["0", "0", "-", "mp_rank_00_model_states.pt", "5.8 kB"]
    assert files[2].split("\t")[3] == "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert "layout\tZeRO stage 2" in lines


def test_piped_inspect_in_a_real_pipe(tmp_path: Path) -> None:
    """Through a real pipe (not CliRunner): `dsckpt inspect CKPT | grep -c optim_states.pt`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DSCKPT_WIDTH", "COLUMNS")}
    env["PYTHONPATH"] = str(ROOT)
    pipe = f"{shlex.quote(str(DSCKPT))} inspect {shlex.quote(str(PIPE_BF16))} --params"
    proc = subprocess.run(
        f"{pipe} | grep -c optim_states.pt", shell=True, capture_output=True, text=True, env=env
    )
    assert proc.stdout.strip() == "4", proc.stdout + proc.stderr
    long = subprocess.run(pipe, shell=True, capture_output=True, text=True, env=env).stdout
    assert max(len(x) for x in long.splitlines()) > 80  # not wrapped at a default width


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", PIPE_BF16, "--params"),
        ("show-map", PIPE_BF16, "--tp", "1", "--pp", "3"),
        ("reshape", Z2, "{out}", "--dp", "3", "--dry-run"),
    ],
)
def test_every_report_is_plain_in_a_pipe(run, tmp_path: Path, args: tuple) -> None:
    argv = [str(a).format(out=tmp_path / "o") for a in args]
    result = run(*argv)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert not any(c in out for c in "┃│┏━┡└"), out
    assert all(x == x.rstrip() for x in out.splitlines())
    titled = [x for x in out.splitlines() if x.startswith("# ")]
    assert titled, out


@pytest.mark.parametrize("width", [60, 80, 100])
def test_terminal_tables_never_fold_a_file_name(run, width: int) -> None:
    out = run("inspect", PIPE_BF16, width=width).stdout
    rows = [x for x in out.splitlines() if "optim_states" in x or "model_states" in x]
    assert rows
    for row in rows:
        cell = row.split("│")[4].strip()
        assert cell.endswith(("_states.pt", "states.pt", "tes.pt")), cell  # whole end, never folded
    if width >= 80:  # the longest name (47 characters) is whole from 80 columns on
        assert "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt" in out


def test_middle_ellipsis() -> None:
    name = "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"
    assert middle_ellipsis(name, 100) == name
    cut = middle_ellipsis(name, 20)
    assert len(cut) == 20 and cut.startswith("bf16_zero") and cut.endswith("states.pt")
    assert "…" in cut


def test_the_result_line_never_wraps(run, tmp_path: Path) -> None:
    out = tmp_path / ("a-long-directory-name-" * 4) / "model.safetensors"
    out.parent.mkdir()
    result = run("to-fp32", Z2, out, width=60)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out} (safetensors)")


# --- one unit convention ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1536, "1.5 kB"),
        (999_960, "1.0 MB"),
        (201_500_000, "201.5 MB"),
        (5_000_000_000, "5.0 GB"),
        (12 * 10**12, "12.0 TB"),
    ],
)
def test_human_bytes_is_decimal(n: int, shown: str) -> None:
    assert human_bytes(n) == shown


def test_every_command_uses_the_same_units(run, tmp_path: Path) -> None:
    texts = [
        run("inspect", Z2).stdout,
        run("to-fp32", Z2, tmp_path / "m.safetensors").stdout,
        run("reshape", Z2, tmp_path / "r", "--dp", "3").stdout,
        run("verify", Z2, tmp_path / "m.safetensors").stdout,
    ]
    for text in texts:
        assert re.search(r"\d (B|kB|MB|GB)\b", text), text
        assert not re.search(r"KiB|MiB|GiB", text), text


def test_the_progress_bar_uses_human_bytes() -> None:
    from dsckpt.cli.progress import _byte_columns

    class Task:
        completed, total, speed, finished_speed = 201_500_000, 5_000_000_000, 3_000_000.0, None

    done, speed = _byte_columns()
    assert done.render(Task()).plain == "201.5 MB / 5.0 GB"
    assert speed.render(Task()).plain == "3.0 MB/s"


# --- --dtype names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "dtype"),
    [("float16", "F16"), ("bfloat16", "BF16"), ("torch.float32", "F32"), ("bf16", "BF16")],
)
def test_dtype_takes_pytorch_names(run, tmp_path: Path, given: str, dtype: str) -> None:
    out = tmp_path / "m.safetensors"
    result = run("to-fp32", Z2, out, "--dtype", given)
    assert result.exit_code == 0, result.output
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8 : 8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} >= {dtype}
    check = run("verify", Z2, out, "--dtype", given)
    assert check.exit_code == 0, check.output


def test_an_unknown_dtype_is_one_line(run, tmp_path: Path) -> None:
    line = _one_error_line(run("to-fp32", Z2, tmp_path / "m.safetensors", "--dtype", "float64"))
    assert "float64" in line and "bfloat16" in line
    assert not (tmp_path / "m.safetensors").exists()


# --- options refused where they mean nothing ----------------------------------------------------


@pytest.mark.parametrize("name", ["m.safetensors", "m.bin"])
def test_max_shard_size_for_a_single_file_is_refused(run, tmp_path: Path, name: str) -> None:
    line = _one_error_line(run("to-fp32", Z2, tmp_path / name, "--max-shard-size", "1GB"))
    assert "--max-shard-size 1GB" in line and name in line
    assert list(tmp_path.iterdir()) == []


def test_max_shard_size_for_a_directory_shards(run, tmp_path: Path) -> None:
    result = run("to-fp32", Z2, tmp_path / "hf", "--max-shard-size", "1KB")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("command", ["to-fp32", "verify"])
def test_from_layers_without_layer_files_is_refused(run, tmp_path: Path, command: str) -> None:
    result = run(command, Z2, tmp_path / "m.safetensors", "--from-layers")
    line = _one_error_line(result)
    assert "--from-layers" in line and "no pipeline layer files" in line
    assert "warning" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_from_layers_warns_only_when_layers_lose_bits(run, tmp_path: Path) -> None:
    bf16 = run("to-fp32", PIPE_BF16, tmp_path / "a.safetensors", "--from-layers")
    assert bf16.exit_code == 0, bf16.output
    assert bf16.stderr.startswith("warning: --from-layers reads the bfloat16 layer weights")
    assert "source: layer files" in bf16.stdout
    fp32 = run(
        "to-fp32", ckpt("pipe", "p2t2d1-z1-fp32"), tmp_path / "b.safetensors", "--from-layers"
    )
    assert fp32.exit_code == 0 and fp32.stderr == ""


# --- --json results -----------------------------------------------------------------------------


def test_to_fp32_json(run, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    result = run("to-fp32", Z2, out, "--json", "--dtype", "bfloat16", "--max-shard-size", "1KB")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(out) and data["format"] == "sharded safetensors"
    assert data["dtype"] == "bf16" and data["files"] == len(list(out.iterdir()))
    assert data["tensors"] == 12 and data["tied_aliases"] == 1
    assert data["bytes"] > 0 and data["seconds"] >= 0
    assert data["source"] == "fp32 master weights from the optimizer partitions"


def test_reshape_json(run, tmp_path: Path) -> None:
    out = tmp_path / "r"
    data = json.loads(run("reshape", Z2, out, "--dp", "3", "--json").stdout)
    assert data["source"] == {"pp": 1, "tp": 1, "dp": 2}
    assert data["target"] == {"pp": 1, "tp": 1, "dp": 3}
    assert not data["dry_run"] and data["empty_ranks"] == 0
    assert sorted(data["files"]) == sorted(p.name for p in (out / data["tag"]).iterdir())
    assert data["bytes"] == sum(p.stat().st_size for p in (out / data["tag"]).iterdir())
    dry = run("reshape", PIPE_BF16, tmp_path / "p", "--tp", "1", "--pp", "1", "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and plan["files"] == [] and not (tmp_path / "p").exists()
    assert plan["source"] == {"pp": 2, "tp": 2, "dp": 1}
    assert plan["target"] == {"pp": 1, "tp": 1, "dp": 1}
    # The write plan: every file that would be written, each byte range's origin.
    files = plan["plan"]["files"]
    assert files[-1]["name"] == "latest" and files[0]["name"].startswith(plan["tag"] + "/")
    assert plan["plan"]["size"] == sum(f["size"] for f in files)
    for f in files:
        ops = f["ops"]
        assert sum(op["nbytes"] for op in ops) == f["size"]  # every byte, once
        assert all(a["at"] + a["nbytes"] == b["at"] for a, b in zip(ops, ops[1:], strict=False))
    assert "plan" not in data  # only a dry run plans in the open


def test_json_results_are_documented() -> None:
    doc = (ROOT / "docs" / "json.md").read_text()
    for key in ("tied_aliases", "empty_ranks", "dry_run", "source_path", "seconds"):
        assert f"`{key}`" in doc


# --- reshape to more ranks than the model fills -------------------------------------------------


def test_reshape_warns_when_ranks_would_be_empty(run, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = run("reshape", Z2, out, "--dp", "1000", "-q")
    assert result.exit_code == 0, result.output
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: 919 of 1000 target ranks")
    assert result.stdout.strip().endswith("919 of 1000 target ranks hold no elements")
    data = json.loads(run("reshape", Z2, tmp_path / "j", "--dp", "1000", "--json").stdout)
    assert data["empty_ranks"] == 919


def test_empty_ranks_match_the_files_written(run, tmp_path: Path) -> None:
    """The count is what the files hold: DeepSpeed saves each fp32 partition without its padding,
    so an empty rank's partitions have no element at all."""
    import torch

    out = tmp_path / "r"
    run("reshape", Z2, out, "--dp", "200", "-q")
    tag = next(p for p in out.iterdir() if p.is_dir())
    empty = 0
    for rank in range(200):
        sd = torch.load(
            tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False
        )["optimizer_state_dict"]
        if all(t.numel() == 0 for t in sd["single_partition_of_fp32_groups"]):
            empty += 1
    data = json.loads(
        run("reshape", Z2, tmp_path / "j", "--dp", "200", "--dry-run", "--json").stdout
    )
    assert data["empty_ranks"] == empty > 0


def test_no_warning_for_an_ordinary_reshape(run, tmp_path: Path) -> None:
    result = run("reshape", Z2, tmp_path / "r", "--dp", "3")
    assert result.exit_code == 0 and result.stderr == ""
    assert "hold no elements" not in result.stdout
