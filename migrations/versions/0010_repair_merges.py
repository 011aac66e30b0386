"""flag banks the old near-duplicate merge touched, for repair by the next maintenance (issue 26, hole 4)

Revision ID: 0010_repair_merges
Revises: 0009_durable_jobs
Create Date: 2026-12-07 04:30:00

Near-duplicate merging pointed a block at another block's blob and token ids, so a document answered with
its neighbour's facts. Which blocks it touched cannot be told in SQL alone (eviction cleared ``merged_into``,
a later delete of the canonical leaves the copied tokens unique), so every bank that ever merged
(``merges > 0``) is flagged; the next maintenance re-tokenizes its blocks from their own text and re-encodes
those whose stored tokens differ (kvstore/memory/dedup.py), then clears the flag.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0010_repair_merges'
down_revision: Union[str, Sequence[str], None] = '0009_durable_jobs'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # A plain ADD COLUMN on both backends (never a table rebuild, which would cascade into documents).
    op.add_column('banks', sa.Column('merge_repair', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute(sa.text("UPDATE banks SET merge_repair = :yes WHERE merges > 0").bindparams(yes=True))


def downgrade() -> None:
    """Downgrade schema. Banks not yet repaired stay as the merge left them.

    A plain DROP COLUMN (SQLite 3.35+): batch mode would rebuild ``banks``, and dropping the old table with
    foreign keys on cascades into every document and block.
    """
    op.execute("ALTER TABLE banks DROP COLUMN merge_repair")
