"""Resource bounds for unpickling untrusted files (used by :mod:`dsckpt.io.unpickle`).

A pickle is a program for a small stack machine, and a few hundred bytes of it can ask for
gigabytes or for centuries: containers by the million (an empty set is 216 bytes, its opcode one),
a tuple shared at every level of a 60-deep tree (hashing it visits 2**60 elements), a list holding
itself (every recursive walk of the result loops forever), nesting deeper than any recursive
walker's stack. Listing such cases is a losing game, so the reader counts instead:

* every opcode costs units from a budget, in proportion to what it can allocate (about 40 bytes a
  unit), with ``data.pkl`` itself capped in size: memory and time stay bounded whatever the
  opcodes are;
* every value that gets hashed (a dict key, a set member, an argument of an allow-listed call) is
  weighed by the tuples it is made of, and the weights are charged to a second budget;
* the finished object graph is walked once: no cycles, bounded depth, and a bounded size when
  shared parts are counted every time they are reached (the "billion laughs" through lists and
  dicts), so code that walks the result recursively stays bounded too.

The figures are far above what DeepSpeed writes (a model of 100k tensors: ~10M opcode units,
depth under 10, no sharing beyond leaves) and far below what hurts.
"""

from __future__ import annotations

import pickle
import reprlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dsckpt.errors import UnsafeCheckpoint

MAX_OP_UNITS = 12_000_000  # opcode budget: at most ~350 MB and ~2 s of CPU, measured
MAX_HASH_UNITS = 32_000_000  # tuple elements hashed for keys and call arguments: ~1 s
MAX_KEY_WEIGHT = 1024  # a dict key or set member: a leaf or a small tuple
MAX_DEPTH = 100  # containers inside containers; DeepSpeed's nest under 10 deep
MAX_EXPANDED = 16_000_000  # nodes of the result counted as a tree (shared parts each time)
MAX_INT_BYTES = 32  # Python ints up to 256 bits (sizes, steps, seeds need 64)


def _costs() -> bytes:
    """Units per opcode, about one per 24 bytes it can make live: a reference pushed is 8 bytes,
    a new int or float 32-40, a new container 56-216, a memo entry about 100."""
    table = bytearray([1] * 256)
    heavy = {
        pickle.EMPTY_SET: 9,  # 216 bytes
        pickle.FROZENSET: 9,
        pickle.EMPTY_DICT: 3,  # 64 bytes
        pickle.DICT: 3,
        pickle.EMPTY_LIST: 3,  # 56 bytes
        pickle.LIST: 3,
        pickle.MARK: 3,  # a new stack list
        pickle.TUPLE: 2,
        pickle.TUPLE1: 2,
        pickle.TUPLE2: 3,
        pickle.TUPLE3: 3,
        pickle.MEMOIZE: 4,  # a memo entry and its int key
        pickle.BINPUT: 4,
        pickle.LONG_BINPUT: 4,
        pickle.PUT: 4,
        pickle.BININT: 2,  # a new int
        pickle.BININT2: 2,
        pickle.LONG1: 2,
        pickle.LONG4: 2,
        pickle.INT: 2,
        pickle.LONG: 2,
        pickle.BINFLOAT: 2,
        pickle.FLOAT: 2,
        pickle.SHORT_BINUNICODE: 3,  # a str is 50 bytes before its text
        pickle.BINUNICODE: 3,
        pickle.UNICODE: 3,
        pickle.BINUNICODE8: 3,
        pickle.SHORT_BINBYTES: 2,
        pickle.BINBYTES: 2,
        pickle.BINBYTES8: 2,
        pickle.SHORT_BINSTRING: 3,
        pickle.BINSTRING: 3,
        pickle.STRING: 3,
        pickle.BYTEARRAY8: 3,
        pickle.REDUCE: 5,  # an object: a tensor stand-in is ~200 bytes with its dict
        pickle.NEWOBJ: 5,
        pickle.NEWOBJ_EX: 5,
        pickle.OBJ: 5,
        pickle.INST: 5,
        pickle.BUILD: 3,
        pickle.BINPERSID: 4,
        pickle.PERSID: 4,
        pickle.SETITEM: 2,  # a dict entry
    }
    for opcode, units in heavy.items():
        table[opcode[0]] = units
    return bytes(table)


