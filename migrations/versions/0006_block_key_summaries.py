"""block key summaries: a few heads' keys per block for the KV rerank (issue 13)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 13:45:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. Existing blocks start without a summary: the first kv retrieval that needs one builds it."""
    with op.batch_alter_table('blocks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kv_summary', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('blocks', schema=None) as batch_op:
        batch_op.drop_column('kv_summary')
