"""The ``dicomshare`` command line: serve, import, check, users and tokens.

Every command opens the archive through :meth:`Archive.open`, which initialises a fresh
data directory or upgrades an older one, so the first command run on a new machine
works without a set-up step. Exit codes: 0 success, 1 something was rejected or found
wrong, 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dicomshare import __version__, cli_admin, cli_audit, cli_deid
from dicomshare.access.service import Access
from dicomshare.archive import Archive, StoreResult
from dicomshare.config import Settings, load_settings, settings_environment
from dicomshare.errors import DicomshareError
from dicomshare.storage.base import Outcome

if TYPE_CHECKING:
    from dicomshare.dimse.scp import DicomService

BATCH = 64  # instances per index transaction during import


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomshare", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dicomshare {__version__}")
    p.add_argument("--data-dir", help="data folder (env DICOMSHARE_DATA_DIR, default ./data)")
    p.add_argument("--database-url", help="sqlite:///... or postgresql+psycopg://... "
                   "(env DICOMSHARE_DATABASE_URL)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the DICOMweb (HTTP) and DICOM (DIMSE) "
                           "servers")
    serve.add_argument("--http-host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="port (default 8080)")
    serve.add_argument("--cors-origins", help="comma-separated origins allowed by CORS")
    serve.add_argument("--dicom-port", type=int, help="DICOM (DIMSE) port, 0 disables "
                       "(default 11112)")
    serve.add_argument("--dicom-host", help="DICOM address to bind (default 127.0.0.1)")
    serve.add_argument("--ae-title", help="our AE title (default DICOMSHARE)")
    serve.add_argument("--dicom-accept-unknown", action="store_const", const=True,
                       help="accept associations from AE titles that are not registered")
    serve.add_argument("--dicom-tls-port", type=int, help="DICOM TLS port (PS3.15 Annex B; "
                       "2762 is the registered one), 0 disables (default 0)")
    serve.add_argument("--dicom-tls-cert", metavar="FILE", help="our TLS certificate (PEM); "
                       "also our client certificate for peers registered with --tls")
    serve.add_argument("--dicom-tls-key", metavar="FILE", help="its private key (PEM, "
                       "unencrypted)")
    serve.add_argument("--dicom-tls-ca", metavar="FILE", help="CA certificates (PEM): "
                       "clients of the TLS port must present a certificate they signed, and "
                       "TLS peers are verified against them (default: the system CAs)")
    serve.add_argument("--workers", type=int,
                       help="HTTP worker processes (default: one per CPU, at most 4)")

    imp = sub.add_parser("import", help="store DICOM files, folders and zip files")
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.add_argument("--org", help="the organisation the instances belong to (default: the "
                     "only one)")

    check = sub.add_parser("check", help="verify blobs and index agree")
    check.add_argument("--repair", action="store_true", help="fix what can be fixed safely")
    check.add_argument("--quick", action="store_true", help="check presence, not hashes")

    cli_admin.add_parsers(sub)
    cli_audit.add_parser(sub)
    cli_deid.add_parser(sub)

    send = sub.add_parser("send", help="send studies to a registered peer (C-STORE)")
    send.add_argument("--to", required=True, metavar="TITLE", help="registered AE title")
    send.add_argument("studies", nargs="+", metavar="STUDY_UID")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.add_argument("--org", help="act for this organisation (default: the only one)")

    remote = sub.add_parser("remote", help="query and retrieve from a registered peer")
    ractions = remote.add_subparsers(dest="action", required=True)
    rfind = ractions.add_parser("find", help="C-FIND: list matches on the peer")
    rfind.add_argument("title", help="registered AE title")
    rfind.add_argument("--level", default="study",
                       choices=["patient", "study", "series", "image"])
    rfind.add_argument("--model", choices=["study", "patient"],
                       help="information model (default: patient for --level patient, "
                       "else study)")
    for flag, key in _FIND_FLAGS.items():
        rfind.add_argument(flag, dest=key, metavar="VALUE", help=f"match {key}")
    rfind.add_argument("-k", "--key", action="append", default=[], metavar="KEY=VALUE",
                       help="match or return any attribute (keyword or tag; repeatable)")
    rfind.add_argument("--limit", type=int, default=1000,
                       help="stop after this many matches (C-CANCEL; default 1000, at most "
                       "10000)")
    rfind.add_argument("--json", action="store_true", help="print the matches as DICOM JSON")
    rget = ractions.add_parser("retrieve", help="C-MOVE (to us) or C-GET studies into the "
                               "archive")
    rget.add_argument("title", help="registered AE title")
    rget.add_argument("studies", nargs="+", metavar="STUDY_UID")
    rget.add_argument("--org", help="the organisation the retrieved studies belong to "
                      "(default: the only one)")
    rget.add_argument("--method", default="move", choices=["move", "get"],
                      help="move: the peer sends to our AE title (it must know us); get: "
                      "on this association (default move)")
    return p


_FIND_FLAGS = {"--patient-id": "PatientID", "--patient-name": "PatientName",
               "--study-date": "StudyDate", "--modality": "Modality",
               "--accession": "AccessionNumber", "--study-uid": "StudyInstanceUID"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)
    overrides = {k: getattr(args, k, None) for k in
                 ("data_dir", "database_url", "http_host", "http_port", "cors_origins",
                  "workers", "dicom_port", "dicom_host", "ae_title", "dicom_accept_unknown",
                  "dicom_tls_port", "dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca")}
    if overrides["data_dir"]:
        overrides["data_dir"] = Path(overrides["data_dir"])
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.command in ("send", "remote"):  # its failures reach the user as our errors
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    settings = load_settings(overrides)
    try:
        if args.command in cli_admin.COMMANDS:
            return cli_admin.run(settings, args)
        if args.command == "audit":
            return cli_audit.run(settings, args)
        if args.command == "deidentify":
            return cli_deid.run(settings, args)
        handler = {"serve": _serve, "import": _import, "check": _check, "send": _send,
                   "remote": _remote}[args.command]
        return handler(settings, args)
    except DicomshareError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from dicomshare import supervisor
    from dicomshare.access.identity import Identities

    archive = Archive.open(settings)
    first = Identities(archive.index.engine).bootstrap()
    if first:
        print("\nFirst start: created user 'admin'. Its API token (shown only once):\n\n"
              f"    {first}\n\nUse it as: Authorization: Bearer <token>\n"
              "To log in with a browser, give it a password: "
              "dicomshare users set-password admin\n", file=sys.stderr, flush=True)
    print(f"dicomshare {__version__}: DICOMweb at http://{settings.http_host}:"
          f"{settings.http_port}{settings.dicomweb_root} (data in {settings.data_dir})",
          file=sys.stderr, flush=True)
    workers = settings.workers or min(4, os.cpu_count() or 1)
    # The DICOM service runs in this process; with several HTTP workers (and
    # dicom_in_workers), in each worker instead, on a shared port: this process only
    # checks here that the ports are free and the settings usable, then lets go.
    wanted = bool(settings.dicom_port or settings.dicom_tls_port)
    dicom = _start_dicom(settings, archive) if wanted else None
    if wanted and dicom is None:
        return 1
    in_workers = dicom is not None and workers > 1 and settings.dicom_in_workers
    shared = {}
    if in_workers and dicom is not None:
        from dicomshare.dimse import listeners

        ports = {listeners.PLAIN: dicom.port, listeners.TLS: dicom.tls_port}
        dicom.stop()
        dicom = None
        try:  # the ports stay bound in this process; the workers accept from them
            shared = {name: listeners.bind(settings.dicom_host, port)
                      for name, port in ports.items() if port}
        except OSError as exc:
            print(f"error: cannot listen for DICOM: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"DICOM: served by each of the {workers} worker processes",
              file=sys.stderr, flush=True)
    if workers > 1 and dicom is None:
        # Checked and bound: from here this process only supervises (supervisor.py).
        archive.close()
        supervisor.become(dataclasses.replace(settings, workers=workers), shared)
    try:
        if workers > 1:  # the DICOM service stays in this process (dicom_in_workers off)
            settings = dataclasses.replace(settings, workers=workers)
            os.environ.update(settings_environment(settings))  # what the workers read
            supervisor.run_workers(settings)
        else:
            import uvicorn

            from dicomshare.web.app import create_app

            app = create_app(settings, archive)
            if dicom is not None:
                app.state.shutdown_hooks.append(dicom.stop)
            uvicorn.run(app, **supervisor.http_options(settings))
    finally:
        if dicom is not None:
            dicom.stop()
            archive.close()
    return 0


def _start_dicom(settings: Settings, archive: Archive) -> DicomService | None:
    """The DIMSE SCP (dimse/scp.py), listening; None (reported) when a port is taken or
    the TLS settings are unusable."""
    from dicomshare.dimse.scp import DicomService

    service = DicomService(settings, archive)
    try:
        service.start()
    except DicomshareError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return None
    except OSError as exc:
        where = exc.filename or f"{settings.dicom_host}:{settings.dicom_port}"
        print(f"error: cannot listen for DICOM on {where}: {exc.strerror or exc}",
              file=sys.stderr)
        return None
    print(f"DICOM: {service.describe()}", file=sys.stderr, flush=True)
    return service


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
    access = _access(archive)
    who = cli_admin.operator(archive, args.org)
    counts: Counter[str] = Counter()
    rejected: list[tuple[str, str]] = []
    sources = list(_sources(args.paths))
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True,
               disable=args.quiet or None, file=sys.stderr, desc="importing")
    batch: list[tuple[_Source, Any]] = []

    def flush() -> None:
        results = access.store(who, [t for _, t in batch])
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
    access.close()
    print(f"stored: {counts['stored']}  already present: {counts['present']}  "
          f"rejected: {len(rejected)}")
    for name, reason in rejected:
        print(f"  rejected {name}: {reason}")
    return 1 if rejected else 0


def _access(archive: Archive) -> Access:
    """The access door with its audit trail, for commands that touch patient data."""
    from dicomshare.access.audit import AuditLog
    from dicomshare.access.grants import Grants

    return Access(archive, Grants(archive.index.engine),
                  AuditLog.open(archive.settings, archive.index.engine))


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


# -- send, remote find / retrieve --------------------------------------------------------
def _send(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dicomshare.dimse import scu
    from dicomshare.dimse.aes import AERegistry

    archive = Archive.open(settings)
    access = _access(archive)
    who = cli_admin.operator(archive, args.org)
    peer = AERegistry(archive.index.engine).require(args.to)
    studies = list(dict.fromkeys(args.studies))
    total = sum(len(archive.locate(uid)) for uid in studies)  # unknown study: fails here
    with tqdm(total=total, unit="instance", disable=args.quiet or None, file=sys.stderr,
              desc=f"sending to {peer.ae_title}") as bar:
        report = scu.send(archive, settings, peer, studies, who, access,
                          progress=lambda _r: bar.update())
    access.close()
    for r in report.instances:
        status = f"0x{r.status:04X}" if r.status is not None else "-"
        print(f"  {r.outcome:<8} {status:<7} {r.sop_uid}"
              + (f"  {r.comment}" if r.comment else ""))
    print(f"sent: {report.count('success')}  warning: {report.count('warning')}  "
          f"failed: {report.count('failure')}")
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
    return 0 if report.ok else 1


def _remote(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from pydicom.datadict import keyword_for_tag

    from dicomshare.dimse import scu
    from dicomshare.dimse.aes import AERegistry

    archive = Archive.open(settings)
    peer = AERegistry(archive.index.engine).require(args.title)
    if args.action == "retrieve":
        access = _access(archive)
        who = cli_admin.operator(archive, args.org)
        reports = scu.retrieve(archive, settings, peer, args.studies, args.method, who, access)
        access.close()
        for r in reports:
            status = f"0x{r.status:04X}" if r.status is not None else "no status"
            line = (f"study {r.study_uid}: {r.outcome} ({status}) completed: {r.completed}  "
                    f"failed: {r.failed}  warning: {r.warning}")
            if r.method == "get":
                line += f"  stored: {r.stored}  already present: {r.already_present}"
            print(line + (f"  {r.comment}" if r.comment else ""))
            for sop_uid, reason in r.refused:
                print(f"  refused {sop_uid}: {reason}")
        return 0 if all(r.outcome == "success" for r in reports) else 1
    keys = {key: getattr(args, key) for key in _FIND_FLAGS.values()
            if getattr(args, key) is not None}
    if "Modality" in keys and args.level in ("patient", "study"):
        keys["ModalitiesInStudy"] = keys.pop("Modality")
    for item in args.key:
        name, _, value = item.partition("=")  # KEY alone: return it, match anything
        if not name.strip():
            print(f"error: -k {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        keys[name.strip()] = value
    matches = scu.find(settings, peer, args.level, keys, args.model, args.limit)
    if args.json:
        print(json.dumps(matches, indent=2, ensure_ascii=False))
    else:
        named = [keyword_for_tag(scu.attribute_tag(k)) or k for k in keys]
        _print_table(matches, list(dict.fromkeys(scu.RETURN_KEYS[args.level] + named)))
    print(f"{len(matches)} match{'es' if len(matches) != 1 else ''}"
          + (f" (stopped at --limit {args.limit}; the rest cancelled)" if matches.truncated
             else ""), file=sys.stderr)
    return 0


def _print_table(matches: list[dict[str, Any]], columns: list[str]) -> None:
    from dicomshare.dicom.attributes import tag_hex
    from dicomshare.dimse.scu import attribute_tag

    tags = [tag_hex(attribute_tag(c)) for c in columns]
    rows = [[_text(m.get(tag)) for tag in tags] for m in matches]
    shown = [i for i, c in enumerate(columns) if any(row[i] for row in rows)] or \
        list(range(len(columns)))
    widths = {i: max([len(columns[i])] + [len(row[i]) for row in rows]) for i in shown}
    print("  ".join(columns[i].ljust(widths[i]) for i in shown).rstrip())
    for row in rows:
        print("  ".join(row[i].ljust(widths[i]) for i in shown).rstrip())


def _text(element: dict[str, Any] | None) -> str:
    values = (element or {}).get("Value") or []
    return "\\".join(str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)
                      for v in values)


if __name__ == "__main__":
    sys.exit(main())
