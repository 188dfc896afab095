"""Layouts and plans -> JSON-ready dicts and Rich renderables. Pure: nothing here prints."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from dsckpt.discover.files import RankFile, Role
from dsckpt.discover.layout import ERROR, Finding, Layout
from dsckpt.discover.moe import MoeLayout
from dsckpt.plan.topology_map import TopologyMap
from dsckpt.plan.zero_reshape import skipped_note
from dsckpt.printable import listed, printable
from dsckpt.sizes import human_bytes

JSON_SCHEMA_VERSION = 1
_LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def text(value: object, style: str = "") -> Text:
    """A table cell, title or line: control characters escaped, never read as Rich markup (a
    key named ``[bold]`` or ``[/]`` is shown as it is)."""
    return Text(printable(value), style=style)


def _row(table: Table, *cells: object) -> None:
    table.add_row(*(c if isinstance(c, (Text, NameCell)) else text(c) for c in cells))


def to_json(data: Any) -> str:
    """``data`` as strict JSON text (RFC 8259): what every ``--json`` prints.

    Values read from a checkpoint can be anything a pickle holds, so they are made plain first:
    sets and tuples become lists (sets sorted), paths and unknown objects their ``str``, enums
    their value, dataclasses dicts, mapping keys strings. Non-finite floats, which JSON has no
    token for, become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``: a NaN step
    counter stays visible as what it is, where ``null`` would read as "not recorded".
    """
    return json.dumps(_plain(data, set()), indent=2, allow_nan=False)


def _plain(value: Any, path: set[int]) -> Any:
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, path)
    if isinstance(value, (bool, int, float, str)):
        return _number(value)
    if isinstance(value, PurePath):
        return str(value)
    if id(value) in path:  # render builds fresh data; a cycle here would be a bug, not a hang
        return "<circular>"
    path.add(id(value))
    try:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: _plain(getattr(value, f.name), path) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {_key(k): _plain(v, path) for k, v in value.items()}
        if isinstance(value, (set, frozenset)):
            items = [_plain(v, path) for v in value]
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
        if isinstance(value, (list, tuple, range)):
            return [_plain(v, path) for v in value]
    finally:
        path.discard(id(value))
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item):
        try:
            got = item()
        except Exception:  # anything odd is shown as text
            return str(value)
        if got is None or isinstance(got, (bool, int, float, str)):
            return _plain(got, path)
    return str(value)


def _number(value: bool | int | float | str) -> Any:
    """A subclass of a JSON scalar type as the plain type; non-finite floats as strings."""
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            plain = kind(value)
            break
    if isinstance(plain, float) and not math.isfinite(plain):
        return "NaN" if math.isnan(plain) else ("Infinity" if plain > 0 else "-Infinity")
    return plain


def _key(key: Any) -> str:
    plain = _plain(key, set())
    return plain if isinstance(plain, str) else json.dumps(plain)


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# --- output for a pipe, and names that stay whole on a terminal ---------------------------------


def plain_lines(renderable: RenderableType) -> list[str]:
    """What the tables of a report say, as lines for a pipe: one record per line, never wrapped.

    Each table gives a ``# title`` line, a tab-separated header (when the table shows one) and
    one tab-separated line per row; tables are separated by a blank line. Cells are the text a
    terminal shows (escaped by :func:`text`, so a tab or newline inside a name cannot split a
    record) and lines carry no trailing spaces: ``grep``, ``cut -f`` and ``awk -F'\\t'`` work.
    """
    lines: list[str] = []
    for part in _parts(renderable):
        if lines:
            lines.append("")
        if isinstance(part, Table):
            lines.extend(_table_lines(part))
        else:
            lines.append(_plain_text(part))
    return lines


def _parts(renderable: RenderableType) -> list[RenderableType]:
    if isinstance(renderable, Group):
        return [p for r in renderable.renderables for p in _parts(r)]
    return [renderable]


def _table_lines(table: Table) -> list[str]:
    lines = [f"# {_plain_text(table.title)}"] if table.title else []
    if table.show_header:
        lines.append("\t".join(_plain_text(c.header) for c in table.columns))
    columns = [list(c.cells) for c in table.columns]
    for row in range(table.row_count):
        lines.append("\t".join(_plain_text(cells[row]) for cells in columns).rstrip())
    if table.caption:
        lines.append(f"# {_plain_text(table.caption)}")
    return lines


def _plain_text(cell: object) -> str:
    if isinstance(cell, NameCell):
        return cell.name
    if isinstance(cell, Text):
        return cell.plain.rstrip()
    return printable(cell).rstrip()


class NameCell:
    """A file name in a table: whole when the column has room; on a terminal too narrow for it,
    cut in the middle (``zero_pp_rank_1…optim_states.pt``) so both ends, which tell the rank and
    the role, stay readable. Never folded over two lines, which reads as two names."""

    _MIN = 16  # the narrowest a name is squeezed to, before Rich gives up on the table's width

    def __init__(self, name: object) -> None:
        self.name = printable(name)

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement(min(len(self.name), self._MIN), len(self.name))

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield Text(middle_ellipsis(self.name, options.max_width), no_wrap=True, overflow="crop")


def middle_ellipsis(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters by replacing its middle with one ``…``."""
    if len(name) <= width:
        return name
    if width <= 1:
        return name[:width]
    keep = width - 1
    head = (keep + 1) // 2
    return f"{name[:head]}…{name[len(name) - (keep - head) :] if keep > head else ''}"


