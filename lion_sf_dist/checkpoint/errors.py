"""Errors raised by :mod:`lion_sf_dist.checkpoint`, each naming its cause."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class of every checkpoint error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist, or holds no complete checkpoint."""


class CheckpointCorruptError(CheckpointError):
    """A file of a complete checkpoint is missing, truncated or unreadable."""


class ModelMismatchError(CheckpointError):
    """The checkpoint was written for a model with other parameters (missing, extra or reshaped)."""


class OptimizerMismatchError(CheckpointError):
    """The checkpoint's optimizer state does not fit the running optimizer."""
