"""The shared ``postgresql`` store (asyncpg; the ``postgresql`` extra)."""

from .store import PostgresOptions, PostgresStore

__all__ = ["PostgresOptions", "PostgresStore"]
