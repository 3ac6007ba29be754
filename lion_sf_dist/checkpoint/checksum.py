"""Per-file checksums of a checkpoint: computed by each rank over the files it wrote, checked on load.

Saves record ``xxh3-64-64MiB-blocks``: the file is cut into blocks of :data:`BLOCK` bytes
(the last one shorter), each block hashed with XXH3-64 (``xxhash``: 50 GB/s on one core
here from the cache, 10-14 GB/s from memory), and the file's checksum is the XXH3-64 of the
blocks' 8-byte digests in order. The writer hashes the blocks as it writes them, in one
pass. A load hashes every file it uses before the first byte reaches the model, so the
hash's speed is the load's overhead: blocks are independent, so the load hashes them on
several threads (one file of a world-size-1 checkpoint included; ``xxhash`` releases the
GIL), from the page cache without copying them (see :class:`FileHash`).

Why 64 MiB: a block is one call that releases the GIL, and its thread needs the GIL back
when it returns. While the load's own thread runs (it parses and plans meanwhile), each
such hand-over cost it about half a millisecond on the VMs measured: 16 MiB blocks (the
previous format; 43 of them for the benchmark's 681 MB file) slowed the load by 10-25 ms,
64 MiB blocks (11) by a few. A block still hashes in about 5 ms, so the thread that
checks can share what is left at the end.

Manifests of earlier formats stay readable: ``xxh3-64-16MiB-blocks`` (the same over 16 MiB
blocks), ``xxh3-64`` (one XXH3-64 over the whole file) and ``crc32`` (the first format);
the last two are hashed whole, files in parallel.

A checksum detects corruption: bit flips, overwritten or zeroed ranges, a file swapped for
another one of the same size, blocks swapped within a file. It is not a signature: whoever
can write the files can write the manifest too (see the README's trust model).
"""

from __future__ import annotations

import functools
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Union

import xxhash

from lion_sf_dist.checkpoint.mapping import MappedFile, map_file

Buffer = Union[bytes, bytearray, memoryview]

ALGORITHM = "xxh3-64-64MiB-blocks"  # what saves record
BLOCK = 64 << 20  # the block of ALGORITHM; tests shrink it to cut small files into many blocks
_EARLIER_BLOCKS = {"xxh3-64-16MiB-blocks": 16 << 20}  # block formats earlier versions recorded


def block_of(algorithm: str) -> Optional[int]:
    """The block size of a block format (``None``: the file is hashed whole)."""
    return BLOCK if algorithm == ALGORITHM else _EARLIER_BLOCKS.get(algorithm)


MAX_THREADS = 8  # hashing is bound by memory bandwidth well before this


