"""The relational schema of the index, shared by SQLite and PostgreSQL.

Alembic migrations in ``storage/migrations`` create and evolve these tables; this
module is the picture the query code is written against. Patient attributes sit on
the study row: until cross-provider identity exists, a patient is "the patient of a
study", which is exactly what QIDO-RS and C-FIND need.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
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
    # IssuerOfPatientIDQualifiersSequence's UniversalEntityID "&" UniversalEntityIDType:
    # the issuer's globally unique identity, when the study carries one.
    Column("issuer_universal_id", Text),
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
    # Site-wide: may create organisations and act in every one.
    Column("superuser", Boolean, nullable=False, server_default=false()),
    Column("disabled_at", DateTime(timezone=True)),
    Column("oidc_subject", String(255), unique=True),  # "issuer|sub" of a linked login
    Column("email", String(320)),  # where notifications go (sharing/notify.py)
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
    # Comma-separated subset of access.policy.SCOPES; a token never exceeds its user's role.
    Column("scopes", String(100), nullable=False, server_default="read,write,share,admin"),
)

remote_ae = Table(
    "remote_ae",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("ae_title", String(16), nullable=False, unique=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("description", Text),
    # Who may connect from this AE and who owns what it stores. NULL: a destination only.
    Column("organisation_pk", Integer, ForeignKey("organisation.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("scopes", String(100), nullable=False, server_default="read,write"),
    # Called over DICOM TLS only (dimse/tls.py); its port is then its TLS port.
    Column("tls", Boolean, nullable=False, server_default=false()),
)

# -- ownership and grants (access/policy.py) ------------------------------------------------

instance_owner = Table(
    "instance_owner",
    metadata,
    # An instance belongs to every organisation that stored it (identical bytes stored by a
    # second organisation make it a co-owner: it holds the data already).
    Column("instance_pk", Integer, ForeignKey("instance.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), primary_key=True),
    Index("ix_instance_owner_org", "organisation_pk", "instance_pk"),
)

study_owner = Table(
    "study_owner",
    metadata,
    # Derived from instance_owner (kept in step by ingest and delete): makes "studies my
    # organisation owns something in" one index lookup for QIDO and C-FIND.
    Column("study_pk", Integer, ForeignKey("study.pk", ondelete="CASCADE"), primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), primary_key=True),
    Index("ix_study_owner_org", "organisation_pk", "study_pk"),
)

access_grant = Table(
    "access_grant",
    metadata,
    Column("pk", Integer, primary_key=True),
    # The organisation whose instances the grant opens (the grantor, or the original
    # grantor of a re-shared grant).
    Column("source_organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("grantee_organisation_pk", Integer, ForeignKey("organisation.pk")),
    Column("grantee_user_pk", Integer, ForeignKey("user_account.pk")),
    # Either a study or all studies of a patient (PatientID + IssuerOfPatientID).
    Column("study_instance_uid", String(64)),
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("permissions", String(100), nullable=False),  # comma-separated policy.GRANT_PERMISSIONS
    Column("parent_pk", Integer, ForeignKey("access_grant.pk")),  # the grant re-shared
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Index("ix_grant_study", "study_instance_uid"),
    Index("ix_grant_patient", "patient_id"),
    Index("ix_grant_grantee_org", "grantee_organisation_pk"),
    Index("ix_grant_grantee_user", "grantee_user_pk"),
)

# -- sessions and login throttling (access/sessions.py) -------------------------------------

browser_session = Table(
    "browser_session",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("user_pk", Integer, ForeignKey("user_account.pk", ondelete="CASCADE"), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),  # sha256 of the cookie
    Column("csrf_hash", String(64), nullable=False),  # sha256 of the CSRF token
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("source", String(255)),
)

login_failure = Table(
    "login_failure",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user_name", String(200)),
    Column("source", String(255)),
    Index("ix_login_failure_user", "user_name", "at"),
    Index("ix_login_failure_source", "source", "at"),
)

# -- audit trail (access/audit.py) ------------------------------------------------------------

audit_event = Table(
    "audit_event",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False, unique=True),  # gapless: 1, 2, 3, ...
    Column("at", DateTime(timezone=True), nullable=False),
    Column("action", String(64), nullable=False),  # e.g. "study.retrieve", "login"
    Column("outcome", String(16), nullable=False),  # success | denied | failure
    Column("actor_user", String(200)),
    Column("actor_organisation_pk", Integer),
    Column("actor_kind", String(16)),  # token | session | ae | cli | link
    Column("source", String(255)),  # client address or calling AE title
    Column("patient_id", Text),
    Column("study_instance_uid", String(64)),
    Column("data_organisations", Text),  # ",1,3,": organisations whose data was touched
    Column("details", Text, nullable=False),  # JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_at", "at"),
    Index("ix_audit_actor", "actor_user"),
    Index("ix_audit_patient", "patient_id"),
    Index("ix_audit_study", "study_instance_uid"),
)

# -- research (research/) -------------------------------------------------------------------

research_project = Table(
    "research_project",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text),
    # The key of the project's pseudonyms and date shifts (hex). It never leaves the server:
    # the same input maps to the same output in every export of the project.
    Column("secret", String(128), nullable=False),
    Column("options", String(500), nullable=False),  # default de-identification options
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("organisation_pk", "name", name="uq_research_project_name"),
)

research_optout = Table(
    "research_optout",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_id", Text, nullable=False),
    Column("issuer_of_patient_id", Text, nullable=False, server_default=""),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text),
    UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_research_optout"),
)

export_job = Table(
    "export_job",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("project_pk", Integer, ForeignKey("research_project.pk"), nullable=False),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("query", Text, nullable=False),  # JSON CohortQuery
    Column("options", String(500), nullable=False),
    Column("layout", String(16), nullable=False),  # folder | zip
    Column("volumes", Boolean, nullable=False, server_default=false()),  # NIfTI of CT/MR
    Column("state", String(16), nullable=False),  # queued | running | done | failed | cancelled
    Column("total", Integer, nullable=False, server_default="0"),
    Column("exported", Integer, nullable=False, server_default="0"),
    Column("held_back", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("heartbeat_at", DateTime(timezone=True)),  # a running job without one is resumed
    Index("ix_export_job_state", "state"),
)

export_item = Table(
    "export_item",
    metadata,
    Column("job_pk", Integer, ForeignKey("export_job.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("state", String(16), nullable=False),  # exported | held | failed
    Column("path", Text),  # inside the export
    Column("sha256", String(64)),
    Column("detail", Text),  # JSON: the instance's de-identification report
)

pseudonym = Table(
    "pseudonym",
    metadata,
    # What each export replaced, so the project's admins can answer "who was PAT-7Q..."
    # (e.g. to act on an incidental finding). Readable by admins only.
    Column("project_pk", Integer, ForeignKey("research_project.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("kind", String(16), primary_key=True),  # patient | study | series | instance
    Column("original", String(200), primary_key=True),
    Column("pseudonym", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# -- sharing (sharing/) ---------------------------------------------------------------------
# Secrets (of share and upload links) are stored as SHA-256 digests: they carry 128+ bits of
# entropy, so a fast hash is enough; a PIN is short and gets argon2.

share_link = Table(
    "share_link",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("label", String(200)),
    # What it covers: the studies in share_link_study, or every study of one patient.
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("permissions", String(100), nullable=False),  # "view,download,upload"
    Column("pin_hash", Text),  # argon2 of the PIN or password; NULL: none
    Column("pin_failures", Integer, nullable=False, server_default="0"),
    Column("locked_at", DateTime(timezone=True)),
    Column("max_uses", Integer),  # NULL: unlimited
    Column("uses", Integer, nullable=False, server_default="0"),
    Column("last_used_at", DateTime(timezone=True)),
    Column("notify", Boolean, nullable=False, server_default=false()),
    Column("deidentified", Boolean, nullable=False, server_default=false()),
    Column("project_pk", Integer, ForeignKey("research_project.pk")),  # pseudonyms' key
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

share_link_study = Table(
    "share_link_study",
    metadata,
    Column("link_pk", Integer, ForeignKey("share_link.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("study_instance_uid", String(64), primary_key=True),
)

address_failure = Table(
    "address_failure",
    metadata,
    # Failed attempts at a secret (share link, PIN, upload link) by client address, for
    # limits shared by every server process (access/throttle.py).
    Column("pk", Integer, primary_key=True),
    Column("scope", String(32), nullable=False),
    Column("source", String(255), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_address_failure", "scope", "source", "at"),
)

inbox_item = Table(
    "inbox_item",
    metadata,
    # A study (or a patient's studies) sent to another organisation or user; accepting it
    # creates a grant.
    Column("pk", Integer, primary_key=True),
    Column("from_organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("from_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("to_organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("to_user_pk", Integer, ForeignKey("user_account.pk")),  # NULL: the whole org
    Column("study_instance_uid", String(64)),
    Column("patient_id", Text),
    Column("issuer_of_patient_id", Text),
    Column("permissions", String(100), nullable=False),
    Column("message", Text),
    Column("state", String(16), nullable=False),  # pending | accepted | declined | withdrawn
    Column("grant_pk", Integer, ForeignKey("access_grant.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("decided_at", DateTime(timezone=True)),
    Column("decided_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Index("ix_inbox_to", "to_organisation_pk", "state"),
)

consult = Table(
    "consult",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("requester_organisation_pk", Integer, ForeignKey("organisation.pk"),
           nullable=False),
    Column("requester_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("specialist_organisation_pk", Integer, ForeignKey("organisation.pk"),
           nullable=False),
    Column("specialist_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("question", Text, nullable=False),
    Column("urgency", String(16), nullable=False),  # routine | urgent | emergency
    # requested | accepted | declined | answered | closed
    Column("state", String(16), nullable=False),
    Column("grant_pk", Integer, ForeignKey("access_grant.pk")),
    Column("decline_reason", Text),
    Column("opinion_sop_instance_uid", String(64)),
    Column("opinion_study_instance_uid", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("accepted_at", DateTime(timezone=True)),
    Column("declined_at", DateTime(timezone=True)),
    Column("answered_at", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    Index("ix_consult_specialist", "specialist_organisation_pk", "state"),
    Index("ix_consult_requester", "requester_organisation_pk", "state"),
)

consult_study = Table(
    "consult_study",
    metadata,
    Column("consult_pk", Integer, ForeignKey("consult.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("study_instance_uid", String(64), primary_key=True),
    Column("grant_pk", Integer, ForeignKey("access_grant.pk")),  # opens it to the specialist
)

consult_comment = Table(
    "consult_comment",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("consult_pk", Integer, ForeignKey("consult.pk", ondelete="CASCADE"),
           nullable=False),
    Column("author_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_consult_comment", "consult_pk", "pk"),
)

notification = Table(
    "notification",
    metadata,
    # For one user, or for every user of an organisation (user_pk NULL).
    Column("pk", Integer, primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("user_pk", Integer, ForeignKey("user_account.pk")),
    Column("kind", String(40), nullable=False),  # share-used, inbox-new, consult-updated, ...
    Column("subject", Text, nullable=False),
    Column("details", Text, nullable=False),  # JSON
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("read_at", DateTime(timezone=True)),
    Column("emailed_at", DateTime(timezone=True)),
    Column("email_error", Text),
    Index("ix_notification_to", "organisation_pk", "user_pk", "pk"),
)

upload_link = Table(
    "upload_link",
    metadata,
    # "Send me your images": anyone with the link may upload into the organisation.
    Column("pk", Integer, primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("label", String(200)),
    Column("max_bytes", BigInteger, nullable=False),
    Column("bytes_received", BigInteger, nullable=False, server_default="0"),
    Column("instances_stored", Integer, nullable=False, server_default="0"),
    Column("notify", Boolean, nullable=False, server_default=false()),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    # When the creator was last told of received files (notifications are throttled).
    Column("notified_at", DateTime(timezone=True)),
)

upload_file = Table(
    "upload_file",
    metadata,
    # One file being uploaded through an upload link, resumable from ``received``.
    Column("pk", Integer, primary_key=True),
    Column("link_pk", Integer, ForeignKey("upload_link.pk", ondelete="CASCADE"),
           nullable=False),
    Column("upload_id", String(64), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("received", BigInteger, nullable=False, server_default="0"),
    Column("state", String(16), nullable=False),  # receiving | stored | rejected
    Column("result", Text),  # JSON: per-instance outcomes once stored
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# -- remote monitoring (issue 7: monitoring/, migration 0009) ---------------------------------

webhook = Table(
    "webhook",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", String(200), nullable=False),  # comma-separated event names
    # Kept in clear: HMAC signing needs the secret itself (docs/monitoring.md).
    Column("secret", String(200), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_webhook_org", "organisation_pk"),
)

monitor_event = Table(
    "monitor_event",
    metadata,
    # The outbox: what happened (instances stored, a consult's news, a share link used),
    # fanned out to webhooks and watchers by the monitoring worker (monitoring/webhooks.py).
    Column("pk", Integer, primary_key=True),
    Column("kind", String(40), nullable=False),  # stored | consult-updated | share-used
    Column("payload", Text, nullable=False),  # JSON
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("processed_at", DateTime(timezone=True)),
    Index("ix_monitor_event_pending", "processed_at", "pk"),
)

webhook_delivery = Table(
    "webhook_delivery",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("webhook_pk", Integer, ForeignKey("webhook.pk", ondelete="CASCADE"),
           nullable=False),
    Column("event_id", String(100), nullable=False),  # the payload's "id": receivers dedupe
    Column("event", String(40), nullable=False),
    Column("body", Text, nullable=False),  # the exact JSON sent (signed anew each attempt)
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("status_code", Integer),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),
    UniqueConstraint("webhook_pk", "event_id"),
    Index("ix_webhook_delivery_due", "state", "next_attempt_at"),
)

webhook_attempt = Table(
    "webhook_attempt",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("delivery_pk", Integer, ForeignKey("webhook_delivery.pk", ondelete="CASCADE"),
           nullable=False),
    Column("number", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
    Index("ix_webhook_attempt", "delivery_pk", "number"),
)

watch = Table(
    "watch",
    metadata,
    # A user follows a patient (PatientID + issuer, "" when none).
    Column("pk", Integer, primary_key=True),
    Column("user_pk", Integer, ForeignKey("user_account.pk", ondelete="CASCADE"),
           nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False, server_default=""),
    Column("label", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("user_pk", "patient_id", "issuer_of_patient_id"),
    Index("ix_watch_patient", "patient_id"),
)

cohort_watch = Table(
    "cohort_watch",
    metadata,
    # A user follows a cohort query (JSON filters, monitoring/watch.py): every new study
    # matching it that the user may see is notified.
    Column("pk", Integer, primary_key=True),
    Column("user_pk", Integer, ForeignKey("user_account.pk", ondelete="CASCADE"),
           nullable=False),
    Column("label", String(200)),
    Column("query", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_cohort_watch_user", "user_pk"),
)

# -- patients across providers (patients/) ----------------------------------------------------
# A patient record is a PatientID qualified by its issuer ("issuer:<IssuerOfPatientID>") or,
# without one, by the organisation that stored it ("org:<pk>"). Records are derived from the
# study rows (patients/identity.py syncs them); links and merges only join records into a
# person for the view, they never change the study rows or the stored DICOM.

patient_record = Table(
    "patient_record",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("ref", String(32), nullable=False, unique=True),  # opaque id used in URLs
    Column("patient_id", Text, nullable=False),
    Column("qualifier", Text, nullable=False),
    Column("issuer_of_patient_id", Text),
    Column("issuer_universal_id", Text),  # as on the study rows
    Column("organisation_pk", Integer, ForeignKey("organisation.pk")),
    # The latest demographics seen in the record's studies (what the matching rule reads).
    Column("patient_name", Text),
    Column("patient_birth_date", Text),
    Column("patient_sex", Text),
    Column("other_ids", Text, nullable=False, server_default="[]"),  # JSON [[id, issuer]]
    Column("last_study_pk", Integer, nullable=False),  # sync watermark
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_id", "qualifier", name="uq_patient_record"),
    Index("ix_patient_record_birth", "patient_birth_date"),
    Index("ix_patient_record_sync", "last_study_pk"),
)

patient_sync_gap = Table(
    "patient_sync_gap",
    metadata,
    # Study pks the incremental sync stepped over (patients/identity.py): on PostgreSQL a
    # transaction can commit a lower pk after a higher one was synced; re-read until expiry.
    Column("study_pk", Integer, primary_key=True, autoincrement=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
)

patient_link = Table(
    "patient_link",
    metadata,
    # An edge between two records (record_a_pk < record_b_pk); persons are the connected
    # components of the confirmed links and live merges. Rows are never deleted: a rejected
    # or unlinked row is the history, and keeps the pair from being proposed again.
    Column("pk", Integer, primary_key=True),
    Column("record_a_pk", Integer, ForeignKey("patient_record.pk"), nullable=False),
    Column("record_b_pk", Integer, ForeignKey("patient_record.pk"), nullable=False),
    Column("state", String(16), nullable=False),  # proposed | confirmed | rejected | unlinked
    Column("origin", String(16), nullable=False),  # rule | manual
    Column("evidence", Text, nullable=False),  # JSON: the rule's evidence or the note
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("decided_at", DateTime(timezone=True)),
    Column("decided_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("unlinked_at", DateTime(timezone=True)),
    Column("unlinked_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Index("ix_patient_link_a", "record_a_pk", "state"),
    Index("ix_patient_link_b", "record_b_pk", "state"),
    Index("ix_patient_link_state", "state"),
)

patient_match_key = Table(
    "patient_match_key",
    metadata,
    # What the matching rule compares, as equality keys (patients/matching.py): one per PN
    # component group ("<birth>|<sex>|<name key>") and per identifier ("id|<id>|<issuer>":
    # the record's own, and those of its OtherPatientIDsSequence). Records sharing a key
    # are candidates; the rule decides.
    Column("record_pk", Integer, ForeignKey("patient_record.pk", ondelete="CASCADE"),
           primary_key=True),
    Column("key", String(400), primary_key=True),
    Index("ix_patient_match_key", "key"),
)

patient_merge = Table(
    "patient_merge",
    metadata,
    # HL7 ADT A40/A47: the old identifier's studies are shown under the new one; undone by
    # setting undone_at (the view is derived, nothing else changes).
    Column("pk", Integer, primary_key=True),
    Column("old_record_pk", Integer, ForeignKey("patient_record.pk"), nullable=False),
    Column("new_record_pk", Integer, ForeignKey("patient_record.pk"), nullable=False),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Column("undone_at", DateTime(timezone=True)),
    Column("undone_by_user_pk", Integer, ForeignKey("user_account.pk")),
    Index("ix_patient_merge_old", "old_record_pk"),
    Index("ix_patient_merge_new", "new_record_pk"),
)

transfer_job = Table(
    "transfer_job",
    metadata,
    # A background DICOM transfer (dimse/jobs.py): send = C-STORE studies to a peer,
    # retrieve = C-MOVE / C-GET them from one. Runs as its creator, within the token's scopes.
    Column("pk", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # send | retrieve
    # queued | running | succeeded | failed | cancelled | interrupted
    Column("state", String(16), nullable=False),
    Column("organisation_pk", Integer, ForeignKey("organisation.pk"), nullable=False),
    Column("created_by_user_pk", Integer, ForeignKey("user_account.pk"), nullable=False),
    Column("scopes", String(100), nullable=False),
    Column("ae_title", String(16), nullable=False),
    Column("study_uids", Text, nullable=False),  # JSON list
    Column("method", String(8)),  # retrieve: move | get
    Column("retry_of_pk", Integer, ForeignKey("transfer_job.pk")),
    Column("total", Integer),  # instances, when known
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("warning", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("result", Text),  # JSON: the report the synchronous route returns
    Column("worker", String(100)),  # the claiming worker; only it writes progress
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("heartbeat_at", DateTime(timezone=True)),  # running without one: interrupted
    Index("ix_transfer_job_state", "state"),
    Index("ix_transfer_job_org", "organisation_pk", "pk"),
    Index("ix_transfer_job_user", "created_by_user_pk", "pk"),
)
