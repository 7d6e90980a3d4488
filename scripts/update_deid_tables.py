#!/usr/bin/env python3
"""Refresh the DICOM tables that ``dicomshare.deid`` ships, from a folder of published ones.

The de-identification profile is built from machine-readable copies of PS3.15 Table E.1-1
and its companions (see ``src/dicomshare/deid/data/README.md``). When a new edition of the
standard is transcribed, run::

    .venv/bin/python scripts/update_deid_tables.py /path/to/tables

Every file is verified (its ``content_sha256`` recomputed from its rows, one edition across
all files) before anything is copied; the copies are byte-for-byte, and the edition is
written to ``data/EDITION``. ``--check`` only compares and exits 1 on any difference, so CI
can prove the packaged copy is the published one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

DEST = Path(__file__).resolve().parent.parent / "src" / "dicomshare" / "deid" / "data"

# The tables the engine reads (profile.py, engine.py, pixels.py).
FILES = (
    "ps3.15-table-e1-1.json",     # attributes, action codes, option columns
    "ps3.15-table-e1-1a.json",    # meaning of the action codes (docs, report)
    "ps3.15-table-e3-10-1.json",  # safe private attributes
    "ps3.16-cid-7050.json",       # de-identification method codes
    "ps3.16-cid-7005.json",       # contributing equipment purpose (De-identifying Equipment)
    "ps3.4-table-b-5-1.json",     # storage SOP classes (burned-in risk by IOD)
)


def content_sha256(rows: object) -> str:
    """The digest each file carries: of its rows in canonical JSON."""
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify(path: Path) -> tuple[bytes, str]:
    """The file's bytes and edition; raises ValueError when it is not a sound table."""
    raw = path.read_bytes()
    doc = json.loads(raw.decode("utf-8"))
    for key in ("schema", "table", "edition", "content_sha256", "rows"):
        if key not in doc:
            raise ValueError(f"{path.name}: no {key!r}")
    if not doc["rows"]:
        raise ValueError(f"{path.name}: no rows")
    actual = content_sha256(doc["rows"])
    if actual != doc["content_sha256"]:
        raise ValueError(f"{path.name}: content_sha256 is {doc['content_sha256']}, "
                         f"the rows hash to {actual}")
    return raw, str(doc["edition"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="folder holding the published JSON tables")
    p.add_argument("--dest", type=Path, default=DEST, help=f"default {DEST}")
    p.add_argument("--check", action="store_true",
                   help="compare only; exit 1 if the packaged copy differs")
    args = p.parse_args(argv)

    found: dict[str, bytes] = {}
    editions: set[str] = set()
    try:
        for name in FILES:
            raw, edition = verify(args.source / name)
            found[name] = raw
            editions.add(edition)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if len(editions) != 1:
        print(f"error: mixed editions {sorted(editions)}", file=sys.stderr)
        return 1
    edition = editions.pop()

    if args.check:
        stale = [n for n, raw in found.items()
                 if not (args.dest / n).is_file() or (args.dest / n).read_bytes() != raw]
        edition_file = args.dest / "EDITION"
        if not edition_file.is_file() or edition_file.read_text().strip() != edition:
            stale.append("EDITION")
        for name in stale:
            print(f"differs: {name}")
        print("up to date" if not stale else f"{len(stale)} file(s) differ")
        return 1 if stale else 0

    args.dest.mkdir(parents=True, exist_ok=True)
    for name, raw in found.items():
        (args.dest / name).write_bytes(raw)
    (args.dest / "EDITION").write_text(edition + "\n")
    print(f"copied {len(found)} tables, edition {edition}, to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
