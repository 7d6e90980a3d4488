"""Registered DICOM application entities (peers we send to and accept from).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remote_ae",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("organisation_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("ae_title"),
    )


def downgrade() -> None:
    op.drop_table("remote_ae")
