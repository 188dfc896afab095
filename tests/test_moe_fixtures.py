"""Sanity of the Mixture-of-Experts fixtures themselves (tests/fixtures/moe/), not of dsckpt.

Every fixture is checked against what its generator recorded and against DeepSpeed's naming
rules: the files are all there (and nothing else), expert placement is a partition of the
experts, each expert file holds that expert's weights under its global id and equal to the live
fp32 master cast to the model dtype, optimizer files carry the partition counts the live engine
had, the ground truth covers exactly the full model's state_dict, and it loads strictly into the
model class (TinyMoE needs ``deepspeed.moe``, Mixtral needs ``transformers``: those tests skip
without them).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
MOE = FIXTURES / "moe"
NAMES = sorted(p.parent.name for p in MOE.glob("*/facts.json"))
SIZE_BUDGET = 4 * 1024 * 1024
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

sys.path.insert(0, str(FIXTURES))
import tiny_moe  # noqa: E402


def facts(name: str) -> dict[str, Any]:
    return json.loads((MOE / name / "facts.json").read_text())


def tag_dir(name: str) -> Path:
    return MOE / name / "ckpt" / facts(name)["tag"]


def ref(name: str, what: str = "ref_live.pt") -> dict[str, Any]:
    return torch.load(MOE / name / what, weights_only=True)


def test_the_fixtures_exist() -> None:
    assert len(NAMES) >= 10, NAMES
    kinds = {facts(n)["kind"] for n in NAMES}
    assert kinds == {"native", "autoep"}


def test_manifest_lists_every_fixture() -> None:
    manifest = json.loads((MOE / "manifest.json").read_text())
    assert sorted(e["name"] for e in manifest["fixtures"]) == NAMES
    for entry in manifest["fixtures"]:
        assert entry["path"] == f"moe/{entry['name']}"
        assert entry["regenerate"] == f"python tests/fixtures/generate_moe.py {entry['name']}"


def test_readme_section_lists_every_fixture() -> None:
    text = (FIXTURES / "README.md").read_text()
    section = text.split("<!-- moe fixtures: begin (generate_moe.py) -->", 1)[1]
    section = section.split("<!-- moe fixtures: end -->", 1)[0].split("| fixture | kind", 1)[1]
    assert sorted(re.findall(r"^\| `([^`]+)` \|", section, re.M)) == NAMES


def test_committed_size_is_small() -> None:
    total = sum(p.stat().st_size for p in MOE.rglob("*") if p.is_file())
    assert total < SIZE_BUDGET, f"{total} bytes"


@pytest.mark.parametrize("name", NAMES)
def test_files_are_exactly_those_listed(name: str) -> None:
    root = MOE / name
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted(facts(name)["files"])
    assert (root / "ckpt" / "latest").read_text() == facts(name)["tag"]
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        assert not (root / "ckpt" / script).exists()


def expected_checkpoint_files(f: dict[str, Any]) -> set[str]:
    """The file names DeepSpeed 0.19.8 writes for this layout (engine.py's naming rules)."""
    stage3 = f["zero_stage"] == 3
    names = set() if stage3 else {"mp_rank_00_model_states.pt"}
    for layer in f["moe_layers"]:
        if not stage3:  # AutoEP ZeRO-3 keeps experts in the ZeRO shards
            names |= {
                f"layer_{layer['moe_layer_id']}_expert_{e}_mp_rank_00_model_states.pt"
                for e in range(layer["num_experts"])
            }
    if f["zero_stage"] == 0:
        names |= {f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(max(f["ep_sizes"]))}
    else:
        prefix = "bf16_" if f["dtype"] == "bf16" else ""
        names |= {f"{prefix}zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in range(f["dp"])}
    if stage3:
        names |= {f"zero_pp_rank_{d}_mp_rank_00_model_states.pt" for d in range(f["dp"])}
    return names


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_file_names_follow_deepspeed(name: str) -> None:
    f = facts(name)
    on_disk = {p.name for p in tag_dir(name).iterdir()}
    assert on_disk == expected_checkpoint_files(f)
    assert set(f["saved_files"]) == on_disk


@pytest.mark.parametrize("name", NAMES)
def test_topology_facts_agree(name: str) -> None:
    f = facts(name)
    assert f["world_size"] == f["dp"]
    assert f["tag"] == f"global_step{f['steps']}" and f["global_steps"] == f["steps"]
    for layer, ep in zip(f["moe_layers"], f["ep_sizes"], strict=True):
        e = layer["num_experts"]
        assert layer["ep_size"] == ep
        assert layer["expert_dp_size"] * ep == f["dp"]
        assert layer["experts_per_rank"] * ep == e
        placed = [x for experts in layer["experts_by_ep_rank"].values() for x in experts]
        assert sorted(placed) == list(range(e))  # each expert on exactly one EP rank
        for r, experts in layer["experts_by_ep_rank"].items():
            n = layer["experts_per_rank"]
            assert experts == list(range(int(r) * n, (int(r) + 1) * n))
        # DeepSpeed's EP groups are consecutive ranks; expert-DP groups stride by EP.
        assert layer["ep_rank_of_rank"] == [r % ep for r in range(f["dp"])]
        assert layer["expert_dp_rank_of_rank"] == [r // ep for r in range(f["dp"])]
        for expert, holders in layer["ranks_holding_expert"].items():
            assert len(holders) == layer["expert_dp_size"]
            assert layer["expert_file_written_by_rank"][expert] == min(holders)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_groups_and_partition_counts(name: str) -> None:
    f = facts(name)
    groups = f["optimizer_groups"]
    expert_dp = {layer["expert_group"]: layer["expert_dp_size"] for layer in f["moe_layers"]}
    assert {g["name"] for g in groups if g["moe"]} == set(expert_dp)
    for g in groups:
        want = expert_dp[g["name"]] if g["moe"] else f["dp"]
        if f["zero_stage"] in (1, 2):
            assert g["partition_count"] == want, g["name"]
            assert g["process_group_size"] == want
    if f["zero_stage"] in (1, 2):
        for fname, entry in f["saved_files"].items():
            if "optim_states" in fname:
                assert entry["partition_count"] == [g["partition_count"] for g in groups]
                assert [p["name"] for p in entry["param_groups"]] == [g["name"] for g in groups]


@pytest.mark.parametrize("name", NAMES)
def test_ground_truth_is_the_full_state_dict(name: str) -> None:
    f = facts(name)
    live = ref(name)
    assert list(live) == f["state_dict_keys"]
    assert {k: list(v.shape) for k, v in live.items()} == f["state_dict_shapes"]
    assert len(f["expert_keys"]) > 0
    if f["kind"] == "native":
        # Every global expert of every MoE layer is present, whatever the EP size.
        for layer in f["moe_layers"]:
            ids = {
                int(m["e"])
                for k in live
                if (m := tiny_moe.NATIVE_EXPERT.match(k)) and m["layer"] == layer["module"]
            }
            assert ids == set(range(layer["num_experts"]))
    else:
        for k in f["expert_keys"]:
            assert live[k].shape[0] == tiny_moe.NUM_EXPERTS
    # Trainable values are fp32 masters whatever the run's dtype; frozen parameters keep the
    # model dtype, buffers their own.
    kept = set(f.get("buffers", [])) | set(f.get("frozen_params", []))
    for k, v in live.items():
        if v.is_floating_point() and k not in kept:
            assert v.dtype == torch.float32, k
    for k in f.get("frozen_params", []):
        assert live[k].dtype == DTYPES[f["dtype"]], k
    assert not f["replicas_differ"]["weights"] and not f["replicas_differ"]["optim"]


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_ground_truth_covers_trainable_params(name: str) -> None:
    f = facts(name)
    live, optim = ref(name), ref(name, "ref_live_optim.pt")
    trainable = {
        n for g in f["optimizer_groups"] for rank in g["params_global_by_rank"] for n in rank
    }
    if f["kind"] == "autoep":  # per-expert rows of a fused tensor: the fused name is the key
        trainable = {re.sub(r"\.(w[123])\.\d+$", r".\1", n) for n in trainable}
    assert set(optim) == trainable
    for n, moments in optim.items():
        assert set(moments) == {"exp_avg", "exp_avg_sq"}
        for v in moments.values():
            assert v.shape == live[n].shape and v.dtype == torch.float32
        assert (moments["exp_avg_sq"] >= 0).all()


@pytest.mark.parametrize("name", [n for n in NAMES if facts(n)["zero_stage"] != 3])
def test_expert_files_hold_the_global_experts(name: str) -> None:
    """Each layer_L_expert_E file: expert E's tensors under global-id names, equal to the live
    master cast to the model dtype."""
    f = facts(name)
    live = ref(name)
    dtype = DTYPES[f["dtype"]]
    for layer in f["moe_layers"]:
        for e in range(layer["num_experts"]):
            path = tag_dir(name) / Path(layer["expert_file"][str(e)]).name
            saved = torch.load(path, weights_only=True)
            assert saved, path.name
            for key, value in saved.items():
                if f["kind"] == "native":
                    m = tiny_moe.NATIVE_EXPERT.match(key)
                    assert m and m["layer"] == layer["module"] and int(m["e"]) == e, key
                    want = live[key]
                else:
                    fused, _, idx = key.rpartition(".")
                    assert int(idx) == e and fused.startswith(layer["module"] + ".experts.w")
                    want = live[fused][e]
                assert value.dtype == dtype, key
                assert torch.equal(value, want.to(dtype)), key


def model_files(f: dict[str, Any]) -> list[str]:
    if f["zero_stage"] == 3:  # one per rank, module entries are placeholders
        return [f"zero_pp_rank_{d}_mp_rank_00_model_states.pt" for d in range(f["dp"])]
    return ["mp_rank_00_model_states.pt"]


@pytest.mark.parametrize("name", NAMES)
def test_non_expert_file_holds_the_rest(name: str) -> None:
    f = facts(name)
    want = [k for k in f["state_dict_keys"] if k not in set(f["expert_keys"])]
    for fname in model_files(f):
        saved = f["saved_files"][fname]
        assert saved["module_keys"] == want
        assert saved["num_experts"] == [layer["num_experts"] for layer in f["moe_layers"]]
        assert saved["has_ds_autoep_layers"] == (f["kind"] == "autoep")


@pytest.mark.parametrize("name", NAMES)
def test_training_and_resume_facts(name: str) -> None:
    f = facts(name)
    losses = json.loads((MOE / name / "losses.json").read_text())
    assert len(losses) == f["steps"] and all(math.isfinite(x) for x in losses)
    check = f["resume_check"]
    assert check["first_steps_equal_fixture"]
    assert check["losses_bitwise_equal"] and check["weights_bitwise_equal"]
    # The full single-process model, loaded with the ground truth, gives the live engine's
    # output: a wrong local->global expert mapping could not pass.
    limit = 1e-5 if f["dtype"] == "fp32" else 0.1
    assert f["forward_check"]["max_abs_logit_diff"] < limit
    # DeepSpeed's own converter cannot read these checkpoints.
    assert f["zero_to_fp32"] != "accepted"


@pytest.mark.parametrize("name", [n for n in NAMES if facts(n)["kind"] == "native"])
def test_native_ground_truth_loads_strictly(name: str) -> None:
    pytest.importorskip("deepspeed")
    f = facts(name)
    model = tiny_moe.build_model(
        f["seed"], (1, 1), f["top_k"], f["residual"], expert_hidden=f["expert_hidden"]
    )
    model.load_state_dict(ref(name), strict=True)
    assert list(model.state_dict()) == f["state_dict_keys"]


@pytest.mark.parametrize("name", [n for n in NAMES if facts(n)["kind"] == "autoep"])
def test_autoep_ground_truth_maps_to_hf_names(name: str) -> None:
    pytest.importorskip("transformers")
    from transformers import MixtralForCausalLM

    f = facts(name)
    hf = tiny_moe.autoep_to_hf(ref(name))
    assert {k: list(v.shape) for k, v in hf.items()} == f["hf_state_dict_shapes"]
    MixtralForCausalLM(tiny_moe.mixtral_config()).load_state_dict(hf, strict=True)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.deepspeed
@pytest.mark.parametrize("name", ["z2-fp32-ep2-dp2", "autoep-z2-fp32-ep2-dp2"])
def test_resuming_a_copy_continues_bitwise(name: str, tmp_path: Path) -> None:
    """train_moe.py --load at the fixture's own topology, in unmodified DeepSpeed, gives the
    losses the generator's uninterrupted run had for the next steps, bit for bit."""
    pytest.importorskip("deepspeed")
    import generate_moe

    fx = {f.name: f for f in generate_moe.FIXTURES}[name]
    copy = tmp_path / "ckpt"
    shutil.copytree(MOE / name / "ckpt", copy)
    before = snapshot(copy)
    generate_moe.run(fx, tmp_path, generate_moe.STEPS, load=copy)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses == facts(name)["resume_check"]["straight_losses"][generate_moe.STEPS :]
    assert snapshot(copy) == before


@pytest.mark.parametrize("name", [n for n in NAMES if facts(n)["zero_stage"] in (1, 2)])
def test_optimizer_files_hold_the_experts_facts_name(name: str) -> None:
    """Rebuild each expert group's flat fp32 buffer from the ground truth, in the order the file's
    rank flattened its local experts, and find this file's slice of it in the file: proves
    `optimizer_file_experts` and the local -> global mapping against DeepSpeed's own bytes."""
    f = facts(name)
    live = ref(name)
    files = f["optimizer_file_experts"]
    assert set(files) == {n for n in f["saved_files"] if "optim_states" in n}
    for fname, info in files.items():
        d = info["written_by_rank"]
        sd = torch.load(tag_dir(name) / fname, map_location="cpu", weights_only=False)
        saved = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        for gi, group in enumerate(f["optimizer_groups"]):
            if not group["moe"]:
                continue
            names = group["params_global_by_rank"][d]
            for layer in f["moe_layers"]:
                mine = [n for n in names if n.startswith(layer["module"] + ".")]
                if not mine:
                    continue
                ids = {int(re.search(r"\.(\d+)(\.|$)", n.split(".experts.")[1])[1]) for n in mine}
                assert ids == set(info["experts"][layer["module"]]), (fname, layer["module"])
            flat = torch.cat([expert_value(f, live, n).flatten() for n in names])
            count = group["partition_count"]
            part = math.ceil(flat.numel() / (2 * count)) * 2
            edp_rank = info["expert_partition"][mine_layer(f, names)][0]
            want = flat[edp_rank * part : (edp_rank + 1) * part]
            got = saved[gi]
            assert got.dtype == torch.float32
            assert torch.equal(got[: want.numel()], want), (fname, gi)


def mine_layer(f: dict[str, Any], names: list[str]) -> str:
    return next(
        lay["module"] for lay in f["moe_layers"] if names[0].startswith(lay["module"] + ".")
    )


def expert_value(f: dict[str, Any], live: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if f["kind"] == "native":
        return live[name]
    fused, _, idx = name.rpartition(".")  # AutoEP: row idx (global expert) of the fused tensor
    return live[fused][int(idx)]
