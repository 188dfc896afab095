import json

import pytest
import torch

from dsckpt.errors import DsckptError, UsageError
from dsckpt.execute.formats.sharding import (
    DEFAULT_MAX_SHARD_SIZE,
    TORCH_PATTERN,
    TensorSpec,
    index_filename,
    parse_size,
    plan_shards,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("10KB", 10_000),
        ("10GiB", 10 * 2**30),
        ("3MiB", 3 * 2**20),
        ("1KiB", 1024),
        ("1kib", 1024),  # binary units are case-insensitive
        ("2gib", 2 * 2**30),
        ("5Gb", 625_000_000),  # transformers: a lower-case b means bits
        ("5gb", 625_000_000),
        ("8mb", 1_000_000),
        ("1000", 1000),  # bare integers are bytes (transformers would refuse the string)
        (1000, 1000),
        (DEFAULT_MAX_SHARD_SIZE, 5_000_000_000),
    ],
)
def test_parse_size_follows_transformers(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["1.5GB", "5 TB", "GB", "", "five", "5XB", 0, -3, "-1GB", True])
def test_parse_size_rejects(bad):
    with pytest.raises(UsageError) as info:
        parse_size(bad)
    assert isinstance(info.value, DsckptError)
    assert "\n" not in str(info.value)


def test_parse_size_message_says_what_to_do():
    with pytest.raises(UsageError) as info:
        parse_size("1.5GB", what="--max-shard-size")
    assert str(info.value) == (
        "--max-shard-size '1.5GB': use an integer number of bytes or an integer with a unit, "
        "e.g. 5GB (10^9 bytes), 500MB, 10GiB (2^30 bytes)"
    )


def test_tensor_spec_sizes():
    assert TensorSpec("a", torch.float32, (2, 3)).nbytes == 24
    assert TensorSpec("s", torch.bfloat16, ()).nbytes == 2  # 0-d: one element
    assert TensorSpec("e", torch.float32, (0, 7)).nbytes == 0
    spec = TensorSpec("t", torch.float64, torch.Size([4]))
    assert spec.shape == (4,) and type(spec.shape) is tuple and spec.numel == 4
    assert spec.nbytes == 32
    with pytest.raises(ValueError, match="negative"):
        TensorSpec("n", torch.float32, (-1,))


class Sized:
    def __init__(self, name, nbytes):
        self.name, self.nbytes = name, nbytes


def sizes_of(plan):
    return [[t.nbytes for t in s.tensors] for s in plan.shards]


def test_greedy_grouping_matches_huggingface_hub_docstring_example():
    # huggingface_hub's documented example: [6, 6, 2, 6, 2, 2] under 10 -> [6], [6+2], [6+2+2]
    tensors = [Sized(f"t{i}", n) for i, n in enumerate([6, 6, 2, 6, 2, 2])]
    plan = plan_shards(tensors, 10)
    assert sizes_of(plan) == [[6], [6, 2], [6, 2, 2]]
    assert [s.filename for s in plan.shards] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert [s.nbytes for s in plan.shards] == [6, 8, 10]
    assert plan.total_size == 24
    assert plan.is_sharded


def test_exact_fit_stays_in_shard():
    plan = plan_shards([Sized("a", 4), Sized("b", 6), Sized("c", 1)], 10)
    assert sizes_of(plan) == [[4, 6], [1]]


def test_oversized_tensor_gets_own_shard_before_the_one_being_filled():
    # As huggingface_hub: the big tensor's shard is emitted at once, and the small tensors
    # around it keep filling the same current shard.
    tensors = [Sized("a", 2), Sized("b", 2), Sized("big", 12), Sized("c", 2)]
    plan = plan_shards(tensors, 10)
    assert [[t.name for t in s.tensors] for s in plan.shards] == [["big"], ["a", "b", "c"]]
    assert plan.weight_map == {
        "a": "model-00002-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "big": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert list(plan.weight_map) == ["a", "b", "big", "c"]  # plan order


def test_single_shard_is_model_safetensors_without_index():
    plan = plan_shards([Sized("a", 3), Sized("b", 4)], "5GB")
    assert [s.filename for s in plan.shards] == ["model.safetensors"]
    assert not plan.is_sharded
    assert plan.index_name == "model.safetensors.index.json"


def test_empty_model_still_gets_one_file():
    plan = plan_shards([], 10)
    assert [(s.filename, s.tensors) for s in plan.shards] == [("model.safetensors", ())]
    assert plan.total_size == 0


def test_aliases_go_with_their_canonical_and_count_once():
    tensors = [Sized("wte", 8), Sized("h0", 8), Sized("ln", 2)]
    plan = plan_shards(tensors, 10, aliases={"lm_head": "wte"})
    assert sizes_of(plan) == [[8], [8, 2]]
    assert plan.shards[0].aliases == (("lm_head", "wte"),)
    assert plan.shards[0].names == ("wte", "lm_head")
    assert plan.weight_map["lm_head"] == "model-00001-of-00002.safetensors"
    assert plan.weight_map["wte"] == "model-00001-of-00002.safetensors"
    assert plan.total_size == 18
    assert list(plan.weight_map) == ["wte", "h0", "ln", "lm_head"]


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        plan_shards([Sized("a", 1), Sized("a", 1)], 10)
    with pytest.raises(ValueError, match="not an output"):
        plan_shards([Sized("a", 1)], 10, aliases={"b": "missing"})
    with pytest.raises(ValueError, match="tensor of its own"):
        plan_shards([Sized("a", 1), Sized("b", 1)], 10, aliases={"b": "a"})
    with pytest.raises(ValueError, match="suffix"):
        plan_shards([Sized("a", 1)], 10, filename_pattern="model.bin")
    with pytest.raises(UsageError, match="max_shard_size 'lots'"):
        plan_shards([Sized("a", 1)], "lots")


def test_index_json_contents_and_format():
    plan = plan_shards([Sized("b", 6), Sized("a", 6)], 10, aliases={"tied": "a"})
    text = plan.index_json({"dsckpt_aliases": '{"tied": "a"}', "total_size": -1})
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert json.loads(text) == {
        "metadata": {"dsckpt_aliases": '{"tied": "a"}', "total_size": 12},
        "weight_map": {
            "a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "tied": "model-00002-of-00002.safetensors",
        },
    }


def test_torch_pattern_names():
    plan = plan_shards([Sized("a", 6), Sized("b", 6)], 10, filename_pattern=TORCH_PATTERN)
    assert [s.filename for s in plan.shards] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    assert plan.index_name == "pytorch_model.bin.index.json"
    assert index_filename("model{suffix}.safetensors") == "model.safetensors.index.json"
    single = plan_shards([Sized("a", 6)], 10, filename_pattern=TORCH_PATTERN)
    assert single.shards[0].filename == "pytorch_model.bin"


def test_tensor_specs_plan_by_bytes():
    specs = [
        TensorSpec("emb", torch.float32, (1000, 10)),  # 40_000 bytes
        TensorSpec("w", torch.bfloat16, (100, 100)),  # 20_000
        TensorSpec("b", torch.float32, (100,)),  # 400
    ]
    plan = plan_shards(specs, "50KB")
    assert sizes_of(plan) == [[40_000], [20_000, 400]]
    assert plan.shards[0].tensors[0] is specs[0]
