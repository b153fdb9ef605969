"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class SslVitError(Exception):
    """Base of every user-facing error: the message says what to change."""


class RecipeError(SslVitError):
    """A recipe or a `key=value` override is invalid."""


class DataError(SslVitError):
    """Data cannot be found, read or decoded."""


class MissingSplit(DataError):
    """The data has no such split (an unlabelled folder has only `train`)."""


class CheckpointError(SslVitError):
    """A run directory, checkpoint or export folder is missing or unreadable."""


class TrainingError(SslVitError):
    """Training cannot go on (for example the loss stayed non-finite)."""
