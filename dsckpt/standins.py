"""Inert stand-ins for the classes DeepSpeed pickles into its checkpoints (no torch import).

Both unpicklers use them: :mod:`dsckpt.load` (torch's restricted unpickler) and
:mod:`dsckpt.unpickle` (dsckpt's own, torch-free). Each is registered under DeepSpeed's import
path, so DeepSpeed never needs importing and nothing in a checkpoint can run code.
"""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass
from functools import cache
from typing import Any


class ZeroStageEnum(int, enum.Enum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (pickled as ``cls(value)``)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _StateHolder:
    """An inert object whose pickled ``__dict__`` is restored as plain attributes."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class LossScaler(_StateHolder):
    """Stand-in for DeepSpeed's static loss scaler (``cur_scale`` and friends)."""


class DynamicLossScaler(_StateHolder):
    """Stand-in for DeepSpeed's dynamic loss scaler (``cur_scale``, ``cur_iter``, ...)."""


@dataclass
class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``."""

    numel: int
    start: int


# Import path in the pickle -> the stand-in that replaces it. Only data-holding classes belong
# here: the restricted unpickler may instantiate them and set their attributes, nothing more.
STAND_INS: dict[str, type] = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStageEnum,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": DynamicLossScaler,
    "deepspeed.utils.tensor_fragment.fragment_address": FragmentAddress,
    # Megatron-DeepSpeed stores its command-line arguments.
    "argparse.Namespace": argparse.Namespace,
}


@cache
def numpy_globals() -> dict[str, Any]:
    """numpy's array and dtype reconstructors (import path -> object), for the RNG states
    Megatron-DeepSpeed saves; empty without numpy.

    They rebuild arrays from raw bytes and dtype strings only; object arrays get their elements
    from the same restricted unpickler. Importing numpy costs about 0.1 s, so callers ask for
    these only when a pickle names a numpy global.
    """
    try:
        import numpy as np
    except ImportError:
        return {}
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    # A dtype's state is restored onto an instance of its concrete class (numpy >= 1.25).
    dtypes = getattr(np, "dtypes", None)
    for name in getattr(dtypes, "__all__", []):
        allowed[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[f"{module}._reconstruct"] = multiarray._reconstruct
        allowed[f"{module}.scalar"] = multiarray.scalar
    return allowed
