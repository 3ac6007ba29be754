"""Checking files against the manifest's checksums, with the hashing started ahead of the check.

A load must hash every file it reads before the first byte reaches the model, so the hash
adds to the load one for one unless it overlaps work the load does anyway. A
:class:`Verification` starts hashing files in the background as soon as it is told which
ones will be read (:meth:`Verification.start`: from the manifest in a single-process load,
from the local read plan otherwise), on this rank's share of the cores but one (at least
one thread: see :func:`checksum.cores`), while the load's own thread
checks the model and DCP plans. :meth:`Verification.check` then runs the jobs no
background thread has begun on the calling thread too, and raises on any mismatch.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from lion_sf_dist.checkpoint import checksum
from lion_sf_dist.checkpoint.errors import CheckpointCorruptError
from lion_sf_dist.checkpoint.mapping import MappedFiles


class Verification:
    """The files of checkpoint ``ckpt`` checked against ``sums`` (``None``: a manifest without checksums).

    The files are hashed through ``files``' mappings (by default its own), which a reader
    then shares. Not thread-safe: one load drives it. :meth:`close` stops the background
    hashing (jobs not begun are dropped).
    """

    def __init__(self, ckpt: Path, sums: Optional[checksum.Checksums], files: Optional[MappedFiles] = None) -> None:
        self._ckpt = ckpt
        self._sums = sums
        self._mapped = files if files is not None else MappedFiles(ckpt)
        self._files: dict[str, tuple[checksum.FileHash, list[Future[checksum.Part]]]] = {}
        self._pool: Optional[ThreadPoolExecutor] = None

    def start(self, names: list[str]) -> None:
        """Begin hashing those of ``names`` the manifest lists and that are not begun yet, in the background."""
        if self._sums is None:
            return
        for name in sorted({n for n in names if n in self._sums.of and n not in self._files}):
            if self._pool is None:
                threads = min(max(1, checksum.cores() - 1), checksum.MAX_THREADS)  # the caller keeps a core
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lion_sf_dist-verify")
            hashing = checksum.FileHash(self._mapped.get(name), self._sums.algorithm)
            self._files[name] = (hashing, [self._pool.submit(job) for job in hashing.jobs])

    def check(self, names: list[str]) -> None:
        """Raise :class:`CheckpointCorruptError` naming the first of ``names`` that is unlisted, unreadable or
        differs from its checksum. Starts what was not started; this thread runs every job not yet begun."""
        if self._sums is None:
            return
        unlisted = [name for name in names if name not in self._sums.of]
        if unlisted:
            raise CheckpointCorruptError(f"checkpoint {str(self._ckpt)!r}: file {unlisted[0]!r} is not in the manifest")
        names = list(dict.fromkeys(names))
        self.start(names)
        stolen: dict[tuple[str, int], checksum.Part] = {}
        for name in names:  # jobs no background thread has begun: this thread runs them
            hashing, futures = self._files[name]
            for i, (job, future) in enumerate(zip(hashing.jobs, futures)):
                if future.cancel():
                    stolen[name, i] = job()
        for name in names:
            hashing, futures = self._files[name]
            parts = [stolen[name, i] if (name, i) in stolen else f.result() for i, f in enumerate(futures)]
            actual = hashing.result(parts)
            if isinstance(actual, OSError):
                raise CheckpointCorruptError(
                    f"checkpoint {str(self._ckpt)!r}: file {name!r} is unreadable ({actual})"
                ) from actual
            if actual != self._sums.of[name]:
                raise CheckpointCorruptError(
                    f"checkpoint {str(self._ckpt)!r}: file {name!r} is corrupt "
                    f"({self._sums.algorithm} {actual}, {self._sums.of[name]} written)"
                )

    def close(self) -> None:
        """Stop the background hashing (waiting for jobs running) and let go of the files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._files.clear()


def verify_files(ckpt: Path, names: list[str], sums: Optional[checksum.Checksums]) -> None:
    """:meth:`Verification.check` of ``names``, now, on every core."""
    verification = Verification(ckpt, sums)
    try:
        verification.check(names)
    finally:
        verification.close()
