"""Patients across providers: issuer-qualified patient records, links between them
and their provenance.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_record",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("ref", sa.String(length=32), nullable=False),
        sa.Column("patient_id", sa.Text(), nullable=False),
        sa.Column("qualifier", sa.Text(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.Text(), nullable=True),
        sa.Column("organisation_pk", sa.Integer(), nullable=True),
        sa.Column("patient_name", sa.Text(), nullable=True),
        sa.Column("patient_birth_date", sa.Text(), nullable=True),
        sa.Column("patient_sex", sa.Text(), nullable=True),
        sa.Column("other_ids", sa.Text(), server_default="[]", nullable=False),
        sa.Column("last_study_pk", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("ref"),
        sa.UniqueConstraint("patient_id", "qualifier", name="uq_patient_record"),
    )
    op.create_index("ix_patient_record_birth", "patient_record", ["patient_birth_date"])
    op.create_index("ix_patient_record_sync", "patient_record", ["last_study_pk"])
    op.create_table(
        "patient_link",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("record_a_pk", sa.Integer(), nullable=False),
        sa.Column("record_b_pk", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("unlinked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("unlinked_by_user_pk", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["record_a_pk"], ["patient_record.pk"]),
        sa.ForeignKeyConstraint(["record_b_pk"], ["patient_record.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.ForeignKeyConstraint(["decided_by_user_pk"], ["user_account.pk"]),
        sa.ForeignKeyConstraint(["unlinked_by_user_pk"], ["user_account.pk"]),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_patient_link_a", "patient_link", ["record_a_pk", "state"])
    op.create_index("ix_patient_link_b", "patient_link", ["record_b_pk", "state"])
    op.create_index("ix_patient_link_state", "patient_link", ["state"])
    op.create_table(
        "patient_match_key",
        sa.Column("record_pk", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.ForeignKeyConstraint(["record_pk"], ["patient_record.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("record_pk", "key"),
    )
    op.create_index("ix_patient_match_key", "patient_match_key", ["key"])
    op.create_table(
        "patient_merge",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("old_record_pk", sa.Integer(), nullable=False),
        sa.Column("new_record_pk", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undone_by_user_pk", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["old_record_pk"], ["patient_record.pk"]),
        sa.ForeignKeyConstraint(["new_record_pk"], ["patient_record.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.ForeignKeyConstraint(["undone_by_user_pk"], ["user_account.pk"]),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_patient_merge_old", "patient_merge", ["old_record_pk"])
    op.create_index("ix_patient_merge_new", "patient_merge", ["new_record_pk"])


def downgrade() -> None:
    op.drop_table("patient_merge")
    op.drop_table("patient_match_key")
    op.drop_table("patient_link")
    op.drop_table("patient_record")
