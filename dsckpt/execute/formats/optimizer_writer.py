"""The optimizer state file ``to-fp32 --optimizer`` writes beside the weights, streamed.

Two formats:

- ``safetensors``: tensors ``<param name>.exp_avg`` / ``.exp_avg_sq``; the param groups (with
  their step and parameter names), the state keys, the frozen parameters and the
  ``model.parameters()`` order as JSON strings in the metadata. torch is not imported.
- ``torch``: a ``torch.optim.AdamW``-style ``state_dict()`` (``state`` keyed by the index in
  ``model.parameters()``, ``param_groups`` with ``params`` index lists) written by
  :func:`~dsckpt.execute.formats.torch_writer.save_torch`: every moment is a lazy tensor whose
  bytes are copied from the checkpoint's files straight into the output.

Memory stays bounded by the metadata either way: no moment is held in memory.
"""

from __future__ import annotations

from typing import Any

from dsckpt.errors import UnsupportedLayout
from dsckpt.execute.executor import materialize
from dsckpt.execute.formats.safetensors_writer import safetensors_file
from dsckpt.io import dtypes
from dsckpt.plan.fileplan import Copy, FilePlan
from dsckpt.plan.optim_export import OptimizerExport

OPTIMIZER_FORMATS = ("safetensors", "torch")


def optimizer_file_name(fmt: str, weights_stem: str | None) -> str:
    """The optimizer file's name: ``optimizer.<ext>`` inside a directory OUT, or
    ``<weights stem>.optimizer.<ext>`` beside a single weights file."""
    ext = "safetensors" if fmt == "safetensors" else "pt"
    return f"optimizer.{ext}" if weights_stem is None else f"{weights_stem}.optimizer.{ext}"


def optimizer_file(name: str, export: OptimizerExport, fmt: str) -> FilePlan:
    """The write plan of ``export`` as file ``name`` in format ``fmt``: the moments are copies
    of the checkpoint's byte ranges either way (a torch file's lazy storages)."""
    if fmt == "safetensors":
        return safetensors_file(name, export.plan.tensors, metadata=export.metadata())
    from dsckpt.execute.formats.torch_writer import LazyStorages, torch_object_file

    lazy = LazyStorages()
    return torch_object_file(name, torch_state_dict(export, lazy), lazy=lazy)


def torch_state_dict(export: OptimizerExport, lazy: Any) -> dict[str, Any]:
    """``torch.optim.AdamW.state_dict()`` of the consolidated model, its moments lazy tensors
    of ``lazy`` (a :class:`~dsckpt.execute.formats.torch_writer.LazyStorages`).

    The structure is torch's own: ``state[i]`` holds ``step`` (a float32 scalar tensor, as
    AdamW keeps it) then the moments, for the ``i``-th parameter of ``model.parameters()``;
    each param group its hyper-parameters then ``params``. Frozen parameters have an index but
    no state and are in no group.
    """
    import torch

    index = {name: i for i, name in enumerate(export.parameters)}
    by_name = {t.name: t for t in export.plan.tensors}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for group in export.groups:
        for name in group.params:
            entry: dict[str, Any] = {}
            if group.step is not None:
                entry["step"] = torch.tensor(float(group.step), dtype=torch.float32)
            for key in export.keys:
                entry[key] = _lazy_tensor(by_name[f"{name}.{key}"], lazy)
            state[index[name]] = entry
        options = {k: _plain(k, v) for k, v in group.options.items()}
        groups.append({**options, "params": [index[n] for n in group.params]})
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _lazy_tensor(tensor: Any, lazy: Any) -> Any:
    ops = tensor.ops(0)  # byte copies where the source allows, at offsets inside the tensor
    if all(isinstance(op, Copy) for op in ops):
        return lazy.tensor(dtypes.to_torch(tensor.dtype), tensor.shape, ops)
    return materialize(tensor)  # a strided or other-dtype source: one tensor in memory


def _plain(key: str, value: Any) -> Any:
    """A hyper-parameter as a plain Python value: the file must load with weights_only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(key, v) for v in value)
    raise UnsupportedLayout(
        f"optimizer hyper-parameter {key!r} is a {type(value).__name__}, which a torch "
        "optimizer state dict loaded with weights_only cannot hold: use --optimizer-format "
        "safetensors"
    )
