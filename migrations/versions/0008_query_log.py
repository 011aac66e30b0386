"""query log: recent answered queries per bank with their timings (the console's chart); blocks by (bank, id)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    """Upgrade schema. The log starts empty; the console's block list pages by (bank_id, id)."""
    op.create_table('query_log',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('bank_id', BigId, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('door', sa.String(length=16), nullable=False),
    sa.Column('mode', sa.String(length=8), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('agent', sa.String(length=128), nullable=True),
    sa.Column('question_preview', sa.String(length=120), nullable=False),
    sa.Column('question_chars', sa.Integer(), nullable=False),
    sa.Column('retrieve_ms', sa.Float(), nullable=False),
    sa.Column('load_ms', sa.Float(), nullable=False),
    sa.Column('prefill_ms', sa.Float(), nullable=False),
    sa.Column('ttft_ms', sa.Float(), nullable=False),
    sa.Column('total_ms', sa.Float(), nullable=False),
    sa.Column('context_tokens', sa.Integer(), nullable=False),
    sa.Column('question_tokens', sa.Integer(), nullable=False),
    sa.Column('generated_tokens', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['bank_id'], ['banks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_query_log_bank_id_id', 'query_log', ['bank_id', 'id'], unique=False)
    op.create_index('ix_blocks_bank_id_id', 'blocks', ['bank_id', 'id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_blocks_bank_id_id', table_name='blocks')
    op.drop_index('ix_query_log_bank_id_id', table_name='query_log')
    op.drop_table('query_log')
