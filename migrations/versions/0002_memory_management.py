"""memory management: document TTL and writer importance, merged blocks, re-encode counter

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('banks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reencodes', sa.BigInteger(), nullable=False, server_default='0'))

    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('importance', sa.Float(), nullable=True))
        batch_op.create_index('ix_documents_bank_expires', ['bank_id', 'expires_at'], unique=False)

    with op.batch_alter_table('blocks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('merged_into', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                                      nullable=True))
        batch_op.create_index('ix_blocks_merged_into', ['merged_into'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('blocks', schema=None) as batch_op:
        batch_op.drop_index('ix_blocks_merged_into')
        batch_op.drop_column('merged_into')

    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.drop_index('ix_documents_bank_expires')
        batch_op.drop_column('importance')
        batch_op.drop_column('expires_at')

    with op.batch_alter_table('banks', schema=None) as batch_op:
        batch_op.drop_column('reencodes')
