"""shared bases: a linear model stored as its head names the base it shares

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 01:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Models so far are whole (their weights file holds the backbone): null.
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shared_base_sha256", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_models_shared_base_sha256"), ["shared_base_sha256"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_shared_base_sha256"))
        batch_op.drop_column("shared_base_sha256")
