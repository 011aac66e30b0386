"""replicas: a registry of the kvrag processes on one catalog, and an op-log notification (issue 28)

Revision ID: 0012_replicas
Revises: 0010_repair_merges
Create Date: 2026-12-07 04:30:00

``replicas`` holds one row per running server (its model fingerprint, blob store and heartbeat): a replica
that loads another model than the live ones is refused at start. On PostgreSQL an insert into ``op_log``
notifies channel ``kvrag_oplog`` (delivered at commit), so the other replicas apply the change to their
FAISS copies at once instead of at their next poll. SQLite has one process by design: no trigger.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0012_replicas'
down_revision: Union[str, Sequence[str], None] = '0010_repair_merges'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION kvrag_oplog_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kvrag_oplog', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
_TRIGGER = ("CREATE TRIGGER kvrag_oplog_notify AFTER INSERT ON op_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION kvrag_oplog_notify()")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('replicas',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('model_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=False),
    sa.Column('blob_url', sa.String(length=1024), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    if op.get_context().dialect.name == 'postgresql':
        op.execute(_FUNCTION)
        op.execute(_TRIGGER)


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_context().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS kvrag_oplog_notify ON op_log")
        op.execute("DROP FUNCTION IF EXISTS kvrag_oplog_notify()")
    op.drop_table('replicas')
