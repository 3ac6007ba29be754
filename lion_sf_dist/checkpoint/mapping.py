"""Checkpoint files mapped into memory once, for the hashing and for the read that follows it.

A load hashes every shard file, then copies the tensors out of the same bytes. Both read
the file through one copy-on-write mapping (:class:`MappedFile`; nothing ever writes to
it, so it stays the page cache's own pages): the copy finds the page tables the hashing
already filled, and neither makes a private copy of the file.

The price is the one every memory-mapped reader pays (``safetensors``,
``torch.load(mmap=True)``): a file truncated by another process while it is mapped ends
this process with SIGBUS instead of an error. This library never changes a committed
checkpoint's files in place.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor


class MappedFile:
    """The bytes of the file at ``path``, mapped: :attr:`view` for hashing, :meth:`as_tensor` for reading.

    Raises ``OSError`` if the file cannot be opened or mapped. The mapping goes when the
    last view of it does (the memoryview, the tensor and every tensor sliced from it).
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:  # the mapping outlives the descriptor
            self.size = os.fstat(f.fileno()).st_size
            self._mapped: Optional[mmap.mmap] = (
                mmap.mmap(f.fileno(), self.size, access=mmap.ACCESS_COPY) if self.size else None
            )
        self.view = memoryview(self._mapped if self._mapped is not None else b"")
        self._tensor: Optional[Tensor] = None

    def as_tensor(self) -> Tensor:
        """The file as a 1-D ``uint8`` CPU tensor over the mapping (no copy)."""
        if self._tensor is None:
            self._tensor = (
                torch.frombuffer(self._mapped, dtype=torch.uint8)
                if self._mapped is not None
                else torch.empty(0, dtype=torch.uint8)
            )
        return self._tensor


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
