"""Organisations as owners: roles, token scopes, ownership, grants, sessions, audit trail.

Existing archives keep working: administrators become superusers (they were site-wide
before), members become clinicians, every stored instance and registered AE title is
given to the oldest organisation, and existing tokens keep every scope.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("user_account") as batch:
        batch.add_column(sa.Column("superuser", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("disabled_at", TS, nullable=True))
        batch.add_column(sa.Column("oidc_subject", sa.String(length=255), nullable=True))
        batch.create_unique_constraint("uq_user_oidc_subject", ["oidc_subject"])
    with op.batch_alter_table("api_token") as batch:
        batch.add_column(sa.Column("scopes", sa.String(length=100), nullable=False,
                                   server_default="read,write,share,admin"))
    with op.batch_alter_table("remote_ae") as batch:
        batch.add_column(sa.Column("scopes", sa.String(length=100), nullable=False,
                                   server_default="read,write"))
    op.execute("UPDATE user_account SET superuser = TRUE WHERE role = 'admin'")
    op.execute("UPDATE user_account SET role = 'clinician' WHERE role = 'member'")

    op.create_table(
        "instance_owner",
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["instance_pk"], ["instance.pk"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.PrimaryKeyConstraint("instance_pk", "organisation_pk"),
    )
    op.create_index("ix_instance_owner_org", "instance_owner", ["organisation_pk", "instance_pk"])
    op.create_table(
        "study_owner",
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("organisation_pk", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["study.pk"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["organisation_pk"], ["organisation.pk"]),
        sa.PrimaryKeyConstraint("study_pk", "organisation_pk"),
    )
    op.create_index("ix_study_owner_org", "study_owner", ["organisation_pk", "study_pk"])
    oldest = "(SELECT MIN(pk) FROM organisation)"
    op.execute(f"UPDATE remote_ae SET organisation_pk = {oldest} WHERE organisation_pk IS NULL")
    op.execute(f"INSERT INTO instance_owner (instance_pk, organisation_pk) "
               f"SELECT pk, {oldest} FROM instance WHERE {oldest} IS NOT NULL")
    op.execute(f"INSERT INTO study_owner (study_pk, organisation_pk) "
               f"SELECT pk, {oldest} FROM study WHERE {oldest} IS NOT NULL")

    op.create_table(
        "access_grant",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("source_organisation_pk", sa.Integer(), nullable=False),
        sa.Column("grantee_organisation_pk", sa.Integer(), nullable=True),
        sa.Column("grantee_user_pk", sa.Integer(), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column("issuer_of_patient_id", sa.Text(), nullable=True),
        sa.Column("permissions", sa.String(length=100), nullable=False),
        sa.Column("parent_pk", sa.Integer(), nullable=True),
        sa.Column("created_by_user_pk", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["source_organisation_pk"], ["organisation.pk"]),
        sa.ForeignKeyConstraint(["grantee_organisation_pk"], ["organisation.pk"]),
        sa.ForeignKeyConstraint(["grantee_user_pk"], ["user_account.pk"]),
        sa.ForeignKeyConstraint(["parent_pk"], ["access_grant.pk"]),
        sa.ForeignKeyConstraint(["created_by_user_pk"], ["user_account.pk"]),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_grant_study", "access_grant", ["study_instance_uid"])
    op.create_index("ix_grant_patient", "access_grant", ["patient_id"])
    op.create_index("ix_grant_grantee_org", "access_grant", ["grantee_organisation_pk"])
    op.create_index("ix_grant_grantee_user", "access_grant", ["grantee_user_pk"])

    op.create_table(
        "browser_session",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("csrf_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["user_pk"], ["user_account.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("secret_hash"),
    )
    op.create_table(
        "login_failure",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("user_name", sa.String(length=200), nullable=True),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_login_failure_user", "login_failure", ["user_name", "at"])
    op.create_index("ix_login_failure_source", "login_failure", ["source", "at"])

    op.create_table(
        "audit_event",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("actor_user", sa.String(length=200), nullable=True),
        sa.Column("actor_organisation_pk", sa.Integer(), nullable=True),
        sa.Column("actor_kind", sa.String(length=16), nullable=True),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("data_organisations", sa.Text(), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("seq"),
    )
    op.create_index("ix_audit_at", "audit_event", ["at"])
    op.create_index("ix_audit_actor", "audit_event", ["actor_user"])
    op.create_index("ix_audit_patient", "audit_event", ["patient_id"])
    op.create_index("ix_audit_study", "audit_event", ["study_instance_uid"])


def downgrade() -> None:
    for table in ("audit_event", "login_failure", "browser_session", "access_grant",
                  "study_owner", "instance_owner"):
        op.drop_table(table)
    with op.batch_alter_table("remote_ae") as batch:
        batch.drop_column("scopes")
    with op.batch_alter_table("api_token") as batch:
        batch.drop_column("scopes")
    with op.batch_alter_table("user_account") as batch:
        batch.drop_constraint("uq_user_oidc_subject", type_="unique")
        batch.drop_column("oidc_subject")
        batch.drop_column("disabled_at")
        batch.drop_column("superuser")
