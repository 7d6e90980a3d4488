"""``dicomshare deidentify IN... OUT``: PS3.15 de-identification of files, folders and zips.

Outputs go to ``OUT/<pseudonymous patient>/<study UID>/<series UID>/<SOP UID>.dcm``. The
project key (behind every pseudonym and date shift) comes from ``--project-key-file``
(created with 32 random bytes, mode 0600, the first time) or, with ``--project NAME``,
from the research project NAME in the archive's database (made if new), so the command
and the server's exports of one project agree. Same key, same pseudonyms: keep
it to add to an export later, and keep it secret. Exit codes: 0 done (held-back instances
are listed, not errors, unless ``--strict``), 1 an input was rejected, 2 bad usage.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from dicomshare.config import Settings
from dicomshare.deid import batch
from dicomshare.deid.masking import RulesError, masking_hook
from dicomshare.deid.profile import OPTIONS
from dicomshare.deid.pseudonyms import MIN_KEY_BYTES

_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ProjectKeyError(Exception):
    """The project key cannot be read or made."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``deidentify`` to the main parser's subparsers."""
    about = "de-identify DICOM files, folders and zips (PS3.15 Basic Profile and options)"
    p = sub.add_parser("deidentify", help=about, description=about[0].upper() + about[1:]
                       + ". Output: OUT/<patient pseudonym>/<study>/<series>/<SOP UID>.dcm.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IN",
                   help="DICOM files, folders (searched recursively) and zip files")
    p.add_argument("output", type=Path, metavar="OUT", help="output folder")
    p.add_argument("--option", action="append", default=[], choices=OPTIONS, metavar="NAME",
                   help=f"a PS3.15 option, repeatable: {', '.join(OPTIONS)}")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--project-key-file", type=Path, metavar="FILE",
                     help="the project's key (created with 32 random bytes if missing)")
    key.add_argument("--project", metavar="NAME",
                     help="use the key of research project NAME of the organisation (made "
                     "if new): the same pseudonyms as the server's exports of it")
    p.add_argument("--org", help="with --project: the organisation (default: the only one)")
    p.add_argument("--mask-rules", action="append", default=[], type=Path, metavar="FILE",
                   help="JSON rules masking burned-in text by device and image size "
                   "(repeatable; docs/deidentification.md); without a matching rule, "
                   "instances at risk are held back")
    p.add_argument("--default-masks", action="store_true",
                   help="also use the generic rules shipped with dicomshare (top bands of "
                   "common ultrasound screens): check them against your devices first")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="worker processes (default 1)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="write the run report: JSON, or a CSV summary if FILE ends in .csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when an instance is held back for review")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dicomshare.cli import _sources

    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    try:
        key = _project_key(settings, args)
    except ProjectKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.output.resolve()
    tasks: list[batch.Task] = []
    missing: list[tuple[str, str]] = []
    for src in _sources(list(args.inputs)):
        if src.opener is None:
            missing.append((src.name, "no such file or folder"))
            continue
        path = Path(src.name)
        if path.is_file() and out in path.resolve().parents:
            continue  # an earlier run's output inside the input folder
        tasks.append(_task(src.name))
    try:
        hook = masking_hook(list(args.mask_rules), args.default_masks)
    except RulesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = batch.Config(tuple(args.option), key, str(out), hook)
    with tqdm(total=len(tasks), unit="instance", disable=args.quiet or None, file=sys.stderr,
              desc="de-identifying") as bar:
        report = batch.run(tasks, config, jobs=args.jobs, progress=bar.update)
    for name, reason in missing:
        report.reject(name, reason)
    print(report.summary())
    for r in report.held_back:
        print(f"  held back {r.source}: {r.held_back}")
    for name, reason in report.rejected:
        print(f"  rejected {name}: {reason}")
    if args.report:
        text = report.to_csv() if args.report.suffix.lower() == ".csv" else report.to_json()
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text, encoding="utf-8")
    if report.rejected:
        return 1
    return 1 if args.strict and report.held_back else 0


def _task(name: str) -> batch.Task:
    """A file, or ``ZIP:MEMBER`` as ``cli._sources`` names zip members."""
    if Path(name).is_file():
        return batch.Task(name, name)
    for i, ch in enumerate(name):
        if ch == ":" and Path(name[:i]).is_file() and zipfile.is_zipfile(name[:i]):
            return batch.Task(name, name[:i], name[i + 1:])
    return batch.Task(name, name)  # vanished since it was listed: reported as unreadable


def _project_key(settings: Settings, args: argparse.Namespace) -> bytes:
    if args.project_key_file is not None:
        return load_or_create_key(args.project_key_file)
    if args.project is not None:
        return _research_project_key(settings, args.project, args.org)
    raise ProjectKeyError("a project key is needed: --project-key-file FILE or --project NAME")


def _research_project_key(settings: Settings, name: str, organisation: str | None) -> bytes:
    """The key of the organisation's research project ``name`` (made if new): the same
    pseudonyms as the server's exports of that project."""
    from dicomshare.archive import Archive
    from dicomshare.cli_admin import operator
    from dicomshare.errors import DicomshareError
    from dicomshare.research.projects import Projects

    if not _PROJECT_NAME.fullmatch(name):
        raise ProjectKeyError("a project name has 1-64 letters, digits, '.', '_' or '-'")
    archive = Archive.open(settings)
    try:
        who = operator(archive, organisation)
        projects = Projects(archive.index.engine)
        found = [p for p in projects.list_projects(who)
                 if p.name == name and p.organisation_pk == who.organisation_pk]
        project = found[0] if found else projects.create(who, name)
        return projects.key(project.id)
    except DicomshareError as exc:
        raise ProjectKeyError(exc.reason) from exc
    finally:
        archive.close()


def load_or_create_key(path: Path) -> bytes:
    """The project key file, made once (see dicomshare.keys)."""
    from dicomshare.keys import KeyFileError
    from dicomshare.keys import load_or_create_key as load

    try:
        return load(path, min_bytes=MIN_KEY_BYTES)
    except KeyFileError as exc:
        raise ProjectKeyError(str(exc)) from exc
