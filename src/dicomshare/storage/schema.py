"""The relational schema of the index, shared by SQLite and PostgreSQL.

Alembic migrations in ``storage/migrations`` create and evolve these tables; this
module is the picture the query code is written against. Patient attributes sit on
the study row: until cross-provider identity exists, a patient is "the patient of a
study", which is exactly what QIDO-RS and C-FIND need.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

study = Table(
    "study",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_instance_uid", String(64), nullable=False, unique=True),
    Column("patient_name", Text),
    # Lower-cased copies: case-insensitive PN matching that can use an index.
    Column("patient_name_lc", Text),
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("patient_birth_date", Text),
    Column("patient_sex", Text),
    Column("study_date", Text),
    Column("study_time", Text),
    Column("accession_number", Text),
    Column("referring_physician_name", Text),
    Column("referring_physician_name_lc", Text),
    Column("study_description", Text),
    Column("study_id", Text),
    Column("attributes", Text, nullable=False),  # DICOM JSON: patient + study modules
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_study_patient_id", "patient_id"),
    Index("ix_study_patient_name_lc", "patient_name_lc",
          postgresql_ops={"patient_name_lc": "text_pattern_ops"}),
    Index("ix_study_date", "study_date"),
    Index("ix_study_accession", "accession_number"),
)

series = Table(
    "series",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("series_instance_uid", String(64), nullable=False, unique=True),
    Column("study_pk", Integer, ForeignKey("study.pk", ondelete="CASCADE"), nullable=False),
    Column("modality", Text),
    Column("series_number", Integer),
    Column("series_description", Text),
    Column("body_part_examined", Text),
    Column("performed_procedure_step_start_date", Text),
    Column("performed_procedure_step_start_time", Text),
    Column("attributes", Text, nullable=False),  # DICOM JSON: series module
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_series_study", "study_pk"),
    Index("ix_series_modality", "modality"),
)

instance = Table(
    "instance",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("series_pk", Integer, ForeignKey("series.pk", ondelete="CASCADE"), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("bits_allocated", Integer),
    Column("number_of_frames", Integer),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("blob_key", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("metadata", Text, nullable=False),  # DICOM JSON with bulk placeholders
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_instance_series", "series_pk"),
    Index("ix_instance_blob", "blob_key"),
)

organisation = Table(
    "organisation",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

user = Table(
    "user_account",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("role", String(32), nullable=False),
    Column("password_hash", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

token = Table(
    "api_token",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("user_pk", Integer, ForeignKey("user_account.pk", ondelete="CASCADE"), nullable=False),
    Column("name", String(200)),
    Column("prefix", String(16), nullable=False),  # shown in listings; not a secret
    Column("secret_hash", String(64), nullable=False, unique=True),  # sha256 of the token
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
)

remote_ae = Table(
    "remote_ae",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("ae_title", String(16), nullable=False, unique=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("description", Text),
    # Who may connect from this AE and who owns what it stores (the access issue fills it).
    Column("organisation_pk", Integer, ForeignKey("organisation.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
