"""Checkpoint files mapped into memory once, for the hashing and for the read that follows it.

A load hashes every shard file, then copies the tensors out of the same bytes. Both read
the file through one copy-on-write mapping (:class:`MappedFile`; nothing ever writes to
it, so it stays the page cache's own pages): the copy finds the page tables the hashing
already filled, and neither makes a private copy of the file.

The price is the one every memory-mapped reader pays (``safetensors``,
``torch.load(mmap=True)``): a file truncated by another process while it is mapped ends
this process with SIGBUS instead of an error. This library never changes a committed
checkpoint's files in place.

A filesystem that cannot map files (``mmap`` fails with ``ENODEV``: some FUSE and object
store mounts) gets the file read into memory instead: the same bytes, at the cost of a
private copy, so checkpoints save and load wherever plain reads work.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor


class MappedFile:
    """The bytes of the file at ``path``, mapped: :attr:`view` for hashing, :meth:`as_tensor` for reading.

    Raises ``OSError`` if the file cannot be opened, mapped or read. The mapping goes when
    the last view of it does (the memoryview, the tensor and every tensor sliced from it).
    On a filesystem that cannot map files the bytes are read into memory instead.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:  # the mapping outlives the descriptor
            self.size = os.fstat(f.fileno()).st_size
            self._bytes: Optional[Union[mmap.mmap, bytearray]] = _file_bytes(f, self.size) if self.size else None
        self.view = memoryview(self._bytes if self._bytes is not None else b"")
        self._tensor: Optional[Tensor] = None

    def as_tensor(self) -> Tensor:
        """The file as a 1-D ``uint8`` CPU tensor over its mapped (or read) bytes, not a copy."""
        if self._tensor is None:
            self._tensor = (
                torch.frombuffer(self._bytes, dtype=torch.uint8)
                if self._bytes is not None
                else torch.empty(0, dtype=torch.uint8)
            )
        return self._tensor


def _file_bytes(f: io.BufferedReader, size: int) -> Union[mmap.mmap, bytearray]:
    """The first ``size`` bytes of open file ``f`` mapped copy-on-write or, where its filesystem
    cannot map files, read (a file that shrank meanwhile is read as far as it goes)."""
    try:
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except OSError as e:
        if e.errno != errno.ENODEV:
            raise
    data = bytearray(size)
    with memoryview(data) as rest:
        got = 0
        while got < size:
            n = f.readinto(rest[got:])
            if not n:
                break
            got += n
    del data[got:]
    return data


def map_file(path: Path) -> Union[MappedFile, OSError]:
    """The file at ``path`` mapped, or the ``OSError`` opening or mapping it raised."""
    try:
        return MappedFile(path)
    except OSError as e:
        return e


class MappedFiles:
    """The files of checkpoint ``ckpt``, each mapped at most once, by name; an error opening one is kept."""

    def __init__(self, ckpt: Path) -> None:
        self._ckpt = ckpt
        self._files: dict[str, Union[MappedFile, OSError]] = {}

    def get(self, name: str) -> Union[MappedFile, OSError]:
        """File ``name`` mapped, or the ``OSError`` mapping it raised (the same one every time)."""
        if name not in self._files:
            self._files[name] = map_file(self._ckpt / name)
        return self._files[name]

    def release(self) -> None:
        """Forget every mapping: each is unmapped once nothing else views it."""
        self._files.clear()
