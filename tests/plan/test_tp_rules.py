"""Tests for dsckpt.plan.tp_rules: names, integers and small files only (no torch, no DeepSpeed).

DeepSpeed's ``universal_checkpoint_info`` key names are read from its installed
``deepspeed/checkpoint/constants.py`` (loaded by path, without importing the deepspeed package,
which would pull in torch); the patterns used are the ones Megatron-DeepSpeed's ``GPTModelPipe``
declares.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import PIPE, facts

from dsckpt.errors import DsckptError
from dsckpt.plan import maps, tp_rules
from dsckpt.plan.tp_rules import (
    Rule,
    RuleError,
    default_rules,
    load_rules,
    merge_plan,
    reshard_plan,
    split_plan,
)


def _deepspeed_constants() -> ModuleType | None:
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "checkpoint" / "constants.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("_ds_constants", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


DS = _deepspeed_constants()
# The real key names when DeepSpeed is installed; dsckpt's own spelling otherwise.
K = {
    "VOCAB": DS.VOCABULARY_PARAMETER_PATTERNS if DS else tp_rules.UC_VOCABULARY,
    "PP_REPL": DS.PIPELINE_REPLICATED_PARAMETER_PATTERNS if DS else tp_rules.UC_PIPELINE_REPLICATED,
    "TP_REPL": DS.TP_REPLICATED_PARAMETER_PATTERNS if DS else tp_rules.UC_TP_REPLICATED,
    "AVERAGE": DS.PARAMETER_TO_AVERAGE_PATTERNS if DS else tp_rules.UC_TO_AVERAGE,
    "ROW": DS.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS if DS else tp_rules.UC_ROW_PARALLEL,
    "SUB2": DS.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0 if DS else tp_rules.UC_2_SUB_PARAMS_CAT_DIM_0,
    "SUBN": DS.PARAMETER_WITH_SUB_PARAMS if DS else tp_rules.UC_SUB_PARAMS,
    "WIDTHS": DS.SUB_PARAM_SHARD_WIDTHS if DS else tp_rules.UC_SUB_PARAM_SHARD_WIDTHS,
    "ORIG": DS.ORIGINAL_VOCAB_SIZE if DS else tp_rules.UC_ORIGINAL_VOCAB_SIZE,
    "PADDED": DS.PADDED_VOCAB_SIZE if DS else tp_rules.UC_PADDED_VOCAB_SIZE,
}


@pytest.mark.skipif(DS is None, reason="DeepSpeed is not installed")
def test_key_names_match_deepspeed() -> None:
    assert DS is not None
    assert tp_rules.UC_VOCABULARY == DS.VOCABULARY_PARAMETER_PATTERNS
    assert tp_rules.UC_PIPELINE_REPLICATED == DS.PIPELINE_REPLICATED_PARAMETER_PATTERNS
    assert tp_rules.UC_TP_REPLICATED == DS.TP_REPLICATED_PARAMETER_PATTERNS
    assert tp_rules.UC_TO_AVERAGE == DS.PARAMETER_TO_AVERAGE_PATTERNS
    assert tp_rules.UC_ROW_PARALLEL == DS.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS
    assert tp_rules.UC_2_SUB_PARAMS_CAT_DIM_0 == DS.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0
    assert tp_rules.UC_SUB_PARAMS == DS.PARAMETER_WITH_SUB_PARAMS
    assert tp_rules.UC_SUB_PARAM_SHARD_WIDTHS == DS.SUB_PARAM_SHARD_WIDTHS
    assert tp_rules.UC_ORIGINAL_VOCAB_SIZE == DS.ORIGINAL_VOCAB_SIZE
    assert tp_rules.UC_PADDED_VOCAB_SIZE == DS.PADDED_VOCAB_SIZE


def gpt_pipe_info(*, swiglu: bool = False, tp: int = 2) -> dict[str, Any]:
    """What Megatron-DeepSpeed's GPTModelPipe stores (its UniversalCheckpointInfo, pipe model)."""
    info: dict[str, Any] = {
        "universal_checkpoint_version": 0.2,
        K["ORIG"]: 50,
        K["PADDED"]: 64,
        K["VOCAB"]: [r"tied_modules.embed.word_embeddings.weight"],
        K["PP_REPL"]: [
            r"tied_modules.embed.word_embeddings.weight",
            r"tied_modules.embed.position_embeddings.weight",
        ],
        K["SUB2"]: [r"\d+.mlp.dense_h_to_4h.weight", r"\d+.mlp.dense_h_to_4h.bias"]
        if swiglu
        else [],
    }
    if tp > 1:  # Megatron-DeepSpeed writes these two lists only when TP > 1
        info[K["TP_REPL"]] = [
            r"\d+.input_layernorm.weight",
            r"\d+.post_attention_layernorm.weight",
            r"\d+.weight",
            r"\d+.bias",
            r"tied_modules.embed.position_embeddings.weight",
            r"\d+.self_attention.dense.bias",
            r"\d+.mlp.dense_4h_to_h.bias",
            r"\d+.input_layernorm.bias",
            r"\d+.post_attention_layernorm.bias",
        ]
        info[K["ROW"]] = [r"\d+.mlp.dense_4h_to_h.weight", r"\d+.self_attention.dense.weight"]
    return info


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

