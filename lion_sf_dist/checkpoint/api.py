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

from lion_sf_dist.checkpoint import checksum, comm, meta, pending, store
from lion_sf_dist.checkpoint.collect import Snapshot, copied, dcp_state, optimizer_of, snapshot
from lion_sf_dist.checkpoint.errors import CheckpointCorruptError, CheckpointError, ModelMismatchError
from lion_sf_dist.checkpoint.meta import HparamPolicy
from lion_sf_dist.checkpoint.storage import METADATA, ChecksummingWriter, SafeReader
from lion_sf_dist.checkpoint.verification import verify_files
from lion_sf_dist.engines import is_deepspeed_engine, lionsf_of
from lion_sf_dist.optimizer import LionSF

PathLike = Union[str, Path]


def save(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Any = None,
    *,
    keep: Optional[int] = 3,
) -> Path:
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
        keep: how many complete checkpoints to keep: an int >= 1, or ``None`` for all.

    Every rank checks its inputs and they agree before anything is written: bad input on
    one rank (an ``extra`` that does not pickle, another model) raises the same error on
    every rank. A checkpoint is committed only when every rank's files are on disk with
    their checksums; failing to prune old ones afterwards is a warning.

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


def prepare(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    extra: Any,
    keep: Optional[int],
    copy: bool = False,
) -> Prepared:
    """Describe the checkpoint, pick its directory (rank 0) and collect what DCP writes; collective.

    ``copy``: clone every local tensor, so that training may change the live ones meanwhile.
    """
    store.check_keep(keep)
    optimizer = optimizer_of(model, optimizer)
    snap = comm.agree(lambda: snapshot(model, optimizer))
    if copy:
        snap = copied(snap)
    description, extra_bytes = comm.agree(lambda: _described(snap, optimizer, extra))
    _same_model_everywhere(description)
    state = comm.agree(lambda: dcp_state(snap))
    tmp, final = comm.on_rank0(lambda: store.begin(Path(path)))
    return Prepared(state, tmp, final, description, extra_bytes, keep)


def _described(snap: Snapshot, optimizer: Optional[torch.optim.Optimizer], extra: Any) -> tuple[dict[str, Any], bytes]:
    """``meta.json``'s description and the pickled ``extra`` (raises here, on the rank whose ``extra`` fails)."""
    buf = io.BytesIO()
    try:
        torch.save(extra, buf)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise CheckpointError(f"extra cannot be pickled on rank {comm.rank()}: {type(e).__name__}: {e}") from e
    return meta.describe(snap, optimizer, comm.world_size(), extra is not None), buf.getvalue()


def _same_model_everywhere(description: dict[str, Any]) -> None:
    """Raise :class:`ModelMismatchError` on every rank unless all ranks save the same parameters and buffers."""
    models = comm.all_gather({**description["params"], **description["buffers"]})
    differ = [r for r, m in enumerate(models) if m != models[0]]
    if differ:
        first = models[differ[0]]
        names = sorted(n for n in first.keys() | models[0].keys() if first.get(n) != models[0].get(n))
        raise ModelMismatchError(
            f"ranks {differ} hold a model with other parameters or buffers than rank 0 "
            f"(rank {differ[0]} differs in {names}): every rank must save the same model"
        )


def write(job: Prepared, group: Optional[dist.ProcessGroup] = None) -> Path:
    """Write ``job`` with DCP over ``group`` (default: the world), then seal and rename it on rank 0.

    Returns the committed directory (``job.final``, or the next free name if a concurrent
    writer took that one). On any failure the temporary directory is released, for the
    next save to remove.
    """
    try:
        writer = ChecksummingWriter(job.tmp)
        try:
            with _quiet_single_process():
                dcp.save(job.state, storage_writer=writer, process_group=group, no_dist=not comm.distributed())
        except CheckpointException as e:  # a BaseException in DCP: turned into an ordinary error, on every rank
            raise CheckpointError(
                f"writing checkpoint {str(job.final)!r} failed (the previous one is untouched): {e}"
            ) from e
        written = comm.all_gather(writer.written, group)  # every rank's files and checksums, for the manifest
        return comm.on_rank0(lambda: _seal(job, written), group)
    finally:
        store.abandon(job.tmp)