COSTS = _costs()

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40


def short(value: Any) -> str:
    """A bounded repr of a value from an untrusted pickle, for messages (never exponential)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # a hostile object's repr: say what it is instead
        return f"<{type(value).__name__}>"


def refused(path: Path, what: str) -> UnsafeCheckpoint:
    """The error for a pickle past one of the bounds."""
    return UnsafeCheckpoint(
        f"{path}: the pickle {what}, past dsckpt's bounds for untrusted files (a DeepSpeed "
        "checkpoint stays far below them), so the file was refused before it could exhaust "
        "memory or time; if it really is a DeepSpeed checkpoint, report it"
    )


def check_graph(
    path: Path,
    root: Any,
    children: Callable[[Any], Iterable[Any] | None],
    leaves: frozenset[type],
) -> None:
    """Refuse a result with a cycle, deeper than MAX_DEPTH, or larger than MAX_EXPANDED as a tree.

    ``children(obj)`` gives what an object holds, None for a leaf; objects of a type in
    ``leaves`` are leaves without asking. A plain list or tuple holds its items (``children``
    is not asked for one that holds leaves only). One pass, iterative, each object measured once:
    linear in the number of objects and references.
    """
    top = children(root)
    if top is None:
        return
    sizes: dict[int, tuple[int, int]] = {}  # id -> (size as a tree, depth) of finished objects
    keep: list[Any] = []  # the finished objects, so their ids stay theirs during the walk
    on_path = {id(root)}
    # A frame: [object, iterator over its children, size so far, depth of its deepest child]
    stack: list[list[Any]] = [[root, iter(top), 1, 0]]
    while stack:
        frame = stack[-1]
        descended = False
        for child in frame[1]:
            if type(child) in leaves:
                frame[2] += 1
                continue
            key = id(child)
            done = sizes.get(key)
            if done is not None:
                frame[2] += done[0]
                if done[1] > frame[3]:
                    frame[3] = done[1]
                continue
            if key in on_path:
                raise refused(path, "holds a structure that contains itself (a cycle)")
            kind = type(child)
            if (kind is list or kind is tuple) and set(map(type, child)) <= leaves:
                # Leaves only (a list of ints per parameter, a shape): measured at C speed, with
                # the verdict the walk would give (each leaf one node, depth one). Exact list and
                # tuple only: a subclass may carry a __dict__ that children() would walk.
                if len(stack) >= MAX_DEPTH:
                    raise refused(path, f"nests containers more than {MAX_DEPTH} deep")
                size = len(child) + 1
                if size > MAX_EXPANDED:
                    raise refused(
                        path,
                        f"holds shared parts making it over {MAX_EXPANDED} objects when walked",
                    )
                sizes[key] = (size, 1)
                keep.append(child)
                frame[2] += size
                if frame[3] < 1:
                    frame[3] = 1
                continue
            inner = children(child)
            if inner is None:
                frame[2] += 1
                continue
            if len(stack) >= MAX_DEPTH:
                raise refused(path, f"nests containers more than {MAX_DEPTH} deep")
            on_path.add(key)
            stack.append([child, iter(inner), 1, 0])
            descended = True
            break
        if descended:
            continue
        stack.pop()
        obj, _, size, depth = frame
        if size > MAX_EXPANDED:
            raise refused(
                path, f"holds shared parts making it over {MAX_EXPANDED} objects when walked"
            )
        on_path.discard(id(obj))
        sizes[id(obj)] = (size, depth + 1)
        keep.append(obj)
        if stack:
            parent = stack[-1]
            parent[2] += size
            if depth + 1 > parent[3]:
                parent[3] = depth + 1
