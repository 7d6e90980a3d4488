"""The documented rule that proposes links between patient records (docs/patients.md).

Two records of *different* qualifiers (issuers, or storing organisations) are proposed as
the same person when either

1. **identifier**: one record's OtherPatientIDsSequence (stored in the study's patient
   module) names the other's PatientID with the other's issuer; or
2. **demographics**: same valid birth date (8 digits), same sex (both given, M/F/O), and the
   same *name key* in at least one PN component group.

A name key is built per component group (alphabetic, ideographic, phonetic: PN is
``alpha=ideo=phon``) from the family and given name components only:

- Unicode NFKC then NFKD, combining marks dropped (accents: "Jörg" -> "jorg"), case-folded
  ("ß" -> "ss");
- the German umlaut transcriptions collapse to the plain vowel ("ae", "oe", "ue" -> "a",
  "o", "u"), applied the same to both sides, so "MÜLLER" and "Mueller" both give "muller";
- everything but letters and digits separates tokens (whitespace, punctuation, hyphens);
- the tokens are sorted, so component order does not matter ("Mueller^Jorg",
  "Jorg Mueller" and "MUELLER, JORG" give one key).

Middle names, prefixes and suffixes are ignored. An empty key never matches. Malformed
values (too many groups or components, control characters, stray bytes) are cut to the
standard's shape, never raise. A proposal is only a proposal: a clinician confirms it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from dicomshare.dicom.json import first

_SEPARATORS = re.compile(r"[^\w]+|_", re.UNICODE)
_TRANSCRIPTIONS = (("ae", "a"), ("oe", "o"), ("ue", "u"))
_DATE = re.compile(r"^\d{8}$")
SEXES = frozenset({"M", "F", "O"})


def _plain(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return stripped.casefold()


def component_groups(value: Any) -> list[list[str]]:
    """A PN value as up to three groups of up to five components (malformed input cut)."""
    if value is None:
        return []
    if isinstance(value, dict):  # DICOM JSON PN: {"Alphabetic": ..., ...}
        value = "=".join(str(value.get(k, "") or "")
                         for k in ("Alphabetic", "Ideographic", "Phonetic"))
    text = str(value)[:1000]
    text = "".join(c if c.isprintable() else " " for c in text)
    return [group.split("^")[:5] for group in text.split("=")[:3]]


def name_key(components: list[str]) -> str:
    """The key of one component group: sorted normalised tokens of family and given names."""
    tokens: list[str] = []
    for part in components[:2]:
        plain = _plain(part)
        for a, b in _TRANSCRIPTIONS:
            plain = plain.replace(a, b)
        tokens += [t for t in _SEPARATORS.split(plain) if t]
    return " ".join(sorted(tokens))


def name_keys(value: Any) -> frozenset[str]:
    """The non-empty keys of every component group of a PN value."""
    return frozenset(k for k in (name_key(g) for g in component_groups(value)) if k)


def other_ids(attributes: str | dict[str, Any] | None) -> list[tuple[str, str]]:
    """(PatientID, IssuerOfPatientID) pairs of OtherPatientIDsSequence in DICOM JSON."""
    if not attributes:
        return []
    try:
        ds = json.loads(attributes) if isinstance(attributes, str) else attributes
    except ValueError:
        return []
    items = (ds.get("00101002") or {}).get("Value") or [] if isinstance(ds, dict) else []
    found: list[tuple[str, str]] = []
    for item in items[:50]:
        if not isinstance(item, dict):
            continue
        pid = _text(item, "00100020")
        if pid:
            found.append((pid, _text(item, "00100021")))
    return found




def _text(ds: dict[str, Any], tag: str) -> str:
    return str(first(ds, tag) or "").strip()


@dataclass(frozen=True)
class Demographics:
    """What the rule compares of one record."""

    patient_id: str
    issuer: str  # IssuerOfPatientID, "" when the record is qualified by its organisation
    qualifier: str
    name: str | None
    birth_date: str | None
    sex: str | None
    other_ids: tuple[tuple[str, str], ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        return name_keys(self.name)

    @property
    def valid_birth_date(self) -> str | None:
        value = (self.birth_date or "").strip()
        return value if _DATE.match(value) else None

    @property
    def valid_sex(self) -> str | None:
        value = (self.sex or "").strip().upper()
        return value if value in SEXES else None


def evidence(a: Demographics, b: Demographics) -> dict[str, Any] | None:
    """Why the rule says ``a`` and ``b`` are one person, or None."""
    if a.qualifier == b.qualifier:
        return None
    for x, y in ((a, b), (b, a)):
        for pid, issuer in x.other_ids:
            if pid == y.patient_id and issuer and issuer == y.issuer:
                return {"rule": "identifier",
                        "detail": f"OtherPatientIDsSequence of {x.patient_id} names "
                                  f"{pid} issued by {issuer}"}
    date = a.valid_birth_date
    sex = a.valid_sex
    if date is None or sex is None or date != b.valid_birth_date or sex != b.valid_sex:
        return None
    common = a.keys & b.keys
    if not common:
        return None
    return {"rule": "demographics", "name_key": sorted(common)[0], "birth_date": date,
            "sex": sex}


def match_keys(d: Demographics) -> set[str]:
    """Equality keys under which a record can meet its matches (an index, not the rule):
    ``<birth>|<sex>|<name key>`` per component group when birth date and sex are valid,
    ``id|<id>|<issuer>`` for the record's own issuer-qualified ID and its other IDs."""
    keys: set[str] = set()
    if d.valid_birth_date and d.valid_sex:
        keys |= {f"{d.valid_birth_date}|{d.valid_sex}|{k}"[:400] for k in d.keys}
    if d.issuer:
        keys.add(f"id|{d.patient_id}|{d.issuer}"[:400])
    keys |= {f"id|{pid}|{issuer}"[:400] for pid, issuer in d.other_ids if issuer}
    return keys
