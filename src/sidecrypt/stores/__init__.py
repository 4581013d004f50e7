"""Pluggable stores: where state that several sidecars share lives (branch keys, the vault).

A *store* is one ``stores.<name>`` block of the config, built from the class whose
``type_name`` matches its ``type`` (``sqlite``: an embedded file, the default;
``postgresql``: a shared database; third parties add more through the
``sidecrypt_store_types`` hook). It implements :class:`~sidecrypt.stores.base.Store`:
``start``/``close``, ``check`` (readiness), ``migrate`` (schema, tracked per feature in a
``schema_version`` table) and ``table(feature)``.

Convention: **tables are owned by features.**

1. A feature defines its table protocol in its own package, next to the code that uses it,
   with a ``FEATURE`` name: the key hierarchy's is ``crypto/hierarchy/table.py``
   (``FEATURE = "branch_keys"``, ``BranchKeyTable``, ``BranchKeyRow``). Rows hold only
   ciphertext and keyed digests, never plaintext or key bytes.
2. Each backend implements it in its own module named after the feature:
   ``stores/sqlite/branch_keys.py`` and ``stores/postgresql/branch_keys.py``. The module
   defines ``MIGRATIONS`` (a tuple of :class:`~sidecrypt.stores.base.Migration`, versions
   1, 2, ... per feature, never edited once released: add a new step instead), a class
   implementing the protocol that takes the backend store and runs its queries through
   ``store.run(op, fn)`` (sqlite: ``fn(connection)`` on the store's thread; postgresql:
   ``async fn(connection)`` on a pooled connection), and
   ``TABLE = FeatureTable(FEATURE, MIGRATIONS, ThatClass)``.
3. The module joins its backend's schema by one entry in ``stores/<backend>/features.py``
   (``FEATURES``). ``migrate()`` then creates and migrates it with the others, in one
   transaction per run, and ``check()`` reports it when behind.
4. Races between sidecars are settled by unique constraints and single-statement upserts
   (``INSERT ... ON CONFLICT DO NOTHING`` then read the winner), never read-then-write.
5. The feature reaches its table with ``store.table(FEATURE)`` wrapped in a typed accessor
   (``crypto.hierarchy.branch_keys(store)``); a store type without that feature raises
   ``StoreError`` with code ``store_unsupported``. A third-party store implements the same
   protocols in whatever way suits it and answers ``table()`` for the features it supports.

Every store counts its calls in ``store.calls`` (``(operation, "ok"|"error") -> n``) for the
metrics plugin, and every failure is a :class:`~sidecrypt.stores.base.StoreError` (503 with
Retry-After when it reaches a request).
"""

from .base import FeatureTable, Migration, Store, StoreError, StoreOptions

__all__ = ["FeatureTable", "Migration", "Store", "StoreError", "StoreOptions"]
