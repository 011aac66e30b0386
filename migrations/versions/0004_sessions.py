"""agent sessions: appendable KV trajectories (segments, paged KV blobs, attention record)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 13:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('agent_sessions',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('bank_id', BigId, nullable=False),
    sa.Column('session_id', sa.String(length=128), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('agent', sa.String(length=128), nullable=True),
    sa.Column('positions', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('bank_id', 'session_id', name='uq_agent_sessions_bank_session')
    )
    with op.batch_alter_table('agent_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_agent_sessions_bank_id'), ['bank_id'], unique=False)

    op.create_table('session_segments',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('session_pk', BigId, nullable=False),
    sa.Column('ordinal', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('agent', sa.String(length=128), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('token_ids', sa.LargeBinary(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('token_count', sa.Integer(), nullable=False),
    sa.Column('attention', sa.JSON(), nullable=False),
    sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('prune_reason', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['session_pk'], ['agent_sessions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('session_pk', 'ordinal', name='uq_session_segments_ordinal')
    )
    with op.batch_alter_table('session_segments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_session_segments_session_pk'), ['session_pk'], unique=False)

    op.create_table('session_pages',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('segment_pk', BigId, nullable=False),
    sa.Column('ordinal', sa.Integer(), nullable=False),
    sa.Column('token_count', sa.Integer(), nullable=False),
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('stored_bytes', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['segment_pk'], ['session_segments.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('session_pages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_session_pages_segment_pk'), ['segment_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_session_pages_blob_id'), ['blob_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('session_pages')
    op.drop_table('session_segments')
    op.drop_table('agent_sessions')
