"""The safe loader: no code from a checkpoint runs, DeepSpeed's classes load as stand-ins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ZERO, RunsAShellCommand, tag_dir

from dsckpt.errors import CorruptFile, UnsafeCheckpoint
from dsckpt.io.load import (
    DynamicLossScaler,
    LossScaler,
    ZeroStageEnum,
    load_meta,
    read_full,
    tensor_ref,
)


def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": RunsAShellCommand(marker)}, evil)
    with pytest.raises(UnsafeCheckpoint, match=r"posix\.system|os\.system"):
        load_meta(evil)
    assert not marker.exists()


def test_meta_load_reads_no_data_but_locates_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    base = torch.arange(12, dtype=torch.float32)
    torch.save({"a": base, "view": base[3:9], "bf": base.to(torch.bfloat16).view(3, 4).t()}, path)
    sd = load_meta(path)
    assert sd["a"].device.type == "meta"
    assert torch.equal(read_full(tensor_ref(path, sd["a"])), base)
    assert torch.equal(read_full(tensor_ref(path, sd["view"])), base[3:9])
    strided = tensor_ref(path, sd["bf"])
    assert not strided.is_contiguous
    assert torch.equal(read_full(strided), base.to(torch.bfloat16).view(3, 4).t())


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04truncated"])
def test_files_that_are_not_torch_zips_are_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CorruptFile, match="x.pt"):
        load_meta(path)


def test_real_deepspeed_files_load_with_stand_ins() -> None:
    seen: set[type] = set()
    for name in ZERO:
        for path in sorted(tag_dir("zero", name).glob("*optim_states.pt")):
            osd = load_meta(path)["optimizer_state_dict"]
            for value in (osd.get("loss_scaler"), osd.get("zero_stage")):
                if value is not None:
                    seen.add(type(value))
    assert ZeroStageEnum in seen
    assert seen & {LossScaler, DynamicLossScaler}
