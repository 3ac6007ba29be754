"""Checkpoint directories on disk: atomic commit, keep-last-K, newest-complete lookup, integrity.

Layout under a root directory::

    root/ckpt-00000007/          a complete checkpoint (sequence number 7)
        .metadata, __0_0.distcp ...   torch.distributed.checkpoint files (one per writing rank)
        meta.json                model, optimizer and hyper-parameter description
        extra.pt                 the user's ``extra`` (rank 0's)
        manifest.json            every file above with its size and checksum; written last
    root/.tmp-ckpt-00000008-<id>/    a save in progress (or one that crashed): never loaded
        .writing                 locked (shared) by the writer while it is alive
    root/.lock                   locked (exclusive) while a save picks its name, commits or prunes

A save writes into a ``.tmp-`` directory and renames it to ``ckpt-N`` only when every file
and the manifest are on disk (POSIX rename is atomic), so a crash at any point leaves the
previous checkpoint as the newest complete one. Old checkpoints are first renamed away
(``.del-``) and then deleted, so a crash while pruning never leaves a half-deleted one.

Several writers may share a root (two jobs, or a save while a ``save_async`` runs): naming,
committing and pruning hold an exclusive ``flock`` on ``root/.lock``, and a save in progress
holds a shared lock on its temporary directory's ``.writing`` file, so pruning removes only
temporaries whose writer is gone. A filesystem without ``flock`` raises
:class:`CheckpointLockError` rather than risk two writers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from lion_sf_dist.checkpoint import checksum
from lion_sf_dist.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLockError,
    CheckpointNotFoundError,
)

PREFIX = "ckpt-"
TMP = ".tmp-"
DELETED = ".del-"
MANIFEST = "manifest.json"
META = "meta.json"
EXTRA = "extra.pt"
LOCK = ".lock"
WRITING = ".writing"
_NAME = re.compile(r"^ckpt-(\d+)$")
_ANY_SEQ = re.compile(r"ckpt-(\d+)")


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def check_keep(keep: Any) -> None:
    """Raise unless ``keep`` is an ``int`` >= 1 or ``None`` (checked before anything is written)."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[int]:
    """``path`` opened (created if needed) and ``flock``-ed with ``mode``; the descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise CheckpointLockError(
                    f"cannot lock {str(path)!r} ({e}): this filesystem has no flock; keep one writer per "
                    "checkpoint root, on a filesystem with locks"
                ) from e
            raise
        yield fd
    finally:
        os.close(fd)


def locked(root: Path) -> contextlib.AbstractContextManager[int]:
    """The root's exclusive lock: held to pick a name, to commit and to prune."""
    return _flock(root / LOCK, fcntl.LOCK_EX)


_writing: dict[Path, contextlib.ExitStack] = {}  # this process's saves in progress: their held locks


def begin(root: Path) -> tuple[Path, Path]:
    """``(tmp, final)``: a fresh temporary directory to write into and the name it will get.

    The temporary directory's ``.writing`` lock is held (shared) until :func:`commit` or
    :func:`abandon`, so no concurrent prune removes it meanwhile.
    """
    root.mkdir(parents=True, exist_ok=True)
    with locked(root):
        seq = _next_seq(root)
        final = root / f"{PREFIX}{seq:08d}"
        tmp = root / f"{TMP}{PREFIX}{seq:08d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        hold = contextlib.ExitStack()
        hold.enter_context(_flock(tmp / WRITING, fcntl.LOCK_SH))
        _writing[tmp] = hold
    return tmp, final


def _next_seq(root: Path) -> int:
    seqs = [int(m.group(1)) for d in root.iterdir() if (m := _ANY_SEQ.search(d.name))]
    return max(seqs, default=-1) + 1


