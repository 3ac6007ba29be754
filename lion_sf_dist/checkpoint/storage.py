"""DCP storage of our own: a writer that checksums what it wrote, a reader that trusts nothing it reads.

:class:`SafeReader` replaces ``FileSystemReader``'s two unsafe steps:

- ``.metadata``: DCP unpickles it with plain ``pickle.load``, so a replaced file runs any
  code it likes. Here it is unpickled with an allow-list of the classes DCP itself writes
  (:data:`_ALLOWED`), anything else refused with :class:`UnsafeCheckpointError` before it
  is constructed; then its structure is checked (tensor entries only: a ``bytes`` entry
  would make DCP ``torch.load(weights_only=False)`` part of a shard file), its shard file
  names (plain names inside the checkpoint, each listed in the manifest) and its coverage
  (the chunks of every tensor tile it exactly: no element missing, none twice).
- the shard files: before the first byte is copied into a tensor, every file this rank's
  plan reads is checked against the manifest's checksum, and all ranks agree (one small
  collective) that every rank's files are intact. So a corrupt or missing file fails the
  load on every rank, naming the file, with the running model untouched. The hashing
  starts in the background as soon as the files are known (the local plan, or
  :meth:`SafeReader.start_verifying`), so it overlaps DCP's planning.

Tensor data is read in place (:mod:`~lion_sf_dist.checkpoint.items`): each file is mapped
once, for the hashing and for the read; every item this rank reads is parsed into a view
of the mapping while the hashing runs, and copied into its running tensor once every rank
agreed. DCP's ``FileSystemReader`` would ``torch.load`` each item into a new tensor first
and copy it from there: on the benchmark's 681 MB checkpoint (288 items, one process) its
read took 265-275 ms, this one 140-150 ms (25 to parse, the rest to copy).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner

from lion_sf_dist import _torch_private
from lion_sf_dist.checkpoint import checksum, comm
from lion_sf_dist.checkpoint.errors import CheckpointCorruptError, UnsafeCheckpointError
from lion_sf_dist.checkpoint.items import StoredTensor, view_item
from lion_sf_dist.checkpoint.mapping import MappedFile, MappedFiles
from lion_sf_dist.checkpoint.verification import Verification

METADATA = ".metadata"  # the name DCP gives its global metadata file


_ALLOWED: dict[tuple[str, str], Any] = {
    **_torch_private.dcp_metadata_pickle_names(),
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): PosixPath,  # StorageMeta.checkpoint_id: the directory DCP wrote to
    ("pathlib", "PurePosixPath"): PurePosixPath,
}
_StorageInfo = _ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")]


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only DCP's metadata records, torch dtypes and plain data."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's {METADATA}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent references are not allowed in a checkpoint's {METADATA}")


def read_metadata(path: Path, where: str) -> dcp_metadata.Metadata:
    """``path`` (a DCP ``.metadata``) unpickled with the allow-list and checked for structure."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{where}: refusing {METADATA}: {e}; it was not written by this library "
            "(replaced or tampered with), and loading it could run code"
        ) from e
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointCorruptError(f"{where}: unreadable {METADATA} ({type(e).__name__}: {e})") from e
    _check_structure(md, where)
    return md


def _check_structure(md: Any, where: str) -> None:
    """Raise unless ``md`` is a DCP ``Metadata`` of tensors whose entries point at plain file names."""
    bad = f"{where}: malformed {METADATA}"
    if not isinstance(md, dcp_metadata.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointCorruptError(f"{bad}: not a DCP Metadata record")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{bad}: entry {key!r} is a {type(entry).__name__}, not a tensor (this format writes tensors only)"
            )
        if (
            not isinstance(entry.properties, dcp_metadata.TensorProperties)
            or not isinstance(entry.properties.dtype, torch.dtype)
            or not isinstance(entry.size, torch.Size)
        ):
            raise CheckpointCorruptError(f"{bad}: entry {key!r} has no valid size or dtype")
        if not isinstance(entry.chunks, list) or not all(
            isinstance(c, dcp_metadata.ChunkStorageMetadata) for c in entry.chunks
        ):
            raise CheckpointCorruptError(f"{bad}: entry {key!r} has no valid chunk list")
    if not isinstance(md.storage_data, dict):
        raise CheckpointCorruptError(f"{bad}: no storage records")
    for index, info in md.storage_data.items():
        if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointCorruptError(f"{bad}: a storage record of type {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise UnsafeCheckpointError(
                f"{bad}: storage record of {index.fqn!r} points at {name!r}, not a file of the checkpoint"
            )
        if info.transform_descriptors:
            raise UnsafeCheckpointError(
                f"{bad}: storage record of {index.fqn!r} asks for stream transforms "
                f"{list(info.transform_descriptors)} (this format writes none)"
            )
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise CheckpointCorruptError(f"{bad}: storage record of {index.fqn!r} has a bad offset or length")


