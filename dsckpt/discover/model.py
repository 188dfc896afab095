"""The records discovery returns: a checkpoint's :class:`Layout`, its tensors and its findings.

Frozen data with no behaviour beyond a few derived figures, so every layer above discovery
(planning, execution, rendering) can depend on it without depending on how it was read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dsckpt.discover import zero
from dsckpt.discover.files import RankFile
from dsckpt.errors import DsckptError, InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.load import TensorRef
from dsckpt.printable import listed

if TYPE_CHECKING:
    from dsckpt.discover.moe import MoeLayout
    from dsckpt.discover.universal import UniversalInfo

# The closed vocabularies of a Layout, as types: a misspelt kind is a type error, not a branch
# that silently never matches.
# "unreadable": the model states could not be read (inspect shows what the file names say).
CheckpointKind = Literal["zero", "zero3", "plain", "pipeline", "universal", "unreadable"]
OptimizerKind = Literal["zero", "bf16_optimizer", "torch", "universal", "none", "unknown"]
TensorKind = Literal["trainable", "frozen", "buffer", "tied"]
Level = Literal["error", "warning", "info"]

ERROR: Level = "error"
WARNING: Level = "warning"
INFO: Level = "info"


@dataclass(frozen=True)
class Finding:
    """Something wrong or notable about the checkpoint. ``code`` is a stable slug for tools."""

    level: Level
    code: str
    message: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the consolidated model and where its values come from."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # as saved in the model weights (module dtype), e.g. "bfloat16"
    kind: TensorKind
    placement: str  # how it is partitioned or sliced, for people
    group: int | None = None  # optimizer group (ZeRO-1/2) or sub-group (ZeRO-3)
    alias_of: str | None = None

    @property
    def numel(self) -> int:
        return zero.numel(self.shape)


@dataclass(frozen=True)
class ZeroSources:
    """Byte locations of the fp32 master weights of one model-parallel rank, per DP rank."""

    stage: int
    fp32: tuple[tuple[TensorRef, ...], ...]  # [dp][group or sub-group]
    groups: tuple[zero.Zero12Group, ...] = ()  # ZeRO-1/2 and BF16_Optimizer
    zero3: zero.Zero3Layout | None = None
    # [dp]: OptimMeta.slice_names of each rank (ZeRO-1/2), kept so reshape planning need not
    # read every rank file again
    slice_names: tuple[tuple[tuple[str | None, ...] | None, ...] | None, ...] = ()
    # ZeRO-3 AutoEP: the expert sub-groups (not in ``zero3``), partitioned over their
    # expert-data-parallel ranks only: sub-group -> (partition count, the parameters with their
    # offsets in each rank's flat tensor, each rank holding ceil(numel / count) of each).
    zero3_experts: Mapping[int, tuple[int, tuple[zero.FlatParam, ...]]] = field(
        default_factory=dict
    )


@dataclass(frozen=True)
class Layout:
    """Everything discovery learned about one checkpoint tag."""

    root: Path
    tag: str | None
    dir: Path
    kind: CheckpointKind
    zero_stage: int
    optimizer: OptimizerKind
    pp: int
    tp: int
    dp: int
    param_dtype: str | None
    master_dtype: str | None
    iteration: int | None
    ds_version: str | None
    files: tuple[RankFile, ...]
    tensors: tuple[TensorEntry, ...]
    findings: tuple[Finding, ...]
    other_tags: tuple[str, ...] = ()
    # A Trainer output_dir narrowed to one checkpoint-N: which and why ("" if read as given),
    # and N (also when checkpoint-N/ itself was given).
    picked: str = ""
    step: int | None = None
    # Sources for consolidation (not rendered): fp32 partitions per mp rank, and tensors
    # that live whole in one file (buffers, frozen params, stage-0 weights; in a universal
    # checkpoint, each trainable parameter's zero/<name>/fp32.pt).
    zero_sources: Mapping[int, ZeroSources] = field(default_factory=dict)
    whole: Mapping[str, tuple[TensorRef, ...]] = field(default_factory=dict)
    frozen_fragments: Mapping[str, tuple[TensorRef, ...]] = field(default_factory=dict)
    # Megatron-DeepSpeed's own description of the model (args, checkpoint_info,
    # universal_checkpoint_info), where the run stored it: input to the TP merge rules.
    model_info: Mapping[str, Any] = field(default_factory=dict)
    # Pipelines: stage boundaries over the layer indices (len pp + 1), as far as the files show
    # them (layers without parameters at the very end leave no trace); empty when unknown.
    stage_parts: tuple[int, ...] = ()
    # Every key of the model's state dict as the checkpoint records it independently of the
    # partitions (ZeRO and plain: the keys of `module`; pipelines: param_shapes and the layer
    # files), and where that record is: what a consolidation must write, no more, no less.
    model_keys: tuple[str, ...] = ()
    model_keys_from: str = ""
    # Files that could not be read (damaged, truncated, not a file): what they hold is unknown,
    # so inspect marks what depends on them instead of showing it as empty.
    unreadable: tuple[str, ...] = ()
    # Universal checkpoints: the zero/<param>/ folders (see dsckpt.discover.universal).
    universal: UniversalInfo | None = None
    # Mixture-of-experts checkpoints: layers, experts, their files and expert optimizer groups
    # (see dsckpt.discover.moe); None for a dense model.
    moe: MoeLayout | None = None

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.size for f in self.files)


def missing_files_hint(tag_dir: Path) -> str:
    """What to do about rank files absent from ``tag_dir``: the end of every missing-file error.

    Every rank saves its own files, so a run over several nodes that saves to disks local to each
    node leaves each node's share on that node: by far the most common reason files are missing.
    """
    return (
        "multi-node runs that save to node-local disks leave each node's files on that node: "
        f"copy every node's files of this tag into {tag_dir}"
    )


def first_error(
    findings: Iterable[Finding], hint: str = "; `dsckpt inspect` lists them"
) -> DsckptError | None:
    """The one exception that stands for a checkpoint's error findings, or None without any.

    Unsupported layouts (``unsupported-*`` findings) come first, since nothing else about such a
    checkpoint can be fixed by the user; otherwise the first error in discovery order. The
    message is that finding's, with how many more there are (``hint`` says where to see them).
    Every command that turns findings into an error (the writing commands' gate, the exit
    status of ``inspect`` and ``show-map``) goes through here.
    """
    errors = sorted(
        (f for f in findings if f.level == ERROR),
        key=lambda f: not f.code.startswith("unsupported"),
    )
    if not errors:
        return None
    first = errors[0]
    cls = UnsupportedLayout if first.code.startswith("unsupported") else InconsistentCheckpoint
    return cls(listed(errors, 1, more=f" (and {{}} more{hint})", each=lambda e: e.message))
