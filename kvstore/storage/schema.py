"""The catalog's whole schema: every ORM table registered on one ``MetaData``.

Tables are declared next to the code that owns them (``kvstore.storage.catalog`` for banks, documents, blocks,
keys, jobs...; ``kvstore.storage.session_tables`` for agent sessions), all on ``catalog.Base``. Importing this module
imports every such declaration, so ``metadata()`` is complete without the caller knowing where tables live:
Alembic's environment (``migrations/env.py``) and the models-vs-migrations check compare against it.
"""

from __future__ import annotations

from sqlalchemy import MetaData

import kvstore.storage.session_tables  # noqa: F401  (declares the session tables on catalog.Base)
from kvstore.storage.catalog import Base


def metadata() -> MetaData:
    """Every catalog table (the target Alembic migrates to)."""
    return Base.metadata
