"""Mixture-of-experts (MoE) layouts as data: which experts exist, where each is saved, and how
the optimizer partitions them. Pure records and integer arithmetic (no torch, no file access).

:class:`MoeLayout` is what discovery learns about a DeepSpeed MoE checkpoint (native
``deepspeed.moe.layer.MoE`` and AutoEP); it is ``Layout.moe`` (None for a dense checkpoint).
DeepSpeed 0.19.8's own code (``engine.py`` ``_save_moe_checkpoint``, ``_get_expert_ckpt_name``,
``load_moe_state_dict``; ``utils/groups.py``) is the ground truth it was read from:

Topology. Expert parallelism (EP) runs inside data parallelism (DP): with ``ep`` experts-ranks
per MoE layer, DP rank ``d`` is expert-parallel rank ``d % ep`` and expert-data-parallel (EDP)
rank ``d // ep``; EP groups are consecutive ranks, EDP groups stride by ``ep``. EP rank ``R``
owns the global experts ``[R * n_local, (R + 1) * n_local)`` with ``n_local = num_experts / ep``.
A model can mix EP sizes (one per MoE layer): each EP size has optimizer groups of its own.

Files. :class:`MoeLayer` lists one file per global expert,
``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` (``L`` the layer ordinal, counted over the
MoE modules in ``named_modules()`` order; ``E`` the global id), holding that expert's tensors in
the model dtype under their global names. The non-expert weights stay in
``mp_rank_00_model_states.pt``. Without ZeRO, the optimizer is saved per EP rank in
``expp_rank_{R}_mp_rank_00_optim_states.pt`` (:attr:`MoeLayout.expp_files`).

Optimizer groups (ZeRO-1/2, BF16_Optimizer). Expert parameters sit in groups of their own,
appended after the dense groups and named ``ep_size_{EP}`` (two groups may share a name).
:class:`ExpertGroup` is one of them: its ``partition_count`` is the EDP size, not the DP size,
and file ``d`` holds EDP rank ``d // ep``'s slice of EP rank ``d % ep``'s local experts, under
**local** names (``deepspeed_experts.0 .. n_local - 1``; AutoEP: the fused ``experts.w1`` of the
local experts). The group order can differ between files of one checkpoint (it comes from a
Python set): discovery matches each file's groups to ``param_shapes`` order by names and sizes
and records where each group sits in each file (:attr:`ExpertGroup.file_index`).
``Layout.zero_sources[0]`` is in that canonical order: ``fp32[d][g]``, ``groups[g]`` (for an
expert group, the partition of **one** EP rank's flat buffer over its EDP ranks, in local
names; the same for every EP rank) and ``slice_names[d][g]``.

:class:`ExpertParam` says where each local parameter of an EP rank goes in the consolidated
state dict: the key with the global expert id (AutoEP: the fused key, this EP rank's experts
starting at ``dst_start``). A consumer reading expert group ``g`` for EP rank ``R`` takes the
flat pieces of ``groups[g]`` (partition ranks = EDP ranks) from the files
``ExpertGroup.files_of(R)``: EDP rank ``k`` is DP rank ``R + k * ep``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dsckpt.discover.zero import FlatParam

# Native MoE: the experts of module M are M.deepspeed_moe.experts.deepspeed_experts.<id>.<rest>
NATIVE_EXPERT = re.compile(
    r"^(?P<module>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<id>\d+)\.(?P<rest>.+)$"
)
# AutoEP: the fused tensors of module M's local experts, M.experts.w1 / w2 / w3
AUTOEP_FUSED = ("w1", "w2", "w3")
EXPERT_GROUP_NAME = re.compile(r"^ep_size_(?P<ep>\d+)$")


def native_expert_name(module: str, expert: int, rest: str) -> str:
    """A native expert parameter's state-dict key: expert ``expert`` (a local or global id) of
    MoE module ``module``, ``rest`` its name inside the expert (``up.weight``)."""
    return f"{module}.deepspeed_moe.experts.deepspeed_experts.{expert}.{rest}"


def expert_file_name(layer: int, expert: int, mp: int = 0) -> str:
    """The file DeepSpeed saves global expert ``expert`` of MoE layer ``layer`` in."""
    return f"layer_{layer}_expert_{expert}_mp_rank_{mp:02d}_model_states.pt"


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer: its experts, their placement over EP ranks and their files.

    Attributes:
        ordinal: ``L`` in the expert file names (MoE layers in ``named_modules()`` order).
        module: the module path (``moe1``, ``model.layers.0.mlp``).
        num_experts: global experts.
        ep_size: expert-parallel degree; 0 when the checkpoint does not say (ZeRO-0 with
            several EP sizes).
        edp_size: expert-data-parallel degree (DP / EP); 0 when ``ep_size`` is.
        group_name: the optimizer's expert group name, ``ep_size_{EP}``.
        autoep: an AutoEP layer (fused ``experts.w1/w2/w3``) rather than a native ``MoE``.
        files: per global expert, the name of its file; empty when the experts are saved in
            no file of their own (AutoEP ZeRO-3: in the ZeRO-3 shards).
        keys: per global expert, the state-dict keys its file holds (global ids); empty for a
            file that is missing or unreadable.
    """

    ordinal: int
    module: str
    num_experts: int
    ep_size: int
    edp_size: int
    group_name: str
    autoep: bool
    files: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...]

    @property
    def n_local(self) -> int:
        """Experts per EP rank."""
        return self.num_experts // self.ep_size if self.ep_size else 0

    def placement(self) -> tuple[tuple[int, ...], ...]:
        """Per EP rank, the global experts it holds."""
        n = self.n_local
        return tuple(tuple(range(r * n, (r + 1) * n)) for r in range(self.ep_size))

    def ep_rank_of(self, dp_rank: int) -> int:
        return dp_rank % self.ep_size

    def edp_rank_of(self, dp_rank: int) -> int:
        return dp_rank // self.ep_size

    def global_expert(self, dp_rank: int, local: int) -> int:
        """The global id of local expert ``local`` on DP rank ``dp_rank``."""
        return self.ep_rank_of(dp_rank) * self.n_local + local

    def ranks_holding(self, expert: int) -> tuple[int, ...]:
        """The DP ranks whose model holds global expert ``expert`` (its EP rank's EDP group)."""
        if not self.ep_size:
            return ()
        ep_rank = expert // self.n_local
        return tuple(ep_rank + k * self.ep_size for k in range(self.edp_size))

    def writer_rank(self, expert: int) -> int:
        """The DP rank that wrote the expert's file: EDP rank 0 of its EP rank."""
        return expert // self.n_local if self.ep_size else 0

    @property
    def fused_keys(self) -> tuple[str, ...]:
        """AutoEP: the consolidated keys of the layer's experts (``experts.w1/w2/w3``)."""
        return tuple(f"{self.module}.experts.{w}" for w in AUTOEP_FUSED) if self.autoep else ()


