"""DCP's tensor items viewed where they lie in a mapped shard file, so that a load copies each once.

A shard file holds one ``torch.save`` archive per tensor item, at the offset and length
DCP's metadata records. DCP's own reader ``torch.load``-s each archive, which copies the
data into a new tensor, then copies that into the running one. Here an archive is parsed
in place instead: its zip directory by torch's archive reader, its ``data.pkl`` by an
unpickler that builds nothing but a description (:class:`_Layout`; allow-list: the two
tensor-rebuild functions, storage types, dtypes and ``OrderedDict``), and its data record
stays where it is: a view of the mapping with the described shape and strides, held as
bytes (:class:`StoredTensor`, :func:`view_item`) and copied byte for byte into the running
tensor. Parsing reads a few hundred bytes per item and changes nothing, so a load parses
every item while its files are still being hashed, and copies once they are verified.

An archive is untrusted (a checkpoint written before checksums is never verified, and a
checksum is no signature): every size, stride and offset is checked to lie inside the
item before a view is made, and anything this format does not write is refused.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lion_sf_dist import _torch_private
from lion_sf_dist.checkpoint.errors import CheckpointCorruptError, UnsafeCheckpointError
from lion_sf_dist.checkpoint.mapping import MappedFile

# How ``torch.save`` names the storage of a tensor of these dtypes (the others: an untyped storage and the dtype)
_LEGACY_STORAGES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}


@dataclass(frozen=True)
class _Storage:
    """A storage ``data.pkl`` refers to: its record ``data/<key>``, size and dtype (``None``: untyped)."""

    key: str
    nbytes: int
    dtype: Optional[torch.dtype]


@dataclass(frozen=True)
class _Layout:
    """The one tensor an archive holds: which storage, and the view of it (in elements of ``dtype``)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class _Refused(pickle.UnpicklingError):
    """``data.pkl`` names an object outside the allow-list (refused before it is built)."""


def _rebuild_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> _Layout:
    """torch's version-2 tensor rebuild, described (dtypes with a legacy storage class)."""
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise _Refused("a tensor without a typed storage")
    return _Layout(storage, offset, tuple(size), tuple(stride), storage.dtype)


def _rebuild_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _Layout:
    """torch's version-3 tensor rebuild, described (the other dtypes: an untyped storage and a dtype)."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise _Refused("a tensor without a storage or a dtype")
    return _Layout(storage, offset, tuple(size), tuple(stride), dtype)


_REBUILDS = {name: {2: _rebuild_v2, 3: _rebuild_v3}[v] for name, v in _torch_private.tensor_rebuild_names().items()}
_UNTYPED = object()  # ``torch.storage.UntypedStorage`` as a storage type in ``data.pkl``


class _LayoutUnpickler(pickle.Unpickler):
    """Unpickles a tensor archive's ``data.pkl`` into a :class:`_Layout`, building nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILDS:
            return _REBUILDS[module, name]
        if module == "torch" and name in _LEGACY_STORAGES:
            return _LEGACY_STORAGES[name]
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _UNTYPED
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name} is not allowed in a tensor item")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent reference {pid!r} is not a storage")
        _, kind, key, _location, numel = pid  # numel: elements of a typed storage, bytes of an untyped one
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _Refused("a storage reference without a key or a size")
        if kind is _UNTYPED:
            return _Storage(key, numel, None)
        if not isinstance(kind, torch.dtype):
            raise _Refused(f"storage type {kind!r} is not allowed")
        return _Storage(key, numel * kind.itemsize, kind)