# --- result lines and --json results of the commands that write --------------------------------


def consolidate_line(result: Any) -> str:
    """to-fp32's one result line."""
    tied = f" + {result.aliases} tied" if result.aliases else ""
    files = f", {result.files} files" if result.files > 1 else ""
    line = (
        f"wrote {result.out} ({result.format}{files}): {result.tensors} tensors{tied}, "
        f"{human_bytes(result.nbytes)} in {result.seconds:.2f} s; source: {result.source}"
        + _hf_folder_part(result)
        + (f"; read {result.picked}" if getattr(result, "picked", "") else "")
    )
    optim = getattr(result, "optimizer", None)
    if optim is not None:
        frozen = f", {optim.frozen} frozen without state" if optim.frozen else ""
        line += (
            f"; optimizer state: {optim.path} ({optim.format}): {', '.join(optim.keys)} of "
            f"{optim.parameters} parameters in {optim.groups} groups{frozen}, "
            f"{human_bytes(optim.nbytes)}"
        )
    return line


def _hf_folder_part(result: Any) -> str:
    """What made OUT a Hugging Face folder (docs/hf.md), for to-fp32's result line."""
    hf = getattr(result, "hf", None)
    if hf is None:
        return ""
    if getattr(hf, "merged", None) is not None:
        part = (
            f"; LoRA adapter {hf.adapter_name!r} merged into {len(hf.merged)} weights of "
            f"{hf.base} (W + (B @ A) * {hf.scaling:g} in fp32, as PEFT's merge_and_unload): "
            f"copied {', '.join(hf.copied) or 'nothing'}"
        )
        if hf.dtype_from_config:
            part += f"; dtype {result.dtype} from {hf.base}/config.json"
        return part + _not_copied(hf)
    if getattr(hf, "adapter_name", None) is not None:
        part = (
            f"; PEFT adapter {hf.adapter_name!r} (its name removed from the keys, as PEFT "
            f"saves them): copied {', '.join(hf.copied) or 'nothing'}"
        )
        return part + _not_copied(hf)
    opt_out = "; --no-hf for the weights alone" if hf.why != "--hf" else ""
    part = f"; Hugging Face folder ({hf.why}{opt_out}): copied {', '.join(hf.copied) or 'nothing'}"
    if result.tied_left_out:
        part += f"; tied {', '.join(result.tied_left_out)} left out as save_pretrained does"
    if hf.dtype_from_config:
        part += f"; dtype {result.dtype} from config.json"
    return part + _not_copied(hf)


def _not_copied(hf: Any) -> str:
    """The base or adapter folder's files left out of OUT, and why."""
    if not hf.not_copied:
        return ""
    return "; not copied: " + ", ".join(f"{n} ({why})" for n, why in hf.not_copied)


def consolidate_json(result: Any, dtype: str) -> dict[str, Any]:
    """to-fp32 --json; keys are documented in docs/json.md."""
    return {
        "schema": JSON_SCHEMA_VERSION,
        "path": str(result.out),
        "format": result.format,
        "dtype": getattr(result, "dtype", "") or dtype,
        "files": result.files,
        "tensors": result.tensors,
        "tied_aliases": result.aliases,
        "bytes": result.nbytes,
        "seconds": round(result.seconds, 3),
        "source": result.source,
        "optimizer": _optimizer_json(getattr(result, "optimizer", None)),
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "step": result.step,
        "hf": _hf_folder_json(result),
    }


def _optimizer_json(optim: Any) -> dict[str, Any] | None:
    if optim is None:
        return None
    return {
        "path": str(optim.path),
        "format": optim.format,
        "parameters": optim.parameters,
        "frozen": optim.frozen,
        "groups": optim.groups,
        "keys": list(optim.keys),
        "bytes": optim.nbytes,
    }


