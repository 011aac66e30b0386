"""Bounds of a bank's eviction settings, checked before anything is written.

``budget_bytes`` is a 64-bit column and ``max_blocks`` a 32-bit one (``kvstore/storage/catalog.py``). A value past a
column's range is not a setting anyone means; left unchecked it reaches the database driver and fails
there (SQLite: "Python int too large to convert to SQLite INTEGER"; PostgreSQL: integer out of range) as a
500 after the row was already dirtied. Checked here it is a ``ValidationFailed`` (422) and nothing changes.
The REST schema carries the same bounds (``server/schemas.py``) so clients see them in OpenAPI.
"""

from __future__ import annotations

from kvstore.errors import ValidationFailed

MAX_BUDGET_BYTES = 2**63 - 1  # BigInteger
MAX_BLOCKS = 2**31 - 1  # Integer (PostgreSQL's int4 is the narrower of the two backends)


def check_bank_limits(*, budget_bytes: int | None, max_blocks: int | None) -> None:
    """Refuse a budget or block cap that is not positive or that the catalog cannot hold (``None``: unset)."""
    if budget_bytes is not None and not 0 < budget_bytes <= MAX_BUDGET_BYTES:
        raise ValidationFailed(f"budget_bytes must be between 1 and {MAX_BUDGET_BYTES}")
    if max_blocks is not None and not 0 < max_blocks <= MAX_BLOCKS:
        raise ValidationFailed(f"max_blocks must be between 1 and {MAX_BLOCKS}")
