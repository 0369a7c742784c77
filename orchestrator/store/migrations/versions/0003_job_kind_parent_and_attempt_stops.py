"""jobs: kind and parent; attempts: a stop in progress (deadline and outcome)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:20:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # Jobs written before this migration are plain jobs with no parent.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=32), server_default='Job', nullable=False))
        batch_op.add_column(sa.Column('parent', sa.String(length=128), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_parent'), ['parent'], unique=False)
    # Attempts written before it were stopped synchronously: none is stopping.
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stop_deadline', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('stop_outcome', sa.String(length=16), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('stop_outcome')
        batch_op.drop_column('stop_deadline')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_parent'))
        batch_op.drop_column('parent')
        batch_op.drop_column('kind')