def _hf_folder_json(result: Any) -> dict[str, Any] | None:
    hf = getattr(result, "hf", None)
    if hf is None:
        return None
    return {
        "folder": None if hf.folder is None else str(hf.folder.path),
        "why": hf.why,
        "adapter_name": getattr(hf, "adapter_name", None),
        "merged": None if getattr(hf, "merged", None) is None else list(hf.merged),
        "base": None if getattr(hf, "base", None) is None else str(hf.base),
        "copied": list(hf.copied),
        "not_copied": [{"name": n, "why": why} for n, why in hf.not_copied],
        "dtype_from_config": hf.dtype_from_config,
        "tied_left_out": list(getattr(result, "tied_left_out", ())),
    }


def reshape_topologies(result: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(source, target) ``{pp, tp, dp}`` of a ZeRO or pipeline reshape result."""
    plan = result.plan
    if hasattr(plan, "src"):  # a pipeline plan
        return _topology(plan.src), _topology(plan.dst)
    return {"pp": 1, "tp": 1, "dp": plan.source_dp}, {"pp": 1, "tp": 1, "dp": plan.dp}


def _topology(t: Any) -> dict[str, int]:
    return {"pp": t.pp, "tp": t.tp, "dp": t.dp}


def reshape_line(result: Any, empty_ranks: int = 0) -> str:
    """reshape's one result line (also after --dry-run), with the empty target ranks if any."""
    src, dst = reshape_topologies(result)
    move = (
        f"PP {src['pp']} x TP {src['tp']} x DP {src['dp']} -> "
        f"PP {dst['pp']} x TP {dst['tp']} x DP {dst['dp']}"
    )
    plan = result.plan
    if not hasattr(plan, "src"):
        kind = result.what
        move = (
            f"{kind} resharded from DP {src['dp']} to DP {dst['dp']}"
            if result.written
            else f"{kind} DP {src['dp']} -> {dst['dp']}"
        )
    empty = f"; {empty_ranks} of {_world(dst)} target ranks hold no elements" if empty_ranks else ""
    if not result.written:
        return f"dry run: {move}; nothing written (would write {result.out}/{result.tag}/){empty}"
    return (
        f"wrote {result.out} (tag {result.tag}): {move}, {len(result.files)} files, "
        f"{human_bytes(result.nbytes)}{empty}{skipped_note(result.skipped)}"
    )


def _world(topology: dict[str, int]) -> int:
    return topology["pp"] * topology["tp"] * topology["dp"]


def reshape_json(
    result: Any, seconds: float, empty_ranks: int, write_plan: Any = None
) -> dict[str, Any]:
    """reshape --json (and --dry-run --json, with the write plan: every file and its byte
    ranges); keys are documented in docs/json.md."""
    src, dst = reshape_topologies(result)
    data = {
        "schema": JSON_SCHEMA_VERSION,
        "path": str(result.out),
        "tag": result.tag,
        "dry_run": not result.written,
        "source_path": str(result.source),
        "source": src,
        "target": dst,
        "files": list(result.files),
        "bytes": result.nbytes,
        "seconds": round(seconds, 3),
        "empty_ranks": empty_ranks,
    }
    source_ep = getattr(result.plan, "source_ep_sizes", ())
    if source_ep:  # reshape --ep: the expert-parallel sizes before and after
        data["expert_parallel"] = {"source": list(source_ep), "target": list(result.plan.ep_sizes)}
    if write_plan is not None:
        data["plan"] = write_plan.describe(ranges=True)
    return data


def tensor_counts(layout: Layout) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    uncertain = uncertain_kinds(layout)
    for kind in ("trainable", "frozen", "buffer", "tied"):
        chosen = [t for t in layout.tensors if t.kind == kind]
        counts[kind] = {
            "tensors": len(chosen),
            "numel": sum(t.numel for t in chosen),
            "complete": kind not in uncertain,
        }
    return counts


def uncertain_kinds(layout: Layout) -> set[str]:
    """The tensor kinds an unreadable file may hold more of: their counts are a lower bound.

    Trainable tensors are listed by the optimizer files (ZeRO) or the model states and layer
    files (no ZeRO, pipelines); frozen tensors and buffers by the model states; tied aliases
    point at any of them.
    """
    if layout.kind == "unreadable":
        return {"trainable", "frozen", "buffer", "tied"}
    roles = {f.name: f.role for f in layout.files}
    bad = {roles.get(name) for name in layout.unreadable}
    kinds = set()
    if Role.OPTIM in bad:
        kinds.add("trainable")
    if bad & {Role.MODEL, Role.ZERO3_MODEL}:
        kinds |= {"frozen", "buffer"}
        if layout.kind in ("plain", "pipeline"):
            kinds.add("trainable")
    if Role.LAYER in bad and not layout.zero_sources:  # no ZeRO: the layer files are the weights
        kinds.add("trainable")
    if kinds:
        kinds.add("tied")
    return kinds


def file_coordinates(layout: Layout, f: RankFile) -> dict[str, int | None]:
    """(pp, tp, dp, layer) of a file; mp ranks split into stage and TP rank."""
    pp = tp = None
    if f.mp is not None:
        pp, tp = divmod(f.mp, layout.tp)
    if f.role is Role.LAYER:
        tp = f.tp
    return {"pp": pp, "tp": tp, "dp": f.dp, "layer": f.layer}


def layout_json(layout: Layout, params: bool = False) -> dict[str, Any]:
    """The facts of a layout as JSON-ready data; keys are documented in docs/json.md."""
    data: dict[str, Any] = {
        "schema": JSON_SCHEMA_VERSION,
        "path": str(layout.root),
        "tag": layout.tag,
        "kind": layout.kind,
        "zero_stage": layout.zero_stage,
        "optimizer": layout.optimizer,
        "param_dtype": layout.param_dtype,
        "master_dtype": layout.master_dtype,
        "topology": {
            "pp": layout.pp,
            "tp": layout.tp,
            "dp": layout.dp,
            "world_size": layout.world_size,
        },
        "iteration": layout.iteration,
        "ds_version": layout.ds_version,
        "counts": tensor_counts(layout),
        "bytes_on_disk": layout.bytes_on_disk,
        "files": [
            {
                "name": f.name,
                "role": f.role.value,
                "size": f.size,
                "prefix": f.prefix,
                "readable": f.name not in layout.unreadable,
                **file_coordinates(layout, f),
                **({"expert": f.expert} if f.role is Role.EXPERT else {}),
            }
            for f in layout.files
        ],
        "findings": findings_json(layout.findings),
        "other_tags": list(layout.other_tags),
        "unreadable_files": list(layout.unreadable),
    }
    if layout.universal is not None:
        data["universal"] = universal_json(layout)
    if layout.moe is not None:
        data["moe"] = moe_json(layout.moe, layout.dp)
    if params:
        data["params"] = [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "kind": t.kind,
                "group": t.group,
                "placement": t.placement,
                "alias_of": t.alias_of,
            }
            for t in layout.tensors
        ]
    return data


