"""dsckpt: inspect, consolidate and reshape DeepSpeed checkpoints without DeepSpeed.

The public API is imported lazily so that ``import dsckpt`` (and the CLI's ``--help``) does not
pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dsckpt._version import __version__

if TYPE_CHECKING:
    from dsckpt.api.consolidation import consolidate, load_into, state_dict
    from dsckpt.api.reshaping import reshape
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.errors import DsckptError

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
    "consolidate": "dsckpt.api.consolidation",
    "load_into": "dsckpt.api.consolidation",
    "state_dict": "dsckpt.api.consolidation",
    "open_checkpoint": "dsckpt.discover.layout",
    "reshape": "dsckpt.api.reshaping",
    "DsckptError": "dsckpt.errors",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dsckpt' has no attribute {name!r}")
