"""``save`` and ``load``: collective, atomic, resharding checkpoints of a model and its LionSF."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from lion_sf_dist.checkpoint import comm, meta, pending, store
from lion_sf_dist.checkpoint.collect import Snapshot, copied, dcp_state, optimizer_of, snapshot
from lion_sf_dist.checkpoint.errors import CheckpointCorruptError, CheckpointError
from lion_sf_dist.checkpoint.meta import HparamPolicy
from lion_sf_dist.engines import is_deepspeed_engine, lionsf_of
from lion_sf_dist.optimizer import LionSF

PathLike = Union[str, Path]


def save(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Any = None, *, keep: Optional[int] = 3) -> Path:
    """Write a checkpoint of ``model`` and ``optimizer`` under the directory ``path``; collective.

    Every rank of the job calls it with its own (sharded or replicated) model and optimizer;
    each rank writes only the pieces it holds (DCP writes a replicated tensor once), nothing
    is gathered. The checkpoint lands in ``path/ckpt-<N>`` (``N`` one above the newest), is
    written into a temporary directory and renamed when complete, so a crash at any point
    leaves the previous checkpoint as the newest loadable one. Afterwards only the newest
    ``keep`` checkpoints are kept (``None``: all).

    Args:
        path: root directory of this run's checkpoints (created if needed).
        model: the module as trained: plain, DDP, FSDP2 (``fully_shard``), ``torch.compile``d,
            or a DeepSpeed engine.
        optimizer: the :class:`~lion_sf_dist.LionSF` stepping ``model`` (its ``exp_avg``,
            per-unit ``agreement_ema`` and hyper-parameters are saved), or ``None`` to save
            the parameters only.
        extra: anything ``torch.save`` can pickle: step counter, data position, RNG states.
            Rank 0's value is stored and returned by :func:`load` on every rank.
        keep: how many complete checkpoints to keep, at least 1.

    Returns:
        The directory of the new checkpoint.
    """
    pending.wait_previous()
    return write(prepare(path, model, optimizer, extra, keep))


@dataclass
class Prepared:
    """A save ready to be written: what DCP writes, where, and what rank 0 seals it with."""

    state: dict[str, Any]
    tmp: Path
    final: Path
    description: dict[str, Any]
    extra: bytes
    keep: Optional[int]


def prepare(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], extra: Any,
            keep: Optional[int], copy: bool = False) -> Prepared:
    """Describe the checkpoint, pick its directory (rank 0) and collect what DCP writes; collective.

    ``copy``: clone every local tensor, so that training may change the live ones meanwhile.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    optimizer = optimizer_of(model, optimizer)
    snap = snapshot(model, optimizer)
    if copy:
        snap = copied(snap)
    description = meta.describe(snap, optimizer, comm.world_size(), extra is not None)
    buf = io.BytesIO()
    torch.save(extra, buf)
    tmp, final = comm.on_rank0(lambda: store.begin(Path(path)))
    return Prepared(dcp_state(snap), tmp, final, description, buf.getvalue(), keep)


def write(job: Prepared, group: Optional[dist.ProcessGroup] = None) -> Path:
    """Write ``job`` with DCP over ``group`` (default: the world), then seal and rename it on rank 0."""
    try:
        with _quiet_single_process():
            dcp.save(job.state, storage_writer=dcp.FileSystemWriter(str(job.tmp)), process_group=group,
                     no_dist=not comm.distributed())
    except CheckpointException as e:  # a BaseException in DCP: turned into an ordinary error, on every rank
        raise CheckpointError(
            f"writing checkpoint {str(job.final)!r} failed (the previous one is untouched): {e}") from e

    def seal() -> None:
        store.write_durable(job.tmp / store.META, json.dumps(job.description, indent=1).encode())
        store.write_durable(job.tmp / store.EXTRA, job.extra)
        store.commit(job.tmp, job.final, job.keep)

    comm.on_rank0(seal, group)
    return job.final


def save_async(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               extra: Any = None, *, keep: Optional[int] = 3) -> pending.PendingSave:
    """:func:`save` that returns once the state is copied; collective.

    Training may go on at once (the copy is written); call ``.wait()`` on the result (or any
    later ``save``/``load``, which wait) before relying on the checkpoint. Trade-off: one
    extra host copy of this rank's parameters and optimizer state while the write runs.
    """
    pending.wait_previous()
    job = prepare(path, model, optimizer, extra, keep, copy=True)
    return pending.start(job.final, lambda group: write(job, group))


def latest(path: PathLike) -> Path:
    """The newest complete checkpoint directory under ``path`` (or ``path`` itself if it is one)."""
    return store.resolve(Path(path))