def _seal(job: Prepared, written: list[dict[str, str]]) -> Path:
    """Rank 0: write ``meta.json`` and ``extra.pt``, then commit with every file's checksum."""
    store.write_durable(job.tmp / store.META, json.dumps(job.description, indent=1).encode())
    store.write_durable(job.tmp / store.EXTRA, job.extra)
    sums = {name: value for rank_files in written for name, value in rank_files.items()}
    sums.update(checksum.checksums(job.tmp, [METADATA, store.META, store.EXTRA]))
    return store.commit(job.tmp, job.final, job.keep, sums)


def save_async(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Any = None,
    *,
    keep: Optional[int] = 3,
) -> pending.PendingSave:
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


def verify(path: PathLike) -> Path:
    """Check a checkpoint without loading it, in this process alone (not collective); its directory.

    ``path`` as for :func:`load`. Checks what :func:`load` checks of the files themselves:
    the manifest, every file's size and checksum, ``meta.json``, and DCP's metadata
    (allow-listed unpickling, structure, every tensor covered). Not checked: whether it
    fits a model. Raises :class:`CheckpointNotFoundError` or :class:`CheckpointCorruptError`.
    """
    ckpt, _, _, sums = _open(Path(path))
    SafeReader(ckpt, sums, f"checkpoint {str(ckpt)!r}").checked_metadata()
    verify_files(ckpt, _shard_files(sums), sums)
    return ckpt


def _shard_files(sums: Optional[checksum.Checksums]) -> list[str]:
    """The DCP shard files a manifest lists (none for a manifest without checksums)."""
    return sorted(set(sums.of if sums else ()) - {METADATA, store.META, store.EXTRA})


def load(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    optimizer_state: bool = True,
    hparams: HparamPolicy = "running",
    weights_only: bool = True,
) -> Any:
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
            ``"checkpoint"`` (copied into the running optimizer, once the load succeeded),
            ``"error"`` (raise).
        weights_only: unpickle ``extra`` with ``torch.load(weights_only=...)``; pass ``False``
            for objects beyond tensors and Python containers (e.g. NumPy RNG states) from a
            checkpoint you trust.

    Everything is checked before the first byte of the model or optimizer changes, on every
    rank, and the ranks agree: the manifest, each file's checksum (every file this rank
    reads), that the shards cover every element of every tensor, the model's names and
    shapes, the optimizer state and hyper-parameters, and ``extra``. On any error every
    rank raises the same error and the running model and optimizer are left as they were
    (short of an I/O error while the verified files are being read).

    Raises:
        CheckpointNotFoundError: ``path`` is missing or holds no complete checkpoint.
        CheckpointCorruptError: a file is missing, truncated, altered or unreadable, or the
            shards do not cover a tensor (named).
        UnsafeCheckpointError: ``.metadata`` holds objects this format never writes (refused
            before any is built: it could run code).
        ModelMismatchError: parameters or buffers missing, extra or reshaped (named).
        OptimizerMismatchError: no saved optimizer state, another optimizer class, a parameter
            without saved ``exp_avg``, or (``hparams="error"``) differing hyper-parameters.
    """
    pending.wait_previous()
    if hparams not in meta.HPARAM_POLICIES:
        raise ValueError(f"hparams must be one of {meta.HPARAM_POLICIES}, got {hparams!r}")
    ckpt, saved, extra_bytes, sums = comm.on_rank0(lambda: _open(Path(path)))
    where = f"checkpoint {str(ckpt)!r}"
    optimizer = optimizer_of(model, optimizer)
    hot = optimizer_state and optimizer is not None
    reader = SafeReader(ckpt, sums, where)
    try:
        if comm.world_size() == 1:  # the only reader reads every shard: hash them while the model is checked
            reader.start_verifying(_shard_files(sums))
        snap, changes = comm.agree(lambda: _checked_snapshot(saved, model, optimizer, hot, hparams, where))
        state = comm.agree(lambda: dcp_state(snap, optimizer_state=hot))
        extra = comm.agree(lambda: _checked_files(reader, extra_bytes, weights_only, where))
        _read(state, reader, where)
    finally:
        reader.close()
    _apply(snap, model, optimizer, hot, changes)
    if hot and isinstance(optimizer, LionSF):
        optimizer.rounding_step = int(saved["optimizer"].get("rounding_step", optimizer.rounding_step))
    return extra


def _checked_snapshot(
    saved: dict[str, Any],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    hot: bool,
    hparams: HparamPolicy,
    where: str,
) -> tuple[Snapshot, dict[str, Any]]:
    """The running tensors, checked against the checkpoint's description, and the hyper-parameters
    ``hparams="checkpoint"`` will copy (in :func:`_apply`, after the read); changes nothing."""
    snap = snapshot(model, optimizer)
    meta.check_model(saved, snap, where)
    changes: dict[str, Any] = {}
    if hot:
        assert optimizer is not None
        meta.check_optimizer(saved, snap, optimizer, where)
        assert isinstance(optimizer, LionSF)  # check_optimizer refuses other classes
        changes = meta.reconcile(saved, snap, optimizer, hparams, where)
        meta.warn_state_dtypes(saved, snap, where)
        _prepare_ema(snap, saved, optimizer)
    return snap, changes


def _checked_files(reader: SafeReader, extra_bytes: bytes, weights_only: bool, where: str) -> Any:
    """DCP's metadata (allow-listed, checksummed, coverage-checked) and ``extra``, unpickled; changes nothing."""
    reader.checked_metadata()
    return _unpickle(extra_bytes, weights_only, where)


