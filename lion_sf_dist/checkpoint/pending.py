"""Asynchronous saves: copy the state now, write it on a background thread, one save at a time.

``save_async`` clones this rank's pieces (host memory equal to its share of parameters and
optimizer state), returns, and writes them with DCP on a thread over a dedicated gloo
process group (so the writes never interleave with training's collectives), then seals and
renames as a synchronous save does. Every ``save``, ``save_async`` and ``load`` first waits
for the previous asynchronous save and raises its error, if it failed.

A script that ends with ``dist.destroy_process_group()`` right after ``save_async`` would
pull the process groups from under the writer (one rank's shards written, another's not):
the first ``save_async`` makes ``torch.distributed.destroy_process_group`` wait for the
pending save first (and raise its failure after destroying). The process itself does not
exit before the writer thread ends (it is not a daemon). And whatever happens to a rank,
nothing is committed unless every rank reported its files (see ``api.write``).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from lion_sf_dist.checkpoint import comm
from lion_sf_dist.checkpoint.errors import CheckpointError

_previous: Optional["PendingSave"] = None
_group: Optional[dist.ProcessGroup] = None


class PendingSave:
    """A checkpoint being written in the background; :meth:`wait` returns its directory."""

    def __init__(self, final: Path) -> None:
        self.path = final
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def done(self) -> bool:
        """Whether the write has finished (successfully or not)."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> Path:
        """Block until written and renamed; raise :class:`CheckpointError` if it failed."""
        global _previous
        if self._thread is not None:
            self._thread.join()
        if _previous is self:
            _previous = None  # its outcome is now reported here, not again by the next save
        if self._error is not None:
            raise CheckpointError(f"asynchronous save of {str(self.path)!r} failed: {self._error}") from self._error
        return self.path


def wait_previous() -> None:
    """Wait for this process's pending asynchronous save (raising its failure once)."""
    global _previous
    job, _previous = _previous, None
    if job is not None:
        job.wait()


def start(final: Path, write: Callable[[Optional[dist.ProcessGroup]], Path]) -> PendingSave:
    """Run ``write(group)`` on a background thread over a dedicated gloo group; the pending save."""
    global _previous, _group
    if comm.distributed() and _group is None:
        _group = dist.new_group(backend="gloo")
    handle = PendingSave(final)
    group = _group

    def run() -> None:
        try:
            handle.path = write(group)
        except Exception as e:  # kept for wait(), which raises it in the caller's thread
            handle._error = e

    handle._thread = threading.Thread(target=run, name="lion_sf_dist-checkpoint", daemon=False)
    _guard_destroy()
    handle._thread.start()
    _previous = handle
    return handle


_unguarded_destroy: Optional[Callable[..., None]] = None


def _guard_destroy() -> None:
    """Make ``torch.distributed.destroy_process_group`` wait for this process's pending save.

    Installed once, on both names it is reached by (``torch.distributed`` re-exports
    ``distributed_c10d``'s function); a caller holding its own reference to the original
    (``from torch.distributed import destroy_process_group`` before the first
    ``save_async``) should ``wait()`` on the save itself.
    """
    global _unguarded_destroy
    if _unguarded_destroy is not None:
        return
    import torch.distributed.distributed_c10d as c10d

    original = _unguarded_destroy = c10d.destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(*args: Any, **kwargs: Any) -> None:
        global _group
        failure: Optional[CheckpointError] = None
        try:
            wait_previous()  # the writer's collectives need every group alive, on every rank
        except CheckpointError as e:
            failure = e
        original(*args, **kwargs)
        if not dist.is_initialized():
            _group = None  # destroyed with the world; a new world gets a new writer group
        if failure is not None:
            raise failure

    c10d.destroy_process_group = destroy_process_group
    dist.destroy_process_group = destroy_process_group
