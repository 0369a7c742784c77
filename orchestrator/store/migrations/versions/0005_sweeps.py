"""sweeps: a µP sweep, the parent of its trial and target jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'sweeps',
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('uid', sa.String(length=36), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('warnings', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('state_reason', sa.String(length=64), nullable=False),
        sa.Column('state_message', sa.Text(), nullable=False),
        sa.Column('owner', sa.String(length=128), nullable=False),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('best', sa.JSON(), nullable=True),
        sa.Column('create_time', sa.DateTime(), nullable=False),
        sa.Column('update_time', sa.DateTime(), nullable=False),
        sa.Column('end_time', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('name'),
        sa.UniqueConstraint('uid'),
    )
    op.create_index('ix_sweeps_create_time_name', 'sweeps', ['create_time', 'name'], unique=False)
    op.create_index(op.f('ix_sweeps_state'), 'sweeps', ['state'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_sweeps_state'), table_name='sweeps')
    op.drop_index('ix_sweeps_create_time_name', table_name='sweeps')
    op.drop_table('sweeps')