REPL: tuple[str, int | None, Any, Any] = ("replicated", None, 1, 1)

DEFAULT_CASES: list[tuple[str, tuple[str, int | None, Any, Any]]] = [
    # GPT under GPTModelPipe: global layer index prefix, tied embedding
    ("tied_modules.embed.word_embeddings.weight", ("vocab", 0, 1, 1)),
    ("tied_modules.embed.position_embeddings.weight", REPL),
    ("3.input_layernorm.weight", REPL),
    ("3.input_layernorm.bias", REPL),
    ("3.self_attention.query_key_value.weight", ("split", 0, 1, "qkv_group")),
    ("3.self_attention.query_key_value.bias", ("split", 0, 1, "qkv_group")),
    ("3.self_attention.dense.weight", ("split", 1, 1, 1)),
    ("3.self_attention.dense.bias", REPL),
    ("3.post_attention_layernorm.weight", REPL),
    ("3.post_attention_layernorm.bias", REPL),
    ("3.mlp.dense_h_to_4h.weight", ("split", 0, 1, 1)),
    ("3.mlp.dense_h_to_4h.bias", ("split", 0, 1, 1)),
    ("3.mlp.dense_4h_to_h.weight", ("split", 1, 1, 1)),
    ("3.mlp.dense_4h_to_h.bias", REPL),
    ("12.weight", REPL),  # the pipe's final LayerNorm / RMSNorm spec
    ("12.bias", REPL),
    ("5.final_layernorm.weight", REPL),  # dsckpt's fixture wraps the final norm
    ("5.final_layernorm.bias", REPL),
    # layer-local keys, as stored inside layer_XX-model_YY files
    ("self_attention.query_key_value.weight", ("split", 0, 1, "qkv_group")),
    ("mlp.dense_4h_to_h.weight", ("split", 1, 1, 1)),
    ("word_embeddings.weight", ("vocab", 0, 1, 1)),
    ("weight", REPL),
    # BLOOM
    ("tied_modules.embed.word_embeddings.norm.weight", REPL),
    ("tied_modules.embed.word_embeddings.norm.bias", REPL),
    ("4.attention.dense.weight", ("split", 1, 1, 1)),
    # LLaMA: untied embedding and head, RMSNorm, no biases
    ("1.word_embeddings.weight", ("vocab", 0, 1, 1)),
    ("35.lm_head.weight", ("vocab", 0, 1, 1)),
    # non-pipeline GPTModel names
    ("language_model.embedding.word_embeddings.weight", ("vocab", 0, 1, 1)),
    ("language_model.output_layer.weight", ("vocab", 0, 1, 1)),
    ("language_model.encoder.layers.0.self_attention.dense.weight", ("split", 1, 1, 1)),
    ("language_model.encoder.final_layernorm.weight", REPL),
    ("language_model.embedding.tokentype_embeddings.weight", REPL),
]


@pytest.mark.parametrize(("name", "expected"), DEFAULT_CASES)
def test_every_default_name_resolves(name: str, expected: tuple[str, int | None, Any, Any]) -> None:
    rule = default_rules().resolve(name)
    assert (rule.kind, rule.dim, rule.blocks, rule.unit) == expected
    assert rule.source == "defaults"