@dataclass(frozen=True)
class ExpertGroup:
    """One ZeRO-1/2 optimizer group of expert parameters.

    Attributes:
        index: its position in ``param_shapes`` (rank 0's order): the index into
            ``ZeroSources.groups`` and ``ZeroSources.fp32[d]``.
        name: its ``name`` in the optimizer's param groups (``ep_size_2``).
        ep_size: expert-parallel degree of its layers.
        edp_size: its ``partition_count``: the files of one EP rank it is split over.
        layers: ordinals of the MoE layers whose experts it holds.
        file_index: per DP rank ``d``, this group's position in file ``d``'s own lists
            (``single_partition_of_fp32_groups``, ``base_optimizer_state``, ``group_paddings``,
            ...), which can differ from ``index``.
    """

    index: int
    name: str
    ep_size: int
    edp_size: int
    layers: tuple[int, ...]
    file_index: tuple[int, ...]

    def ep_rank_of(self, dp_rank: int) -> int:
        return dp_rank % self.ep_size

    def edp_rank_of(self, dp_rank: int) -> int:
        """The partition rank of file ``dp_rank`` in this group."""
        return dp_rank // self.ep_size

    def files_of(self, ep_rank: int) -> tuple[int, ...]:
        """The DP ranks (files) holding EP rank ``ep_rank``'s partitions, in EDP-rank order."""
        return tuple(ep_rank + k * self.ep_size for k in range(self.edp_size))


