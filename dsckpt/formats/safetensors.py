"""Preallocated safetensors files whose header is computed from the plan before any data moves.

Layout (the safetensors format): an 8-byte little-endian header length, the JSON header padded
with spaces so the data starts 8-byte aligned, then each tensor's bytes at its ``data_offsets``.
Tensors keep plan order (buffers, frozen, trainable, aliases), as DeepSpeed's state dict does.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import TracebackType

import torch

from dsckpt.formats.atomic import reserve
from dsckpt.plan import OutputTensor

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ALIGN = 8


def header_bytes(
    tensors: list[OutputTensor], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """The encoded header (length prefix included) and each tensor's offset in the data section."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets = {}
    position = 0
    for t in tensors:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{t.name}: dtype {t.dtype} has no safetensors name")
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [position, position + t.nbytes],
        }
        offsets[t.name] = position
        position += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(encoded) + 8) % _ALIGN)
    return struct.pack("<Q", len(encoded)) + encoded, offsets


class SafetensorsSink:
    """One safetensors file, sized and headed up front; ``locate`` gives where a tensor goes."""

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> None:
        self.path = path
        head, offsets = header_bytes(tensors, metadata)
        self.data_start = len(head)
        self.offsets = offsets
        self.size = len(head) + sum(t.nbytes for t in tensors)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            reserve(self.fd, path, self.size)
            os.pwrite(self.fd, head, 0)
        except BaseException:
            os.close(self.fd)
            raise

    def locate(self, name: str) -> tuple[int, int]:
        return self.fd, self.data_start + self.offsets[name]

    def __enter__(self) -> SafetensorsSink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self.fd)


def shard_tensors(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Group tensors into shards as transformers does: start a new shard when the next tensor
    would push the current one past ``max_bytes``; a larger tensor gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardedSink:
    """Several safetensors shards in one directory, with the index's weight map."""

    def __init__(
        self, directory: Path, shards: list[list[OutputTensor]], metadata: dict[str, str]
    ) -> None:
        self.sinks: list[SafetensorsSink] = []
        self.weight_map: dict[str, str] = {}
        self.by_name: dict[str, SafetensorsSink] = {}
        self.total_size = sum(t.nbytes for shard in shards for t in shard)
        try:
            for i, shard in enumerate(shards):
                name = shard_name(i, len(shards))
                sink = SafetensorsSink(directory / name, shard, metadata)
                self.sinks.append(sink)
                for t in shard:
                    self.weight_map[t.name] = name
                    self.by_name[t.name] = sink
        except BaseException:
            self.__exit__(None, None, None)
            raise

    @property
    def files(self) -> int:
        return len(self.sinks)

    def locate(self, name: str) -> tuple[int, int]:
        return self.by_name[name].locate(name)

    def __enter__(self) -> ShardedSink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sink in self.sinks:
            sink.__exit__(kind, exc, tb)