class Hasher(Protocol):
    """A running checksum: ``update`` with bytes in order, ``hexdigest`` as the manifest records it."""

    def update(self, data: Buffer, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32:
    """CRC-32 as the first format recorded it (eight hex digits)."""

    def __init__(self) -> None:
        self._state = 0

    def update(self, data: Buffer, /) -> None:
        self._state = zlib.crc32(data, self._state)

    def hexdigest(self) -> str:
        return f"{self._state:08x}"


class _Blocks:
    """The running checksum of a block format: XXH3-64 per block of ``block`` bytes, then of the digests."""

    def __init__(self, block: int) -> None:
        self._size = block
        self._digests: list[bytes] = []
        self._block = xxhash.xxh3_64()
        self._filled = 0

    def update(self, data: Buffer, /) -> None:
        view = memoryview(data).cast("B")
        if self._filled + len(view) < self._size:  # most writes: a zip record's header, inside one block
            self._block.update(view)
            self._filled += len(view)
            return
        while len(view):
            take = min(len(view), self._size - self._filled)
            self._block.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._size:
                self._digests.append(self._block.digest())
                self._block, self._filled = xxhash.xxh3_64(), 0

    def hexdigest(self) -> str:
        last = [self._block.digest()] if self._filled else []
        return _combined(self._digests + last)


def _combined(digests: list[bytes]) -> str:
    return xxhash.xxh3_64(b"".join(digests)).hexdigest()


_HASHERS: dict[str, Callable[[], Hasher]] = {
    ALGORITHM: lambda: _Blocks(BLOCK),
    **{name: functools.partial(_Blocks, block) for name, block in _EARLIER_BLOCKS.items()},
    "xxh3-64": xxhash.xxh3_64,
    "crc32": _Crc32,
}
READABLE = frozenset(_HASHERS)  # algorithms a manifest may name


def new(algorithm: str = ALGORITHM) -> Hasher:
    """A fresh running checksum of ``algorithm`` (one of :data:`READABLE`)."""
    return _HASHERS[algorithm]()


def cores() -> int:
    """The cores this process's hashing may use: those it may run on, shared with the other ranks of its host.

    torchrun's ranks on one host (``LOCAL_WORLD_SIZE``) usually all see every core; each then
    takes its share, so that ranks hashing at once do not oversubscribe the host. Ranks a
    launcher pinned to disjoint cores (their masks together fit the host) keep their own.
    """
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    if mine * ranks <= (os.cpu_count() or mine):
        return mine
    return max(1, mine // ranks)


Part = Union[bytes, str]  # what one job yields: a block's digest or a whole file's checksum


class FileHash:
    """The checksum of one file, cut into independent :attr:`jobs` that any thread may run.

    ``file`` is the file mapped, or the ``OSError`` mapping it raised: then there are no
    jobs and :meth:`result` is the error. The jobs of a block format's file are its blocks;
    a file of a whole-file algorithm is one job.

    The bytes are hashed where they lie in the page cache, through the file's memory map
    (:mod:`~lion_sf_dist.checkpoint.mapping`): reading them into a buffer first costs more
    than the hash (a 681 MB file: 37 ms to copy, 26 ms to hash, on one core here). A job is
    then one call that releases the GIL, so it needs the GIL back only once: while the
    load's own thread runs Python, a hashing thread waits up to the interpreter's switch
    interval each time it does (a map, a size check and an unmap per block made that three
    times as slow).
    """

    def __init__(self, file: Union[MappedFile, OSError], algorithm: str) -> None:
        self._block = block_of(algorithm)
        self._error = file if isinstance(file, OSError) else None
        self._view = file.view if isinstance(file, MappedFile) else memoryview(b"")
        size, block = len(self._view), self._block
        parts = [(0, size)] if block is None else [(s, min(s + block, size)) for s in range(0, size, block)]
        ranges = [] if self._error is not None else parts
        self.jobs: list[Callable[[], Part]] = [
            functools.partial(_hash_part, self._view, start, stop, algorithm) for start, stop in ranges
        ]  # they hold the view, not this object: no cycle keeps the file mapped

    def result(self, parts: list[Part]) -> Union[str, OSError]:
        """The file's checksum from what its :attr:`jobs` yielded, in order, or the error opening it."""
        if self._error is not None:
            return self._error
        if self._block is not None:
            return _combined([p for p in parts if isinstance(p, bytes)])
        (whole,) = parts
        assert isinstance(whole, str)
        return whole


def _hash_part(view: memoryview, start: int, stop: int, algorithm: str) -> Part:
    """For a block format the XXH3-64 digest of ``view[start:stop]``, else the manifest's hex digest of it."""
    with view[start:stop] as part:
        if block_of(algorithm) is not None:
            return xxhash.xxh3_64_digest(part)
        hasher = new(algorithm)
        hasher.update(part)
        return hasher.hexdigest()


def files_checksums(paths: list[Path], algorithm: str = ALGORITHM) -> list[Union[str, OSError]]:
    """The checksum of each of ``paths``, or the ``OSError`` opening or reading it raised.

    All jobs of all files (see :class:`FileHash`) run on one pool of threads, one per core
    this process may use (at most :data:`MAX_THREADS`): one large file is hashed in parallel too.
    """
    hashes = [FileHash(map_file(path), algorithm) for path in paths]
    jobs = [job for h in hashes for job in h.jobs]
    if len(jobs) > 1:
        with ThreadPoolExecutor(max(1, min(len(jobs), cores(), MAX_THREADS))) as pool:
            parts = iter(list(pool.map(lambda job: job(), jobs)))
    else:
        parts = iter([job() for job in jobs])
    return [h.result([next(parts) for _ in h.jobs]) for h in hashes]


def file_checksum(path: Path, algorithm: str = ALGORITHM) -> str:
    """The checksum of ``path``'s bytes (its blocks hashed in parallel); raises ``OSError`` if unreadable."""
    (result,) = files_checksums([path], algorithm)
    if isinstance(result, OSError):
        raise result
    return result


@dataclass(frozen=True)
class Checksums:
    """A manifest's checksums: the algorithm it names and ``{file name: checksum}``."""

    algorithm: str
    of: dict[str, str]


def checksums(directory: Path, names: list[str]) -> dict[str, str]:
    """``{name: checksum}`` of the files ``names`` in ``directory`` (:data:`ALGORITHM`); raises ``OSError``."""
    return {name: file_checksum(directory / name) for name in names}