def test_final_norm_glob_does_not_capture_other_weights() -> None:
    rule = Rule(pattern="{layer}.{weight,bias}", kind="replicated")
    assert rule.matches("12.weight") and rule.matches("bias")
    assert not rule.matches("12.mlp.dense_4h_to_h.weight")
    assert not rule.matches("tied_modules.embed.weight")


def test_gated_mlp_is_off_by_default_and_on_with_swiglu() -> None:
    assert default_rules().resolve("3.mlp.dense_h_to_4h.weight").blocks == 1
    from_args = load_rules(model_args=argparse.Namespace(swiglu=True, num_attention_heads=4))
    assert from_args.resolve("3.mlp.dense_h_to_4h.weight").blocks == 2
    assert from_args.resolve("3.mlp.dense_h_to_4h.bias").blocks == 2
    from_core_args = load_rules(model_args={"gated_linear_unit": True})
    assert from_core_args.resolve("mlp.dense_h_to_4h.weight").blocks == 2


def test_universal_info_overrides_defaults() -> None:
    info = gpt_pipe_info(swiglu=True)
    info[K["AVERAGE"]] = [r"\d+.input_layernorm.weight"]
    info[K["TP_REPL"]].remove(r"\d+.input_layernorm.weight")
    rules = load_rules(None, info)

    gated = rules.resolve("3.mlp.dense_h_to_4h.weight")
    assert (gated.kind, gated.dim, gated.blocks) == ("split", 0, 2)
    assert gated.source == f"checkpoint {K['SUB2']}"

    avg = rules.resolve("3.input_layernorm.weight")
    assert avg.kind == "average" and avg.source == f"checkpoint {K['AVERAGE']}"

    row = rules.resolve("7.self_attention.dense.weight")
    assert (row.kind, row.dim) == ("split", 1) and row.source == f"checkpoint {K['ROW']}"

    vocab = rules.resolve("tied_modules.embed.word_embeddings.weight")
    assert vocab.kind == "vocab" and vocab.source == f"checkpoint {K['VOCAB']}"

    # not listed by the checkpoint: falls through to the defaults
    qkv = rules.resolve("3.self_attention.query_key_value.weight")
    assert qkv.source == "defaults"

    # DeepSpeed patterns carry a "\d+." / "tied_modules.<key>." prefix; layer-local keys match too
    assert rules.resolve("input_layernorm.weight").kind == "average"
    assert rules.resolve("weight").source == f"checkpoint {K['TP_REPL']}"
    assert rules.resolve("position_embeddings.weight").source == f"checkpoint {K['TP_REPL']}"

    assert rules.facts["original_vocab_size"] == 50
    assert rules.is_pipeline_replicated("tied_modules.embed.word_embeddings.weight")
    assert not rules.is_pipeline_replicated("3.input_layernorm.weight")


def test_universal_info_agrees_with_defaults_for_gpt() -> None:
    ck = load_rules(None, gpt_pipe_info(tp=2))
    for name, _ in DEFAULT_CASES:
        a, b = ck.resolve(name), default_rules().resolve(name)
        assert (a.kind, a.dim, a.blocks) == (b.kind, b.dim, b.blocks), name


def test_sub_params_shape_becomes_blocks() -> None:
    info = {
        K["SUBN"]: [
            {"patterns": [r".*\.qkv\.weight$"], "shape": [[64, 16, 16], -1], "partition_dim": 0}
        ],
        K["WIDTHS"]: {r".*\.qkv\.weight$": [[32, 32], [8, 8], [8, 8]]},
    }
    rule = load_rules(None, info).resolve("model.layers.0.qkv.weight")
    assert (rule.kind, rule.dim, rule.blocks, rule.ndim) == ("split", 0, (64, 16, 16), 2)
    plan = merge_plan(rule, [(48, 8), (48, 8)])
    assert plan.full_shape == (96, 8)
    with pytest.raises(RuleError, match="2-d tensor"):
        merge_plan(rule, [(48,), (48,)])
    info[K["WIDTHS"]] = {r".*\.qkv\.weight$": [[40, 24], [8, 8], [8, 8]]}
    with pytest.raises(RuleError, match="uneven per-rank shard widths"):
        load_rules(None, info)


USER_TOML = """
schema = 1

[model]
swiglu = false
num_attention_heads = 4
hidden_size = 32

[[rules]]
match = "{self_attention,attention}.query_key_value.{weight,bias}"
kind = "split"
dim = 0
blocks = 3
unit = "head_dim"
note = "non-interleaved [Q; K; V]"

[[rules]]
match = "input_layernorm.weight"
kind = "replicated"
"""

