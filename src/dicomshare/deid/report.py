"""What a de-identification did: per instance, and for a whole run.

Attribute paths are keywords joined by ``/`` through sequences, with item numbers left out
(``ReferencedStudySequence/ReferencedSOPInstanceUID``) so a path is listed once however
many items it occurs in; private and unknown tags appear as ``(gggg,eeee)``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class InstanceReport:
    """The outcome for one input instance."""

    source: str = ""
    input_sop_uid: str = ""
    output_sop_uid: str | None = None  # None when held back (or rejected)
    output_path: str | None = None
    held_back: str | None = None  # why it was not written
    removed: list[str] = field(default_factory=list)  # X
    replaced: list[str] = field(default_factory=list)  # D, U, pseudonyms
    emptied: list[str] = field(default_factory=list)  # Z
    cleaned: list[str] = field(default_factory=list)  # C: shifted dates, cleaned text
    kept_by_option: list[str] = field(default_factory=list)  # K because an option said so
    notes: list[str] = field(default_factory=list)
    pixels_cleaned: bool = False

    @property
    def status(self) -> str:
        return "held_back" if self.held_back else "written" if self.output_path else "done"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, **asdict(self)}


@dataclass
class RunReport:
    """Every instance of a run, the inputs that could not be read, and totals."""

    options: tuple[str, ...] = ()
    edition: str = ""
    instances: list[InstanceReport] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    seconds: float = 0.0

    def add(self, report: InstanceReport) -> None:
        self.instances.append(report)

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append((source, reason))

    @property
    def written(self) -> list[InstanceReport]:
        return [r for r in self.instances if not r.held_back]

    @property
    def held_back(self) -> list[InstanceReport]:
        return [r for r in self.instances if r.held_back]

    @property
    def rate(self) -> float:
        """Instances per second over the run (0 when not timed)."""
        return len(self.instances) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"de-identified: {len(self.written)}  held back: {len(self.held_back)}  "
                f"rejected: {len(self.rejected)}  ({self.rate:.0f} instances/s)")

    def to_json(self) -> str:
        doc = {"edition": self.edition, "options": list(self.options),
               "totals": {"written": len(self.written), "held_back": len(self.held_back),
                          "rejected": len(self.rejected)},
               "seconds": round(self.seconds, 3),
               "instances": [r.as_dict() for r in self.instances],
               "rejected": [{"source": s, "reason": r} for s, r in self.rejected]}
        return json.dumps(doc, indent=1, ensure_ascii=False)

    def to_csv(self) -> str:
        """One summary line per input: status, UIDs, path, reason and counts."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["source", "status", "input_sop_uid", "output_sop_uid", "output_path",
                         "reason", "removed", "replaced", "emptied", "cleaned",
                         "kept_by_option"])
        for r in self.instances:
            writer.writerow([r.source, r.status, r.input_sop_uid, r.output_sop_uid or "",
                             r.output_path or "", r.held_back or "", len(r.removed),
                             len(r.replaced), len(r.emptied), len(r.cleaned),
                             len(r.kept_by_option)])
        for source, reason in self.rejected:
            writer.writerow([source, "rejected", "", "", "", reason, "", "", "", "", ""])
        return out.getvalue()