Box = tuple[tuple[int, ...], tuple[int, ...]]


def uncovered(size: tuple[int, ...], boxes: list[Box]) -> Optional[str]:
    """Why the ``(offsets, sizes)`` boxes do not tile a tensor of ``size`` exactly, or ``None``.

    Identical boxes count once (a replicated piece written by two ranks holds the same
    data); otherwise boxes must lie inside the tensor, not overlap, and their volumes sum
    to its element count: together these mean every element is covered exactly once.
    Overlaps are found by a sweep along dimension 0, near-linear for the row-sharded
    layouts DCP writes.
    """
    unique = sorted({(tuple(o), tuple(s)) for o, s in boxes if math.prod(s) > 0})
    for offsets, sizes in unique:
        if (
            len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o < 0 or o + s > d for o, s, d in zip(offsets, sizes, size))
        ):
            return f"chunk at {list(offsets)} of size {list(sizes)} lies outside the tensor's {list(size)}"
    if len(size) == 0:
        return None if unique else "no chunk holds the scalar"
    active: list[Box] = []
    for box in unique:
        active = [a for a in active if a[0][0] + a[1][0] > box[0][0]]
        for a in active:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], box[0], box[1])):
                return f"chunks at {list(a[0])} and {list(box[0])} overlap"
        active.append(box)
    covered = sum(math.prod(s) for _, s in unique)
    total = math.prod(size)
    return None if covered == total else f"its chunks hold {covered} of its {total} elements"


def check_coverage(md: dcp_metadata.Metadata, where: str) -> None:
    """Raise :class:`CheckpointCorruptError` unless every tensor's chunks tile it and are all stored."""
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointCorruptError(f"{where}: entry {key!r} is not a tensor ({type(entry).__name__})")
        why = uncovered(tuple(entry.size), [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks])
        if why is None:
            missing = [
                list(c.offsets)
                for c in entry.chunks
                if dcp_metadata.MetadataIndex(key, c.offsets) not in md.storage_data
            ]
            why = f"chunks at {missing} have no storage record" if missing else None
        if why is not None:
            raise CheckpointCorruptError(
                f"{where}: tensor {key!r} is incomplete in the checkpoint: {why} "
                "(a save that did not finish on every rank?)"
            )


