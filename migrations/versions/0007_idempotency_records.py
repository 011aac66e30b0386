"""idempotency records bound to the key that made them, expiring (issue 26, hole 10e)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 01:30:00

The primary key gains ``owner`` (the API key id that made the record; ``root`` for the admin key), so the
table is rebuilt under a new name (a primary key change is a table rebuild on SQLite anyway). Existing
records are kept with an empty owner: no key matches it, so they answer no one and are purged once past
KVRAG_IDEMPOTENCY_TTL_S. A downgrade drops the records (they only make retries safe for a day).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('idempotency_records',
    sa.Column('bank_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('bank_id', 'owner', 'key')
    )
    with op.batch_alter_table('idempotency_records', schema=None) as batch_op:
        batch_op.create_index('ix_idempotency_records_created_at', ['created_at'], unique=False)
    op.execute("INSERT INTO idempotency_records (bank_id, owner, key, request_hash, status_code, response, created_at) "
               "SELECT bank_id, '', key, request_hash, status_code, response, created_at FROM idempotency_keys")
    op.drop_table('idempotency_keys')


def downgrade() -> None:
    """Downgrade schema."""
    op.create_table('idempotency_keys',
    sa.Column('bank_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('bank_id', 'key')
    )
    with op.batch_alter_table('idempotency_records', schema=None) as batch_op:
        batch_op.drop_index('ix_idempotency_records_created_at')
    op.drop_table('idempotency_records')
