"""Errors raised by :mod:`salm.data`, separate so callers can catch them without importing loaders."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file or row cannot be turned into examples; the message names the file and line."""


class DatasetUnavailableError(RuntimeError):
    """A hub dataset could not be loaded (usually: no network); the message suggests a local file."""
