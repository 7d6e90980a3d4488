"""PS3.15 Table E.1-1 compiled into a rule per tag, for one set of options.

The table (packaged copy in ``data/``, edition in ``data/EDITION``) gives every attribute
that can identify someone a Basic Profile action and, per option, K (keep) or C (clean).
:class:`Profile` resolves those to one action per tag once, at construction, into a dict
(exact tags) and three masks (``(50xx,xxxx)`` curves, ``(60xx,3000)`` and ``(60xx,4000)``
overlays); private tags are recognised by their odd group. Attributes the table does not
list get a rule from :func:`Profile.default_rule`, memoised per tag, so an instance is
de-identified with one dict lookup per element.

Precedence, decided here and nowhere else:

1. An option selected by the caller that has an action for the tag beats the Basic Profile.
2. Two selected options that disagree: C (clean) beats K (keep), the safer of the two; e.g.
   Retain Device Identity (K) with Retain Longitudinal Modified Dates (C) shifts a
   calibration date rather than keeping it.
3. The two longitudinal options exclude each other (ValueError).
4. Combined codes (Table E.1-1a) resolve, without IOD Type information, to the form that is
   valid whatever the attribute's Type: Z/D, X/D and X/Z/D to D, X/Z to Z, X/Z/U* to U
   (keep the sequence, replace the instance UIDs inside). None keeps identifying content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_is_retired, dictionary_VR, keyword_for_tag

from dicomshare.deid.vocab import CLASS_UIDS, SAFE_TEXT

DATA_DIR = Path(__file__).with_name("data")

# Option names as in the table's columns, plus the pixel option (no column: it is the hook).
OPTIONS = (
    "retain_safe_private", "retain_uids", "retain_device_identity",
    "retain_institution_identity", "retain_patient_characteristics",
    "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates",
    "clean_descriptors", "clean_structured_content", "clean_graphics", "clean_pixel_data",
)
EXCLUSIVE = (("retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"),)

# CID 7050 code value of the profile and of each option (meanings come from the table).
BASIC_CODE = "113100"
OPTION_CODES = {
    "clean_pixel_data": "113101", "clean_graphics": "113103",
    "clean_structured_content": "113104", "clean_descriptors": "113105",
    "retain_longitudinal_full_dates": "113106", "retain_longitudinal_modified_dates": "113107",
    "retain_patient_characteristics": "113108", "retain_device_identity": "113109",
    "retain_uids": "113110", "retain_safe_private": "113111",
    "retain_institution_identity": "113112",
}

# Resolved actions.
X, Z, D, K, C, U = "X", "Z", "D", "K", "C", "U"
COMBINED = {"Z/D": D, "X/Z": Z, "X/D": D, "X/Z/D": D, "X/Z/U*": U}

ENCRYPTED_ATTRIBUTES = 0x04000500  # Encrypted Attributes Sequence
TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UR", "UT"})
DATE_VRS = frozenset({"DA", "DT", "TM"})


@cache
def read_table(name: str) -> dict[str, Any]:
    """A packaged table, verified against its own content digest (a corrupted copy fails)."""
    doc: dict[str, Any] = json.loads((DATA_DIR / name).read_text(encoding="utf-8"))
    text = json.dumps(doc["rows"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != doc["content_sha256"]:
        raise RuntimeError(f"packaged table {name} does not match its content_sha256")
    return doc


EDITION = (DATA_DIR / "EDITION").read_text(encoding="ascii").strip()


@cache
def method_codes() -> dict[str, tuple[str, str, str]]:
    """CID 7050 rows by code value: (scheme designator, code value, code meaning)."""
    rows = read_table("ps3.16-cid-7050.json")["rows"]
    return {r["code_value"]: (r["scheme_designator"], r["code_value"], r["code_meaning"])
            for r in rows}


@dataclass(frozen=True, slots=True)
class Rule:
    """What to do with one attribute: the resolved action and where it came from."""

    action: str  # X Z D K C U
    source: str  # "basic", the deciding option, or "default" (not in the table)
    code: str  # the table's code (e.g. "X/Z/D") or, for defaults, the reason
    vr: str = ""  # from the data dictionary; "" when unknown there

    @property
    def by_option(self) -> bool:
        return self.source not in ("basic", "default")


def parse_tag(text: str) -> tuple[int, int] | None:
    """``"(0008,0050)"`` to (tag, mask); ``x`` digits are wildcards. None for other forms."""
    body = text.strip()
    if len(body) != 11 or body[0] != "(" or body[5] != "," or body[10] != ")":
        return None
    digits = (body[1:5] + body[6:10]).upper()
    value = mask = 0
    for ch in digits:
        value <<= 4
        mask <<= 4
        if ch == "X":
            continue
        value |= int(ch, 16)
        mask |= 0xF
    if digits[2:4] == "XX":  # repeating groups (50xx, 60xx) are even
        mask |= 0x00010000
    return value, mask


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


class Profile:
    """The Basic Profile plus the selected options, as one action per tag."""

    def __init__(self, options: Iterable[str] = ()) -> None:
        selected = frozenset(options)
        unknown = selected - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown de-identification option(s): {', '.join(sorted(unknown))}"
                             f" (known: {', '.join(OPTIONS)})")
        for group in EXCLUSIVE:
            if all(o in selected for o in group):
                raise ValueError(f"options {' and '.join(group)} exclude each other")
        self.options: tuple[str, ...] = tuple(o for o in OPTIONS if o in selected)
        self.edition = EDITION
        codes = {r["code"] for r in read_table("ps3.15-table-e1-1a.json")["rows"]}
        self._exact: dict[int, Rule] = {}
        self._masks: list[tuple[int, int, Rule]] = []
        self.private_rule = Rule(X, "basic", "X")
        for row in read_table("ps3.15-table-e1-1.json")["rows"]:
            if row["basic_profile"] not in codes:
                raise RuntimeError(f"Table E.1-1 row {row['tag']}: unknown action "
                                   f"{row['basic_profile']!r}")
            rule = self._resolve(row["basic_profile"], row["options"])
            parsed = parse_tag(row["tag"])
            if parsed is None:
                if "odd" in row["tag"]:
                    self.private_rule = rule
                    continue
                raise RuntimeError(f"Table E.1-1: cannot read tag {row['tag']!r}")
            value, mask = parsed
            if mask == 0xFFFFFFFF:
                self._exact[value] = replace(rule, vr=_dictionary_vr(value))
            else:
                self._masks.append((mask, value, rule))
        self._normal: dict[int, Rule] = dict(self._exact)
        self._dummy: dict[int, Rule] = dict(self._exact)
        self.safe_private = _safe_private() if self.private_rule.action == C else frozenset()
        self.dates = ("full" if "retain_longitudinal_full_dates" in selected else
                      "modified" if "retain_longitudinal_modified_dates" in selected else "")
        self.cleans_text = bool(selected & {"clean_descriptors", "clean_structured_content",
                                            "clean_graphics", "retain_patient_characteristics"})

    def _resolve(self, basic: str, columns: dict[str, str]) -> Rule:
        chosen = [(o, a) for o, a in columns.items() if o in self.options]
        for option, action in chosen:
            if action == C:
                return Rule(C, option, "C")
        if chosen:
            return Rule(K, chosen[0][0], "K")
        return Rule(COMBINED.get(basic, basic), "basic", basic)

    # -- lookup ----------------------------------------------------------------------------
    def memo(self, dummy: bool) -> dict[int, Rule]:
        """The per-tag cache the engine reads first (table rules, then defaults met so far)."""
        return self._dummy if dummy else self._normal

    def rule(self, tag: int, vr: str | None, dummy: bool = False) -> Rule:
        """The rule for a standard (even group) tag, memoised when it is VR-independent."""
        memo = self._dummy if dummy else self._normal
        found = memo.get(tag)
        if found is not None:
            return found
        for mask, value, rule in self._masks:
            if tag & mask == value:
                found = replace(rule, vr=_dictionary_vr(tag))
                break
        else:
            dict_vr = _dictionary_vr(tag)
            found = self.default_rule(tag, dict_vr or (vr or "UN"), dummy, known=bool(dict_vr))
            if not dict_vr:
                return found  # VR from the element: may differ next time
        memo[int(tag)] = found
        return found

    def default_rule(self, tag: int, vr: str, dummy: bool, known: bool = True) -> Rule:
        """Attributes Table E.1-1 does not list (documented in docs/deidentification.md).

        Sequences are walked (their items follow the table), except Encrypted Attributes
        (the originals sealed by an earlier de-identifier), which go; numbers, codes (CS),
        ages and binary data are kept; UIDs are remapped unless they name a class or syntax; dates
        and times follow the longitudinal options and are removed without one; person names
        get a dummy; other text is kept only when it is technical vocabulary (``SAFE_TEXT``,
        outside dummy sequences), else cleaned (Clean Descriptors) or given a dummy; values
        of unknown VR (UN) and group lengths are removed.
        """
        if tag & 0xFFFF == 0:
            return Rule(X, "default", "group length", vr)
        if tag == ENCRYPTED_ATTRIBUTES:  # an earlier de-identifier's sealed originals
            return Rule(X, "default", "encrypted originals", vr)
        keyword = keyword_for_tag(tag) if known else ""
        if known and dictionary_is_retired(tag):
            keyword = ""  # retired text is never whitelisted
        if vr == "SQ":
            return Rule(K, "default", "sequence", vr)
        if vr == "UI":
            if keyword in CLASS_UIDS:
                return Rule(K, "default", "class UID", vr)
            return Rule(U, "default", "instance UID", vr)
        if vr in DATE_VRS:
            if self.dates == "full":
                return Rule(K, "default", "date (full dates)", vr)
            if self.dates == "modified":
                return Rule(C, "default", "date (modified dates)", vr)
            return Rule(X, "default", "date", vr)
        if vr == "PN":
            return Rule(D, "default", "person name", vr)
        if vr in TEXT_VRS:
            if keyword in SAFE_TEXT and not dummy:
                return Rule(K, "default", "technical text", vr)
            if "clean_descriptors" in self.options and vr != "AE":
                return Rule(C, "default", "text", vr)
            return Rule(D, "default", "text", vr)
        if vr in ("UN", ""):
            return Rule(X, "default", "unknown VR", vr)
        return Rule(K, "default", "not identifying", vr)

    # -- what the output says about itself ---------------------------------------------------
    def method_codes(self, pixels_cleaned: bool) -> list[tuple[str, str, str]]:
        """CID 7050 codes for the profile and each option applied (pixels only if cleaned)."""
        table = method_codes()
        used = [BASIC_CODE] + [OPTION_CODES[o] for o in self.options if o != "clean_pixel_data"]
        if pixels_cleaned:
            used.insert(1, OPTION_CODES["clean_pixel_data"])
        return [table[c] for c in used]

    def method_text(self, pixels_cleaned: bool, version: str) -> list[str]:
        """Values of DeidentificationMethod (LO, at most 64 characters each)."""
        meanings = [m for _, _, m in self.method_codes(pixels_cleaned)]
        return [f"DICOM PS3.15 {self.edition} Table E.1-1", *meanings, f"dicomshare {version}"]

    @property
    def longitudinal(self) -> str:
        """LongitudinalTemporalInformationModified for the chosen date handling."""
        return {"full": "UNMODIFIED", "modified": "MODIFIED"}.get(self.dates, "REMOVED")


@cache
def _safe_private() -> frozenset[tuple[int, str, int]]:
    """Table E.3.10-1 as (group, private creator, element low byte) triples."""
    out = set()
    for row in read_table("ps3.15-table-e3-10-1.json")["rows"]:
        tag = row["tag"].strip().upper()  # e.g. "(0019,XX0C)"; some rows use lower case
        if len(tag) != 11 or tag[6:8] != "XX":
            raise RuntimeError(f"Table E.3.10-1: cannot read tag {row['tag']!r}")
        out.add((int(tag[1:5], 16), row["private_creator"], int(tag[8:10], 16)))
    return frozenset(out)
