"""Finding the checkpoint in Hugging Face Trainer and Accelerate folders (tests/fixtures/hf):
``output_dir/`` (newest ``checkpoint-N``, or ``--step``), ``checkpoint-N/``, ``global_stepN/``,
and Accelerate ``save_state`` folders with two models (``--tag``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsckpt.discover import trainer

HF = Path(__file__).parents[1] / "fixtures" / "hf"
TWO_CKPTS = HF / "trainer-z3-bf16-tied" / "output_dir"
ACCEL = HF / "accelerate-z3-bf16-2models" / "output_dir" / "step_4"


def ref(name: str, ckpt: str, what: str = "ref_live.pt") -> dict[str, torch.Tensor]:
    return torch.load(HF / name / "refs" / ckpt / what, weights_only=True)


def assert_equal_to(got: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(live)
    for key, value in live.items():
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], value.float()), key


def test_output_dir_reads_the_newest_checkpoint_and_says_so(cli, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = cli("to-fp32", TWO_CKPTS, out, "-q")
    assert result.exit_code == 0, result.output
    assert "read checkpoint-4 (newest of checkpoint-2, checkpoint-4)" in result.output
    got = load_file(out)
    assert_equal_to(got, ref("trainer-z3-bf16-tied", "checkpoint-4"))
    # checkpoint-2 holds other values: the newest was really the one read
    older = ref("trainer-z3-bf16-tied", "checkpoint-2")
    assert any(not torch.equal(got[k], older[k].float()) for k in older)


def test_step_picks_another_checkpoint_and_json_says_which(cli, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = cli("to-fp32", TWO_CKPTS, out, "--step", "2", "--json", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["step"] == 2
    assert Path(record["checkpoint"]) == TWO_CKPTS / "checkpoint-2"
    assert_equal_to(load_file(out), ref("trainer-z3-bf16-tied", "checkpoint-2"))


def test_newest_is_by_number_not_by_name(tmp_path: Path) -> None:
    for n in (9, 10, 100, 2):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not a step: ignored
    found = trainer.resolve(tmp_path)
    assert found.path == tmp_path / "checkpoint-100" and found.step == 100


@pytest.mark.parametrize(
    "given",
    [
        TWO_CKPTS / "checkpoint-4",
        TWO_CKPTS / "checkpoint-4" / "global_step4",
    ],
    ids=["checkpoint-N", "global_stepN"],
)
def test_checkpoint_folder_and_tag_folder(cli, tmp_path: Path, given: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = cli("to-fp32", given, out, "-q")
    assert result.exit_code == 0, result.output
    assert "newest" not in result.output  # read as given: nothing was picked
    assert_equal_to(load_file(out), ref("trainer-z3-bf16-tied", "checkpoint-4"))


def test_missing_step_lists_the_checkpoints(cli, tmp_path: Path) -> None:
    result = cli("to-fp32", TWO_CKPTS, tmp_path / "m.safetensors", "--step", "3")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[0]
    assert "no checkpoint-3/" in line and "checkpoint-2, checkpoint-4" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_step_on_a_checkpoint_folder_of_another_step_is_refused(cli, tmp_path: Path) -> None:
    result = cli("to-fp32", TWO_CKPTS / "checkpoint-4", tmp_path / "m.safetensors", "--step", "2")
    assert result.exit_code == 1
    assert "--step 2" in result.output and "output_dir" in result.output


@pytest.mark.parametrize(("tag", "suffix"), [("pytorch_model", ""), ("pytorch_model_1", "_1")])
def test_accelerate_models_by_tag(cli, tmp_path: Path, tag: str, suffix: str) -> None:
    out = tmp_path / "model.safetensors"
    result = cli("to-fp32", ACCEL, out, "--tag", tag, "-q")
    assert result.exit_code == 0, result.output
    assert_equal_to(
        load_file(out), ref("accelerate-z3-bf16-2models", "step_4", f"ref_live{suffix}.pt")
    )


def test_accelerate_two_models_without_tag_is_one_line_listing_them(cli, tmp_path: Path) -> None:
    # `latest` names the second model only because it was saved last: never trusted here.
    result = cli("to-fp32", ACCEL, tmp_path / "m.safetensors")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 2, result.output  # the error, and at most the DSCKPT_DEBUG hint
    assert "pytorch_model, pytorch_model_1" in lines[0] and "--tag" in lines[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_inspect_notes_the_checkpoint_picked(cli) -> None:
    result = cli("inspect", TWO_CKPTS, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    codes = {f["code"]: f["message"] for f in record["findings"]}
    assert "checkpoint-4 (newest of checkpoint-2, checkpoint-4)" in codes["trainer-checkpoint"]
    assert record["tag"] == "global_step4"


def test_output_dir_that_is_itself_a_checkpoint_reads_its_own_latest(tmp_path: Path) -> None:
    # A final trainer.save_model() under ZeRO-3 saves a DeepSpeed checkpoint in output_dir
    # itself, beside the checkpoint-N folders: that one is what the user pointed at.
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    assert trainer.resolve(tmp_path).path == tmp_path
    assert trainer.resolve(tmp_path, step=2).path == tmp_path / "checkpoint-2"
