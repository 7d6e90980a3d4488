"""Figures collected during a run and their markdown rendering (for docs/performance.md)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from bench.servers import DICOMSHARE, ORTHANC

LABELS = {DICOMSHARE: "dicomshare", ORTHANC: "Orthanc"}


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (same as numpy's default), stdlib only."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * pct / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50.0)


@dataclass
class Figure:
    section: str
    metric: str
    unit: str
    better: str  # "higher", "lower" or "" (informational)
    values: dict[str, float | None] = field(default_factory=dict)
    note: str = ""

    def ratio(self) -> float | None:
        d, o = self.values.get(DICOMSHARE), self.values.get(ORTHANC)
        if d is None or o is None or o == 0 or math.isnan(d) or math.isnan(o):
            return None
        return d / o


class Report:
    """Ordered collection of figures plus free-text notes and errors."""

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.figures: list[Figure] = []
        self.notes: list[str] = []
        self.errors: list[str] = []

    def add(
        self,
        section: str,
        metric: str,
        unit: str,
        better: str,
        server: str,
        value: float | None,
        note: str = "",
    ) -> None:
        for f in self.figures:
            if f.section == section and f.metric == metric:
                f.values[server] = value
                if note and note not in f.note:
                    f.note = f"{f.note}; {note}" if f.note else note
                return
        self.figures.append(Figure(section, metric, unit, better, {server: value}, note))

    def error(self, section: str, server: str, message: str) -> None:
        self.errors.append(f"{section} / {LABELS.get(server, server)}: {message}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "figures": [asdict(f) for f in self.figures],
                "notes": self.notes,
                "errors": self.errors,
            },
            indent=2,
        )

    def markdown(self, header: list[str]) -> str:
        lines = list(header)
        both = DICOMSHARE in self.servers and ORTHANC in self.servers
        cols = [LABELS[s] for s in (DICOMSHARE, ORTHANC) if s in self.servers]
        sections: list[str] = []
        for f in self.figures:
            if f.section not in sections:
                sections.append(f.section)
        for sec in sections:
            lines += ["", f"### {sec}", ""]
            head = ["Metric", *cols] + (["dicomshare/Orthanc"] if both else []) + ["Better", "Note"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append(
                "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + [":---:", "---"]) + "|"
            )
            for f in (x for x in self.figures if x.section == sec):
                row = [f"{f.metric} ({f.unit})" if f.unit else f.metric]
                row += [_fmt(f.values.get(s)) for s in (DICOMSHARE, ORTHANC) if s in self.servers]
                if both:
                    r = f.ratio()
                    row.append("n/a" if r is None else f"{r:.2f}x")
                row += [f.better or "-", f.note]
                lines.append("| " + " | ".join(row) + " |")
        if both:
            lines += [
                "",
                "Ratios are dicomshare divided by Orthanc: above 1 is better for "
                "'higher' rows (throughput), below 1 is better for 'lower' rows "
                "(latency, memory).",
            ]
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        if self.errors:
            lines += ["", "Errors:", *[f"- {e}" for e in self.errors]]
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"
