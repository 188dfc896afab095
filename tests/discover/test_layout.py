"""Discovery against every ZeRO fixture: what the generator knows it wrote."""

from __future__ import annotations

import pytest
from conftest import ZERO, ckpt, facts, tag_dir

from dsckpt.discover.layout import open_checkpoint


@pytest.mark.parametrize("name", ZERO)
def test_layout_matches_what_deepspeed_wrote(name: str) -> None:
    f = facts("zero", name)
    layout = open_checkpoint(ckpt("zero", name))
    assert layout.findings == ()
    assert layout.tag == f["tag"]
    assert (layout.pp, layout.tp, layout.dp) == (f["pp"], f["tp"], f["dp"])
    assert layout.zero_stage == f["zero_stage"]
    assert layout.kind == {0: "plain", 3: "zero3"}.get(f["zero_stage"], "zero")
    assert layout.iteration == f["global_steps"]
    assert layout.ds_version == f["versions"]["deepspeed"]
    expected_param_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[f["dtype"]]
    assert layout.param_dtype == expected_param_dtype
    assert layout.master_dtype == ("float32" if f["zero_stage"] else expected_param_dtype)
    expected_optimizer = {"BF16_Optimizer": "bf16_optimizer"}.get(f["optimizer_class"])
    if f["zero_stage"] > 0:
        assert layout.optimizer == (expected_optimizer or "zero")

    by_kind = {
        k: {t.name: t for t in layout.tensors if t.kind == k}
        for k in ("trainable", "frozen", "buffer", "tied")
    }
    assert set(by_kind["buffer"]) == {b["name"] for b in f["buffers"]}
    if f["zero_stage"] == 0:
        # Stage 0 records no trainable/frozen split: every weight is a module tensor.
        weights = {t["name"] for t in f["trainable_params"]} | {
            p["name"] for p in f["frozen_params"]
        }
        assert set(by_kind["trainable"]) | set(by_kind["frozen"]) == weights
    else:
        trainable = [(t["name"], tuple(t["shape"])) for t in f["trainable_params"]]
        assert sorted((n, t.shape) for n, t in by_kind["trainable"].items()) == sorted(trainable)
        assert {n: t.group for n, t in by_kind["trainable"].items()} == {
            t["name"]: t["group"] for t in f["trainable_params"]
        } or f["zero_stage"] == 3
        assert set(by_kind["frozen"]) == {p["name"] for p in f["frozen_params"]}
        assert sum(t.numel for t in by_kind["trainable"].values()) == f["numel"]["trainable"]
    assert {n: t.alias_of for n, t in by_kind["tied"].items()} == f["tied_aliases"]


@pytest.mark.parametrize("name", ZERO[:3])
def test_root_tag_and_tag_dir_agree(name: str) -> None:
    from_root = open_checkpoint(ckpt("zero", name))
    with_tag = open_checkpoint(ckpt("zero", name), tag=facts("zero", name)["tag"])
    direct = open_checkpoint(tag_dir("zero", name))
    assert from_root.tensors == with_tag.tensors == direct.tensors
    assert direct.tag is None and from_root.tag == with_tag.tag


def test_zero3_sub_groups_are_read() -> None:
    names = [n for n in ZERO if facts("zero", n).get("zero3_sub_groups") or 0 > 1]
    if not names:
        pytest.skip("no ZeRO-3 fixture with several sub-groups")
    for name in names:
        layout = open_checkpoint(ckpt("zero", name))
        groups = {t.group for t in layout.tensors if t.kind == "trainable"}
        assert len(groups) == facts("zero", name)["zero3_sub_groups"]
