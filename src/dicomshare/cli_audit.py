"""``dicomshare audit``: verify the chain, export it, list records.

``verify`` exits 1 when anything is wrong, so it can run from cron or a monitoring check;
it prints the last seq and hash, which an operator (or a script) keeps somewhere else and
passes back with ``--anchor``: that is what detects deleted newest records. Exporting and
listing read patient identifiers out of the archive, so they are audited themselves.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from dicomshare.access.audit import AuditEvent, AuditLog, canonical_json, iso_utc
from dicomshare.access.audit_export import to_dicom_xml, to_json_line
from dicomshare.access.policy import Principal
from dicomshare.config import Settings
from dicomshare.errors import DicomshareError
from dicomshare.storage import schema as s


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``audit`` and its subcommands to the main parser's subparsers."""
    audit = sub.add_parser("audit", help="the tamper-evident audit trail: verify, export, list")
    _configure(audit)


def _configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check the hash chain; exit 1 if broken")
    verify.add_argument("--anchor", action="append", default=[], type=_anchor,
                        metavar="SEQ:HASH", help="a seq and hash printed by an earlier verify "
                        "(or the last line of an export): must still be there, unchanged; "
                        "detects deleted newest records (repeatable)")
    export = actions.add_parser("export", help="write records as JSON lines or DICOM audit "
                                "messages (one per line)")
    export.add_argument("--format", choices=["jsonl", "dicom"], default="jsonl")
    export.add_argument("--since-seq", type=int, default=0, metavar="N",
                        help="only records after seq N (incremental exports)")
    export.add_argument("--output", "-o", type=Path, metavar="FILE",
                        help="write to FILE (replaced atomically) instead of standard output")
    lst = actions.add_parser("list", help="one line per record, newest first")
    lst.add_argument("--user")
    lst.add_argument("--patient-id")
    lst.add_argument("--study", metavar="STUDY_UID")
    lst.add_argument("--action", dest="event_action", metavar="ACTION",
                     help="e.g. study.retrieve, login")
    lst.add_argument("--organisation", metavar="NAME_OR_ID",
                     help="records of its users or touching its data")
    lst.add_argument("--since", type=_when, metavar="ISO", help="from (inclusive), e.g. "
                     "2024-06-01 or 2024-06-01T08:00:00+02:00; no offset means UTC")
    lst.add_argument("--until", type=_when, metavar="ISO", help="to (exclusive)")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--offset", type=int, default=0)


def _anchor(text: str) -> tuple[int, str]:
    seq, sep, digest = text.partition(":")
    if not sep or not seq.strip().isdigit() or len(digest.strip()) != 64:
        raise argparse.ArgumentTypeError("expected SEQ:HASH (a number, a colon, 64 hex digits)")
    return int(seq), digest.strip().lower()


def _when(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from exc
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def main(argv: list[str], settings: Settings) -> int:
    """``dicomshare audit ARGV...`` with the given settings (for tests and embedding)."""
    parser = argparse.ArgumentParser(prog="dicomshare audit")
    _configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(settings, args)
    except DicomshareError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1


def run(settings: Settings, args: argparse.Namespace) -> int:
    from dicomshare.archive import Archive

    archive = Archive.open(settings)
    try:
        audit = AuditLog.open(settings, archive.index.engine)
        try:
            handler = {"verify": _verify, "export": _export, "list": _list}[args.action]
            return handler(settings, audit, args)
        finally:
            audit.close()
    finally:
        archive.close()


def _operator() -> Principal:
    """The person at the terminal: the operating-system account that ran the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    return Principal(user=user, organisation="", role="operator", kind="cli",
                     superuser=True, source=socket.gethostname())


def _verify(_settings: Settings, audit: AuditLog, args: argparse.Namespace) -> int:
    report = audit.verify(anchors=args.anchor)
    print(f"checked {report.checked} records")
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    if report.checked:
        print(f"last record: seq {report.last_seq} hash {report.last_hash}")
        print(f"(keep this elsewhere; later: dicomshare audit verify --anchor "
              f"{report.last_seq}:{report.last_hash})")
    print("the audit trail is intact" if report.ok else
          f"the audit trail is NOT intact: {len(report.problems)} problems")
    return 0 if report.ok else 1


@contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _organisations(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {int(pk): name for pk, name in
                conn.execute(select(s.organisation.c.pk, s.organisation.c.name)).all()}


def _export(settings: Settings, audit: AuditLog, args: argparse.Namespace) -> int:
    names = _organisations(audit.engine) if args.format == "dicom" else {}
    count, last = 0, None
    with _output(args.output) as out:
        for rec in audit.iter_records(args.since_seq):
            if args.format == "dicom":
                line = to_dicom_xml(rec, names, audit_source_id=settings.ae_title)
            else:
                line = to_json_line(rec)
            out.write(line + "\n")
            count, last = count + 1, rec
    where = str(args.output) if args.output else "standard output"
    print(f"exported {count} records to {where}"
          + (f" (last: seq {last.seq} hash {last.hash})" if last else ""), file=sys.stderr)
    audit.record(AuditEvent("audit.export", principal=_operator(), details={
        "format": args.format, "since_seq": args.since_seq, "records": count,
        "last_seq": last.seq if last else None, "output": where}), wait=True)
    return 0


def _list(_settings: Settings, audit: AuditLog, args: argparse.Namespace) -> int:
    organisation = None
    if args.organisation is not None:
        organisation = _organisation_pk(audit.engine, args.organisation)
        if organisation is None:
            print(f"error: no organisation {args.organisation!r}", file=sys.stderr)
            return 1
    filters: dict[str, Any] = dict(
        organisation=organisation, user=args.user, patient_id=args.patient_id,
        study_uid=args.study, action=args.event_action, since=args.since, until=args.until)
    records = audit.query(**filters, limit=args.limit, offset=args.offset)
    for rec in records:
        print("\t".join([
            str(rec.seq), iso_utc(rec.at), rec.action, rec.outcome, rec.actor_user or "-",
            str(rec.actor_organisation) if rec.actor_organisation is not None else "-",
            rec.source or "-", ",".join(rec.patient_ids) or "-",
            ",".join(rec.study_uids) or "-", canonical_json(rec.details)]))
    shown = {k: (iso_utc(v) if isinstance(v, datetime) else v)
             for k, v in filters.items() if v is not None}
    audit.record(AuditEvent("audit.list", principal=_operator(),
                            details={"filters": shown, "records": len(records)}), wait=True)
    return 0


def _organisation_pk(engine: Engine, value: str) -> int | None:
    if value.isdigit():
        return int(value)
    with engine.connect() as conn:
        pk = conn.execute(select(s.organisation.c.pk)
                          .where(s.organisation.c.name == value)).scalar_one_or_none()
    return int(pk) if pk is not None else None


__all__ = ["add_parser", "main", "run"]
