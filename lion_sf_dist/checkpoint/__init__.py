"""Sharded, resharding, atomic checkpoints of a model and its LionSF (SPEC sections 5-7).

``save(path, model, optimizer, extra=None)`` and ``load(path, model, optimizer) -> extra``,
collective over the job's ranks, for single-process, DDP, FSDP2 and DeepSpeed models. One
format per logical parameter, on ``torch.distributed.checkpoint``: a checkpoint written at
any world size and layout loads at any other, or in one process without a process group.
"""

from lion_sf_dist.checkpoint.api import latest, load, save
from lion_sf_dist.checkpoint.pending import PendingSave, save_async
from lion_sf_dist.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    ModelMismatchError,
    OptimizerMismatchError,
)

__all__ = [
    "save", "save_async", "load", "latest", "PendingSave",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointCorruptError",
    "ModelMismatchError", "OptimizerMismatchError",
]