def layout_report(layout: Layout, params: bool = False) -> RenderableType:
    """Summary, files by rank, the layer grid (pipelines), parameters, findings."""
    parts: list[RenderableType] = [_summary(layout), _files(layout)]
    if any(f.role is Role.LAYER for f in layout.files):
        parts.append(_layer_grid(layout))
    if layout.moe is not None:
        parts.extend(moe_tables(layout.moe, layout.dp))
    if params:
        parts.append(_params(layout))
    parts.append(findings_table(layout))
    return Group(*parts)


def _summary(layout: Layout) -> Table:
    table = Table(
        title="Checkpoint", show_header=False, title_justify="left", box=None, padding=(0, 2)
    )
    table.add_column(style="bold")
    table.add_column()
    kinds = {
        "zero": f"ZeRO stage {layout.zero_stage}",
        "zero3": "ZeRO stage 3",
        "plain": "no ZeRO (stage 0)",
        "universal": "universal checkpoint",
        "pipeline": f"pipeline / 3D (ZeRO stage {layout.zero_stage})",
    }
    if layout.kind == "unreadable":
        return _unreadable_summary(table, layout)
    counts = tensor_counts(layout)
    # What an unreadable file held is unknown: say so rather than show it as "?" or empty.
    unread = "unreadable" if layout.unreadable else "?"
    master_unread = unread if any(n.endswith("optim_states.pt") for n in layout.unreadable) else "?"
    rows = [
        ("path", f"{layout.root}" + (f"  (tag {layout.tag})" if layout.tag else "")),
        ("layout", kinds.get(layout.kind, layout.kind)),
        (
            "optimizer files",
            {
                "zero": "DeepSpeed ZeRO optimizer",
                "bf16_optimizer": "DeepSpeed BF16_Optimizer",
                "torch": "plain torch optimizer in model states",
                "universal": "ds_to_universal's zero/<param>/ folders",
                "none": "none",
            }.get(layout.optimizer, layout.optimizer),
        ),
        (
            "dtypes",
            f"params {layout.param_dtype or unread}, master {layout.master_dtype or master_unread}",
        ),
        (
            "topology",
            f"TP {layout.tp} x PP {layout.pp} x DP {layout.dp} = world size {layout.world_size}",
        ),
        ("iteration", str(layout.iteration)),
        ("DeepSpeed", str(layout.ds_version)),
    ]
    for kind in ("trainable", "frozen", "buffer", "tied"):
        c = counts[kind]
        label = {"buffer": "buffers", "tied": "tied aliases"}.get(kind, kind)
        noun = "tensor" if c["tensors"] == 1 else "tensors"
        value = f"{c['tensors']} {noun}, {human_count(c['numel'])} elements"
        if not c["complete"]:
            value = "unreadable" if not c["tensors"] else f"at least {value} (files unreadable)"
        rows.append((label, value))
    rows.append(("on disk", f"{human_bytes(layout.bytes_on_disk)} in {len(layout.files)} files"))
    if layout.universal is not None:
        rows.append(("zero/", _universal_line(layout)))
    if layout.moe is not None:
        rows.insert(5, ("experts", moe_line(layout.moe)))
    for key, value in rows:
        _row(table, key, value)
    return table


