"""Sharing: share links, the inbox, consults, notifications and upload links.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("user_account") as batch:
        batch.add_column(sa.Column("email", sa.String(length=320), nullable=True))
    op.create_table(
        "notification",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["organisation_pk"],
            ["organisation.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["user_pk"],
            ["user_account.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_notification_to", "notification", ["organisation_pk", "user_pk", "pk"])
    op.create_table(
        "upload_link",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("max_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bytes_received", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("instances_stored", sa.Integer(), server_default="0", nullable=False),
        sa.Column("notify", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by_user_pk"],
            ["user_account.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["organisation_pk"],
            ["organisation.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("secret_hash"),
    )
    op.create_table(
        "consult",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("requester_organisation_pk", sa.Integer(), nullable=False),
        sa.Column("requester_user_pk", sa.Integer(), nullable=True),
        sa.Column("specialist_organisation_pk", sa.Integer(), nullable=False),
        sa.Column("specialist_user_pk", sa.Integer(), nullable=True),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("urgency", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("grant_pk", sa.Integer(), nullable=True),
        sa.Column("decline_reason", sa.Text(), nullable=True),
        sa.Column("opinion_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("opinion_study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("declined_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["grant_pk"],
            ["access_grant.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["requester_organisation_pk"],
            ["organisation.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["requester_user_pk"],
            ["user_account.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["specialist_organisation_pk"],
            ["organisation.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["specialist_user_pk"],
            ["user_account.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_consult_requester", "consult", ["requester_organisation_pk", "state"])
    op.create_index("ix_consult_specialist", "consult", ["specialist_organisation_pk", "state"])
    op.create_table(
        "inbox_item",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("from_organisation_pk", sa.Integer(), nullable=False),
        sa.Column("from_user_pk", sa.Integer(), nullable=True),
        sa.Column("to_organisation_pk", sa.Integer(), nullable=False),
        sa.Column("to_user_pk", sa.Integer(), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column("issuer_of_patient_id", sa.Text(), nullable=True),
        sa.Column("permissions", sa.String(length=100), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("grant_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by_user_pk", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["decided_by_user_pk"],
            ["user_account.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["from_organisation_pk"],
            ["organisation.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["from_user_pk"],
            ["user_account.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["grant_pk"],
            ["access_grant.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["to_organisation_pk"],
            ["organisation.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["to_user_pk"],
            ["user_account.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_inbox_to", "inbox_item", ["to_organisation_pk", "state"])
    op.create_table(
        "share_link",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column("issuer_of_patient_id", sa.Text(), nullable=True),
        sa.Column("permissions", sa.String(length=100), nullable=False),
        sa.Column("pin_hash", sa.Text(), nullable=True),
        sa.Column("pin_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("locked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notify", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("deidentified", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("project_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by_user_pk"],
            ["user_account.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["organisation_pk"],
            ["organisation.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["project_pk"],
            ["research_project.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("secret_hash"),
    )
    op.create_table(
        "upload_file",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("link_pk", sa.Integer(), nullable=False),
        sa.Column("upload_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("received", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["link_pk"], ["upload_link.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("upload_id"),
    )
    op.create_table(
        "consult_comment",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("consult_pk", sa.Integer(), nullable=False),
        sa.Column("author_user_pk", sa.Integer(), nullable=True),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["author_user_pk"],
            ["user_account.pk"],
        ),
        sa.ForeignKeyConstraint(["consult_pk"], ["consult.pk"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["organisation_pk"],
            ["organisation.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_consult_comment", "consult_comment", ["consult_pk", "pk"])
    op.create_table(
        "consult_study",
        sa.Column("consult_pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("grant_pk", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["consult_pk"], ["consult.pk"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["grant_pk"], ["access_grant.pk"]),
        sa.PrimaryKeyConstraint("consult_pk", "study_instance_uid"),
    )
    op.create_table(
        "share_link_study",
        sa.Column("link_pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["link_pk"], ["share_link.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("link_pk", "study_instance_uid"),
    )
    op.create_table(
        "share_link_failure",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_share_link_failure_source", "share_link_failure", ["source", "at"])


def downgrade() -> None:
    op.drop_index("ix_share_link_failure_source", table_name="share_link_failure")
    op.drop_table("share_link_failure")
    op.drop_table("share_link_study")
    op.drop_table("consult_study")
    op.drop_table("consult_comment")
    op.drop_table("upload_file")
    op.drop_table("share_link")
    op.drop_table("inbox_item")
    op.drop_table("consult")
    op.drop_table("upload_link")
    op.drop_table("notification")
    with op.batch_alter_table("user_account") as batch:
        batch.drop_column("email")
