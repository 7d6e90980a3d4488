"""Keyed, deterministic pseudonyms: UIDs, patient identity, date shifts, AE titles.

Every value is derived with HMAC-SHA256 under the project key, with a label per kind of
value, so the same input maps to the same output in every export of one project (studies
exported months apart line up) while two projects, or anyone without the key, cannot link
or reverse them. Nothing is stored: the key is the whole mapping.

- UID: ``2.25.<n>``, where n is 128 bits of the HMAC with the RFC 9562 version (8, custom)
  and variant bits set, i.e. 122 keyed bits shaped as a UUID, as PS3.5 B.2 intends for
  2.25 UIDs. n < 2**128 has at most 39 digits, so a UID has at most 44 of the 64 allowed
  characters. UIDs under the standard's root (1.2.840.10008, e.g. SOP classes, well-known
  frames of reference) are not secret and are returned unchanged.
- Patient: ``PAT-`` + 16 base32 characters (80 bits) of the HMAC of the patient key
  (Patient ID and Issuer of Patient ID); used for both Patient ID and Patient's Name.
- Date shift: a whole number of days in ``-SHIFT_DAYS..-1`` from the HMAC of the patient
  key: every date of a patient moves by the same offset (intervals preserved), patients
  move by different offsets (one in 3650 pairs collides), never by zero.
- AE title: ``AE`` + 14 base32 characters, for Application Entity titles that an option
  says to clean rather than drop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import date, timedelta

UID_ROOT = "2.25."
STANDARD_ROOT = "1.2.840.10008."
SHIFT_DAYS = 3650
MIN_KEY_BYTES = 16
_CACHE_LIMIT = 1 << 20


class Pseudonyms:
    """The keyed mappings of one project."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a project key has at least {MIN_KEY_BYTES} bytes")
        self._key = bytes(key)
        self._uids: dict[str, str] = {}

    def _mac(self, label: bytes, value: bytes) -> bytes:
        return hmac.new(self._key, label + b"\x00" + value, hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """The pseudonym of a UID (standard UIDs and empty values unchanged)."""
        found = self._uids.get(value)
        if found is not None:
            return found
        clean = value.strip(" \x00")
        if not clean or clean.startswith(STANDARD_ROOT):
            out = clean
        else:
            n = int.from_bytes(self._mac(b"uid", clean.encode("ascii", "replace"))[:16], "big")
            n = (n & ~(0xF << 76)) | (0x8 << 76)  # UUID version 8
            n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
            out = f"{UID_ROOT}{n}"
        if len(self._uids) >= _CACHE_LIMIT:
            self._uids.clear()
        self._uids[value] = out
        return out

    @staticmethod
    def patient_key(patient_id: str, issuer: str, fallback: str = "") -> bytes:
        """What identifies a patient: (Patient ID, Issuer); ``fallback`` when there is no ID."""
        if patient_id.strip():
            return f"id\x00{patient_id.strip()}\x00{issuer.strip()}".encode()
        return f"other\x00{fallback}".encode()

    def patient(self, patient_key: bytes) -> str:
        """The pseudonymous Patient ID (and name) of a patient."""
        digest = base64.b32encode(self._mac(b"patient", patient_key)).decode("ascii")
        return "PAT-" + digest[:16]

    def date_offset(self, patient_key: bytes) -> int:
        """The patient's date shift in days, in -SHIFT_DAYS..-1."""
        n = int.from_bytes(self._mac(b"date-shift", patient_key)[:8], "big")
        return -(n % SHIFT_DAYS + 1)

    def ae(self, value: str) -> str:
        """A consistent stand-in for an AE title (16 characters at most)."""
        digest = base64.b32encode(self._mac(b"ae", value.strip().encode())).decode("ascii")
        return "AE" + digest[:14]


# -- date shifting ------------------------------------------------------------------------
def shift_da(value: str, days: int) -> str | None:
    """A DA value (or ``A-B`` range, or old ``YYYY.MM.DD``) moved by ``days``; None if
    it is not a date (the caller then drops it: an unreadable date cannot be shifted)."""
    if "-" in value:
        parts = [shift_da(p, days) if p else "" for p in value.split("-", 1)]
        return None if None in parts else "-".join(p or "" for p in parts)
    text = value.strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    return _shift_digits(text, days)


def shift_dt(value: str, days: int) -> str | None:
    """A DT value with its date part moved by ``days``; time, fraction and UTC offset kept.
    Partial dates (YYYY, YYYYMM) are shifted from the period's first day and truncated."""
    text = value.strip()
    end = len(text)
    for i, ch in enumerate(text):
        if not ch.isdigit():
            end = i
            break
    digits = text[:end]
    head = digits[:8]
    if len(head) not in (4, 6, 8):
        return None
    padded = head + "0101"[len(head) - 4:] if len(head) < 8 else head
    shifted = _shift_digits(padded, days)
    if shifted is None:
        return None
    return shifted[:len(head)] + text[len(head):]


def _shift_digits(text: str, days: int) -> str | None:
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"