def _unreadable_summary(table: Table, layout: Layout) -> Table:
    """The summary of a checkpoint whose model states cannot be read: only the file names speak."""
    rows = [
        ("path", f"{layout.root}" + (f"  (tag {layout.tag})" if layout.tag else "")),
        ("layout", "unknown: the model states are unreadable"),
        ("files", f"{len(layout.files)} rank files; unreadable: {', '.join(layout.unreadable)}"),
        ("on disk", f"{human_bytes(layout.bytes_on_disk)} in {len(layout.files)} files"),
    ]
    for key, value in rows:
        _row(table, key, value)
    return table


def universal_json(layout: Layout) -> dict[str, Any]:
    """A universal checkpoint's zero/ folders: which optimizer state each holds."""
    info = layout.universal
    assert info is not None
    return {
        "source_zero_stage": info.source_stage,
        "param_groups": info.param_groups,
        "bytes_on_disk": info.bytes_on_disk,
        "universal_checkpoint_info": dict(info.patterns),
        "params": [
            {
                "name": p.name,
                "trainable": p.trainable,
                "states": sorted(p.states) + (["step"] if p.step is not None else []),
                "step": p.step,
                "vocab_rows": p.vocab_rows,
            }
            for p in info.params
        ],
    }


def _universal_line(layout: Layout) -> str:
    info = layout.universal
    assert info is not None
    trainable = [p for p in info.params if p.trainable]
    held = sorted(
        {s for p in trainable for s in p.states}
        | ({"step"} if any(p.step is not None for p in trainable) else set())
    )
    copies = len(info.params) - len(trainable)
    # ds_to_universal also copies module tensors (buffers, frozen) there, cast to float32.
    extra = f" + {copies} module copies" if copies else ""
    return (
        f"{len(trainable)} parameters ({' '.join(held) or 'no state'}){extra}, "
        f"{human_bytes(info.bytes_on_disk)}"
    )


def _files(layout: Layout) -> Table:
    table = Table(title="Files by rank", title_justify="left")
    # No role column: the name ends in it (model_states, optim_states), and the width it took
    # is what keeps a pipeline's longest name (47 characters) whole in 80 columns.
    for col in ("pp", "tp", "dp", "file", "size"):
        numeric = col in ("pp", "tp", "dp", "size")
        # Only the name gives way on a narrow terminal (NameCell cuts its middle): the short
        # columns keep their width, and nothing is folded mid-name.
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)
    ordered = sorted(
        (f for f in layout.files if f.role is not Role.LAYER),
        key=lambda f: (f.mp or 0, -1 if f.dp is None else f.dp, f.role.value),
    )
    for f in ordered:
        c = file_coordinates(layout, f)
        size: object = human_bytes(f.size)
        if f.name in layout.unreadable:
            size = Text(f"{size} unreadable", style="bold red")
        _row(table, *(_opt(c[k]) for k in ("pp", "tp", "dp")), NameCell(f.name), size)
    return table


def _layer_grid(layout: Layout) -> Table:
    by_layer: dict[int, dict[int, int]] = defaultdict(dict)
    unreadable: set[tuple[int, int]] = set()
    for f in layout.files:
        if f.role is Role.LAYER and f.layer is not None and f.tp is not None:
            by_layer[f.layer][f.tp] = f.size
            if f.name in layout.unreadable:
                unreadable.add((f.layer, f.tp))
    tps = sorted({tp for row in by_layer.values() for tp in row})
    table = Table(title="Layer files (layer x TP rank)", title_justify="left")
    table.add_column("layer", justify="right")
    for tp in tps:
        table.add_column(f"tp {tp}", justify="right")
    for layer in sorted(by_layer):
        _row(
            table,
            str(layer),
            *(
                Text("unreadable", style="bold red")
                if (layer, tp) in unreadable
                else human_bytes(by_layer[layer][tp])
                if tp in by_layer[layer]
                else Text("missing", style="bold red")
                for tp in tps
            ),
        )
    return table