class SafeReader(FileSystemReader):
    """``FileSystemReader`` with the allow-listed ``.metadata``, coverage and checksum checks above.

    Args:
        ckpt: the checkpoint directory.
        checksums: the manifest's checksums; every shard file and ``.metadata`` must be
            listed. ``None`` for a checkpoint written before checksums
            were recorded (sizes were checked; contents cannot be).
        where: how errors name the checkpoint.
        group: the process group the load runs on (``None``: the default one).
    """

    def __init__(
        self, ckpt: Path, checksums: Optional[checksum.Checksums], where: str, group: Optional[dist.ProcessGroup] = None
    ) -> None:
        super().__init__(str(ckpt))
        self._ckpt = ckpt
        self._checksums = checksums
        self._mapped = MappedFiles(ckpt)
        self._verification = Verification(ckpt, checksums, self._mapped)
        self._where = where
        self._group = group
        self._metadata: Optional[dcp_metadata.Metadata] = None

    def checked_metadata(self) -> dcp_metadata.Metadata:
        """The checkpoint's metadata, read once: checksum, allow-list, structure, files and coverage checked."""
        if self._metadata is None:
            self._verification.check([METADATA])
            md = read_metadata(self._ckpt / METADATA, self._where)
            if self._checksums is not None:
                unlisted = sorted({i.relative_path for i in md.storage_data.values()} - set(self._checksums.of))
                if unlisted:
                    raise CheckpointCorruptError(f"{self._where}: shard file(s) {unlisted} are not in the manifest")
            check_coverage(md, self._where)
            self._metadata = md
        return self._metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        """DCP's entry point: the checked metadata (per-rank metadata files are not part of this format)."""
        if kwargs.get("rank") is not None:
            raise CheckpointCorruptError(f"{self._where}: per-rank metadata files are not part of this format")
        md = self.checked_metadata()
        if md.storage_meta is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return md

    def start_verifying(self, names: list[str]) -> None:
        """Begin hashing the files ``names``, which this rank will read, in the background."""
        self._verification.start(names)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """DCP's entry point once this rank knows what it reads: the hashing of those files begins."""
        self.start_verifying(self._files(plan))
        return super().prepare_local_plan(plan)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        """Parse every item this rank reads and verify its files, agree with the other ranks, then copy.

        Nothing is copied into a running tensor until every rank's items parsed and its
        files verified; a parse error in a file that fails its checksum is reported as the
        checksum failure, which names the file.
        """

        def prepare() -> list[tuple[ReadItem, StoredTensor, Tensor]]:
            wrong = [i.dest_index.fqn for i in plan.items if i.type != LoadItemType.TENSOR]
            if wrong:
                raise UnsafeCheckpointError(f"{self._where}: entries {wrong} would be unpickled, not read as tensors")
            files = self._files(plan)
            try:
                copies = [(item, self._source(item), planner.resolve_tensor(item).detach()) for item in plan.items]
            except CheckpointCorruptError:
                self._verification.check(files)  # a file failing its checksum explains the parse error: name it
                raise
            self._verification.check(files)
            for item, source, target in copies:
                if source.shape != target.shape:
                    raise CheckpointCorruptError(
                        f"{self._where}: {item.dest_index.fqn!r} at {list(item.dest_offsets)}: the checkpoint holds "
                        f"{list(source.shape)} elements where the plan reads {list(target.shape)}"
                    )
            return copies

        for item, source, target in comm.agree(prepare, self._group):
            source.copy_to(target)
            planner.commit_tensor(item, target)
        done: torch.futures.Future[None] = torch.futures.Future()
        done.set_result(None)
        return done

    def _source(self, item: ReadItem) -> StoredTensor:
        """The checkpoint's part of ``item``, in place in its file's mapping."""
        info = self.storage_data[item.storage_index]
        file = self._mapped.get(info.relative_path)
        where = f"{self._where}: file {info.relative_path!r}, entry {item.storage_index.fqn!r}"
        if not isinstance(file, MappedFile):
            raise CheckpointCorruptError(f"{where}: unreadable ({file})") from file
        whole = view_item(file, info.offset, info.length, where)
        for dim, (start, size) in enumerate(zip(item.storage_offsets, item.lengths)):
            if start < 0 or start + size > whole.shape[dim]:
                raise CheckpointCorruptError(f"{where}: the plan reads past the stored {list(whole.shape)}")
            whole = whole.narrow(dim, start, size)
        return whole

    def _files(self, plan: LoadPlan) -> list[str]:
        return sorted({self.storage_data[i.storage_index].relative_path for i in plan.items})

    def close(self) -> None:
        """Wait for hashing still running in the background (after a load that failed before reading); unmap."""
        self._verification.close()
        self._mapped.release()


class _HashingStream:
    """A file being written that keeps the running checksum of the bytes written to it, in order.

    ``sequential`` turns false if the writer seeks (it could then overwrite bytes already
    counted): the file is read back instead.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.hasher = checksum.new()
        self.sequential = True

    def write(self, data: checksum.Buffer) -> int:
        n = self._raw.write(data)
        self.hasher.update(memoryview(data).cast("B")[:n])
        return n

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return self._raw.seek(*args)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close: the file's own
        return getattr(self._raw, name)


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, recording the checksum of each file as it is written (``sums``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, str] = {}

    @contextlib.contextmanager
    def create_stream(self, path: Union[str, "os.PathLike[str]"], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as raw:
            if mode != "wb":
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
        if stream.sequential:
            self.sums[Path(path).name] = stream.hasher.hexdigest()


class ChecksummingWriter(FileSystemWriter):
    """``FileSystemWriter`` that records the checksum of every file this rank wrote (``written``).

    The checksum is computed from the bytes as they are written (no second pass over the
    files), on the writing thread: for ``save_async``, in the background.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._dir = path
        self._hashing = _HashingFileSystem()
        self.fs = self._hashing
        self.written: dict[str, str] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        """DCP's write, then the checksums of its files."""
        done = super().write_data(plan, planner)
        names = sorted({r.storage_data.relative_path for r in done.wait()})
        self.written = {n: self._hashing.sums.get(n) or checksum.file_checksum(self._dir / n) for n in names}
        return done
