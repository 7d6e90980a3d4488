"""One typed settings object, read from ``DICOMSHARE_*`` environment variables and CLI flags.

Precedence: CLI flag > environment variable > default. Every command builds its
``Settings`` through :func:`load_settings`, so the server, the importer and the
admin commands always agree on where the data lives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "DICOMSHARE_"


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Field names map to ``DICOMSHARE_<NAME>`` variables."""

    data_dir: Path = Path("data")
    database_url: str = ""  # empty: sqlite:///<data_dir>/index.db
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    dicomweb_root: str = "/dicomweb"
    # Base URL clients use to reach the server (e.g. behind a reverse proxy); empty: from
    # each request's Host header.
    public_url: str = ""
    cors_origins: tuple[str, ...] = ()
    # Binary attributes longer than this are served as BulkDataURI in metadata.
    bulkdata_threshold: int = 1024
    # fsync blobs and use synchronous=FULL in SQLite: an acknowledged instance survives power loss.
    fsync: bool = True
    max_stow_bytes: int = 0  # 0: unlimited (memory is bounded anyway; disk is the limit)
    workers: int = 0  # HTTP worker processes; 0: one per CPU, at most 4
    # DICOM network service (DIMSE); port 0 disables it.
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    ae_title: str = "DICOMSHARE"
    dicom_accept_unknown: bool = False  # accept associations from unregistered AE titles
    dicom_max_pdu: int = 262144  # bytes; 0: unlimited
    dicom_max_associations: int = 16
    dicom_timeout: int = 60  # seconds: ACSE, DIMSE and network timeouts
    # Accepted associations wait on their socket and queues instead of polling
    # (dimse/reactor.py); false falls back to pynetdicom's own loops.
    dicom_event_loops: bool = True
    # With several HTTP worker processes, each also listens for DICOM on the same port(s)
    # (SO_REUSEPORT; the kernel spreads associations over them): several modalities at
    # once use every CPU. False: one listener, in the supervisor process.
    dicom_in_workers: bool = True
    dicom_listeners: str = ""  # where workers fetch the DICOM listening sockets (`serve`)
    # Seconds between pending C-MOVE / C-GET responses (progress; the first and the final
    # response always go). 0: one after every sub-operation, as pynetdicom does.
    dicom_pending_interval: float = 0.5
    # DICOM TLS (PS3.15 Annex B; dimse/tls.py). A second listener on dicom_tls_port (0: none;
    # 2762 is the registered port) with this certificate and key (PEM). The CA file, when
    # set, makes client certificates required (mutual TLS) and verifies TLS peers we call;
    # without it they are verified against the system CAs. Certificate and key are also
    # presented as our client certificate to peers registered with --tls.
    dicom_tls_port: int = 0
    dicom_tls_cert: str = ""
    dicom_tls_key: str = ""
    dicom_tls_ca: str = ""
    log_level: str = "info"
    # Access and audit (docs/security.md).
    # Key of the audit trail's HMAC chain; empty: <data_dir>/secrets/audit.key (made once).
    # Several servers sharing one PostgreSQL must share this key.
    audit_key: str = ""
    # Forward each audit record to a syslog collector (RFC 5424): udp://host:port or
    # tcp://host:port; empty: no forwarding.
    audit_syslog: str = ""
    session_hours: int = 12  # browser session lifetime
    # Session cookies carry the Secure flag (HTTPS only); turn off only for plain-HTTP tests.
    secure_cookies: bool = True
    login_max_failures: int = 5  # failed logins of one user before it is locked ...
    login_lockout_minutes: int = 15  # ... for this long
    login_max_failures_per_source: int = 20  # failed logins from one address per lockout window
    # OpenID Connect (optional): a hospital's own identity provider.
    oidc_issuer: str = ""  # e.g. https://login.example.org/realms/hospital; empty: disabled
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    oidc_username_claim: str = "preferred_username"  # claim naming the local user
    # A running export whose worker sent no heartbeat for this long is resumed by another.
    export_stale_seconds: int = 60
    # A running background transfer (dimse/jobs.py) without a heartbeat for this long is
    # marked interrupted (never re-run by itself).
    transfer_stale_seconds: int = 60
    # Burned-in text masking for exports: rule files (comma-separated paths), and whether
    # the generic shipped rules apply too. Without a matching rule: held back.
    deid_mask_rules: tuple[str, ...] = ()
    deid_default_masks: bool = False
    # Sharing (share links, upload links, inbox, consults).
    share_pin_max_failures: int = 5  # wrong PINs before a share link locks
    upload_max_bytes: int = 2 * 1024**3  # default size limit of one upload link
    # Notifications by e-mail; empty smtp_host: notifications stay in the API only.
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    smtp_from: str = "dicomshare@localhost"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.db').resolve()}"


def _convert(name: str, raw: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind == "Path":
        return Path(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind == "tuple[str, ...]":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def settings_environment(settings: Settings) -> dict[str, str]:
    """The settings as DICOMSHARE_* variables, for child processes."""
    env = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[ENV_PREFIX + f.name.upper()] = str(value)
    return env


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from the environment, then apply non-None ``overrides`` (CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Settings)}
    for name in names:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            try:
                values[name] = _convert(name, raw)
            except ValueError as exc:
                raise SystemExit(f"invalid {ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from exc
    settings = Settings(**values)
    clean = {k: v for k, v in (overrides or {}).items() if v is not None and k in names}
    if "cors_origins" in clean and isinstance(clean["cors_origins"], str):
        clean["cors_origins"] = _convert("cors_origins", clean["cors_origins"])
    return replace(settings, **clean)