def _params(layout: Layout) -> Table:
    table = Table(title="Parameters", title_justify="left")
    for col in ("name", "shape", "dtype", "kind", "placement"):
        table.add_column(col, overflow="fold")
    for t in layout.tensors:
        _row(table, t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.kind, t.placement)
    return table


def findings_table(layout: Layout) -> RenderableType:
    if not layout.findings:
        return Text("No problems found.", style="green")
    table = Table(title="Findings", title_justify="left", show_lines=False)
    table.add_column("level")
    table.add_column("what", overflow="fold")
    for f in sorted(layout.findings, key=lambda x: x.level != ERROR):
        _row(table, text(f.level, _LEVEL_STYLE.get(f.level, "")), f.message)
    return table


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


# --- topology maps (show-map, reshape --dry-run) ------------------------------------------------

_SHOWN = 4  # per-rank items spelled out in one cell before summarising


def _span(values: list[int] | tuple[int, ...] | range) -> str:
    items = list(values)
    if not items:
        return "-"
    if items == list(range(items[0], items[-1] + 1)) and len(items) > 2:
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))


def _few(parts: list[str]) -> str:
    return listed(parts, _SHOWN, "; ", "; and {} more")


def findings_json(findings: Iterable[Finding]) -> list[dict[str, str]]:
    return [{"level": x.level, "code": x.code, "message": x.message} for x in findings]


def map_json(tmap: TopologyMap, findings: Iterable[Finding] = ()) -> dict[str, Any]:
    """The maps as JSON-ready data, with the checkpoint's findings (the same as ``inspect``)."""

    def topo(t: Any) -> dict[str, int]:
        return {"pp": t.pp, "tp": t.tp, "dp": t.dp}

    data: dict[str, Any] = {
        "schema": JSON_SCHEMA_VERSION,
        "source": {**topo(tmap.src), "stage_parts": list(tmap.src_parts)},
        "ranks": [
            {
                "stage": r.stage,
                "tp": r.tp_rank,
                "mp": r.mp_rank,
                "layers": list(r.layers),
                "model_file": r.model_file,
                "model_files": list(r.model_files),
                "optim_files": list(r.optim_files),
            }
            for r in tmap.rows
        ],
        "findings": findings_json(findings),
    }
    if tmap.moe is not None:
        data["moe"] = moe_json(tmap.moe, tmap.src.dp)
    if tmap.expert_targets:
        data["expert_targets"] = [
            {
                "group": e.group,
                "name": e.name,
                "ep_size": e.ep_size,
                "expert_dp_size": e.edp_size,
                "dp_sources": [list(d) for d in e.dp_sources],
            }
            for e in tmap.expert_targets
        ]
    if tmap.dst is not None:
        data["target"] = {
            **topo(tmap.dst),
            "stage_parts": list(tmap.dst_parts),
            "partition_method": tmap.method,
            "layer_specs": tmap.layer_specs or None,
            "layer_specs_inferred": tmap.specs_inferred,
            "tp_unit": tmap.tp_unit,
        }
        data["targets"] = [
            {
                "stage": t.stage,
                "tp": t.tp_rank,
                "mp": t.mp_rank,
                "layers": list(t.layers),
                "source_stages": list(t.source_stages),
                "tp_pieces": [
                    {
                        "src_tp": p.src,
                        "src_start": p.src_start,
                        "length": p.length,
                        "dst_start": p.dst_start,
                    }
                    for p in t.tp_pieces
                ],
                "dp_sources": [list(d) for d in t.dp_sources],
            }
            for t in tmap.targets
        ]
    return data


