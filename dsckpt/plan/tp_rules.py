"""How the tensor-parallel slices of each Megatron parameter combine: rules as data.

Every TP-partitioned checkpoint needs, for each parameter name, the answer to one question: are
the TP ranks' tensors copies of one tensor, or slices of it, and if slices, along which dimension
and in what layout? The answers live in a table, not in code paths:

* the shipped defaults, ``dsckpt/plan/rules/megatron.json`` (Megatron-DeepSpeed's GPT, BLOOM and
  LLaMA naming);
* the checkpoint's own ``universal_checkpoint_info`` (the regex lists Megatron-DeepSpeed stores in
  every ``mp_rank_*_model_states.pt`` for DeepSpeed's universal-checkpoint converter), turned into
  rules with the same meaning DeepSpeed's ``ds_to_universal`` gives them;
* a user file (TOML or JSON, same schema as the defaults).

Resolution order is user file > checkpoint > defaults; within each source the first matching rule
wins. Rules name their layout with four kinds:

``replicated``
    Every TP rank holds the same tensor (layernorms, row-parallel biases, position embeddings).
    Merging takes rank 0's copy; splitting copies it to every rank.
``average``
    Like ``replicated``, but merging takes the mean of the ranks' copies: DeepSpeed's
    ``parameter_to_average_patterns``, for runs whose replicas drifted apart.
``split``
    Slices along ``dim``; the full dimension is ``blocks`` sub-blocks each split evenly across
    the ranks, in whole ``unit`` elements. This is :func:`dsckpt.plan.maps.reshard_dim`'s model, so
    a column-parallel weight is ``dim=0``, a row-parallel weight ``dim=1``, a gated MLP's
    ``[gate; up]`` ``dim=0, blocks=2``, Megatron's per-head ``[q; k; v]`` interleaved QKV
    ``dim=0, unit=qkv_group`` and a non-interleaved ``[Q; K; V]`` ``dim=0, blocks=3``.
``vocab``
    A vocabulary-parallel tensor: split on dim 0 over the *padded* vocabulary. When the real
    vocabulary size is known (recorded by the checkpoint or given by the user) a merge strips the
    padding rows and a split pads to Megatron's size for the target degree.

``blocks`` and ``unit`` may name a model fact instead of a number (``"qkv_group"``); facts come
from the user file's ``[model]`` table, the checkpoint's info and Megatron's saved ``args``.

The plans (:func:`merge_plan`, :func:`split_plan`, :func:`reshard_plan`) are pure integer
arithmetic on shapes, built on :func:`dsckpt.plan.maps.reshard_dim` and
:func:`dsckpt.plan.maps.reshard_vocab`, so consolidation (TP n -> 1) and reshape (TP a -> b) are one
code path. No torch import here.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeGuard

from dsckpt.errors import DsckptError
from dsckpt.plan import maps
from dsckpt.plan.maps import MapError, Piece
from dsckpt.printable import listed

__all__ = [
    "RULES_OPTION",
    "RULE_KINDS",
    "RuleError",
    "Rule",
    "RuleSet",
    "TPPlan",
    "load_rules",
    "default_rules",
    "rules_from_universal_info",
    "parse_rules",
    "facts_from_args",
    "derive_facts",
    "merge_plan",
    "split_plan",
    "reshard_plan",
]

#: The CLI option that passes a user rules file; named in error messages.
RULES_OPTION = "--rules"

Kind = Literal["replicated", "average", "split", "vocab"]
RULE_KINDS: tuple[str, ...] = ("replicated", "average", "split", "vocab")
Shape = tuple[int, ...]
Facts = Mapping[str, Any]

_DEFAULTS_RESOURCE = "rules/megatron.json"
_SCHEMA_VERSION = 1

# Keys of DeepSpeed's universal_checkpoint_info (deepspeed/checkpoint/constants.py). Spelled out
# rather than imported: DeepSpeed is a test-only dependency.
UC_VOCABULARY = "vocabulary_parameter_patterns"
UC_PIPELINE_REPLICATED = "pipeline_replicated_parameter_patterns"
UC_TO_AVERAGE = "parameter_to_average_patterns"
UC_ROW_PARALLEL = "parameter_with_row_parallelism_patterns"
UC_TP_REPLICATED = "tp_replicated_parameter_patterns"
UC_2_SUB_PARAMS_CAT_DIM_0 = "parameter_with_2_sub_params_cat_dim_0"
UC_SUB_PARAMS = "parameter_with_sub_params"
UC_SUB_PARAM_SHARD_WIDTHS = "sub_param_shard_widths"
UC_ORIGINAL_VOCAB_SIZE = "original_vocab_size"
UC_PADDED_VOCAB_SIZE = "padded_vocab_size"


class RuleError(DsckptError):
    """A parameter no rule covers, a malformed rules file, or a layout a rule cannot realise."""


# --------------------------------------------------------------------------------------------
# Name patterns
# --------------------------------------------------------------------------------------------

_LAYER_PREFIX = re.compile(r"\d+\.")
_TIED_PREFIX = re.compile(r"tied_modules\.[^.]+\.")
# A leading layer index or tied-module key written in a DeepSpeed-style regex, e.g. "\d+." or
# "tied_modules.embed." (dots escaped or not): stripped to match layer-local names too.
_REGEX_PREFIX = re.compile(
    r"^(?:(?:\\d\+|\\d\*|\[0-9\]\+)(?:\\\.|\.)|tied_modules(?:\\\.|\.)[A-Za-z0-9_]+(?:\\\.|\.))"
)


def _is_local(name: str) -> bool:
    """True for a name without a pipeline layer index or tied-module prefix."""
    return not (_LAYER_PREFIX.match(name) or _TIED_PREFIX.match(name))


def local_name(name: str) -> str:
    """``name`` without its leading ``<layer>.`` or ``tied_modules.<key>.`` prefix."""
    m = _LAYER_PREFIX.match(name) or _TIED_PREFIX.match(name)
    return name[m.end() :] if m else name


def _translate_glob(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "{":
            j = glob.find("}", i)
            if j < 0:
                raise ValueError(f"unclosed '{{' in {glob!r}")
            inner = glob[i + 1 : j]
            if inner == "layer":
                out.append(r"\d+")
            elif "," in inner:
                out.append("(?:" + "|".join(re.escape(a) for a in inner.split(",")) + ")")
            else:
                raise ValueError(
                    f"unknown placeholder {{{inner}}} in {glob!r}: use {{layer}} or {{a,b,...}}"
                )
            i = j + 1
        elif c == "*":
            if glob.startswith("**", i):
                out.append(".*")
                i += 2
            else:
                out.append(r"[^.]*")
                i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _compile_glob(glob: str) -> re.Pattern[str]:
    # A leading "{layer}." anchors the pattern at the start of the name, the layer index being
    # optional so the layer-local key resolves too; any other glob matches the full name or a
    # suffix after a dot, which covers "<layer>.", "tied_modules.<key>." and
    # "language_model.encoder.layers.<n>." prefixes alike.
    if glob.startswith("{layer}."):
        return re.compile(r"(?:\d+\.)?" + _translate_glob(glob[len("{layer}.") :]))
    return re.compile(r"(?:.*\.)?" + _translate_glob(glob))


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How the TP slices of the parameters matching one pattern combine.

    Attributes:
        pattern: The pattern as written: a glob (``syntax="glob"``) or a regex (``"regex"``).
        kind: ``replicated``, ``average``, ``split`` or ``vocab``.
        dim: Split dimension (``split``; 0 for ``vocab``; ``None`` otherwise).
        blocks: Sub-blocks of the split dimension: a count, or their sizes (ints or fact names).
        unit: Elements that stay together on one rank: an int or a fact name.
        syntax: ``glob``: matches the full name or a dot-boundary suffix (``{layer}.`` prefix:
            anchored, layer optional). ``regex``: ``re.match`` against the full name, as DeepSpeed
            matches ``universal_checkpoint_info`` patterns; a leading ``\\d+.`` or
            ``tied_modules.<key>.`` in the regex is also tried without it on layer-local names.
        when: Name of a boolean model fact (``swiglu``) the rule requires, or ``None``.
        ndim: Required tensor rank, or ``None`` (set for DeepSpeed sub-parameter shapes).
        source: Where the rule came from, for messages and ``show``.
        note: Why the rule says what it says.
    """

    pattern: str
    kind: Kind
    dim: int | None = None
    blocks: int | tuple[int | str, ...] = 1
    unit: int | str = 1
    syntax: Literal["glob", "regex"] = "glob"
    when: str | None = None
    ndim: int | None = None
    source: str = "defaults"
    note: str = ""
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _local_regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}: use one of {', '.join(RULE_KINDS)}")
        if self.kind == "split" and self.dim is None:
            raise ValueError("a 'split' rule needs 'dim'")
        if self.kind == "vocab" and (self.dim != 0 or self.blocks != 1 or self.unit != 1):
            raise ValueError("a 'vocab' rule splits dim 0 in rows: it takes no 'blocks' or 'unit'")
        if self.kind in ("replicated", "average") and (
            self.dim is not None or self.blocks != 1 or self.unit != 1
        ):
            raise ValueError(f"a {self.kind!r} rule takes no 'dim', 'blocks' or 'unit'")
        local: re.Pattern[str] | None = None
        try:
            if self.syntax == "glob":
                regex = _compile_glob(self.pattern)
            elif self.syntax == "regex":
                regex = re.compile(self.pattern)
                m = _REGEX_PREFIX.match(self.pattern)
                if m and m.end() < len(self.pattern):
                    local = re.compile(self.pattern[m.end() :])
            else:
                raise ValueError(f"unknown syntax {self.syntax!r}")
        except re.error as exc:
            raise ValueError(f"invalid regex {self.pattern!r}: {exc}") from None
        object.__setattr__(self, "_regex", regex)
        object.__setattr__(self, "_local_regex", local)

    def matches(self, name: str) -> bool:
        """Whether the rule's pattern covers ``name`` (full or layer-local); ignores ``when``."""
        if self.syntax == "glob":
            return self._regex.fullmatch(name) is not None
        if self._regex.match(name):
            return True
        return (
            self._local_regex is not None
            and _is_local(name)
            and bool(self._local_regex.match(name))
        )

    @property
    def is_split(self) -> bool:
        """True for rules whose ranks hold different slices (``split`` and ``vocab``)."""
        return self.kind in ("split", "vocab")

    def describe(self) -> str:
        """A short human description, e.g. ``split dim 0, 2 blocks``."""
        if not self.is_split:
            return self.kind
        parts = [f"{self.kind} dim {self.dim}"]
        if self.blocks != 1:
            if isinstance(self.blocks, int):
                parts.append(f"{self.blocks} blocks")
            else:
                parts.append("blocks [" + ", ".join(map(str, self.blocks)) + "]")
        if self.unit != 1:
            parts.append(f"units of {self.unit}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The rule in the rules-file schema (round-trips through :func:`parse_rules`)."""
        out: dict[str, Any] = {("match" if self.syntax == "glob" else "regex"): self.pattern}
        out["kind"] = self.kind
        if self.kind == "split":
            out["dim"] = self.dim
        if self.blocks != 1:
            out["blocks"] = self.blocks if isinstance(self.blocks, int) else list(self.blocks)
        if self.unit != 1:
            out["unit"] = self.unit
        if self.when:
            out["when"] = self.when
        if self.ndim is not None:
            out["ndim"] = self.ndim
        if self.note:
            out["note"] = self.note
        return out


_RULE_KEYS = {"match", "regex", "kind", "dim", "blocks", "unit", "when", "ndim", "note"}
_FILE_KEYS = {"schema", "name", "description", "rules", "model"}


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _rule_from_dict(d: Mapping[str, Any], source: str, where: str) -> Rule:
    def bad(msg: str) -> RuleError:
        return RuleError(f"{where}: {msg}")

    if not isinstance(d, Mapping):
        raise bad(f"a rule must be a table/object, got {type(d).__name__}")
    unknown = set(d) - _RULE_KEYS
    if unknown:
        raise bad(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    if ("match" in d) == ("regex" in d):
        raise bad("give exactly one of 'match' (a glob) or 'regex'")
    syntax: Literal["glob", "regex"] = "glob" if "match" in d else "regex"
    pattern = d["match"] if syntax == "glob" else d["regex"]
    if not isinstance(pattern, str) or not pattern:
        raise bad(f"'{'match' if syntax == 'glob' else 'regex'}' must be a non-empty string")
    kind = d.get("kind")
    if kind not in RULE_KINDS:
        raise bad(f"'kind' must be one of {', '.join(RULE_KINDS)}, got {kind!r}")
    dim = d.get("dim", 0 if kind == "vocab" else None)
    if dim is not None and not (_is_int(dim) and dim >= 0):
        raise bad(f"'dim' must be an int >= 0, got {dim!r}")
    blocks_raw = d.get("blocks", 1)
    blocks: int | tuple[int | str, ...]
    if _is_int(blocks_raw):
        if blocks_raw < 1:
            raise bad(f"'blocks' must be >= 1, got {blocks_raw}")
        blocks = blocks_raw
    elif (
        isinstance(blocks_raw, list)
        and blocks_raw
        and all((_is_int(b) and b >= 0) or (isinstance(b, str) and b) for b in blocks_raw)
    ):
        blocks = tuple(blocks_raw)
    else:
        raise bad(f"'blocks' must be a count or a list of sizes or fact names, got {blocks_raw!r}")
    unit = d.get("unit", 1)
    if not ((_is_int(unit) and unit >= 1) or (isinstance(unit, str) and unit)):
        raise bad(f"'unit' must be an int >= 1 or a fact name, got {unit!r}")
    when = d.get("when")
    if when is not None and not (isinstance(when, str) and when):
        raise bad(f"'when' must be a fact name, got {when!r}")
    ndim = d.get("ndim")
    if ndim is not None and not (_is_int(ndim) and ndim >= 0):
        raise bad(f"'ndim' must be an int >= 0, got {ndim!r}")
    note = d.get("note", "")
    if not isinstance(note, str):
        raise bad("'note' must be a string")
    try:
        return Rule(
            pattern=pattern,
            kind=kind,
            dim=dim,
            blocks=blocks,
            unit=unit,
            syntax=syntax,
            when=when,
            ndim=ndim,
            source=source,
            note=note,
        )
    except ValueError as exc:
        raise bad(str(exc)) from None


@dataclass(frozen=True)
class _ParsedFile:
    rules: tuple[Rule, ...]
    model: dict[str, Any]


def parse_rules(data: Mapping[str, Any], source: str) -> tuple[tuple[Rule, ...], dict[str, Any]]:
    """Validate a rules document (the parsed TOML/JSON) and build its rules.

    Args:
        data: The document: ``{"schema": 1, "rules": [...], "model": {...}}``.
        source: Where it came from, e.g. ``"user file rules.toml"``.

    Returns:
        The rules in file order and the ``model`` facts table.

    Raises:
        RuleError: For any schema violation, naming the source and the rule index.
    """
    if not isinstance(data, Mapping):
        raise RuleError(f"{source}: the top level must be a table/object")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise RuleError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}"
        )
    schema = data.get("schema", _SCHEMA_VERSION)
    if schema != _SCHEMA_VERSION:
        raise RuleError(
            f"{source}: schema {schema!r} is not supported (this dsckpt reads "
            f"schema {_SCHEMA_VERSION})"
        )
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RuleError(f"{source}: 'rules' must be a list ([[rules]] in TOML)")
    rules = tuple(
        _rule_from_dict(r, source, f"{source}: rules[{i}]") for i, r in enumerate(raw_rules)
    )
    model = data.get("model", {})
    if not isinstance(model, Mapping):
        raise RuleError(f"{source}: 'model' must be a table/object of facts")
    for k, v in model.items():
        if not (_is_int(v) or isinstance(v, bool)):
            raise RuleError(f"{source}: model.{k} must be an int or a boolean, got {v!r}")
    return rules, dict(model)