def _read(state: dict[str, Any], reader: SafeReader, where: str) -> None:
    """DCP reads the checkpoint into ``state`` (the live tensors), once every rank's files verified."""
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, no_dist=not comm.distributed())
    except CheckpointException as e:  # every rank's failures, gathered by DCP: ours keep their class
        ours = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
        if ours:
            raise type(ours[0])(str(ours[0])) from e
        raise CheckpointCorruptError(f"{where}: reading the tensors failed: {e}") from e
    except CheckpointError:
        raise
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointCorruptError(f"{where}: reading the tensors failed: {e}") from e


def _apply(
    snap: Snapshot, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], hot: bool, changes: dict[str, Any]
) -> None:
    """After a successful read: the agreement averages and saved hyper-parameters, or fresh state; ZeRO's bit16."""
    if isinstance(optimizer, LionSF):
        if hot:
            _install_ema(snap, optimizer)
            if changes:
                optimizer.set_hyperparameters(changes)
        else:
            optimizer.reset_state()
    if is_deepspeed_engine(model):
        lionsf_of(model).refresh()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _open(path: Path) -> tuple[Path, dict[str, Any], bytes, Optional[checksum.Checksums]]:
    """Rank 0: the checkpoint, its verified ``meta.json`` and ``extra.pt``, and the manifest's checksums."""
    ckpt = store.resolve(path)
    sums = store.verify(ckpt)
    verify_files(ckpt, [store.META, store.EXTRA], sums)
    try:
        saved = json.loads((ckpt / store.META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"checkpoint {str(ckpt)!r}: unreadable {store.META} ({e})") from e
    meta.check_format(saved, f"checkpoint {str(ckpt)!r}")
    return ckpt, saved, (ckpt / store.EXTRA).read_bytes(), sums


def _unpickle(data: bytes, weights_only: bool, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{where}: extra holds objects that weights_only=True refuses ({e}); "
            "pass weights_only=False to load(), for a checkpoint you trust"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointCorruptError(f"{where}: unreadable {store.EXTRA} ({type(e).__name__}: {e})") from e


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
