"""dsckpt: inspect, consolidate and reshape DeepSpeed checkpoints without DeepSpeed.

The public API is imported lazily so that ``import dsckpt`` (and the CLI's ``--help``) does not
pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dsckpt._version import __version__

if TYPE_CHECKING:
    from dsckpt.consolidation import consolidate, load_into, state_dict
    from dsckpt.errors import DsckptError
    from dsckpt.layout import open_checkpoint
    from dsckpt.reshaping import reshape

__all__ = [
    "DsckptError",
    "__version__",
    "consolidate",
    "load_into",
    "open_checkpoint",
    "reshape",
    "state_dict",
]

_HOMES = {
    "consolidate": "dsckpt.consolidation",
    "load_into": "dsckpt.consolidation",
    "state_dict": "dsckpt.consolidation",
    "open_checkpoint": "dsckpt.layout",
    "reshape": "dsckpt.reshaping",
    "DsckptError": "dsckpt.errors",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dsckpt' has no attribute {name!r}")
