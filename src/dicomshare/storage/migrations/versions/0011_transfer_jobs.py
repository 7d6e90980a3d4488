"""Background DICOM transfers (send, retrieve) as jobs: dimse/jobs.py.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfer_job",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=False),
        sa.Column("scopes", sa.String(length=100), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("study_uids", sa.Text(), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=True),
        sa.Column("retry_of_pk", sa.Integer(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("completed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("warning", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.ForeignKeyConstraint(["retry_of_pk"], ["transfer_job.pk"]),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_transfer_job_state", "transfer_job", ["state"])
    op.create_index("ix_transfer_job_org", "transfer_job", ["organisation_pk", "pk"])
    op.create_index("ix_transfer_job_user", "transfer_job", ["created_by_user_pk", "pk"])


def downgrade() -> None:
    op.drop_index("ix_transfer_job_user", table_name="transfer_job")
    op.drop_index("ix_transfer_job_org", table_name="transfer_job")
    op.drop_index("ix_transfer_job_state", table_name="transfer_job")
    op.drop_table("transfer_job")
