"""Research: projects (pseudonym keys), opt-outs, export jobs and their items, pseudonyms.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "research_project",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("secret", sa.String(length=128), nullable=False),
        sa.Column("options", sa.String(length=500), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("organisation_pk", "name", name="uq_research_project_name"),
    )
    op.create_table(
        "research_optout",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Text(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.Text(), nullable=False, server_default=""),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_research_optout"),
    )
    op.create_table(
        "export_job",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("project_pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("options", sa.String(length=500), nullable=False),
        sa.Column("layout", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("exported", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("held_back", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["project_pk"], ["research_project.pk"]),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_export_job_state", "export_job", ["state"])
    op.create_table(
        "export_item",
        sa.Column("job_pk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_pk"], ["export_job.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_pk", "sop_instance_uid"),
    )
    op.create_table(
        "pseudonym",
        sa.Column("project_pk", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("original", sa.String(length=200), nullable=False),
        sa.Column("pseudonym", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["project_pk"], ["research_project.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_pk", "kind", "original"),
    )


def downgrade() -> None:
    for table in ("pseudonym", "export_item", "export_job", "research_optout",
                  "research_project"):
        op.drop_table(table)
