"""Inert stand-ins for the classes DeepSpeed pickles into its checkpoints (no torch import).

Both unpicklers use them: :mod:`dsckpt.io.load` (torch's restricted unpickler) and
:mod:`dsckpt.io.unpickle` (dsckpt's own, torch-free). Each is registered under DeepSpeed's import
path, so DeepSpeed never needs importing and nothing in a checkpoint can run code.
"""

from __future__ import annotations

import argparse
import enum
import pickle
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from dsckpt.io.bounds import short


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


# -- numpy for dsckpt's own reader ---------------------------------------------------------------
#
# numpy's reconstructors trust their arguments: ndarray(shape) allocates whatever the shape says,
# and an object array's pickled state with fewer items than its shape crashes the interpreter
# (numpy 2.4: a segmentation fault). dsckpt's torch-free reader hands out checked versions
# instead, which accept exactly what numpy's own pickles hold and nothing that allocates more
# than the file carries.

_DTYPE_SPEC = re.compile(r"[<>|=]?[A-Za-z]\d{0,4}(\[\w{1,8}\])?")
_MAX_ARRAY_DIMS = 32


class _NumpyArrayType:
    """What ``numpy.ndarray`` unpickles to in dsckpt's reader: only _reconstruct's first
    argument, never a callable that allocates by a shape from the file."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TypeError("numpy.ndarray is not built by a pickle")


NDARRAY = _NumpyArrayType()


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> Any:
    import numpy as np

    if type(spec) is not str or not _DTYPE_SPEC.fullmatch(spec) or type(align) is not bool:
        raise pickle.UnpicklingError(f"numpy.dtype({short(spec)}) is not a dtype numpy pickles")
    # Always a copy: numpy's builtin dtypes are shared singletons, and the BUILD that follows
    # must not change float64 for the whole process.
    return np.dtype(spec, align, True)


def _multiarray() -> Any:
    import numpy as np

    return np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> Any:
    import numpy as np

    if subtype is not NDARRAY or type(shape) is not tuple or shape != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct with arguments numpy never pickles")
    if typecode not in (b"b", "b"):
        raise pickle.UnpicklingError("numpy _reconstruct with arguments numpy never pickles")
    return _multiarray()._reconstruct(np.ndarray, (0,), b"b")


def _is_plain_object(dtype: Any) -> bool:
    return bool(dtype.kind == "O" and dtype.shape == () and dtype.names is None)


def _scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("a numpy scalar without a dtype")
    if dtype.hasobject:
        if not _is_plain_object(dtype):
            raise pickle.UnpicklingError("a numpy scalar of a structured object dtype")
    elif type(data) is not bytes or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"a numpy {dtype} scalar from {type(data).__name__} data")
    return _multiarray().scalar(dtype, data)


def check_numpy_build(inst: Any, state: Any) -> None:
    """Refuse (UnpicklingError) a pickle BUILD on a numpy object that numpy's own pickles would
    not do: only an array's or a dtype's state, consistent with itself."""
    import numpy as np

    if type(inst) is np.ndarray:
        _check_array_state(state)
    elif isinstance(inst, np.dtype):
        # The state numpy pickles is the one the dtype already has, but for the byte order.
        expected = inst.__reduce__()[2]
        if not (
            type(state) is tuple
            and len(state) == len(expected)
            and state[1] in ("<", ">", "|", "=")
            and all(a == b for i, (a, b) in enumerate(zip(state, expected, strict=True)) if i != 1)
        ):
            raise pickle.UnpicklingError(f"a numpy dtype state numpy never pickles for {inst}")
    else:
        raise pickle.UnpicklingError(f"a pickle sets the state of a numpy {type(inst).__name__}")


def _check_array_state(state: Any) -> None:
    import numpy as np

    bad = pickle.UnpicklingError("a numpy array state numpy never pickles")
    if not (type(state) is tuple and len(state) == 5 and state[0] == 1):
        raise bad
    _, shape, dtype, fortran, raw = state
    if (
        type(shape) is not tuple
        or len(shape) > _MAX_ARRAY_DIMS
        or not all(type(n) is int and 0 <= n < 2**31 for n in shape)
        or not isinstance(dtype, np.dtype)
        or type(fortran) is not bool
    ):
        raise bad
    numel = 1
    for n in shape:
        numel *= n
    if dtype.hasobject:
        if not _is_plain_object(dtype) or type(raw) is not list or len(raw) != numel:
            raise pickle.UnpicklingError(
                f"a numpy object array of shape {shape} whose state holds "
                f"{len(raw) if type(raw) is list else type(raw).__name__} items"
            )
    elif type(raw) is not bytes or dtype.itemsize == 0 or len(raw) != numel * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"a numpy {dtype} array of shape {shape} whose state is not its {numel} elements' bytes"
        )


@cache
def checked_numpy_globals() -> dict[str, Any]:
    """numpy's pickled names as dsckpt's torch-free reader resolves them (empty without numpy)."""
    if not numpy_globals():
        return {}
    allowed: dict[str, Any] = {"numpy.ndarray": NDARRAY, "numpy.dtype": _dtype}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[f"{module}._reconstruct"] = _reconstruct
        allowed[f"{module}.scalar"] = _scalar
    return allowed