class _Slice(io.RawIOBase):
    """A read-only, seekable file over a memoryview: what torch's archive reader reads an item through."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: Optional[int] = -1) -> bytes:
        stop = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos : stop])
        self._pos = max(self._pos, stop)
        return out

    def readinto(self, buffer: Any) -> int:
        out = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(out)] = out
        return len(out)


def _layout(archive: Any) -> _Layout:
    """The described tensor of an archive, its numbers checked to describe a view of its storage.

    Raises :class:`_Refused` for an object outside the allow-list, ``ValueError`` for
    anything else that is not a tensor this format writes.
    """
    layout = _LayoutUnpickler(io.BytesIO(archive.get_record("data.pkl"))).load()
    if not isinstance(layout, _Layout):
        raise ValueError(f"data.pkl holds a {type(layout).__name__}, not a tensor")
    numbers = (layout.offset, *layout.size, *layout.stride)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise ValueError("a tensor with a negative or non-integer offset, size or stride")
    if len(layout.size) != len(layout.stride):
        raise ValueError(f"a tensor of {len(layout.size)} sizes and {len(layout.stride)} strides")
    if layout.storage.dtype is not None and layout.storage.dtype != layout.dtype:
        raise ValueError(f"a {layout.dtype} tensor on a {layout.storage.dtype} storage")
    elements, rest = divmod(layout.storage.nbytes, layout.dtype.itemsize)
    if rest:
        raise ValueError(f"a storage of {layout.storage.nbytes} bytes holding {layout.dtype} elements")
    extent = layout.offset + sum((n - 1) * s for n, s in zip(layout.size, layout.stride)) + 1
    if math.prod(layout.size) and extent > elements:
        raise ValueError(f"a view reaching element {extent} of a storage of {elements}")
    return layout


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as it lies in a mapped file: its bytes, at whatever address the file puts them.

    DCP packs items back to back, so an item's data is rarely aligned to its dtype, and
    some kernels (complex ones among them) fault on a misaligned typed view. So the data
    is held as ``uint8`` (:attr:`data`: the tensor's shape and one trailing dimension of
    ``dtype.itemsize`` bytes) and copied byte for byte into a tensor of its own dtype.
    """

    data: Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape[:-1]

    def narrow(self, dim: int, start: int, length: int) -> StoredTensor:
        """Elements ``[start, start + length)`` along ``dim``, still in place."""
        return StoredTensor(self.data.narrow(dim, start, length), self.dtype)

    def copy_to(self, target: Tensor) -> None:
        """Copy into ``target`` (its shape): the bytes as they are, or converted to another dtype."""
        if target.dtype == self.dtype:
            target.unsqueeze(-1).view(torch.uint8).copy_(self.data)
        else:
            target.copy_(self.value())

    def value(self) -> Tensor:
        """A copy of the tensor in memory of its own (aligned), of its dtype."""
        return self.data.clone(memory_format=torch.contiguous_format).view(self.dtype).squeeze(-1)


def view_item(file: MappedFile, offset: int, length: int, where: str) -> StoredTensor:
    """The tensor whose ``torch.save`` archive is bytes ``[offset, offset + length)`` of ``file``, in place.

    The result reads the mapping: copy out of it before the file is released. An archive
    written on a host of the other byte order is copied and byte-swapped (as ``torch.load``
    would). Raises :class:`UnsafeCheckpointError` for objects this format never writes and
    :class:`CheckpointCorruptError` for anything else malformed, naming ``where``.
    """
    if offset < 0 or length < 0 or offset + length > file.size:
        raise CheckpointCorruptError(f"{where}: item at {offset} of {length} bytes lies outside its file")
    try:
        archive = _torch_private.tensor_archive(_Slice(file.view[offset : offset + length]))
        layout = _layout(archive)
        record = f"data/{layout.storage.key}"
        start, nbytes = archive.get_record_offset(record), archive.get_record_size(record)
        order = archive.get_record("byteorder") if archive.has_record("byteorder") else sys.byteorder.encode()
    except _Refused as e:
        raise UnsafeCheckpointError(f"{where}: {e}") from e
    except (
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        TypeError,
        EOFError,
        KeyError,
        IndexError,
        OverflowError,
    ) as e:
        raise CheckpointCorruptError(f"{where}: unreadable tensor archive ({type(e).__name__}: {e})") from e
    itemsize = layout.dtype.itemsize
    if nbytes != layout.storage.nbytes or start < 0 or start + nbytes > length:
        raise CheckpointCorruptError(
            f"{where}: data record of {nbytes} bytes at {start} does not hold the {layout.storage.nbytes} "
            f"bytes described, inside the item's {length} bytes"
        )
    if order not in (b"little", b"big"):
        raise CheckpointCorruptError(f"{where}: byte order {order!r}")
    data = file.as_tensor()[offset + start : offset + start + nbytes]
    if order != sys.byteorder.encode():
        data = data.clone()
        data.untyped_storage().byteswap(layout.dtype)
    return StoredTensor(
        data.as_strided(
            (*layout.size, itemsize),
            (*(n * itemsize for n in layout.stride), 1),
            data.storage_offset() + layout.offset * itemsize,
        ),
        layout.dtype,
    )
