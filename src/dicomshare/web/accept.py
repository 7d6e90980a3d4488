"""Media types and HTTP Accept negotiation for DICOMweb (RFC 9110, PS3.18 8.3.3).

This module also holds the media-type grammar (``parse_media_type``) that the
multipart code reuses for Content-Type, so both read parameters identically.

Typical use in a route::

    ranges = accept_from_request(request.headers.get("accept"),
                                 request.query_params.getlist("accept"),
                                 keep_refusals=True)
    chosen = best_match(ranges, ['multipart/related; type="application/dicom"'])
    if chosen is None:
        raise NotAcceptable(...)
    offer, media_range = chosen
    syntax = media_range.params.get("transfer-syntax")   # left to the caller

Parameter matching: a range parameter only constrains an offer that declares the
same parameter (value ``*`` matches anything). Parameters the offer does not
declare, such as ``transfer-syntax``, are not judged here; the caller reads them
from the chosen range.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WS = " \t"
# Lenient on purpose: real clients send q=.5 or q=1.; anything else is rejected.
_QVALUE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
# A '+' in a query string decodes to a space (application/dicom+json -> "dicom json").
_MANGLED_PLUS = re.compile(r"(?<=[^\s;,=])\s+(?=[^\s;,=])")


def is_token(text: str) -> bool:
    """RFC 9110 token: what may appear unquoted in type, subtype and parameter names."""
    return bool(text) and all(c in _TCHARS for c in text)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _read_quoted(text: str, pos: int) -> tuple[str, int]:
    """Decode the quoted-string at ``text[pos] == '"'``; returns (value, index after it)."""
    out: list[str] = []
    pos += 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif ch == '"':
            return "".join(out), pos + 1
        else:
            out.append(ch)
            pos += 1
    raise ValueError(f"unterminated quoted parameter value in {text!r}")


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; name=value; ...`` into a lower-cased type and parameters.

    Unquoted values are accepted even when they are not tokens, because DICOMweb
    clients routinely send ``type=application/dicom`` without quotes.
    """
    text = value.strip()
    semi = text.find(";")
    end = len(text) if semi < 0 else semi
    media = text[:end].strip().lower()
    major, slash, minor = media.partition("/")
    if not slash or not is_token(major) or not is_token(minor):
        raise ValueError(f"invalid media type {media!r} (expected type/subtype)")
    params: dict[str, str] = {}
    pos = end
    while pos < len(text):
        pos = _skip_ws(text, pos + 1)  # step over ';'
        if pos >= len(text) or text[pos] == ";":
            continue
        eq = pos
        while eq < len(text) and text[eq] not in "=;":
            eq += 1
        name = text[pos:eq].strip().lower()
        if eq >= len(text) or text[eq] != "=":
            raise ValueError(f"parameter {name!r} has no value")
        if not is_token(name):
            raise ValueError(f"invalid parameter name {name!r}")
        pos = _skip_ws(text, eq + 1)
        if pos < len(text) and text[pos] == '"':
            param, pos = _read_quoted(text, pos)
            pos = _skip_ws(text, pos)
            if pos < len(text) and text[pos] != ";":
                raise ValueError(f"unexpected text after quoted value of {name!r}")
        else:
            stop = text.find(";", pos)
            stop = len(text) if stop < 0 else stop
            param = text[pos:stop].strip()
            if not param or any(c.isspace() or c == '"' for c in param):
                raise ValueError(f"invalid value {param!r} for parameter {name!r}")
            pos = stop
        if name in params:
            raise ValueError(f"duplicate parameter {name!r}")
        params[name] = param
    return media, params