def load(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
         optimizer_state: bool = True, hparams: HparamPolicy = "running", weights_only: bool = True) -> Any:
    """Restore ``model`` (and ``optimizer``) in place from a checkpoint; collective; returns ``extra``.

    ``path`` is a root directory given to :func:`save` (its newest complete checkpoint is
    loaded) or one checkpoint directory. The checkpoint may come from any world size and any
    supported layout: each rank reads the pieces its own layout needs (resharding). With no
    process group it loads in a single process.

    Restart modes:

    - hot restart (default): parameters, buffers, ``exp_avg`` and ``agreement_ema`` are
      restored exactly; training continues as if uninterrupted.
    - fresh-state restart: ``optimizer_state=False`` (or ``optimizer=None``) restores the
      parameters and buffers only; a given optimizer gets zero ``exp_avg`` and a fresh
      agreement average. For a changed optimizer, or a model that gained parameters only in
      the optimizer's view (frozen then unfrozen). LionSF needs no warm-up either way.

    Args:
        hparams: which hyper-parameters win where the checkpoint's and the running
            optimizer's differ: ``"running"`` (default, with a warning listing them),
            ``"checkpoint"`` (copied into the running optimizer), ``"error"`` (raise).
        weights_only: unpickle ``extra`` with ``torch.load(weights_only=...)``; pass ``False``
            for objects beyond tensors and Python containers (e.g. NumPy RNG states) from a
            checkpoint you trust.

    Raises:
        CheckpointNotFoundError: ``path`` is missing or holds no complete checkpoint.
        CheckpointCorruptError: a file is missing, truncated or unreadable (named).
        ModelMismatchError: parameters or buffers missing, extra or reshaped (named).
        OptimizerMismatchError: no saved optimizer state, another optimizer class, a parameter
            without saved ``exp_avg``, or (``hparams="error"``) differing hyper-parameters.
    """
    pending.wait_previous()
    ckpt, saved, extra_bytes = comm.on_rank0(lambda: _open(Path(path)))
    where = f"checkpoint {str(ckpt)!r}"
    optimizer = optimizer_of(model, optimizer)
    hot = optimizer_state and optimizer is not None
    snap = snapshot(model, optimizer)
    meta.check_model(saved, snap, where)
    changes: dict[str, Any] = {}
    if hot:
        assert optimizer is not None
        meta.check_optimizer(saved, snap, optimizer, where)
        assert isinstance(optimizer, LionSF)  # check_optimizer refuses other classes
        changes = meta.reconcile(saved, snap, optimizer, hparams, where)
        _prepare_ema(snap, saved, optimizer)
    state = dcp_state(snap, optimizer_state=hot)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=not comm.distributed())
    except (CheckpointException, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointCorruptError(f"{where}: reading the tensors failed: {e}") from e
    if isinstance(optimizer, LionSF):
        if hot:
            _install_ema(snap, optimizer)
            if changes:
                optimizer.set_hyperparameters(changes)
        else:
            optimizer.reset_state()
    if is_deepspeed_engine(model):
        lionsf_of(model).refresh()
    return _unpickle(extra_bytes, weights_only, where)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _open(path: Path) -> tuple[Path, dict[str, Any], bytes]:
    ckpt = store.resolve(path)
    store.verify(ckpt)
    try:
        saved = json.loads((ckpt / store.META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r}: unreadable {store.META} ({e})") from e
    meta.check_format(saved, f"checkpoint {str(ckpt)!r}")
    return ckpt, saved, (ckpt / store.EXTRA).read_bytes()


def _unpickle(data: bytes, weights_only: bool, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: extra holds objects that weights_only=True refuses ({e}); "
                              "pass weights_only=False to load(), for a checkpoint you trust") from e


def _prepare_ema(snap: Snapshot, saved: dict[str, Any], optimizer: LionSF) -> None:
    """Load targets for the saved agreement averages of the parameters the running optimizer trains."""
    stored = set(saved["optimizer"].get("agreement_ema_state", []))
    held = {n for names in snap.optimizer_names for n in names}
    snap.ema = {n: torch.zeros((), dtype=torch.float32) for n in held & stored} if optimizer.agreement_ema else {}


def _install_ema(snap: Snapshot, optimizer: LionSF) -> None:
    """Hand the loaded averages to the optimizer: each unit takes its first parameter's (none saved: fresh)."""
    if not optimizer.agreement_ema:
        return
    if not snap.ema:
        optimizer.load_agreement_average(None)
        return
    values = torch.zeros(optimizer.units.count, dtype=torch.float32)
    filled: set[int] = set()
    for names in snap.optimizer_names:
        for name in names:
            unit = snap.unit_of[name]
            if name in snap.ema and unit not in filled:
                values[unit] = snap.ema[name]
                filled.add(unit)
    optimizer.load_agreement_average(values)
