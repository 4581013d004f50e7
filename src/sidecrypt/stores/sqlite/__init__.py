"""The embedded ``sqlite`` store (the default)."""

from .store import SqliteOptions, SqliteStore

__all__ = ["SqliteOptions", "SqliteStore"]
