"""Attribute matching, PS3.4 C.2.2.2, shared by QIDO-RS and C-FIND.

A search becomes a :class:`Query` of :class:`Condition` s. The index turns conditions
on indexed columns into SQL; any other condition (sequence paths, attributes without a
column) is evaluated here, by :func:`matches_json`, against the stored DICOM JSON.
Both routes implement the same rules:

- empty value: universal matching (the attribute is returned, nothing is filtered);
- ``*`` and ``?`` wildcards (not for UIDs, dates or times);
- ranges for DA, TM and DT: ``A-B``, ``A-`` and ``-B``, inclusive;
- UID lists separated by ``\\`` (or ``,`` as PS3.18 allows);
- PN matching is case-insensitive; with fuzzy matching a value also matches the start
  of any name component ("smi" finds "Smith^John" and "Jones^Smita").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dicomshare.dicom.attributes import Level, is_valid_uid, keyword, parse_path, tag_hex, vr_of
from dicomshare.errors import InvalidQuery


class Kind(StrEnum):
    UNIVERSAL = "universal"
    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    LIST = "list"


@dataclass(frozen=True)
class Condition:
    path: tuple[int, ...]
    kind: Kind
    value: Any = None  # str | tuple[str, str] (range, '' = open) | tuple[str, ...] (list)
    vr: str = "UN"

    @property
    def keyword(self) -> str:
        return ".".join(keyword(t) for t in self.path)

    @property
    def is_nested(self) -> bool:
        return len(self.path) > 1


@dataclass
class Query:
    """One search at one level, from QIDO-RS parameters or a C-FIND identifier."""

    level: Level
    conditions: list[Condition] = field(default_factory=list)
    include_all: bool = False
    include: set[int] = field(default_factory=set)
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False

    def condition(self, name: str) -> Condition | None:
        for cond in self.conditions:
            if cond.keyword == name:
                return cond
        return None


MAX_LIMIT = 10_000
MAX_OFFSET = 10_000_000
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DATETIME = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_RANGE_VRS = {"DA": _DATE, "TM": _TIME, "DT": _DATETIME}
_NO_WILDCARD = {"IS", "DS", "SL", "SS", "SV", "UL", "US", "UV", "FL", "FD", "AS", "AT"}
CONTROL_PARAMS = {"includefield", "limit", "offset", "fuzzymatching", "accept", "charset"}


def condition_for(key: str, raw: str) -> Condition:
    """Build one condition from a key (keyword, tag or dotted path) and its raw value."""
    path = parse_path(key)
    vr = vr_of(path[-1])
    value = raw.strip() if vr not in ("PN",) else raw.strip(" ")
    if value == "" or value == "*":
        return Condition(path, Kind.UNIVERSAL, None, vr)
    if vr == "SQ":
        raise InvalidQuery(f"{key}: a sequence matches only universally (empty value)")
    if len(value) > 1024:
        raise InvalidQuery(f"{key}: value longer than 1024 characters")
    if vr == "UI":
        uids = tuple(u.strip() for u in re.split(r"[\\,]", value) if u.strip())
        for uid in uids:
            if not is_valid_uid(uid):
                raise InvalidQuery(f"{key}: {uid[:80]!r} is not a valid UID")
        return Condition(path, Kind.LIST if len(uids) > 1 else Kind.SINGLE,
                         uids if len(uids) > 1 else uids[0], vr)
    if vr in _RANGE_VRS:
        pattern = _RANGE_VRS[vr]
        if "-" in value.lstrip("-+") or value.startswith("-"):
            low, _, high = _split_range(value, vr)
            for part in (low, high):
                if part and not pattern.match(part):
                    raise InvalidQuery(f"{key}: {part!r} is not a valid {vr} value")
            if low and high and low > high:
                raise InvalidQuery(f"{key}: range start {low} is after its end {high}")
            return Condition(path, Kind.RANGE, (low, high), vr)
        if not pattern.match(value):
            raise InvalidQuery(f"{key}: {value!r} is not a valid {vr} value")
        return Condition(path, Kind.SINGLE, value, vr)
    if vr == "CS" and ("\\" in value or "," in value):
        items = tuple(v.strip() for v in re.split(r"[\\,]", value) if v.strip())
        return Condition(path, Kind.LIST, items, vr)
    if "*" in value or "?" in value:
        if vr in _NO_WILDCARD:  # PS3.4 C.2.2.2.4: no wildcard matching for these VRs
            raise InvalidQuery(f"{key}: wildcards are not allowed in {vr} values")
        return Condition(path, Kind.WILDCARD, value, vr)
    return Condition(path, Kind.SINGLE, value, vr)


def _split_range(value: str, vr: str) -> tuple[str, str, str]:
    if vr == "DT":
        # A DT may carry a '-hhmm' offset; split on the '-' that separates two values.
        match = re.match(r"^([^-]*(?:-\d{4})?)-(.*)$", value)
        if match and (not match.group(1) or _DATETIME.match(match.group(1))):
            return match.group(1), "-", match.group(2)
    low, sep, high = value.partition("-")
    return low, sep, high


def parse_qido(level: Level, params: list[tuple[str, str]]) -> Query:
    """QIDO-RS query parameters (PS3.18 8.3.4) to a Query; raises InvalidQuery."""
    query = Query(level=level)
    seen: set[tuple[int, ...]] = set()
    for name, raw in params:
        lname = name.lower()
        if lname == "includefield":
            for item in re.split(r"[,\s]+", raw.strip()):
                if not item:
                    continue
                if item.lower() == "all":
                    query.include_all = True
                else:
                    query.include.add(parse_path(item)[0])
        elif lname == "limit":
            query.limit = int_param("limit", raw, 0, MAX_LIMIT)
        elif lname == "offset":
            query.offset = int_param("offset", raw, 0, MAX_OFFSET)
        elif lname == "fuzzymatching":
            if raw.lower() not in ("true", "false"):
                raise InvalidQuery("fuzzymatching must be true or false")
            query.fuzzy = raw.lower() == "true"
        elif lname in CONTROL_PARAMS:
            continue
        else:
            try:
                cond = condition_for(name, raw)
            except InvalidQuery as exc:
                raise InvalidQuery(f"unknown or invalid query parameter: {exc.reason}") from exc
            if cond.path in seen:
                raise InvalidQuery(f"{name} is given more than once")
            seen.add(cond.path)
            query.conditions.append(cond)
    return query


def int_param(name: str, raw: str, low: int, high: int) -> int:
    """A bounded integer query parameter: plain digits only (Python's int() would also take
    " 7", "1_000" and other spellings no client means)."""
    if not re.fullmatch(r"-?\d{1,12}", raw):
        raise InvalidQuery(f"{name} must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if value < low:
        raise InvalidQuery(f"{name} must be at least {low}, got {value}")
    if value > high:
        raise InvalidQuery(f"{name} must be at most {high}, got {value}")
    return value


def wildcard_match(pattern: str, text: str, case_insensitive: bool = False) -> bool:
    """Does ``text`` match a DICOM wildcard pattern (``*`` any run, ``?`` one character)?

    In time proportional to len(pattern) x len(text) at worst: a regular expression of the
    pattern backtracks exponentially on hostile ones (``*a*a*a*a*...b``), and patterns come
    from clients (QIDO-RS, C-FIND, cohort watches)."""
    if case_insensitive:
        pattern, text = pattern.lower(), text.lower()
    p = t = 0
    star, resume = -1, 0  # the last * seen, and where in text it is trying from
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p += 1
            t += 1
        elif star >= 0:  # let the last * take one more character and retry from there
            resume += 1
            p, t = star + 1, resume
        else:
            return False
    return all(ch == "*" for ch in pattern[p:])


def matches_value(cond: Condition, value: str | None, fuzzy: bool = False) -> bool:
    """Does one stored value satisfy the condition? ``None`` means absent or empty."""
    if cond.kind is Kind.UNIVERSAL:
        return True
    if value is None or value == "":
        # PS3.4 C.2.2.2.2: an empty stored value matches any wildcard that is all '*'.
        return cond.kind is Kind.WILDCARD and set(cond.value) == {"*"}
    ci = cond.vr == "PN"
    if cond.kind is Kind.SINGLE:
        if ci and fuzzy:
            return any(part.lower().startswith(cond.value.lower())
                       for part in re.split(r"[\^=\s]", value) if part)
        return value.lower() == cond.value.lower() if ci else value == cond.value
    if cond.kind is Kind.WILDCARD:
        return wildcard_match(cond.value, value, ci)
    if cond.kind is Kind.LIST:
        return value in cond.value
    low, high = cond.value
    return (not low or value >= low) and (not high or value[: len(high)] <= high)


def json_values(element: dict[str, Any] | None) -> list[str]:
    """The values of one DICOM JSON element as strings (PN: the alphabetic group)."""
    if not element:
        return []
    out = []
    for item in element.get("Value", []):
        if isinstance(item, dict):
            if "Alphabetic" in item or "Ideographic" in item or "Phonetic" in item:
                out.append(str(item.get("Alphabetic", "")))
        elif item is not None:
            out.append(str(item))
    return out


def matches_json(cond: Condition, dataset: dict[str, Any], fuzzy: bool = False) -> bool:
    """Evaluate a condition against DICOM JSON, following sequence paths into every item."""
    if cond.kind is Kind.UNIVERSAL:
        return True
    return _match_path(cond, cond.path, dataset, fuzzy)


def _match_path(cond: Condition, path: tuple[int, ...], ds: dict[str, Any], fuzzy: bool) -> bool:
    element = ds.get(tag_hex(path[0]))
    if len(path) == 1:
        values = json_values(element)
        if not values:
            return matches_value(cond, None, fuzzy)
        return any(matches_value(cond, v, fuzzy) for v in values)
    items = (element or {}).get("Value", [])
    return any(_match_path(cond, path[1:], item, fuzzy) for item in items if isinstance(item, dict))
