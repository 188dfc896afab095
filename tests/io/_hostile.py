"""A corpus builder for hostile and careless checkpoint files (tests/io/test_hostile_read.py).

Zips are laid out by hand where :mod:`zipfile` refuses to write the damage (duplicate names,
bad zip64 extras, overlapping records); pickles are written opcode by opcode, since no pickler
produces a bomb. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).parents[2]

# -- zips --------------------------------------------------------------------------------------

_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_EOCD = struct.Struct("<4s4H2LH")


@dataclass
class Entry:
    """One zip record; the optional fields damage the central directory's view of it."""

    name: bytes
    data: bytes
    flags: int = 0x800  # UTF-8 names
    method: int = 0
    central_extra: bytes = b""
    central_size: int | None = None  # the size the central directory claims
    central_offset: int | None = None  # the local header offset it claims


def build_zip(entries: list[Entry], count: int | None = None) -> bytes:
    """A stored zip of ``entries``, as torch.save lays it out (no alignment padding)."""
    out = bytearray()
    offsets = []
    for e in entries:
        offsets.append(len(out))
        crc = zlib.crc32(e.data)
        out += _LOCAL.pack(
            b"PK\x03\x04", 20, e.flags, e.method, 0, 0, crc, len(e.data), len(e.data),
            len(e.name), 0,
        )  # fmt: skip
        out += e.name + e.data
    directory = bytearray()
    for e, offset in zip(entries, offsets, strict=True):
        size = len(e.data) if e.central_size is None else e.central_size
        where = offset if e.central_offset is None else e.central_offset
        directory += _CENTRAL.pack(
            b"PK\x01\x02", 20, 0, 20, 0, e.flags, e.method, 0, 0, zlib.crc32(e.data),
            size, size, len(e.name), len(e.central_extra), 0, 0, 0, 0, where,
        )  # fmt: skip
        directory += e.name + e.central_extra
    n = len(entries) if count is None else count
    eocd = _EOCD.pack(b"PK\x05\x06", 0, 0, n, n, len(directory), len(out), 0)
    return bytes(out + directory + eocd)


def torch_like(pkl: bytes, storages: dict[str, bytes] | None = None) -> list[Entry]:
    """The records torch.save writes around a pickle (top folder ``archive``)."""
    entries = [Entry(b"archive/data.pkl", pkl), Entry(b"archive/byteorder", b"little")]
    for key, data in (storages or {}).items():
        entries.append(Entry(f"archive/data/{key}".encode(), data))
    entries.append(Entry(b"archive/version", b"3\n"))
    return entries


def write_torch_like(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    path.write_bytes(build_zip(torch_like(pkl, storages)))
    return path


# -- pickles -----------------------------------------------------------------------------------

P2 = b"\x80\x02"


def put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)  # LONG_BINPUT


def get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


