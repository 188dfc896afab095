"""CRC-32 (zip's) computed while bytes are copied, on worker threads, with the fastest code at hand.

Zip tools (``python -m zipfile -t``, ``unzip -t``) check every record's CRC-32; torch never does.
A streamed output gets real CRCs without a second pass over its output: each chunk is copied
kernel-side while a worker thread CRCs the same chunk of the source, still warm in the page cache
(:class:`CrcCopier`; ``os.preadv``, ``copy_file_range`` and the CRC functions release the GIL),
and the per-chunk CRCs are joined with :func:`crc32_combine`. ``bench/bench_crc.py`` measured
the alternatives (bench/README.md has the figures).

:func:`crc32` is ``isal.isal_zlib.crc32`` (Intel ISA-L, about 6x zlib's speed) when the optional
``isal`` package is importable, else ``zlib.crc32``; both give the same values.
"""

from __future__ import annotations

import errno
import os
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["CHUNK", "CrcCopier", "crc32", "crc32_combine", "crc_impl", "zero_crc"]

CHUNK = 8 << 20  # bytes per read/CRC/write step: large enough that per-call costs vanish


def _fastest() -> tuple[str, Callable[..., int]]:
    try:
        from isal import isal_zlib

        return "isal", isal_zlib.crc32
    except ImportError:
        return "zlib", zlib.crc32


crc_impl, crc32 = _fastest()


_POLY = 0xEDB88320  # reflected CRC-32 polynomial (zip, zlib)


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, in the reflected bit order CRC-32 uses."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x^(2^n) modulo the polynomial


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (as zlib's C API)."""
    p, k, n = 1 << 31, 3, len2  # x^0; multiply by x^(8 * len2)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


class CrcCopier:
    """Copies byte ranges between files, computing their CRC-32 on a worker pool on the way.

    Each chunk is copied kernel-side (``copy_file_range``: no user-space copy, a reflink where
    the filesystem has them) on the calling thread while a worker CRCs the same chunk of the
    source, warm in the page cache since the kernel has just read it. Example::

        with CrcCopier() as copier:
            parts = copier.copy(src, 0, dst, 4096, 1 << 30)
            crc = copier.crc_of(parts)   # CRC-32 of the 1 GiB now at dst[4096:]

    :meth:`crc_of` waits for the CRCs it is given and joins them in order (``(None, n)`` stands
    for ``n`` zero bytes, a hole). Errors of a worker are raised by :meth:`crc_of`.
    """

    def __init__(self, threads: int | None = None, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        if threads is None:
            # One core copies; the others CRC. Four zlib threads (~2.3 GB/s each) outrun a
            # page-cache copy; isal's one thread (~14 GB/s) already does.
            threads = max(1, min(4, (os.cpu_count() or 2) - 1))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dsckpt-crc")
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.chunk))
        return buf  # type: ignore[no-any-return]

    def _crc_range(self, fd: int, offset: int, n: int) -> int:
        view = self._buffer()[:n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k == 0:
                raise OSError(errno.EIO, "unexpected end of a source file while computing a CRC")
            got += k
        return crc32(view)

    def copy(
        self, src: int, src_off: int, dst: int, dst_off: int, nbytes: int
    ) -> list[tuple[Future[int], int]]:
        """Copy ``nbytes`` from ``src`` at ``src_off`` to ``dst`` at ``dst_off``.

        Returns:
            The pending per-chunk CRCs with their lengths, in order, for :meth:`crc_of`.
        """
        from dsckpt.execute.executor import _copy_bytes

        parts = []
        for off in range(0, nbytes, self.chunk):
            n = min(self.chunk, nbytes - off)
            _copy_bytes(src, src_off + off, dst, dst_off + off, n)
            parts.append((self._pool.submit(self._crc_range, src, src_off + off, n), n))
        return parts

    def crc_file(self, fd: int, offset: int, nbytes: int) -> list[tuple[Future[int], int]]:
        """Queue the CRC of ``nbytes`` of ``fd`` at ``offset`` (bytes already in place)."""
        parts = []
        for off in range(0, nbytes, self.chunk):
            n = min(self.chunk, nbytes - off)
            parts.append((self._pool.submit(self._crc_range, fd, offset + off, n), n))
        return parts

    @staticmethod
    def crc_of(parts: Iterable[tuple[Future[int] | int | None, int]]) -> int:
        """CRC-32 of the concatenation of ``parts``: ``(future or int or None, length)``, where
        None stands for ``length`` zero bytes."""
        result = 0
        for part, n in parts:
            if part is None:
                value = zero_crc(n)
            elif isinstance(part, int):
                value = part
            else:
                value = part.result()
            result = crc32_combine(result, value, n)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CrcCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def zero_crc(n: int) -> int:
    """CRC-32 of ``n`` zero bytes in O(log n) steps, without allocating them."""
    result, block, size = 0, crc32(b"\0"), 1
    while n:
        if n & 1:
            result = crc32_combine(result, block, size)
        block = crc32_combine(block, block, size)
        size *= 2
        n >>= 1
    return result