def format_media_type(media_type: str, params: Mapping[str, str]) -> str:
    """Inverse of parse_media_type; quotes a value only when it is not a token."""
    out = [media_type]
    for name, val in params.items():
        if not is_token(val):
            val = '"' + val.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{name}={val}")
    return "; ".join(out)


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept list."""

    type: str  # 'multipart/related', 'image/*', '*/*'
    params: dict[str, str] = field(default_factory=dict, hash=False)  # q excluded
    q: float = 1.0

    def __str__(self) -> str:
        params = dict(self.params)
        if self.q != 1.0:
            params["q"] = f"{self.q:g}"
        return format_media_type(self.type, params)

    def specificity(
        self, offer_type: str, offer_params: Mapping[str, str]
    ) -> tuple[int, int] | None:
        """How precisely this range names the offer, or None when it does not match.

        Ranks exact type over ``type/*`` over ``*/*``, then the number of offer
        parameters explicitly matched, as RFC 9110 12.5.1 prescribes.
        """
        if self.type == "*/*":
            level = 0
        elif self.type.endswith("/*"):
            if offer_type.split("/", 1)[0] != self.type[:-2]:
                return None
            level = 1
        elif self.type == offer_type:
            level = 2
        else:
            return None
        matched = 0
        for name, val in self.params.items():
            if name not in offer_params or val == "*":
                continue
            if val.lower() != offer_params[name].lower():
                return None
            matched += 1
        return level, matched


def _split_list(header: str) -> list[str]:
    """Split on commas that are not inside a quoted string."""
    pieces: list[str] = []
    start, quoted, pos = 0, False, 0
    while pos < len(header):
        ch = header[pos]
        if quoted and ch == "\\":
            pos += 1
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            pieces.append(header[start:pos])
            start = pos + 1
        pos += 1
    pieces.append(header[start:])
    return [p.strip() for p in pieces if p.strip()]


def _parse_range(piece: str) -> MediaRange:
    media_part = piece.split(";", 1)[0].strip()
    if media_part == "*":  # legacy clients (old Java) send a bare '*'
        piece = "*/*" + piece[piece.index("*") + 1 :]
    try:
        media, params = parse_media_type(piece)
    except ValueError as exc:
        raise ValueError(f"malformed media range {piece!r}: {exc}") from exc
    major, minor = media.split("/", 1)
    if major == "*" and minor != "*":
        raise ValueError(f"malformed media range {piece!r}: '*/{minor}' is not allowed")
    q = 1.0
    if "q" in params:
        raw = params.pop("q")
        if not _QVALUE.fullmatch(raw) or not 0.0 <= float(raw) <= 1.0:
            raise ValueError(f"malformed media range {piece!r}: q={raw!r} is not in 0..1")
        q = float(raw)
    return MediaRange(media, params, q)


def parse_accept(header: str | None, *, keep_refusals: bool = False) -> list[MediaRange]:
    """Parse an Accept value, best first (stable for equal q).

    ``q=0`` entries are dropped unless ``keep_refusals``: keeping them lets
    ``negotiate`` honour ``image/*, image/jp2;q=0`` as "any image except JPEG 2000".
    """
    pieces = _split_list(header) if header else []
    if not pieces:
        return [MediaRange("*/*", {}, 1.0)]
    ranges = [_parse_range(piece) for piece in pieces]
    if not keep_refusals:
        ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def accept_from_request(
    header: str | None,
    query_value: str | Sequence[str] | None,
    *,
    keep_refusals: bool = False,
) -> list[MediaRange]:
    """Ranges from the ``accept`` query parameter (PS3.18 8.3.3.1), else the header.

    The query value may still be percent-encoded, may repeat, and may have had its
    '+' turned into a space by form decoding; all three are undone here.
    """
    values = [query_value] if isinstance(query_value, str) else list(query_value or [])
    joined = ",".join(v for v in values if v.strip())
    if not joined:
        return parse_accept(header, keep_refusals=keep_refusals)
    if "%" in joined:
        joined = unquote(joined)
    joined = _MANGLED_PLUS.sub("+", joined)
    return parse_accept(joined, keep_refusals=keep_refusals)


def best_match(
    accepted: Sequence[MediaRange], offers: Sequence[str]
) -> tuple[str, MediaRange] | None:
    """The preferred offer and the range that admitted it, or None (answer 406).

    Each offer takes the q of its most specific matching range. Among equal q, an
    explicit match beats a wildcard, then the client's order decides, then ours.
    """
    best: tuple[str, MediaRange] | None = None
    best_key: tuple[float, tuple[int, int], int, int] | None = None
    for offer_index, offer in enumerate(offers):
        offer_type, offer_params = parse_media_type(offer)
        if "*" in offer_type:
            raise ValueError(f"offer {offer!r} must be a concrete media type")
        chosen: tuple[tuple[int, int], float, int, MediaRange] | None = None
        for range_index, rng in enumerate(accepted):
            spec = rng.specificity(offer_type, offer_params)
            if spec is None:
                continue
            if chosen is None or (spec, rng.q) > (chosen[0], chosen[1]):
                chosen = (spec, rng.q, range_index, rng)
        if chosen is None or chosen[1] <= 0:
            continue
        spec, q, range_index, rng = chosen
        key = (q, spec, -range_index, -offer_index)
        if best_key is None or key > best_key:
            best_key, best = key, (offer, rng)
    return best


def negotiate(accepted: Sequence[MediaRange], offers: Sequence[str]) -> str | None:
    """The best offered media type (as given in ``offers``), or None for 406."""
    match = best_match(accepted, offers)
    return None if match is None else match[0]
