"""dataset versions: immutable snapshots of a dataset's images, labels and splits

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 23:00:00

Every existing dataset gets a version 1 holding its images as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("image_count", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "number", name="uq_dataset_versions_dataset_number"),
    )
    with op.batch_alter_table("dataset_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dataset_versions_dataset_id"), ["dataset_id"], unique=False
        )

    op.create_table(
        "dataset_version_images",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=256), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["dataset_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("version_id", "image_id"),
    )

    # Version 1 of every existing dataset: its images as they are now.
    op.execute(
        "INSERT INTO dataset_versions (dataset_id, number, image_count) "
        "SELECT d.id, 1, (SELECT COUNT(*) FROM images i WHERE i.dataset_id = d.id) "
        "FROM datasets d"
    )
    op.execute(
        "INSERT INTO dataset_version_images (version_id, image_id, label, split) "
        "SELECT v.id, i.id, i.label, i.split FROM images i "
        "JOIN dataset_versions v ON v.dataset_id = i.dataset_id"
    )


def downgrade() -> None:
    op.drop_table("dataset_version_images")
    with op.batch_alter_table("dataset_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_versions_dataset_id"))
    op.drop_table("dataset_versions")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