def abandon(tmp: Path) -> None:
    """Release a failed save's temporary directory: the next prune (by any writer) removes it."""
    hold = _writing.pop(tmp, None)
    if hold is not None:
        hold.close()


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path, keep: Optional[int], checksums: dict[str, str]) -> Path:
    """Seal ``tmp`` with a manifest, rename it and prune to the newest ``keep``; the committed path.

    ``checksums`` must name every file in ``tmp`` (each rank's shards, gathered, and rank 0's
    own files): a file without one, or one listed but absent, means a rank's part is
    missing, and nothing is committed. The name is ``final`` unless a concurrent writer
    took it (or a newer one) meanwhile: then the next free one, so the newest checkpoint
    is always the last committed. A failed prune is a warning: the checkpoint is saved.
    """
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.name != WRITING}
    if files.keys() != checksums.keys():
        raise CheckpointError(
            f"{str(final)!r} is incomplete, not committed: files written {sorted(files)}, "
            f"files reported by the ranks {sorted(checksums)}"
        )
    manifest = {"files": files, "checksum": checksum.ALGORITHM, "checksums": dict(sorted(checksums.items()))}
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    with locked(final.parent):
        if final.exists() or (complete(final.parent) and complete(final.parent)[-1].name > final.name):
            final = final.parent / f"{PREFIX}{_next_seq(final.parent):08d}"
        (tmp / WRITING).unlink()
        _fsync_dir(tmp)
        os.rename(tmp, final)
        abandon(tmp)
        _fsync_dir(final.parent)
        try:
            prune(final.parent, keep)
        except OSError as e:
            warnings.warn(f"{str(final)!r} was saved, but pruning old checkpoints failed: {e}", stacklevel=2)
    return final


def prune(root: Path, keep: Optional[int]) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of dead saves.

    Call with :func:`locked` held. A ``.tmp-`` directory whose ``.writing`` lock is held is
    a save in progress (of this or another process) and stays.
    """
    doomed = complete(root)[:-keep] if keep else []
    for d in doomed:
        trash = root / f"{DELETED}{d.name}-{uuid.uuid4().hex[:8]}"
        os.rename(d, trash)
    for d in root.iterdir():
        if d.is_dir() and (d.name.startswith(DELETED) or (d.name.startswith(TMP) and not _in_progress(d))):
            shutil.rmtree(d, ignore_errors=True)


def _in_progress(tmp: Path) -> bool:
    """Whether a live writer holds ``tmp``'s ``.writing`` lock."""
    if not (tmp / WRITING).is_file():
        return False  # crashed before its lock existed, or an older version's leftover
    try:
        with _flock(tmp / WRITING, fcntl.LOCK_EX | fcntl.LOCK_NB):
            return False
    except BlockingIOError:
        return True


def resolve(path: Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or the newest complete one under it."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if (path / MANIFEST).is_file():
        return path
    if _NAME.match(path.name) or path.name.startswith(TMP):
        raise CheckpointNotFoundError(
            f"{str(path)!r} is an incomplete checkpoint (no {MANIFEST}: its save did not finish)"
        )
    found = complete(path)
    damaged = [d.name for d in path.iterdir() if _NAME.match(d.name) and d not in found] if path.is_dir() else []
    if found and damaged and max(damaged) > found[-1].name:
        warnings.warn(
            f"{str(path)!r}: {sorted(damaged)} lack {MANIFEST} (damaged after their save?); "
            f"loading the newest complete one, {found[-1].name}",
            stacklevel=3,
        )
    if not found:
        partial = [d.name for d in path.iterdir() if d.name.startswith(TMP)] if path.is_dir() else []
        hint = f" (only unfinished saves: {partial})" if partial else ""
        raise CheckpointNotFoundError(f"no complete checkpoint under {str(path)!r}{hint}")
    return found[-1]


def verify(ckpt: Path) -> Optional[checksum.Checksums]:
    """Raise :class:`CheckpointCorruptError` naming any file that is missing or has the wrong size.

    Returns the manifest's checksums (``None``: written before checksums were recorded; a
    warning says its contents cannot be verified).
    """
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{ckpt / MANIFEST}: unreadable manifest ({e})") from e
    older = [d for d in complete(ckpt.parent) if d.name < ckpt.name]
    hint = f"; the previous checkpoint {str(older[-1])!r} can be loaded by passing its path" if older else ""
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r}: file {name!r} is missing{hint}")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointCorruptError(
                f"checkpoint {str(ckpt)!r}: file {name!r} is truncated or altered "
                f"({actual} bytes, {size} written){hint}"
            )
    sums = manifest.get("checksums")
    if sums is None:
        warnings.warn(
            f"checkpoint {str(ckpt)!r} predates checksums: its files' sizes were checked, their contents cannot be",
            stacklevel=3,
        )
        return None
    algorithm = manifest.get("checksum")
    if (
        algorithm not in checksum.READABLE
        or not isinstance(sums, dict)
        or sums.keys() != files.keys()
        or not all(isinstance(v, str) for v in sums.values())
    ):
        raise CheckpointCorruptError(
            f"{ckpt / MANIFEST}: checksums ({algorithm!r}) do not match its files or name none of "
            f"{sorted(checksum.READABLE)}"
        )
    return checksum.Checksums(algorithm, sums)
