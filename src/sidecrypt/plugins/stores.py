"""The built-in store types: ``sqlite`` always, ``postgresql`` when asyncpg is installed."""

from __future__ import annotations

from .. import hookimpl
from ..stores.base import Store
from ..stores.sqlite import SqliteStore


@hookimpl(trylast=True)
def sidecrypt_store_types() -> list[type[Store]]:
    types: list[type[Store]] = [SqliteStore]
    try:
        from ..stores.postgresql import PostgresStore
    except ModuleNotFoundError as exc:  # the postgresql extra is not installed
        if exc.name != "asyncpg":
            raise
    else:
        types.append(PostgresStore)
    return types
