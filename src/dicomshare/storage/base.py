"""The two storage protocols: an Index of attributes and a BlobStore of received bytes.

Concrete classes are picked by URL in :mod:`dicomshare.storage` only; everything else
talks to these protocols, and one conformance suite runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from dicomshare.access.policy import EVERYTHING, Visibility
from dicomshare.dicom.header import Header
from dicomshare.dicom.matching import Query


class Outcome(StrEnum):
    STORED = "stored"
    ALREADY_PRESENT = "already-present"  # identical bytes were stored before: a no-op
    CONFLICT = "conflict"  # same SOP Instance UID, different bytes: first one kept
    # The study exists and holds only other organisations' instances, and no add-series
    # grant covers it: nothing stored.
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class InstanceRecord:
    """What ingest hands the index: a parsed header and where its bytes now live."""

    header: Header
    blob_key: str
    size: int
    sha256: str
    owner: int | None = None  # the storing organisation (None: nobody, e.g. legacy import)
    # Where the storer may add to existing studies (None: anywhere; see may_add_to).
    store_access: Visibility | None = None


@dataclass(frozen=True)
class StoredInstance:
    """One indexed instance, as retrieve and check need it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    sha256: str
    number_of_frames: int | None = None


class Index(Protocol):
    """Attributes of every stored instance, searchable at every level."""

    def add(self, records: Sequence[InstanceRecord]) -> list[Outcome]:
        """Index a batch in one transaction; return one outcome per record, in order."""

    def search(self, query: Query, study_uid: str | None = None,
               series_uid: str | None = None, visibility: Visibility = EVERYTHING
               ) -> list[dict[str, Any]]:
        """Visible matches as DICOM JSON (without RetrieveURL), ordered, paged by the query;
        computed attributes (counts, ModalitiesInStudy) cover visible instances only."""

    def locate(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, with_metadata: bool = False,
               visibility: Visibility = EVERYTHING
               ) -> list[tuple[StoredInstance, str | None]]:
        """Visible instances below a resource, ordered by series and instance number."""

    def remove(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, organisation: int | None = None
               ) -> list[StoredInstance]:
        """Delete index rows below a resource (and emptied parents); return what went.

        With ``organisation``, only that organisation's ownership goes; an instance is
        deleted when no owner is left."""

    def adopt(self, sop_uid: str) -> list[str]:
        """Give an unowned instance to its study's owners (or the only organisation)."""

    def all_instances(self) -> Iterator[StoredInstance]:
        """Every indexed instance, for `dicomshare check`."""


class TempBlob(Protocol):
    """Bytes being received. Written in chunks; hashed on the way; invisible until committed."""

    path: Path
    size: int

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def sha256(self) -> str: ...
    def close(self) -> None: ...


class BlobStore(Protocol):
    """Received bytes, stored unchanged under a content-derived key."""

    def new_temp(self) -> TempBlob: ...
    def start_sync(self, temp: TempBlob) -> None:
        """Writing is over: start making the bytes durable (may run in the background)."""
    def commit_many(self, temps: list[TempBlob]) -> list[str]:
        """Make the bytes durable under their keys (fsync + rename); return the keys."""
    def discard(self, temp: TempBlob) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def local_path(self, key: str) -> AbstractContextManager[Path]:
        """A filesystem path holding the blob, for readers that want one (pydicom)."""
    def delete(self, key: str) -> None: ...
    def keys(self) -> Iterator[str]: ...
    def begin_delete(self, keys: list[str]) -> object:
        """Durably note blobs about to lose their index rows (before the commit)."""
    def end_delete(self, journal: object) -> None: ...
    def deleting(self) -> set[str]:
        """Keys noted by deletes that did not end (a crash): never re-indexed by repair."""
    def clear_deleting(self) -> None: ...
