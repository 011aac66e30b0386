"""context map: per-bank map head (version, token budget, frozen), versioned snapshots, query records

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('context_maps',
    sa.Column('bank_id', BigId, nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('budget_tokens', sa.Integer(), nullable=False),
    sa.Column('frozen', sa.Boolean(), nullable=False),
    sa.Column('refreshes', sa.Integer(), nullable=False),
    sa.Column('refreshed_through', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('bank_id')
    )
    op.create_table('context_map_versions',
    sa.Column('bank_id', BigId, nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('state', sa.JSON(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('change', sa.String(length=16), nullable=False),
    sa.Column('evicted', sa.JSON(), nullable=False),
    sa.Column('agent', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('bank_id', 'version')
    )
    op.create_table('context_map_queries',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('bank_id', BigId, nullable=False),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.Column('sources', sa.JSON(), nullable=False),
    sa.Column('map_version', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('context_map_queries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_context_map_queries_bank_id'), ['bank_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('context_map_queries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_context_map_queries_bank_id'))

    op.drop_table('context_map_queries')
    op.drop_table('context_map_versions')
    op.drop_table('context_maps')
