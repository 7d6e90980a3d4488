"""The ``dicomshare`` command line: serve, import, check, users and tokens.

Every command opens the archive through :meth:`Archive.open`, which initialises a fresh
data directory or upgrades an older one, so the first command run on a new machine
works without a set-up step. Exit codes: 0 success, 1 something was rejected or found
wrong, 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from dicomshare import __version__
from dicomshare.archive import Archive, StoreResult
from dicomshare.config import Settings, load_settings, settings_environment
from dicomshare.errors import DicomshareError
from dicomshare.storage.base import Outcome

BATCH = 64  # instances per index transaction during import


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomshare", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dicomshare {__version__}")
    p.add_argument("--data-dir", help="data folder (env DICOMSHARE_DATA_DIR, default ./data)")
    p.add_argument("--database-url", help="sqlite:///... or postgresql+psycopg://... "
                   "(env DICOMSHARE_DATABASE_URL)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP (DICOMweb) server")
    serve.add_argument("--http-host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="port (default 8080)")
    serve.add_argument("--cors-origins", help="comma-separated origins allowed by CORS")
    serve.add_argument("--dicom-port", type=int, help="DICOM (DIMSE) port, 0 disables "
                       "(default 11112)")
    serve.add_argument("--dicom-host", help="DICOM address to bind (default 127.0.0.1)")
    serve.add_argument("--ae-title", help="our AE title (default DICOMSHARE)")
    serve.add_argument("--dicom-accept-unknown", action="store_const", const=True,
                       help="accept associations from AE titles that are not registered")
    serve.add_argument("--workers", type=int,
                       help="HTTP worker processes (default: one per CPU, at most 4)")

    imp = sub.add_parser("import", help="store DICOM files, folders and zip files")
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--quiet", action="store_true", help="no progress bar")

    check = sub.add_parser("check", help="verify blobs and index agree")
    check.add_argument("--repair", action="store_true", help="fix what can be fixed safely")
    check.add_argument("--quick", action="store_true", help="check presence, not hashes")

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action",
                                                                         required=True)
    create = users.add_parser("create", help="create a user")
    create.add_argument("name")
    create.add_argument("--org", required=True, help="organisation (created if new)")
    create.add_argument("--role", required=True, choices=["admin", "member"])
    create.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input")

    tokens = sub.add_parser("tokens", help="manage API tokens").add_subparsers(
        dest="action", required=True)
    tcreate = tokens.add_parser("create", help="create a token; prints only the token")
    tcreate.add_argument("user")
    tcreate.add_argument("--name", help="a label for the token")
    tcreate.add_argument("--expires-days", type=int, help="expire after this many days")
    trevoke = tokens.add_parser("revoke", help="revoke a token by id")
    trevoke.add_argument("id", type=int)
    tokens.add_parser("list", help="list tokens (never their secrets)")

    ae = sub.add_parser("ae", help="registered DICOM peers (AE titles)").add_subparsers(
        dest="action", required=True)
    ae_add = ae.add_parser("add", help="register a peer: it may connect, and receive C-MOVEs")
    ae_add.add_argument("title")
    ae_add.add_argument("--host", required=True)
    ae_add.add_argument("--port", required=True, type=int)
    ae_add.add_argument("--description")
    ae_add.add_argument("--replace", action="store_true", help="update an existing entry")
    ae_remove = ae.add_parser("remove", help="forget a peer")
    ae_remove.add_argument("title")
    ae.add_parser("list", help="list registered peers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)
    overrides = {k: getattr(args, k, None) for k in
                 ("data_dir", "database_url", "http_host", "http_port", "cors_origins",
                  "workers", "dicom_port", "dicom_host", "ae_title", "dicom_accept_unknown")}
    if overrides["data_dir"]:
        overrides["data_dir"] = Path(overrides["data_dir"])
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = load_settings(overrides)
    try:
        handler = {"serve": _serve, "import": _import, "check": _check,
                   "users": _users, "tokens": _tokens, "ae": _ae}[args.command]
        return handler(settings, args)
    except DicomshareError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    import uvicorn

    from dicomshare.access.identity import Identities
    from dicomshare.web.app import create_app

    archive = Archive.open(settings)
    first = Identities(archive.index.engine).bootstrap()
    if first:
        print("\nFirst start: created user 'admin'. Its API token (shown only once):\n\n"
              f"    {first}\n\nUse it as: Authorization: Bearer <token>\n", file=sys.stderr,
              flush=True)
    print(f"dicomshare {__version__}: DICOMweb at http://{settings.http_host}:"
          f"{settings.http_port}{settings.dicomweb_root} (data in {settings.data_dir})",
          file=sys.stderr, flush=True)
    options: dict[str, Any] = dict(host=settings.http_host, port=settings.http_port,
                                   log_level=settings.log_level, access_log=False,
                                   timeout_keep_alive=30)
    workers = settings.workers or min(4, os.cpu_count() or 1)
    if workers > 1:
        # Worker processes rebuild the settings from the environment.
        archive.close()
        os.environ.update(settings_environment(settings))
        uvicorn.run("dicomshare.web.app:app_from_env", factory=True, workers=workers,
                    **options)
    else:
        uvicorn.run(create_app(settings, archive), **options)
    return 0


# -- import -------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str
    size: int
    opener: Any  # () -> IO[bytes]


def _sources(paths: list[Path]) -> Iterator[_Source]:
    for root in paths:
        if not root.exists():
            yield _Source(str(root), 0, None)
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if path.name.upper() == "DICOMDIR":
                continue  # a media directory, not an instance
            if zipfile.is_zipfile(path) and not _looks_dicom(path):
                # Left open: the members are read after all sources are listed.
                with nullcontext(zipfile.ZipFile(path)) as archive:
                    for info in archive.infolist():
                        if info.is_dir() or Path(info.filename).name.upper() == "DICOMDIR":
                            continue
                        yield _Source(f"{path}:{info.filename}", info.file_size,
                                      lambda a=archive, i=info: a.open(i))
            else:
                yield _Source(str(path), path.stat().st_size, lambda p=path: open(p, "rb"))


def _looks_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _import(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    archive = Archive.open(settings)
    counts: Counter[str] = Counter()
    rejected: list[tuple[str, str]] = []
    sources = list(_sources(args.paths))
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True,
               disable=args.quiet or None, file=sys.stderr, desc="importing")
    batch: list[tuple[_Source, Any]] = []

    def flush() -> None:
        results = archive.store_received([t for _, t in batch])
        for (src, _), result in zip(batch, results, strict=True):
            _tally(src.name, result, counts, rejected)
        batch.clear()

    for src in sources:
        if src.opener is None:
            rejected.append((src.name, "no such file or folder"))
            continue
        temp = archive.new_temp()
        try:
            with src.opener() as stream:
                _copy(stream, temp, bar)
        except (OSError, zipfile.BadZipFile) as exc:
            archive.blobs.discard(temp)  # type: ignore[arg-type]
            rejected.append((src.name, f"cannot read: {exc}"))
            continue
        batch.append((src, temp))
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    bar.close()
    print(f"stored: {counts['stored']}  already present: {counts['present']}  "
          f"rejected: {len(rejected)}")
    for name, reason in rejected:
        print(f"  rejected {name}: {reason}")
    return 1 if rejected else 0


def _copy(stream: IO[bytes], temp: Any, bar: Any) -> None:
    while chunk := stream.read(1 << 20):
        temp.write(chunk)
        bar.update(len(chunk))


def _tally(name: str, result: StoreResult, counts: Counter[str],
           rejected: list[tuple[str, str]]) -> None:
    if result.error is not None:
        rejected.append((name, result.error.reason))
    elif result.outcome is Outcome.ALREADY_PRESENT:
        counts["present"] += 1
    else:
        counts["stored"] += 1


# -- check, users, tokens -----------------------------------------------------------------
def _check(settings: Settings, args: argparse.Namespace) -> int:
    archive = Archive.open(settings)
    report = archive.check(repair=args.repair, verify_hashes=not args.quick)
    print(f"checked {report.checked} instances")
    for inst in report.missing:
        print(f"  missing blob: instance {inst.sop_uid} (study {inst.study_uid})")
    for inst in report.corrupt:
        print(f"  hash mismatch: instance {inst.sop_uid} (blob {inst.blob_key})")
    for key in report.orphans:
        print(f"  blob not in the index: {key}")
    for path in report.leftovers:
        print(f"  partial upload left by a crash: {path.name}")
    for line in report.repaired:
        print(f"  repaired: {line}")
    if report.clean:
        print("ok: index and blobs agree")
        return 0
    if args.repair and not report.corrupt:
        print("repaired; run check again to confirm")
        return 0
    return 1


def _users(settings: Settings, args: argparse.Namespace) -> int:
    from dicomshare.access.identity import Identities

    archive = Archive.open(settings)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: passwords differ", file=sys.stderr)
            return 1
    else:
        print("error: no terminal to ask for a password; use --password-stdin",
              file=sys.stderr)
        return 2
    Identities(archive.index.engine).create_user(args.name, args.org, args.role, password)
    print(f"created user {args.name} ({args.role} of {args.org})", file=sys.stderr)
    return 0


def _tokens(settings: Settings, args: argparse.Namespace) -> int:
    from dicomshare.access.identity import Identities

    identities = Identities(Archive.open(settings).index.engine)
    if args.action == "create":
        expires = (datetime.now(UTC) + timedelta(days=args.expires_days)
                   if args.expires_days is not None else None)
        token_id, secret = identities.create_token(args.user, args.name, expires)
        print(secret)
        print(f"token id {token_id} for {args.user}", file=sys.stderr)
    elif args.action == "revoke":
        identities.revoke_token(args.id)
        print(f"revoked token {args.id}", file=sys.stderr)
    else:
        for t in identities.list_tokens():
            state = "revoked" if t.revoked_at else (
                "expired" if t.expires_at and t.expires_at <= datetime.now(UTC) else "active")
            print(f"{t.id}\t{t.user}\t{t.name or ''}\t{t.prefix}...\t{state}\t"
                  f"{t.created_at:%Y-%m-%d %H:%M}")
    return 0


def _ae(settings: Settings, args: argparse.Namespace) -> int:
    from dicomshare.dimse.aes import AERegistry

    registry = AERegistry(Archive.open(settings).index.engine)
    if args.action == "add":
        ae = registry.add(args.title, args.host, args.port, args.description, args.replace)
        print(f"registered {ae.ae_title} at {ae.host}:{ae.port}", file=sys.stderr)
    elif args.action == "remove":
        registry.remove(args.title)
        print(f"removed {args.title}", file=sys.stderr)
    else:
        for ae in registry.all():
            print(f"{ae.ae_title}\t{ae.host}\t{ae.port}\t{ae.description or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