def _read_rules_file(path: Path) -> _ParsedFile:
    source = f"rules file {path}"
    if not path.is_file():
        raise RuleError(f"{source} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"{source} cannot be read: {exc}") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10 only
                try:
                    import tomli as tomllib
                except ImportError:
                    raise RuleError(
                        f"{source}: reading TOML needs Python 3.11+ or the 'tomli' package; "
                        "install tomli or write the rules as JSON"
                    ) from None
            data = tomllib.loads(text)
        else:
            raise RuleError(f"{source}: the name must end in .toml or .json")
    except (ValueError, TypeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise RuleError(f"{source} is not valid {suffix[1:].upper()}: {exc}") from None
    rules, model = parse_rules(data, source)
    return _ParsedFile(rules, model)


@lru_cache(maxsize=1)
def _default_file() -> _ParsedFile:
    text = resources.files("dsckpt.plan").joinpath(_DEFAULTS_RESOURCE).read_text(encoding="utf-8")
    rules, model = parse_rules(json.loads(text), "defaults")
    return _ParsedFile(rules, model)


# --------------------------------------------------------------------------------------------
# DeepSpeed universal_checkpoint_info -> rules
# --------------------------------------------------------------------------------------------


def _pattern_list(info: Mapping[str, Any], key: str) -> list[str]:
    value = info.get(key) or []
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise RuleError(
            f"checkpoint universal_checkpoint_info[{key!r}] must be a list of regex strings, "
            f"got {value!r}"
        )
    return list(value)


def rules_from_universal_info(info: Mapping[str, Any]) -> tuple[Rule, ...]:
    """Rules with the meaning DeepSpeed's ``ds_to_universal`` gives the checkpoint's patterns.

    DeepSpeed matches each pattern with ``re.match`` against the parameter's full name and merges
    TP slices by the first category that matches: TP-replicated (take rank 0), to-average (mean),
    2 sub-parameters cat dim 0 (gated MLP), sub-parameters with a shape, row-parallel (cat dim 1);
    anything else is concatenated on dim 0. Vocabulary patterns are then stripped of padding rows.
    Here vocabulary rules come first (a vocabulary tensor is split on dim 0 in every Megatron
    model), then the categories in DeepSpeed's order; unlisted names fall through to the next
    source instead of to an implicit dim 0.

    Args:
        info: The ``universal_checkpoint_info`` dict of an ``mp_rank`` file.

    Returns:
        The rules, with ``source`` naming the info key each came from.

    Raises:
        RuleError: If a pattern list is malformed or a sub-parameter layout is uneven (AutoTP's
            per-rank shard widths), which even splits cannot express.
    """
    rules: list[Rule] = []

    def add(key: str, kind: Kind, **kw: Any) -> None:
        for p in _pattern_list(info, key):
            try:
                rules.append(
                    Rule(pattern=p, kind=kind, syntax="regex", source=f"checkpoint {key}", **kw)
                )
            except ValueError as exc:
                raise RuleError(f"checkpoint universal_checkpoint_info[{key!r}]: {exc}") from None

    add(UC_VOCABULARY, "vocab", dim=0)
    add(UC_TP_REPLICATED, "replicated")
    add(UC_TO_AVERAGE, "average")
    add(UC_2_SUB_PARAMS_CAT_DIM_0, "split", dim=0, blocks=2)

    widths = info.get(UC_SUB_PARAM_SHARD_WIDTHS) or {}
    for i, entry in enumerate(info.get(UC_SUB_PARAMS) or []):
        where = f"checkpoint universal_checkpoint_info[{UC_SUB_PARAMS!r}][{i}]"
        entry = entry if isinstance(entry, Mapping) else getattr(entry, "__dict__", None)
        if not isinstance(entry, Mapping):
            raise RuleError(f"{where}: expected {{patterns, shape, partition_dim}}, got {entry!r}")
        try:
            patterns = list(entry["patterns"])
            shape = list(entry["shape"])
            pdim = int(entry["partition_dim"])
            spec = shape[pdim]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RuleError(f"{where}: malformed sub-parameter shape: {exc}") from None
        blocks: int | tuple[int | str, ...]
        blocks = tuple(int(s) for s in spec) if isinstance(spec, (list, tuple)) else int(spec)
        for p in patterns:
            for sub in widths.get(p) or []:
                if len(set(sub)) > 1:
                    raise RuleError(
                        f"{where}: pattern {p!r} records uneven per-rank shard widths {list(sub)} "
                        "(an AutoTP layout); dsckpt only splits sub-parameters evenly"
                    )
            try:
                rules.append(
                    Rule(
                        pattern=p,
                        kind="split",
                        dim=pdim,
                        blocks=blocks,
                        syntax="regex",
                        ndim=len(shape),
                        source=f"checkpoint {UC_SUB_PARAMS}",
                    )
                )
            except ValueError as exc:
                raise RuleError(f"{where}: {exc}") from None

    add(UC_ROW_PARALLEL, "split", dim=1)
    return tuple(rules)


# --------------------------------------------------------------------------------------------
# Model facts
# --------------------------------------------------------------------------------------------

# Megatron argument names read from a checkpoint's saved ``args``.
_ARG_FACTS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "kv_channels",
    "ffn_hidden_size",
    "swiglu",
    "make_vocab_size_divisible_by",
    "padded_vocab_size",
    "original_vocab_size",
)


def facts_from_args(args: Any) -> dict[str, Any]:
    """Model facts from Megatron's saved ``args`` (an ``argparse.Namespace`` or a mapping).

    Reads the head counts, sizes, vocabulary padding and ``swiglu``. Megatron-LM core's
    ``num_query_groups`` (with ``group_query_attention``) is read as ``num_key_value_heads``,
    and ``gated_linear_unit`` as ``swiglu``. Values that are ``None`` or not ints/bools are skipped.

    Args:
        args: The ``args`` entry of an ``mp_rank`` file, or ``None``.

    Returns:
        A dict of facts (possibly empty).
    """
    if args is None:
        return {}
    get = args.get if isinstance(args, Mapping) else (lambda k: getattr(args, k, None))
    out: dict[str, Any] = {}
    for key in _ARG_FACTS:
        v = get(key)
        if key == "swiglu":
            if isinstance(v, bool):
                out[key] = v
        elif _is_int(v):
            out[key] = v
    if "num_key_value_heads" not in out and get("group_query_attention") is True:
        groups = get("num_query_groups")
        if _is_int(groups):
            out["num_key_value_heads"] = groups
    if get("gated_linear_unit") is True:
        out["swiglu"] = True
    return out


def derive_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Add the facts rules refer to that follow from others, unless given explicitly.

    ``head_dim`` = ``kv_channels`` or ``hidden_size / num_attention_heads``;
    ``num_key_value_heads`` defaults to ``num_attention_heads``; ``q_rows`` = heads * head_dim;
    ``kv_rows`` = kv heads * head_dim; ``qkv_group`` = (heads / kv heads + 2) * head_dim, the rows
    of one query group in Megatron's fused QKV (``3 * head_dim`` without GQA).

    Args:
        facts: Known facts.

    Returns:
        A new dict with the derived facts added.
    """
    out = dict(facts)
    heads = out.get("num_attention_heads")
    if _is_int(heads) and heads > 0:
        out.setdefault("num_key_value_heads", heads)
        if "head_dim" not in out:
            if _is_int(out.get("kv_channels")):
                out["head_dim"] = out["kv_channels"]
            elif _is_int(out.get("hidden_size")) and out["hidden_size"] % heads == 0:
                out["head_dim"] = out["hidden_size"] // heads
        kv = out["num_key_value_heads"]
        hd = out.get("head_dim")
        if _is_int(hd) and _is_int(kv) and kv > 0:
            out.setdefault("q_rows", heads * hd)
            out.setdefault("kv_rows", kv * hd)
            if heads % kv == 0:
                out.setdefault("qkv_group", (heads // kv + 2) * hd)
    return out


# --------------------------------------------------------------------------------------------
# Rule sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSet:
    """Rules in resolution order (user file, checkpoint, defaults) and the model facts.

    Attributes:
        rules: Every rule, highest precedence first; the first active match wins.
        facts: Model facts (``swiglu``, head counts, vocabulary sizes, ``qkv_group`` ...).
        sources: The sources consulted, highest precedence first, for messages and ``show``.
        pipeline_replicated: DeepSpeed's ``pipeline_replicated_parameter_patterns`` (regexes of
            tied parameters kept on the first and last stage), if the checkpoint lists them.
    """

    rules: tuple[Rule, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    pipeline_replicated: tuple[str, ...] = ()
    _cache: dict[str, Rule] = field(default_factory=dict, repr=False, compare=False)

    def active(self, rule: Rule) -> bool:
        """Whether a rule's ``when`` condition holds for these facts."""
        return rule.when is None or bool(self.facts.get(rule.when))

    def find(self, name: str) -> Rule | None:
        """The rule for ``name``, or ``None`` if no rule covers it."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        for rule in self.rules:
            if self.active(rule) and rule.matches(name):
                self._cache[name] = rule
                return rule
        return None

    def resolve(self, name: str) -> Rule:
        """The rule for a parameter name.

        Args:
            name: The name as ``param_shapes`` spells it (``3.mlp.dense_4h_to_h.weight``,
                ``tied_modules.embed.word_embeddings.weight``) or the layer-local key of a layer
                file (``mlp.dense_4h_to_h.weight``).

        Returns:
            The first active rule that matches.

        Raises:
            RuleError: If no rule covers the name; the message says how to add one.
        """
        rule = self.find(name)
        if rule is None:
            raise RuleError(_uncovered_message([name], self.sources))
        return rule

    def check(self, names: Iterable[str]) -> dict[str, Rule]:
        """Resolve many names at once, reporting every uncovered one in a single error.

        Args:
            names: Parameter names.

        Returns:
            ``{name: rule}``.

        Raises:
            RuleError: Listing all names no rule covers.
        """
        out: dict[str, Rule] = {}
        missing: list[str] = []
        for n in names:
            rule = self.find(n)
            if rule is None:
                missing.append(n)
            else:
                out[n] = rule
        if missing:
            raise RuleError(_uncovered_message(missing, self.sources))
        return out

    def is_pipeline_replicated(self, name: str) -> bool:
        """Whether ``name`` is a tied parameter present on several pipeline stages.

        Uses the checkpoint's ``pipeline_replicated_parameter_patterns`` when present, else any
        ``tied_modules.*`` name (DeepSpeed keeps tied modules on every stage that uses them).
        """
        if self.pipeline_replicated:
            return any(re.match(p, name) for p in self.pipeline_replicated)
        return name.startswith("tied_modules.")

    def merge_plan(
        self, name: str, local_shapes: Sequence[Sequence[int]], *, strip_padding: bool = True
    ) -> TPPlan:
        """:func:`merge_plan` for the rule of ``name``, with these facts."""
        return merge_plan(
            self.resolve(name),
            local_shapes,
            facts=self.facts,
            strip_padding=strip_padding,
            name=name,
        )

    def split_plan(self, name: str, full_shape: Sequence[int], degree: int) -> TPPlan:
        """:func:`split_plan` for the rule of ``name``, with these facts."""
        return split_plan(self.resolve(name), full_shape, degree, facts=self.facts, name=name)

    def reshard_plan(
        self,
        name: str,
        src_shapes: Sequence[Sequence[int]],
        dst_degree: int,
        *,
        strip_padding: bool = True,
    ) -> TPPlan:
        """:func:`reshard_plan` for the rule of ``name``, with these facts."""
        return reshard_plan(
            self.resolve(name),
            src_shapes,
            dst_degree,
            facts=self.facts,
            strip_padding=strip_padding,
            name=name,
        )


def _example_for(name: str) -> str:
    return json.dumps({"rules": [{"match": local_name(name), "kind": "replicated"}]})


def _uncovered_message(names: Sequence[str], sources: Sequence[str]) -> str:
    shown = listed(names, 10, each=repr)
    what = "parameter" if len(names) == 1 else f"{len(names)} parameters"
    consulted = "; ".join(sources) if sources else "no rules"
    return (
        f"no tensor-parallel rule covers {what} {shown} (consulted: {consulted}): write a rules "
        f"file and pass it with {RULES_OPTION} FILE.json (or .toml, same schema), e.g. "
        f'{_example_for(names[0])} with kind replicated, average, split (with "dim") or vocab'
    )


def load_rules(
    user_file: Path | None = None,
    checkpoint_info: Mapping[str, Any] | None = None,
    *,
    model_args: Any = None,
    facts: Mapping[str, Any] | None = None,
) -> RuleSet:
    """Build the rule set for one checkpoint.

    Rules: user file > checkpoint ``universal_checkpoint_info`` > shipped defaults. Facts: the
    ``facts`` argument > the user file's ``[model]`` > the checkpoint info's vocabulary sizes >
    ``model_args``; then :func:`derive_facts` fills in ``head_dim``, ``qkv_group`` and friends.

    Args:
        user_file: A TOML or JSON rules file, or ``None``.
        checkpoint_info: The ``universal_checkpoint_info`` dict of an ``mp_rank`` file, or ``None``.
        model_args: Megatron's saved ``args`` (Namespace or mapping), or ``None``.
        facts: Facts that override everything (e.g. from CLI flags), or ``None``.

    Returns:
        The rule set.

    Raises:
        RuleError: If the user file or the checkpoint info is malformed.
    """
    rules: list[Rule] = []
    sources: list[str] = []
    merged: dict[str, Any] = dict(facts_from_args(model_args))
    pipeline_replicated: tuple[str, ...] = ()

    user: _ParsedFile | None = None
    if user_file is not None:
        user = _read_rules_file(Path(user_file))
        rules.extend(user.rules)
        sources.append(f"rules file {user_file} ({len(user.rules)} rules)")
    if checkpoint_info:
        if not isinstance(checkpoint_info, Mapping):
            raise RuleError(
                f"checkpoint universal_checkpoint_info must be a dict, got "
                f"{type(checkpoint_info).__name__}"
            )
        ck = rules_from_universal_info(checkpoint_info)
        rules.extend(ck)
        sources.append(f"checkpoint universal_checkpoint_info ({len(ck)} rules)")
        for key in (UC_ORIGINAL_VOCAB_SIZE, UC_PADDED_VOCAB_SIZE):
            if _is_int(checkpoint_info.get(key)):
                merged[key] = checkpoint_info[key]
        pipeline_replicated = tuple(_pattern_list(checkpoint_info, UC_PIPELINE_REPLICATED))
    defaults = _default_file()
    rules.extend(defaults.rules)
    sources.append(f"dsckpt defaults {_DEFAULTS_RESOURCE} ({len(defaults.rules)} rules)")
    if user is not None:
        merged.update(user.model)
    if facts:
        merged.update(facts)
    return RuleSet(
        rules=tuple(rules),
        facts=derive_facts(merged),
        sources=tuple(sources),
        pipeline_replicated=pipeline_replicated,
    )


def default_rules(facts: Mapping[str, Any] | None = None) -> RuleSet:
    """The shipped defaults alone (no checkpoint, no user file), with optional facts."""
    return load_rules(None, None, facts=facts)


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPPlan:
    """How to build every target TP rank's tensor from the source ranks' tensors.

    Attributes:
        rule: The rule the plan follows.
        combine: ``concat``: each target is the ``pieces`` tiled along ``dim`` (then ``padding``
            zero-filled); ``copy``: each target is the whole tensor of its single piece's source
            rank; ``mean``: each target is the element-wise mean of its pieces' source tensors.
        dim: The dimension pieces run along (``None`` for ``copy`` and ``mean``).
        src_shapes: Source shapes, by source TP rank.
        full_shape: The unsplit shape (vocabulary rows stripped to the real size when it is
            known and stripping is on).
        dst_shapes: Target shapes, by target TP rank.
        pieces: ``pieces[dst_rank]``: :class:`dsckpt.plan.maps.Piece` runs (source rank, offset in
            the source along ``dim``, length, offset in the target). For ``copy``/``mean`` each
            piece spans a whole source tensor (its ``length`` is dim 0's size, or 1 for a scalar).
        padding: ``padding[dst_rank] = (start, length)`` rows along ``dim`` to zero-fill
            (vocabulary padding; ``length`` 0 otherwise).
        replicas: For ``copy``: every source rank holding a copy (an executor may verify they
            agree and suggest ``kind = "average"`` if not); empty otherwise.
    """

    rule: Rule
    combine: Literal["concat", "copy", "mean"]
    dim: int | None
    src_shapes: tuple[Shape, ...]
    full_shape: Shape
    dst_shapes: tuple[Shape, ...]
    pieces: tuple[tuple[Piece, ...], ...]
    padding: tuple[tuple[int, int], ...]
    replicas: tuple[int, ...] = ()

    @property
    def src_degree(self) -> int:
        """Number of source TP ranks."""
        return len(self.src_shapes)

    @property
    def dst_degree(self) -> int:
        """Number of target TP ranks."""
        return len(self.dst_shapes)


def _label(name: str | None) -> str:
    return f"parameter {name!r}" if name else "parameter"


def _shapes(shapes: Sequence[Sequence[int]], label: str) -> tuple[Shape, ...]:
    out = tuple(tuple(int(x) for x in s) for s in shapes)
    if not out:
        raise RuleError(f"{label}: no source shapes given")
    for s in out:
        if any(x < 0 for x in s):
            raise RuleError(f"{label}: negative size in shape {s}")
    return out


def _fact_value(value: int | str, facts: Facts, what: str, label: str, rule: Rule) -> int:
    if _is_int(value):
        return int(value)
    v = facts.get(str(value))
    if _is_int(v) and v > 0:
        return int(v)
    hint = ""
    if value in ("qkv_group", "head_dim", "q_rows", "kv_rows"):
        hint = " (it follows from num_attention_heads, num_key_value_heads and hidden_size)"
    raise RuleError(
        f"{label}: rule {rule.pattern!r} ({rule.source}) splits in {what} of {value!r}, which is "
        f"not known{hint}: add it to the [model] table of a rules file passed with "
        f'{RULES_OPTION}, e.g. {{"model": {{"{value}": 192}}}}'
    )


def _check_degree(degree: int, what: str) -> None:
    if not _is_int(degree) or degree < 1:
        raise RuleError(f"{what} TP degree must be an int >= 1, got {degree!r}")


def reshard_plan(
    rule: Rule,
    src_shapes: Sequence[Sequence[int]],
    dst_degree: int,
    *,
    facts: Facts | None = None,
    strip_padding: bool = True,
    dst_padded_vocab: int | None = None,
    name: str | None = None,
) -> TPPlan:
    """Plan re-splitting one parameter from ``len(src_shapes)`` TP ranks to ``dst_degree``.

    Consolidation is ``dst_degree=1``; splitting a full tensor is one source shape.

    Vocabulary tensors: with ``facts["original_vocab_size"]`` known and ``strip_padding`` on,
    source rows at and past it are padding and are dropped; the target is padded to
    ``dst_padded_vocab`` if given, else to Megatron's size for the target degree
    (:func:`dsckpt.plan.maps.padded_vocab_size` with ``facts["make_vocab_size_divisible_by"]``),
    else to the source's padded size. Padding rows are listed in ``padding`` for zero-filling (their
    values carry nothing: Megatron never produces those tokens). :func:`merge_plan` instead
    strips to the real size, which is what a consolidated state dict wants.

    Args:
        rule: The parameter's rule.
        src_shapes: The shape on each source TP rank, by rank.
        dst_degree: Target TP degree.
        facts: Model facts for symbolic ``blocks``/``unit`` and vocabulary sizes.
        strip_padding: Whether to use a known real vocabulary size.
        dst_padded_vocab: Target padded vocabulary size, overriding the rules above.
        name: The parameter's name, for messages.

    Returns:
        The plan.

    Raises:
        RuleError: If the shapes contradict the rule, a needed fact is unknown, or a degree does
            not divide the dimension (the message lists the degrees that would).
    """
    facts = facts or {}
    label = _label(name)
    _check_degree(dst_degree, "target")
    shapes = _shapes(src_shapes, label)
    n = len(shapes)
    first = shapes[0]
    if rule.ndim is not None and len(first) != rule.ndim:
        raise RuleError(
            f"{label}: rule {rule.pattern!r} ({rule.source}) describes a {rule.ndim}-d tensor "
            f"but the tensor has shape {first}"
        )
    if any(s != first for s in shapes):
        kind = "replicated" if not rule.is_split else "split evenly"
        raise RuleError(
            f"{label}: its TP slices have different shapes {list(shapes)}, but rule "
            f"{rule.pattern!r} ({rule.source}) says it is {kind}; Megatron splits evenly, so the "
            f"checkpoint is damaged or the rule is wrong (override it with {RULES_OPTION})"
        )

    if not rule.is_split:
        length = first[0] if first else 1
        if rule.kind == "average":
            pieces = tuple(Piece(r, 0, length, 0) for r in range(n))
            per_dst: tuple[tuple[Piece, ...], ...] = (pieces,) * dst_degree
            combine: Literal["concat", "copy", "mean"] = "mean"
            replicas: tuple[int, ...] = ()
        else:
            per_dst = ((Piece(0, 0, length, 0),),) * dst_degree
            combine = "copy"
            replicas = tuple(range(n))
        return TPPlan(
            rule=rule,
            combine=combine,
            dim=None,
            src_shapes=shapes,
            full_shape=first,
            dst_shapes=(first,) * dst_degree,
            pieces=per_dst,
            padding=((0, 0),) * dst_degree,
            replicas=replicas,
        )

    dim = rule.dim
    assert dim is not None  # guaranteed by Rule.__post_init__ for split kinds
    if dim >= len(first):
        raise RuleError(
            f"{label}: rule {rule.pattern!r} ({rule.source}) splits dim {dim} but the tensor has "
            f"shape {first}; override the rule with {RULES_OPTION}"
        )
    src_total = first[dim] * n

    def with_dim(size: int) -> Shape:
        return first[:dim] + (size,) + first[dim + 1 :]

    def unpadded(dr: maps.DimReshard) -> TPPlan:
        """Equal target slices along ``dim``, nothing to zero-fill (not a stripped vocabulary)."""
        return TPPlan(
            rule=rule,
            combine="concat",
            dim=dim,
            src_shapes=shapes,
            full_shape=with_dim(src_total),
            dst_shapes=(with_dim(dr.dst_local_size),) * dst_degree,
            pieces=dr.pieces,
            padding=((dr.dst_local_size, 0),) * dst_degree,
        )

    try:
        if rule.kind == "vocab":
            orig = facts.get("original_vocab_size") if strip_padding else None
            if orig is None:
                return unpadded(maps.reshard_dim(src_total, n, dst_degree))
            if not _is_int(orig) or orig > src_total:
                raise RuleError(
                    f"{label}: original_vocab_size {orig!r} is larger than the {src_total} "
                    "vocabulary rows the slices hold; fix original_vocab_size in the [model] "
                    f"table of the {RULES_OPTION} file"
                )
            multiple = facts.get("make_vocab_size_divisible_by")
            if dst_padded_vocab is not None:
                dst_padded = dst_padded_vocab
            elif _is_int(multiple):
                dst_padded = maps.padded_vocab_size(orig, multiple, dst_degree)
            else:
                dst_padded = src_total
            try:
                vr = maps.reshard_vocab(orig, src_total, n, dst_padded, dst_degree)
            except MapError as exc:
                hint = ""
                if dst_padded_vocab is None and not _is_int(multiple):
                    hint = (
                        "; set make_vocab_size_divisible_by in the [model] table to pad the "
                        "vocabulary as Megatron does for the target degree"
                    )
                raise RuleError(f"{label} (vocabulary of {orig} real rows): {exc}{hint}") from None
            return TPPlan(
                rule=rule,
                combine="concat",
                dim=dim,
                src_shapes=shapes,
                full_shape=with_dim(orig),
                dst_shapes=(with_dim(dst_padded // dst_degree),) * dst_degree,
                pieces=vr.pieces,
                padding=vr.padding,
            )

        split_needed = max(n, dst_degree) > 1
        blocks: int | tuple[int, ...]
        if isinstance(rule.blocks, int) or not split_needed:
            blocks = rule.blocks if isinstance(rule.blocks, int) else 1
        else:
            blocks = tuple(_fact_value(b, facts, "blocks", label, rule) for b in rule.blocks)
        if dst_degree > 1:
            unit = _fact_value(rule.unit, facts, "units", label, rule)
        elif _is_int(rule.unit):
            unit = int(rule.unit)
        else:
            # Merging to one rank only concatenates; an unknown unit merely skips the check
            # that each source slice holds whole heads.
            v = facts.get(str(rule.unit))
            unit = int(v) if _is_int(v) and v > 0 else 1
        dr = maps.reshard_dim(src_total, n, dst_degree, blocks=blocks, unit=unit)
    except MapError as exc:
        layout = rule.describe()
        if isinstance(rule.unit, str):
            layout += f" ({rule.unit} = {facts.get(rule.unit, 'unknown')})"
        raise RuleError(f"{label} ({layout}, shape {with_dim(src_total)}): {exc}") from None
    return unpadded(dr)


def merge_plan(
    rule: Rule,
    local_shapes: Sequence[Sequence[int]],
    *,
    facts: Facts | None = None,
    strip_padding: bool = True,
    name: str | None = None,
) -> TPPlan:
    """Plan consolidating one parameter's TP slices into one tensor (TP n -> 1).

    A vocabulary tensor loses its padding rows when ``facts["original_vocab_size"]`` is known
    (recorded by the checkpoint or given by the user) and ``strip_padding`` is on; otherwise the
    padded rows are kept. To build a TP=1 *Megatron* checkpoint, padded as Megatron pads at TP 1,
    use :func:`reshard_plan` with ``dst_degree=1``.

    Args:
        rule: The parameter's rule.
        local_shapes: The shape on each TP rank, by rank.
        facts: Model facts (``original_vocab_size`` turns on padding stripping).
        strip_padding: Whether to strip vocabulary padding when the real size is known.
        name: The parameter's name, for messages.

    Returns:
        The plan; ``plan.full_shape`` is the consolidated shape and ``plan.pieces[0]`` its runs.
    """
    orig = (facts or {}).get("original_vocab_size") if strip_padding else None
    return reshard_plan(
        rule,
        local_shapes,
        1,
        facts=facts,
        strip_padding=strip_padding,
        dst_padded_vocab=orig if rule.kind == "vocab" and _is_int(orig) else None,
        name=name,
    )


def split_plan(
    rule: Rule,
    full_shape: Sequence[int],
    degree: int,
    *,
    facts: Facts | None = None,
    dst_padded_vocab: int | None = None,
    name: str | None = None,
) -> TPPlan:
    """Plan splitting one full tensor across ``degree`` TP ranks (TP 1 -> degree).

    Args:
        rule: The parameter's rule.
        full_shape: The unsplit shape.
        degree: Target TP degree.
        facts: Model facts (head counts for QKV units, vocabulary sizes).
        dst_padded_vocab: Target padded vocabulary size (see :func:`reshard_plan`).
        name: The parameter's name, for messages.

    Returns:
        The plan; ``plan.dst_shapes`` are the per-rank shapes.
    """
    return reshard_plan(
        rule, [full_shape], degree, facts=facts, dst_padded_vocab=dst_padded_vocab, name=name
    )
