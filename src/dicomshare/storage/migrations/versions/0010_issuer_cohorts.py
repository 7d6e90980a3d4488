"""Issuer qualifiers (IssuerOfPatientIDQualifiersSequence) on studies and patient records;
the patient sync's gaps; watches on cohort queries; one table of failed attempts per
address (share links and upload links) instead of share_link_failure.

Revision ID: 0010
Revises: 0009
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _universal(attributes: str | None) -> str | None:
    """The same rule as dicomshare.dicom.header.issuer_universal_id, frozen here."""
    try:
        ds = json.loads(attributes or "{}")
        item = ((ds.get("00100024") or {}).get("Value") or [{}])[0]
        uid = str(((item.get("00400032") or {}).get("Value") or [""])[0] or "").strip()[:64]
        kind = str(((item.get("00400033") or {}).get("Value") or [""])[0] or "").strip()[:16]
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    return f"{uid}&{kind}" if uid else None


def upgrade() -> None:
    op.add_column("study", sa.Column("issuer_universal_id", sa.Text(), nullable=True))
    op.add_column("patient_record",
                  sa.Column("issuer_universal_id", sa.Text(), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT pk, attributes FROM study WHERE attributes LIKE '%00100024%'")).all()
    for pk, attributes in rows:
        found = _universal(attributes)
        if found:
            conn.execute(sa.text("UPDATE study SET issuer_universal_id = :u WHERE pk = :pk"),
                         {"u": found, "pk": pk})
    if rows:  # records are re-derived with the new qualifiers on the next sync
        conn.execute(sa.text("UPDATE patient_record SET last_study_pk = 0"))
    op.drop_index("ix_share_link_failure_source", table_name="share_link_failure")
    op.drop_table("share_link_failure")  # recent failures only: nothing worth carrying over
    op.create_table(
        "address_failure",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_address_failure", "address_failure", ["scope", "source", "at"])
    op.create_table(
        "patient_sync_gap",
        sa.Column("study_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_pk"),
    )
    op.create_table(
        "cohort_watch",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_pk"], ["user_account.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_cohort_watch_user", "cohort_watch", ["user_pk"])
    # Remote AEs called over DICOM TLS only (dimse/tls.py).
    with op.batch_alter_table("remote_ae") as batch:
        batch.add_column(sa.Column("tls", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("remote_ae") as batch:
        batch.drop_column("tls")
    op.drop_index("ix_cohort_watch_user", table_name="cohort_watch")
    op.drop_table("cohort_watch")
    op.drop_table("patient_sync_gap")
    op.drop_index("ix_address_failure", table_name="address_failure")
    op.drop_table("address_failure")
    op.create_table(
        "share_link_failure",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ix_share_link_failure_source", "share_link_failure", ["source", "at"])
    op.drop_column("patient_record", "issuer_universal_id")
    op.drop_column("study", "issuer_universal_id")