USER_JSON = {
    "rules": [
        {"regex": r"\d+\.mlp\.dense_h_to_4h\.weight", "kind": "split", "dim": 0},
        {"match": "mlp.router.weight", "kind": "replicated"},
    ],
    "model": {"original_vocab_size": 40},
}


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_user_file_overrides_checkpoint_and_defaults(tmp_path: Path, fmt: str) -> None:
    info = gpt_pipe_info(swiglu=True)
    info[K["AVERAGE"]] = [r"\d+.input_layernorm.weight"]
    info[K["TP_REPL"]].remove(r"\d+.input_layernorm.weight")
    path = tmp_path / f"rules.{fmt}"
    if fmt == "toml":
        path.write_text(USER_TOML)
    else:
        path.write_text(json.dumps(USER_JSON))
    rules = load_rules(path, info, model_args={"swiglu": True, "num_attention_heads": 8})
    src = f"rules file {path}"
    if fmt == "toml":
        qkv = rules.resolve("3.self_attention.query_key_value.weight")  # beats defaults
        assert (qkv.blocks, qkv.unit, qkv.source) == (3, "head_dim", src)
        ln = rules.resolve("3.input_layernorm.weight")  # beats the checkpoint's "average"
        assert (ln.kind, ln.source) == ("replicated", src)
        assert rules.facts["num_attention_heads"] == 4  # the file's [model] beats the args
        assert rules.facts["head_dim"] == 8
        plan = rules.split_plan("3.self_attention.query_key_value.weight", (96, 32), 4)
        assert plan.dst_shapes == ((24, 32),) * 4
    else:
        h4h = rules.resolve("3.mlp.dense_h_to_4h.weight")  # beats the checkpoint's 2 sub-params
        assert (h4h.blocks, h4h.source) == (1, src)
        assert rules.resolve("3.mlp.dense_h_to_4h.bias").blocks == 2  # still the checkpoint's
        assert rules.resolve("3.mlp.router.weight").kind == "replicated"
        assert rules.facts["original_vocab_size"] == 40  # the file beats the checkpoint's 50
    assert rules.sources[0].startswith(src)


def test_uncovered_name_says_how_to_add_a_rule() -> None:
    with pytest.raises(RuleError) as exc:
        default_rules().resolve("3.mlp.deepspeed_moe.gate.wg.weight")
    msg = str(exc.value)
    assert "'3.mlp.deepspeed_moe.gate.wg.weight'" in msg
    assert tp_rules.RULES_OPTION in msg
    assert '{"rules": [{"match": "mlp.deepspeed_moe.gate.wg.weight", "kind": "replicated"}]}' in msg
    assert isinstance(exc.value, DsckptError)


def test_check_reports_every_uncovered_name() -> None:
    with pytest.raises(RuleError, match=r"2 parameters 'a\.x', 'b\.y'"):
        default_rules().check(["3.input_layernorm.weight", "a.x", "b.y"])
    assert default_rules().check(["3.weight"])["3.weight"].kind == "replicated"


@pytest.mark.parametrize(
    ("suffix", "text", "match"),
    [
        ("json", '{"rules": [{"match": "a.b", "kind": "sliced"}]}', r"rules\[0\]: 'kind' must be"),
        ("json", '{"rules": [{"match": "a", "regex": "a", "kind": "replicated"}]}', "exactly one"),
        ("json", '{"rules": [{"match": "a", "kind": "split"}]}', "needs 'dim'"),
        ("json", '{"rules": [{"match": "a", "kind": "replicated", "dim": 0}]}', "takes no"),
        ("json", '{"rules": [{"match": "a", "kind": "vocab", "dim": 1}]}', "splits dim 0"),
        ("json", '{"rules": [{"match": "a", "kind": "split", "dim": 0, "unit": 0}]}', "'unit'"),
        ("json", '{"rules": [{"match": "a", "kind": "split", "dim": 0, "bad": 1}]}', "unknown key"),
        ("json", '{"rules": [{"regex": "(", "kind": "replicated"}]}', "invalid regex"),
        ("json", '{"rules": [{"match": "{x}.w", "kind": "replicated"}]}', "unknown placeholder"),
        ("json", '{"schema": 2}', "schema 2"),
        ("json", '{"model": {"swiglu": "yes"}}', "model.swiglu"),
        ("json", "{not json", "not valid JSON"),
        ("toml", "rules = [", "not valid TOML"),
        ("yaml", "rules: []", r"\.toml or \.json"),
    ],
)
def test_bad_rules_files_are_refused(tmp_path: Path, suffix: str, text: str, match: str) -> None:
    path = tmp_path / f"rules.{suffix}"
    path.write_text(text)
    with pytest.raises(RuleError, match=match):
        load_rules(path)


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="does not exist"):
        load_rules(tmp_path / "nope.toml")


