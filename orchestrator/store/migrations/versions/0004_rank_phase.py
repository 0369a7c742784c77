"""rank_status: what a rank said it was doing when not training (its phase)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('rank_status', schema=None) as batch_op:
        batch_op.add_column(sa.Column('phase', sa.String(length=64), server_default='', nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('rank_status', schema=None) as batch_op:
        batch_op.drop_column('phase')
