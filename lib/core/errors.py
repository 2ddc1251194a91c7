"""Errors that mean "the user asked for something that cannot work"; the CLI turns them into exit 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A flag value that cannot work (the message names the flag)."""
