"""Sharded, resharding, atomic checkpoints of a model and its LionSF (docs/CONTRACT.md).

Usage (every rank of the job calls both; without a process group they run in one process)::

    from lion_sf_dist import checkpoint

    checkpoint.save("runs/x/ckpt", model, opt, extra={"step": step, "rng": torch.get_rng_state()})
    extra = checkpoint.load("runs/x/ckpt", model, opt)          # hot restart: params + optimizer state
    checkpoint.load("runs/x/ckpt", model, opt, optimizer_state=False)   # fresh-state restart

``model`` is a plain module, DDP, FSDP2/HSDP (``fully_shard``), ``torch.compile``d, or a
DeepSpeed engine (ZeRO 0-3, LionSF attached by ``lion_sf_dist.deepspeed``); ``opt`` the
LionSF (under DeepSpeed the engine's optimizer or the LionSF inside it), or ``None``.

Format: one per logical parameter, whatever wrote it, on ``torch.distributed.checkpoint``
(DCP): ``param/<name>``, ``buffer/<name>``, ``exp_avg/<name>`` and ``agreement_ema/<name>``
hold logical (unsharded) shapes; FSDP2 writes its DTensor shards, ZeRO its flat fragments
cut into rectangular boxes of the logical tensor (padding dropped), replicated tensors are
written once. No rank gathers a full tensor; each rank writes what it holds and reads what
its own layout needs, so a checkpoint from any world size and layout (single process, DDP,
FSDP2, HSDP, ZeRO 0-3) loads into any other. ``meta.json`` describes the model (names,
shapes, dtypes), the optimizer (class, hyper-parameters, param groups by name) and the
writing layout; ``extra.pt`` holds rank 0's ``extra``; ``manifest.json`` every file's size.

Safety: ``path`` is a directory of checkpoints ``ckpt-<N>``; each is written into a
temporary directory and renamed when complete, the newest ``keep`` (default 3) are kept,
and ``load`` takes the newest complete one (or the one directory it is given). A crash at
any point of a save leaves the previous checkpoint loadable. ``path`` must be on a
filesystem every rank sees.

Hyper-parameters: where the checkpoint's and the running optimizer's differ, the running
optimizer's win by default (with a warning naming each); ``hparams="checkpoint"`` copies
the saved ones, ``hparams="error"`` refuses. ``save_async`` returns once this rank's state
is copied to host memory and writes it on a background thread.
"""

from lion_sf_dist.checkpoint.api import latest, load, save, save_async, verify
from lion_sf_dist.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLockError,
    CheckpointNotFoundError,
    ModelMismatchError,
    OptimizerMismatchError,
    UnsafeCheckpointError,
)
from lion_sf_dist.checkpoint.pending import PendingSave

__all__ = [
    "save",
    "save_async",
    "load",
    "latest",
    "verify",
    "PendingSave",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptError",
    "UnsafeCheckpointError",
    "CheckpointLockError",
    "ModelMismatchError",
    "OptimizerMismatchError",
]