def map_report(tmap: TopologyMap) -> RenderableType:
    """The source layout by stage, and the old -> new map when a target is set."""
    src = tmap.src
    title = f"Source: PP {src.pp} x TP {src.tp} x DP {src.dp}"
    table = Table(title=title, title_justify="left")
    # Layer columns only where there are layer files (pipelines): for ZeRO they would say "0"
    # and "-", and take the width a model-states name needs (ZeRO-3's are 44 characters).
    layered = any(r.layers for r in tmap.rows)
    columns = ["stage", "layers", "tp", "model states", "layer files", "optimizer files (by dp)"]
    if not layered:
        columns = [c for c in columns if c not in ("layers", "layer files")]
    for col in columns:
        table.add_column(col, overflow="fold")
    by_stage: dict[int, list[Any]] = defaultdict(list)
    for row in tmap.rows:
        by_stage[row.stage].append(row)
    for stage, rows in sorted(by_stage.items()):
        layers = (
            range(tmap.src_parts[stage], tmap.src_parts[stage + 1]) if tmap.src_parts else range(0)
        )
        first, last = rows[0], rows[-1]
        model = _model_cell(first, last, len(rows))
        with_files = sorted({x for r in rows for x in r.layers})
        dps = len(first.optim_files)
        optim = (
            f"{dps} per TP rank: zero_pp_rank_0..{dps - 1}"
            if dps > 1
            else (first.optim_files[0] if dps and len(rows) == 1 else f"{dps} per TP rank")
        )
        cells: list[object] = [
            str(stage),
            _span(layers),
            _span([r.tp_rank for r in rows]),
            NameCell(model),
            f"layer_{_span(with_files)} x {len(rows)} TP" if with_files else "-",
            optim,
        ]
        if not layered:
            del cells[4], cells[1]
        _row(table, *cells)
    parts: list[RenderableType] = [table]
    if tmap.moe is not None:
        parts.append(expert_placement_table(tmap.moe, src.dp))
    if tmap.dst is not None:
        parts.append(_targets_table(tmap))
        if tmap.expert_targets:
            parts.append(_expert_targets_table(tmap))
    return Group(*parts)


def _model_cell(first: Any, last: Any, n_rows: int) -> str:
    """The model-states file(s) of a stage, named as DeepSpeed names them: one file per rank,
    or under ZeRO-3 one per DP rank (``zero_pp_rank_D_mp_rank_MM_model_states.pt``)."""
    if first.model_file is None:
        dps = len(first.model_files)
        mp = f"{first.mp_rank:02d}" if n_rows == 1 else f"{first.mp_rank:02d}..{last.mp_rank:02d}"
        return f"zero_pp_rank_0..{dps - 1}_mp_rank_{mp}_model_states.pt"
    if n_rows == 1:
        return str(first.model_file)
    return f"mp_rank_{first.mp_rank:02d}..{last.mp_rank:02d}"


def _targets_table(tmap: TopologyMap) -> Table:
    dst = tmap.dst
    assert dst is not None
    table = Table(
        title=text(
            f"Target: PP {dst.pp} x TP {dst.tp} x DP {dst.dp} "
            f"(layers by '{tmap.method}'; TP pieces in 1/{tmap.tp_unit} of a split dim)"
        ),
        title_justify="left",
    )
    for col in ("stage'", "layers", "from stages", "TP' <- source TP slices", "DP' <- source DP"):
        table.add_column(col, overflow="fold")
    by_stage: dict[int, list[Any]] = defaultdict(list)
    for t in tmap.targets:
        by_stage[t.stage].append(t)
    for stage, targets in sorted(by_stage.items()):
        tp_cells = [
            f"{t.tp_rank}<-"
            + "+".join(f"{p.src}[{p.src_start}:{p.src_start + p.length}]" for p in t.tp_pieces)
            for t in targets
        ]
        dp_cells = [f"{d}<-{_span(srcs)}" for d, srcs in enumerate(targets[0].dp_sources)]
        _row(
            table,
            str(stage),
            _span(targets[0].layers),
            _span(targets[0].source_stages),
            _few(tp_cells),
            _few(dp_cells),
        )
    if tmap.layer_specs:
        how = "inferred from the files; --layer-specs to set" if tmap.specs_inferred else "given"
        table.caption = text(f"layer specs ({how}): {tmap.layer_specs}")
        table.caption_justify = "left"
    return table


def zero_reshape_table(result: Any) -> Table:
    """A ZeRO reshape's plan: per group and target rank, where the partition comes from. The
    title names what is reshaped as the result line does (``ZeRO-1 MoE (expert parallelism 2
    kept)``, ``universal checkpoint -> native ZeRO-2``)."""
    plan = result.plan
    table = Table(title=f"{result.what}: DP {plan.source_dp} -> {plan.dp}", title_justify="left")
    table.add_column("group")
    table.add_column("rank", justify="right")
    table.add_column("elements", justify="right")
    table.add_column("padding", justify="right")
    origin = "zero/<parameter>" if plan.run_sources else "source rank"
    table.add_column(Text(f"from: {origin}[elements]->offset"), overflow="fold")
    for group, rank, numel, padding, sources in plan.rows():
        _row(table, group, str(rank), str(numel), str(padding), sources)
    if plan.frozen:
        table.caption = (
            f"{len(plan.frozen)} frozen parameter(s) re-split the same way into "
            f"ceil(numel/{plan.dp}) fragments per rank"
        )
    return table


# --- mixture of experts (inspect, show-map) ----------------------------------------------------