def int_(n: int) -> bytes:
    """Any int, as LONG1."""
    raw = n.to_bytes((n.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def glob(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def list_laughs(levels: int = 30, fan: int = 10) -> bytes:
    """A list of ``fan`` references to the previous level's list, ``levels`` deep: 10**30 as
    a tree, a few KB as a pickle."""
    out = [P2, b"K\x01", put(0)]
    for level in range(1, levels + 1):
        out += [b"](", get(level - 1) * fan, b"e", put(level)]
    return b"".join(out) + b"."


def dict_laughs(levels: int = 30, fan: int = 10) -> bytes:
    """The same through dicts whose values are the previous level, and tuples."""
    out = [P2, b"K\x01", put(0)]
    for level in range(1, levels + 1):
        previous = get(level - 1)
        items = b"".join(int_(i) + previous for i in range(fan))
        out += [b"}(", items, b"u", b"(", previous * 3, b"t", b"\x86", put(level)]
    return b"".join(out) + b"."


def tuple_bomb(levels: int = 64) -> bytes:
    """T0 = (1, 1), Tk = (Tk-1, Tk-1): hashing T64 visits 2**64 elements."""
    out = [P2, b"K\x01K\x01\x86", put(0)]
    for level in range(1, levels + 1):
        out += [get(level - 1), get(level - 1), b"\x86", put(level)]
    return b"".join(out)


def tuple_bomb_as(use: str) -> bytes:
    """The tuple bomb hashed in one of the ways a pickle can hash a value."""
    bomb = tuple_bomb()
    last = get(64)
    if use == "dict key":
        return bomb + b"}" + last + b"K\x00s."
    if use == "DICT opcode":
        return bomb + b"(" + last + b"K\x00d."
    if use == "set member":
        return b"\x80\x04" + bomb[2:] + b"\x8f(" + last + b"\x90."
    if use == "frozenset":
        return b"\x80\x04" + bomb[2:] + b"(" + last + b"\x91."
    if use == "builtins.set":
        return bomb + glob("__builtin__", "set") + b"](" + last + b"e\x85R."
    if use == "ZeroStageEnum":
        return bomb + glob("deepspeed.runtime.zero.config", "ZeroStageEnum") + last + b"\x85R."
    if use == "Counter":
        return bomb + glob("collections", "Counter") + b"](" + last + b"e\x85R."
    if use == "BUILD key":
        ns = glob("argparse", "Namespace") + b")\x81"
        return bomb + ns + b"}" + last + b"K\x00sb."
    raise ValueError(use)


TUPLE_BOMB_USES = [
    "dict key", "DICT opcode", "set member", "frozenset", "builtins.set", "ZeroStageEnum",
    "Counter", "BUILD key",
]  # fmt: skip


def deep_lists(depth: int = 100_000) -> bytes:
    return P2 + b"]" * depth + b"a" * (depth - 1) + b"."


def deep_tuples(depth: int = 100_000) -> bytes:
    return P2 + b")" + b"\x85" * depth + b"."


def self_list() -> bytes:
    return P2 + b"]" + put(0) + get(0) + b"a."


def self_namespace() -> bytes:
    ns = glob("argparse", "Namespace") + b")\x81" + put(0)
    return P2 + ns + b"}" + text("me") + get(0) + b"sb."


def long4(nbytes: int = 8 << 20) -> bytes:
    return P2 + b"\x8b" + struct.pack("<i", nbytes) + b"\x01" * nbytes + b"."


def int_digits(digits: int = 10**6) -> bytes:
    return P2 + b"I" + b"9" * digits + b"\n."


def hex_int(digits: int = 10**6) -> bytes:
    return P2 + b"L0x" + b"f" * digits + b"L\n."


def huge_binunicode8() -> bytes:
    return b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc."


def huge_frame() -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N."


def flood(opcode: bytes, total: int = (32 << 20) - 64, proto: int = 4) -> bytes:
    """``data.pkl`` filled with one cheap opcode up to the size dsckpt reads."""
    head = bytes([0x80, proto]) + (b"]" if opcode in (b"\x94", b"]a") else b"")
    body = opcode * ((total - len(head)) // len(opcode))
    return head + body + b"."


def tensor(numel: int, shape: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """{"t": a float tensor} as torch pickles it, with the numbers given (storage key "0")."""
    pid = b"(" + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu")
    pid += int_(numel) + b"tQ"
    sizes = b"(" + b"".join(int_(n) for n in shape) + b"t"
    strides = b"(" + b"".join(int_(n) for n in stride) + b"t"
    hooks = glob("collections", "OrderedDict") + b")R"
    rebuild = glob("torch._utils", "_rebuild_tensor_v2")
    args = b"(" + pid + int_(offset) + sizes + strides + b"\x89" + hooks + b"tR"
    return P2 + b"}" + text("t") + rebuild + args + b"s."


def torch_size(shape: tuple[int, ...]) -> bytes:
    return P2 + glob("torch", "Size") + b"](" + b"".join(int_(n) for n in shape) + b"e\x85R."


# -- numpy (built from numpy's own pickles, then damaged) --------------------------------------


def numpy_object_array_lying_about_shape() -> bytes:
    """An object array's state claiming 10**9 items and holding 3: numpy 2.4 crashes the
    interpreter (segmentation fault) restoring it."""
    import pickle

    import numpy as np

    pkl = pickle.dumps(np.array([None, None, None], dtype=object), protocol=2)
    honest = b"(K\x01K\x03\x85"
    assert pkl.count(honest) == 1
    return pkl.replace(honest, b"(K\x01J" + struct.pack("<i", 10**9) + b"\x85")


def numpy_reconstruct_huge() -> bytes:
    import pickle

    import numpy as np

    pkl = pickle.dumps(np.arange(3, dtype=np.uint32), protocol=2)
    first = b"K\x00\x85"  # _reconstruct(ndarray, (0,), b"b")
    return pkl.replace(first, b"J" + struct.pack("<i", 10**9) + b"\x85", 1)


def numpy_ndarray_call() -> bytes:
    dtype = glob("numpy", "dtype") + text("O8") + b"\x89\x88\x87R"
    return (
        P2
        + glob("numpy", "ndarray")
        + b"J"
        + struct.pack("<i", 10**9)
        + b"\x85"
        + dtype
        + b"\x86R."
    )


def numpy_structured_dtype() -> bytes:
    import pickle

    import numpy as np

    return pickle.dumps(np.dtype([("a", "<i4"), ("b", "O")]), protocol=2)


def numpy_shared_dtype_flipped() -> bytes:
    """numpy.dtype('f8') without a copy, then its byte order flipped by BUILD: would change
    float64 for the whole process if the singleton came back."""
    state = b"(K\x03" + text(">") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    return P2 + glob("numpy", "dtype") + text("f8") + b"\x89\x89\x87R" + state + b"b."


# -- measuring a load in a fresh process ---------------------------------------------------------

_MEASURE = """
import json, resource, sys, time
from pathlib import Path
from dsckpt.errors import DsckptError
path, how = Path(sys.argv[1]), sys.argv[2]
if how == "load_meta":
    from dsckpt.io.load import load_meta as load
else:
    from dsckpt.io.unpickle import load_saved as load
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
try:
    load(path)
    error, message = None, ""
except DsckptError as exc:
    error, message = type(exc).__name__, str(exc)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "error": error, "message": message,
    "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    "wall": time.perf_counter() - start, "maxrss_mb": after.ru_maxrss / 1024,
}))
"""


def measure(path: Path, how: str = "load_saved", timeout: float = 120) -> dict[str, Any]:
    """Load ``path`` in a new interpreter; its outcome, CPU seconds and peak RSS (MB).

    A crash (numpy's segfault) or a hang fails the test here rather than killing pytest.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), how],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
