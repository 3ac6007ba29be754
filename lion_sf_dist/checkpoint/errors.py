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


class UnsafeCheckpointError(CheckpointCorruptError):
    """A checkpoint file holds objects outside the allow-list of what this format writes.

    Raised before anything in the file is constructed: the file was replaced or tampered
    with (or written by something else), and loading it could run code.
    """


class CheckpointLockError(CheckpointError):
    """The checkpoint root's lock file cannot be locked (a filesystem without ``flock``)."""
