"""durable jobs: input, resume state, step, owner key, lease (owner, expiry, heartbeat), cancel, timestamps

Revision ID: 0009_durable_jobs
Revises: 0008
Create Date: 2026-12-07 04:30:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0009_durable_jobs'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. Jobs of the old in-process runner left ``queued`` or ``running`` had no stored input, so
    nothing can resume them: they are failed with that reason rather than left in limbo."""
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('step', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('input', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('state', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('cancel_requested', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('lease_owner', sa.String(length=96), nullable=True))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_jobs_status_created', 'jobs', ['status', 'created_at'], unique=False)
    op.create_index('ix_jobs_bank_created', 'jobs', ['bank', 'created_at'], unique=False)
    op.create_index('ix_jobs_owner_status', 'jobs', ['owner', 'status'], unique=False)
    jobs = sa.table('jobs', sa.column('status', sa.String), sa.column('error', sa.Text),
                    sa.column('finished_at', sa.DateTime(timezone=True)), sa.column('updated_at', sa.DateTime(timezone=True)))
    op.execute(jobs.update().where(jobs.c.status.in_(['queued', 'running'])).values(
        status='failed', error='interrupted: accepted before jobs were durable, its input was not kept',
        finished_at=jobs.c.updated_at))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_jobs_owner_status', table_name='jobs')
    op.drop_index('ix_jobs_bank_created', table_name='jobs')
    op.drop_index('ix_jobs_status_created', table_name='jobs')
    with op.batch_alter_table('jobs') as batch:
        for column in ('heartbeat_at', 'lease_expires_at', 'lease_owner', 'finished_at', 'started_at',
                       'cancel_requested', 'attempts', 'owner', 'state', 'input', 'step'):
            batch.drop_column(column)
