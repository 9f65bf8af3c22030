"""model names: versions per (tenant, name) and movable aliases

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Models so far are named job-{id}, one each: version 1 keeps (tenant, name, version) unique.
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))
        batch_op.create_unique_constraint(
            "uq_models_tenant_name_version", ["tenant", "name", "version"]
        )
    op.create_table(
        "model_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "name", "alias", name="uq_model_aliases_tenant_name_alias"),
    )
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_aliases_model_id"), ["model_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_aliases_model_id"))
    op.drop_table("model_aliases")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_constraint("uq_models_tenant_name_version", type_="unique")
        batch_op.drop_column("version")
