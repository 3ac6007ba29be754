"""Checkpoint directories on disk: atomic commit, keep-last-K, newest-complete lookup, integrity.

Layout under a root directory::

    root/ckpt-00000007/          a complete checkpoint (sequence number 7)
        .metadata, __0_0.distcp ...   torch.distributed.checkpoint files (one per writing rank)
        meta.json                model, optimizer and hyper-parameter description
        extra.pt                 the user's ``extra`` (rank 0's)
        manifest.json            every file above with its size; written last
    root/.tmp-ckpt-00000008-<id>/    a save in progress (or one that crashed): never loaded

A save writes into a ``.tmp-`` directory and renames it to ``ckpt-N`` only when every file
and the manifest are on disk (POSIX rename is atomic), so a crash at any point leaves the
previous checkpoint as the newest complete one. Old checkpoints are first renamed away
(``.del-``) and then deleted, so a crash while pruning never leaves a half-deleted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Optional

from lion_sf_dist.checkpoint.errors import CheckpointCorruptError, CheckpointNotFoundError

PREFIX = "ckpt-"
TMP = ".tmp-"
DELETED = ".del-"
MANIFEST = "manifest.json"
META = "meta.json"
EXTRA = "extra.pt"
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


def begin(root: Path) -> tuple[Path, Path]:
    """``(tmp, final)``: a fresh temporary directory to write into and the name it will get."""
    root.mkdir(parents=True, exist_ok=True)
    seqs = [int(m.group(1)) for d in root.iterdir() if (m := _ANY_SEQ.search(d.name))]
    seq = max(seqs, default=-1) + 1
    final = root / f"{PREFIX}{seq:08d}"
    tmp = root / f"{TMP}{PREFIX}{seq:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp, final


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


def commit(tmp: Path, final: Path, keep: Optional[int]) -> None:
    """Seal ``tmp`` with a manifest, rename it to ``final`` and prune to the newest ``keep``."""
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
    write_durable(tmp / MANIFEST, json.dumps({"files": files}, indent=1).encode())
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    prune(final.parent, keep, current=tmp)


def prune(root: Path, keep: Optional[int], current: Optional[Path] = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of crashed saves."""
    doomed = complete(root)[:-keep] if keep else []
    for d in doomed:
        trash = root / f"{DELETED}{d.name}-{uuid.uuid4().hex[:8]}"
        os.rename(d, trash)
    for d in root.iterdir():
        if d.is_dir() and d != current and (d.name.startswith(DELETED) or d.name.startswith(TMP)):
            shutil.rmtree(d, ignore_errors=True)


def resolve(path: Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or the newest complete one under it."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if (path / MANIFEST).is_file():
        return path
    if _NAME.match(path.name) or path.name.startswith(TMP):
        raise CheckpointNotFoundError(
            f"{str(path)!r} is an incomplete checkpoint (no {MANIFEST}: its save did not finish)")
    found = complete(path)
    damaged = [d.name for d in path.iterdir() if _NAME.match(d.name) and d not in found] if path.is_dir() else []
    if found and damaged and max(damaged) > found[-1].name:
        warnings.warn(f"{str(path)!r}: {sorted(damaged)} lack {MANIFEST} (damaged after their save?); "
                      f"loading the newest complete one, {found[-1].name}", stacklevel=3)
    if not found:
        partial = [d.name for d in path.iterdir() if d.name.startswith(TMP)] if path.is_dir() else []
        hint = f" (only unfinished saves: {partial})" if partial else ""
        raise CheckpointNotFoundError(f"no complete checkpoint under {str(path)!r}{hint}")
    return found[-1]


def verify(ckpt: Path) -> None:
    """Raise :class:`CheckpointCorruptError` naming any file that is missing or has the wrong size."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
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
                f"({actual} bytes, {size} written){hint}")