@dataclass(frozen=True)
class ExpertParam:
    """Where one local expert parameter of one EP rank goes in the consolidated state dict.

    Attributes:
        group: the :class:`ExpertGroup` index.
        ep_rank: the EP rank whose files hold it.
        layer: the MoE layer ordinal.
        flat: the local parameter in the group's flat buffer (local name, shape, offset).
        name: the consolidated key (global expert id; AutoEP: the fused key).
        shape: the consolidated tensor's shape (AutoEP: all experts of the layer).
        dst_start: first element of the consolidated tensor this EP rank's values fill.
    """

    group: int
    ep_rank: int
    layer: int
    flat: FlatParam
    name: str
    shape: tuple[int, ...]
    dst_start: int


@dataclass(frozen=True)
class MoeLayout:
    """What a MoE checkpoint's layout adds to a dense one (``Layout.moe``).

    Attributes:
        autoep: the layers are AutoEP's (``ds_autoep_layers`` in the model states).
        layers: the MoE layers, by ordinal.
        groups: the expert optimizer groups (ZeRO-1/2), by ``param_shapes`` index.
        params: every expert parameter of every EP rank (ZeRO-1/2), group by group, EP rank by
            EP rank, in flat-buffer order.
        expp_files: without ZeRO, the per-EP-rank optimizer files, by EP rank.
        aliases: AutoEP's second name for each router weight (``mlp.gate.gate.weight`` ->
            ``mlp.router.gate.weight``): one Parameter that the files record twice.
    """

    autoep: bool
    layers: tuple[MoeLayer, ...]
    groups: tuple[ExpertGroup, ...] = ()
    params: tuple[ExpertParam, ...] = ()
    expp_files: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()

    def group(self, index: int) -> ExpertGroup | None:
        return next((g for g in self.groups if g.index == index), None)

    @property
    def expert_group_indices(self) -> frozenset[int]:
        return frozenset(g.index for g in self.groups)

    @property
    def ep_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({layer.ep_size for layer in self.layers}))

    def layer_of(self, local_name: str) -> MoeLayer | None:
        """The layer a (local or global) expert parameter name belongs to."""
        for layer in self.layers:
            if local_name.startswith(layer.module + "."):
                return layer
        return None

    def expert_keys(self) -> tuple[str, ...]:
        """Every consolidated key the experts contribute, layer by layer."""
        out: list[str] = []
        for layer in self.layers:
            if layer.autoep:
                out.extend(layer.fused_keys)
            else:
                for keys in layer.keys:
                    out.extend(keys)
        return tuple(out)


def global_target(
    layer: MoeLayer, local_name: str, local_shape: tuple[int, ...], ep_rank: int
) -> tuple[str, tuple[int, ...], int] | None:
    """Where EP rank ``ep_rank``'s local expert parameter ``local_name`` goes: (key, shape,
    first element), or None when the name is not one of ``layer``'s expert parameters.

    Native: ``deepspeed_experts.<local>`` becomes ``deepspeed_experts.<ep_rank * n_local +
    local>``, the tensor whole. AutoEP: the fused ``experts.wN`` of the local experts is rows
    ``[ep_rank * n_local, (ep_rank + 1) * n_local)`` of the layer's ``experts.wN``.
    """
    n_local = layer.n_local
    if layer.autoep:
        if local_name not in layer.fused_keys or not local_shape or local_shape[0] != n_local:
            return None
        shape = (layer.num_experts, *local_shape[1:])
        return local_name, shape, ep_rank * math.prod(local_shape)
    found = NATIVE_EXPERT.match(local_name)
    if found is None or found["module"] != layer.module or int(found["id"]) >= n_local:
        return None
    global_id = ep_rank * n_local + int(found["id"])
    return native_expert_name(layer.module, global_id, found["rest"]), local_shape, 0


def ep_size_of_group(name: str | None) -> int | None:
    """The EP size DeepSpeed encodes in an expert group's name (``ep_size_4`` -> 4)."""
    found = EXPERT_GROUP_NAME.match(name or "")
    return int(found["ep"]) if found else None