def moe_line(moe: MoeLayout) -> str:
    """One line: how many MoE layers, experts, EP and EDP sizes."""
    kind = "AutoEP" if moe.autoep else "DeepSpeed MoE"
    experts = sorted({layer.num_experts for layer in moe.layers})
    degrees = sorted({(layer.ep_size, layer.edp_size) for layer in moe.layers})
    return (
        f"{len(moe.layers)} {kind} layer{'s' if len(moe.layers) != 1 else ''} of "
        f"{'/'.join(map(str, experts))} experts; "
        + ", ".join(f"EP {_unknown(ep)} x EDP {_unknown(edp)}" for ep, edp in degrees)
    )


def _unknown(n: int) -> str:
    return str(n) if n else "?"


def moe_json(moe: MoeLayout, dp: int) -> dict[str, Any]:
    """The MoE layout as JSON-ready data (docs/json.md, docs/moe.md)."""
    return {
        "autoep": moe.autoep,
        "layers": [
            {
                "layer": layer.ordinal,
                "module": layer.module,
                "num_experts": layer.num_experts,
                "ep_size": layer.ep_size or None,
                "expert_dp_size": layer.edp_size or None,
                "expert_group": layer.group_name or None,
                "experts_by_ep_rank": [list(p) for p in layer.placement()],
                "expert_files": list(layer.files),
                "dp_ranks_by_ep_rank": [
                    list(range(r, dp, layer.ep_size)) for r in range(layer.ep_size)
                ]
                if layer.ep_size
                else None,
            }
            for layer in moe.layers
        ],
        "expert_groups": [
            {
                "group": g.index,
                "name": g.name,
                "ep_size": g.ep_size,
                "expert_dp_size": g.edp_size,
                "layers": list(g.layers),
                "position_in_file": list(g.file_index),
                "files_by_ep_rank": [list(g.files_of(r)) for r in range(g.ep_size)],
            }
            for g in moe.groups
        ],
        "expp_files": list(moe.expp_files),
    }


def moe_tables(moe: MoeLayout, dp: int) -> list[RenderableType]:
    """inspect: the MoE layers, and which EP rank (and DP ranks) hold which experts."""
    layers = Table(title="MoE layers", title_justify="left")
    for col in ("layer", "module", "experts", "EP", "expert DP", "group", "expert files"):
        layers.add_column(col, overflow="fold")
    for layer in moe.layers:
        _row(
            layers,
            str(layer.ordinal),
            layer.module,
            str(layer.num_experts),
            _unknown(layer.ep_size),
            _unknown(layer.edp_size),
            layer.group_name or "?",
            f"layer_{layer.ordinal}_expert_{_span(range(layer.num_experts))}_mp_rank_00"
            if layer.files
            else "none (in the ZeRO-3 shards)",
        )
    return [layers, expert_placement_table(moe, dp)]


def expert_placement_table(moe: MoeLayout, dp: int) -> Table:
    """Per EP size and EP rank: the experts of each layer it holds and the files holding them
    (expert files; under ZeRO-1/2 the optimizer files of its expert-data-parallel group)."""
    table = Table(title="Experts by expert-parallel rank", title_justify="left")
    for col in ("EP", "EP rank", "DP ranks", "experts (layer: global ids)", "optimizer files"):
        table.add_column(col, overflow="fold")
    for ep in sorted({layer.ep_size for layer in moe.layers if layer.ep_size}):
        members = [layer for layer in moe.layers if layer.ep_size == ep]
        groups = [g for g in moe.groups if g.ep_size == ep]
        for rank in range(ep):
            ranks = list(range(rank, dp, ep))
            held = "; ".join(f"{x.ordinal}: {_span(x.placement()[rank])}" for x in members)
            if groups:
                files = "zero_pp_rank_" + _span(groups[0].files_of(rank))
            elif rank < len(moe.expp_files):
                files = moe.expp_files[rank]
            else:
                files = "-"
            _row(table, str(ep), str(rank), _span(ranks), held, files)
    return table


def _expert_targets_table(tmap: TopologyMap) -> Table:
    dst = tmap.dst
    assert dst is not None
    table = Table(
        title=f"Expert groups at DP {dst.dp} (EP unchanged): DP' <- source DP",
        title_justify="left",
    )
    for col in ("group", "EP", "expert DP'", "DP' <- source DP"):
        table.add_column(col, overflow="fold")
    for e in tmap.expert_targets:
        cells = [f"{d}<-{_span(srcs)}" for d, srcs in enumerate(e.dp_sources)]
        _row(table, f"{e.group} ({e.name})", str(e.ep_size), str(e.edp_size), _few(cells))
    return table