def test_defaults_round_trip_through_the_schema() -> None:
    rules = default_rules().rules
    again, _ = tp_rules.parse_rules({"rules": [r.to_dict() for r in rules]}, "defaults")
    assert again == rules


def test_facts_from_args() -> None:
    gqa = tp_rules.derive_facts(
        tp_rules.facts_from_args(
            argparse.Namespace(
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=2,
                kv_channels=None,
                swiglu=True,
                make_vocab_size_divisible_by=128,
                padded_vocab_size=32000,
            )
        )
    )
    assert gqa["head_dim"] == 8
    assert gqa["qkv_group"] == (8 // 2 + 2) * 8
    assert (gqa["q_rows"], gqa["kv_rows"]) == (64, 16)
    assert gqa["swiglu"] is True and gqa["make_vocab_size_divisible_by"] == 128
    core = tp_rules.facts_from_args(
        {"num_attention_heads": 8, "group_query_attention": True, "num_query_groups": 1}
    )
    assert core["num_key_value_heads"] == 1
    mha = tp_rules.derive_facts({"num_attention_heads": 4, "hidden_size": 32})
    assert mha["qkv_group"] == 3 * 8


# --------------------------------------------------------------------------------------------
# Plans: merge TP=4
# --------------------------------------------------------------------------------------------


def _rule(name: str, **facts: Any) -> Rule:
    return default_rules(facts).resolve(name)


def test_merge_tp4_shapes_for_each_kind() -> None:
    facts = {"num_attention_heads": 8, "hidden_size": 32, "original_vocab_size": 50}
    rules = default_rules(facts)
    col = rules.merge_plan("3.mlp.dense_h_to_4h.weight", [(32, 32)] * 4)
    assert (col.full_shape, col.combine, col.dim) == ((128, 32), "concat", 0)
    assert col.pieces == (
        (
            maps.Piece(0, 0, 32, 0),
            maps.Piece(1, 0, 32, 32),
            maps.Piece(2, 0, 32, 64),
            maps.Piece(3, 0, 32, 96),
        ),
    )

    bias = rules.merge_plan("3.mlp.dense_h_to_4h.bias", [(32,)] * 4)
    assert bias.full_shape == (128,)

    row = rules.merge_plan("3.self_attention.dense.weight", [(32, 8)] * 4)
    assert (row.full_shape, row.dim) == ((32, 32), 1)

    qkv = rules.merge_plan("3.self_attention.query_key_value.weight", [(24, 32)] * 4)
    assert qkv.full_shape == (96, 32)

    stripped = rules.merge_plan("tied_modules.embed.word_embeddings.weight", [(16, 32)] * 4)
    assert stripped.full_shape == (50, 32)
    assert sum(p.length for p in stripped.pieces[0]) == 50
    kept = rules.merge_plan(
        "tied_modules.embed.word_embeddings.weight", [(16, 32)] * 4, strip_padding=False
    )
    assert kept.full_shape == (64, 32)
    no_facts = merge_plan(_rule("word_embeddings.weight"), [(16, 32)] * 4)
    assert no_facts.full_shape == (64, 32)  # nothing recorded: padding kept

    repl = rules.merge_plan("3.input_layernorm.weight", [(32,)] * 4)
    assert (repl.full_shape, repl.combine, repl.replicas) == ((32,), "copy", (0, 1, 2, 3))
    assert repl.pieces == ((maps.Piece(0, 0, 32, 0),),)

    avg = merge_plan(Rule(pattern="x", kind="average"), [(32,)] * 4)
    assert avg.combine == "mean" and [p.src for p in avg.pieces[0]] == [0, 1, 2, 3]


def test_merge_gated_tp4_takes_gates_then_ups() -> None:
    gated = default_rules({"swiglu": True}).resolve("3.mlp.dense_h_to_4h.weight")
    plan = merge_plan(gated, [(16, 8)] * 4)  # each rank: [gate_r (8 rows); up_r (8 rows)]
    assert plan.full_shape == (64, 8)
    assert [(p.src, p.src_start, p.length, p.dst_start) for p in plan.pieces[0]] == [
        (0, 0, 8, 0),
        (1, 0, 8, 8),
        (2, 0, 8, 16),
        (3, 0, 8, 24),
        (0, 8, 8, 32),
        (1, 8, 8, 40),
        (2, 8, 8, 48),
        (3, 8, 8, 56),
    ]


# --------------------------------------------------------------------------------------------
# Plans against an independent model of Megatron's layouts (labels instead of tensors)
# --------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, DIVISIBLE_BY = 64, 8, 8, 128, 50, 4


def megatron_local(kind: str, tp: int, kv_heads: int = KV_HEADS) -> list[list[Any]]:
    """Each TP rank's rows (along the split dim) as Megatron lays them out, as labels."""
    hd = HIDDEN // HEADS
    rows: list[Any]
    if kind == "column":
        rows = list(range(FFN))
        return [rows[r * FFN // tp : (r + 1) * FFN // tp] for r in range(tp)]
    if kind == "row":
        cols = list(range(HIDDEN))
        return [cols[r * HIDDEN // tp : (r + 1) * HIDDEN // tp] for r in range(tp)]
    if kind == "gated":  # full = [gate; up]; rank r = [gate_r; up_r]
        gate = [("g", i) for i in range(FFN)]
        up = [("u", i) for i in range(FFN)]
        c = FFN // tp
        return [gate[r * c : (r + 1) * c] + up[r * c : (r + 1) * c] for r in range(tp)]
    if kind == "qkv":  # per KV group: [q of the group's heads; k; v], whole groups per rank
        groups = [
            [(g, part, i) for part in ["q"] * (HEADS // kv_heads) + ["k", "v"] for i in range(hd)]
            for g in range(kv_heads)
        ]
        per = kv_heads // tp
        return [sum(groups[r * per : (r + 1) * per], []) for r in range(tp)]
    if kind == "vocab":
        padded = maps.padded_vocab_size(VOCAB, DIVISIBLE_BY, tp)
        rows = list(range(VOCAB)) + [None] * (padded - VOCAB)
        return [rows[r * padded // tp : (r + 1) * padded // tp] for r in range(tp)]
    raise AssertionError(kind)


NAMES = {
    "column": "3.mlp.dense_h_to_4h.weight",
    "row": "3.self_attention.dense.weight",
    "gated": "3.mlp.dense_h_to_4h.weight",
    "qkv": "3.self_attention.query_key_value.weight",
    "vocab": "tied_modules.embed.word_embeddings.weight",
}
FACTS = {
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_size": HIDDEN,
    "original_vocab_size": VOCAB,
    "make_vocab_size_divisible_by": DIVISIBLE_BY,
}


def local_shape(kind: str, rows: int) -> tuple[int, ...]:
    return (HIDDEN, rows) if kind == "row" else (rows, HIDDEN)


def apply(plan: tp_rules.TPPlan, src: list[list[Any]]) -> list[list[Any]]:
    """Execute a plan on label lists (the split dimension only)."""
    out = []
    for r in range(plan.dst_degree):
        assert plan.dim is not None
        dst: list[Any] = ["?"] * plan.dst_shapes[r][plan.dim]
        for p in plan.pieces[r]:
            dst[p.dst_start : p.dst_start + p.length] = src[p.src][
                p.src_start : p.src_start + p.length
            ]
        start, length = plan.padding[r]
        dst[start : start + length] = [None] * length
        assert "?" not in dst
        out.append(dst)
    return out


@pytest.mark.parametrize("kind", list(NAMES))
@pytest.mark.parametrize("src_tp", [1, 2, 4, 8])
def test_merge_then_split_round_trips(kind: str, src_tp: int) -> None:
    rules = default_rules({**FACTS, "swiglu": kind == "gated"})
    name = NAMES[kind]
    local = megatron_local(kind, src_tp)
    shapes = [local_shape(kind, len(x)) for x in local]
    merged = rules.merge_plan(name, shapes)
    full = apply(merged, local)[0]
    assert full == (list(range(VOCAB)) if kind == "vocab" else megatron_local(kind, 1)[0])
    split = rules.split_plan(name, merged.full_shape, src_tp)
    assert list(split.dst_shapes) == shapes
    assert apply(split, [full]) == local


@pytest.mark.parametrize("kind", list(NAMES))
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 4), (4, 2), (8, 1), (1, 8), (2, 8), (8, 4)])
def test_reshard_matches_megatron_layout(kind: str, src_tp: int, dst_tp: int) -> None:
    rules = default_rules({**FACTS, "swiglu": kind == "gated"})
    local = megatron_local(kind, src_tp)
    shapes = [local_shape(kind, len(x)) for x in local]
    plan = rules.reshard_plan(NAMES[kind], shapes, dst_tp)
    assert apply(plan, local) == megatron_local(kind, dst_tp)  # vocab: re-padded as Megatron


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 4), (4, 1), (2, 4), (4, 2)])
def test_reshard_gqa_qkv_keeps_query_groups_whole(src_tp: int, dst_tp: int) -> None:
    rules = load_rules(
        model_args=argparse.Namespace(
            hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=4, kv_channels=None
        )
    )
    assert rules.facts["qkv_group"] == (HEADS // 4 + 2) * (HIDDEN // HEADS)
    local = megatron_local("qkv", src_tp, kv_heads=4)
    shapes = [local_shape("qkv", len(x)) for x in local]
    plan = rules.reshard_plan(NAMES["qkv"], shapes, dst_tp)
    assert apply(plan, local) == megatron_local("qkv", dst_tp, kv_heads=4)
    with pytest.raises(RuleError, match="possible degrees are 1, 2, 4$"):
        rules.reshard_plan(NAMES["qkv"], shapes, 8)


def test_reshard_vocab_without_padding_rule_keeps_source_padding() -> None:
    rules = default_rules({"original_vocab_size": VOCAB})  # make_vocab_size_divisible_by unknown
    local = megatron_local("vocab", 4)  # 64 padded rows
    plan = rules.reshard_plan("word_embeddings.weight", [(16, 8)] * 4, 2)
    assert plan.dst_shapes == ((32, 8),) * 2
    got = apply(plan, local)
    assert got[0] + got[1] == list(range(VOCAB)) + [None] * 14


def test_split_qkv_refuses_degrees_that_split_heads() -> None:
    rules = default_rules({"num_attention_heads": 4, "hidden_size": 32})
    name = "3.self_attention.query_key_value.weight"
    assert rules.split_plan(name, (96, 32), 4).dst_shapes == ((24, 32),) * 4
    with pytest.raises(RuleError, match=r"possible degrees are 1, 2, 4$") as exc:
        rules.split_plan(name, (96, 32), 8)
    assert name in str(exc.value) and "qkv_group = 24" in str(exc.value)
    with pytest.raises(RuleError, match="possible degrees are 1, 2, 4$"):
        rules.split_plan(name, (96, 32), 3)


def test_split_qkv_needs_head_counts() -> None:
    with pytest.raises(RuleError, match="'qkv_group'.*num_attention_heads.*--rules"):
        default_rules().split_plan("3.self_attention.query_key_value.weight", (96, 32), 2)
    # merging only concatenates, so the unknown unit is not needed
    merged = default_rules().merge_plan("3.self_attention.query_key_value.weight", [(48, 32)] * 2)
    assert merged.full_shape == (96, 32)


def test_split_refuses_degrees_that_split_hidden() -> None:
    with pytest.raises(RuleError, match=r"possible degrees are 1, 2, 4, 8, 16, 32$"):
        default_rules().split_plan("3.self_attention.dense.weight", (32, 32), 3)
    with pytest.raises(RuleError, match=r"possible degrees are 1, 2, 4, 8$"):
        default_rules().split_plan("mlp.dense_4h_to_h.weight", (8, 8), 16)


def test_split_refuses_degrees_that_split_padded_vocab() -> None:
    name = "tied_modules.embed.word_embeddings.weight"
    with pytest.raises(RuleError, match=r"possible degrees are 1, 2, 4, 8, 16, 32, 64$"):
        default_rules().split_plan(name, (64, 8), 3)  # nothing recorded: rows as they are
    with pytest.raises(RuleError, match=r"possible degrees are 1, 2, 5, 10, 25, 50.*divisible_by"):
        default_rules({"original_vocab_size": 50}).split_plan(name, (50, 8), 4)
    padded = default_rules({"original_vocab_size": 50, "make_vocab_size_divisible_by": 128})
    plan = padded.split_plan(name, (50, 8), 4)  # Megatron pads 50 to 512 at TP 4
    assert plan.dst_shapes == ((128, 8),) * 4
    assert plan.padding == ((50, 78), (0, 128), (0, 128), (0, 128))


def test_split_degrees_must_be_positive() -> None:
    with pytest.raises(RuleError, match="target TP degree"):
        default_rules().split_plan("3.self_attention.dense.weight", (32, 32), 0)


def test_plans_reject_shapes_that_contradict_the_rule() -> None:
    rules = default_rules()
    with pytest.raises(RuleError, match="different shapes"):
        rules.merge_plan("3.input_layernorm.weight", [(32,), (16,)])
    with pytest.raises(RuleError, match="splits dim 1 but the tensor has shape"):
        rules.merge_plan("3.self_attention.dense.weight", [(32,), (32,)])
    with pytest.raises(RuleError, match="larger than"):
        default_rules({"original_vocab_size": 100}).merge_plan(
            "word_embeddings.weight", [(16, 8)] * 2
        )


def test_replicated_split_copies_to_every_rank() -> None:
    plan = split_plan(_rule("3.input_layernorm.weight"), (32,), 4)
    assert plan.dst_shapes == ((32,),) * 4 and plan.combine == "copy"
    scalar = reshard_plan(Rule(pattern="s", kind="replicated"), [()] * 2, 2)
    assert scalar.pieces == ((maps.Piece(0, 0, 1, 0),),) * 2


def test_reshard_to_non_divisor_degree_uses_overlaps() -> None:
    # 2 -> 3 works when every block is a multiple of 6 whole units (maps.reshard_dim's model)
    plan = reshard_plan(_rule("3.mlp.dense_h_to_4h.weight"), [(6, 4)] * 2, 3)
    assert plan.dst_shapes == ((4, 4),) * 3
    assert sum(p.length for ps in plan.pieces for p in ps) == 12


# --------------------------------------------------------------------------------------------
# Against the pipeline fixtures written by real DeepSpeed (their facts.json, no tensors)
# --------------------------------------------------------------------------------------------

FIXTURE_KINDS = {
    "replicated": ("replicated", None, 1),
    "vocab": ("vocab", 0, 1),
    "column": ("split", 0, 1),
    "row": ("split", 1, 1),
    "qkv": ("split", 0, 1),
    "gated": ("split", 0, 2),
}


@pytest.mark.parametrize("with_info", [False, True])
@pytest.mark.parametrize("fixture", PIPE)
def test_rules_agree_with_pipeline_fixtures(fixture: str, with_info: bool) -> None:
    f = facts("pipe", fixture)
    args = {
        "hidden_size": f["hidden_size"],
        "num_attention_heads": f["num_attention_heads"],
        "swiglu": f["gated_mlp"],
        "make_vocab_size_divisible_by": f["make_vocab_size_divisible_by"],
        "padded_vocab_size": f["padded_vocab_size"],
    }
    info = gpt_pipe_info(swiglu=f["gated_mlp"], tp=f["tp"]) if with_info else None
    if info is not None:
        info[K["ORIG"]], info[K["PADDED"]] = f["orig_vocab_size"], f["padded_vocab_size"]
    rules = load_rules(None, info, model_args=args)
    tp = f["tp"]
    for name, p in f["params"].items():
        rule = rules.resolve(name)
        assert (rule.kind, rule.dim, rule.blocks) == FIXTURE_KINDS[p["kind"]], name
        full = tuple(p["full_shape"])
        dim = p["tp_split_dim"]
        local = full if dim is None else full[:dim] + (full[dim] // tp,) + full[dim + 1 :]
        kept = rules.merge_plan(name, [local] * tp, strip_padding=False)
        assert kept.full_shape == full, name
        if p["kind"] == "vocab" and with_info:
            stripped = rules.merge_plan(name, [local] * tp)
            assert stripped.full_shape == (f["orig_vocab_size"], *full[1:])
        assert rules.split_plan(name, kept.full_shape, tp).dst_shapes == (local,) * tp, name
