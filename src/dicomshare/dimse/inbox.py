"""Receiving C-STORE data sets straight into archive temp blobs, per association.

pynetdicom collects a data set in memory and hands it over decoded; an archive wants the
received bytes, in bounded memory, and nothing left behind by an aborted transfer. So each
new DIMSE message of an accepted association gets a :class:`Sink`: for a C-STORE request it
writes the fragments into a temp blob after a Part 10 header built from the request (the
stored file is then the received bytes); for anything else it behaves as pynetdicom's own
buffer. :class:`Inbox` owns an association's sinks and runs work queued for after a
response has been sent (storage commitment reports).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage

from dicomshare.access.policy import Principal, Visibility
from dicomshare.archive import Archive, StoreResult
from dicomshare.dimse import wire
from dicomshare.errors import StorageFailure
from dicomshare.storage.base import TempBlob

log = logging.getLogger(__name__)
PREAMBLE = wire.PREAMBLE


class Inbox:
    """Per association: the temp blobs being received, work to do after a response, its
    store permissions and the C-STORE results its next audit record covers."""

    def __init__(self, archive: Archive, assoc: Association) -> None:
        self.archive = archive
        self.assoc = assoc
        self.lock = threading.Lock()
        self.open: set[Sink] = set()
        self._after: list[Callable[[], None]] = []
        self.may_store: tuple[float, Visibility] | None = None  # until when (scp.py)
        self._reported: list[StoreResult] = []  # C-STORE results not yet audited
        self._reported_since = 0.0
        self._reporter: Principal | None = None

    def hold_report(self, who: Principal, result: StoreResult, every: float
                    ) -> tuple[Principal | None, list[StoreResult]]:
        """Keep a C-STORE result for the association's next audit record; return the
        results that are due now (another study began, or ``every`` seconds passed)."""
        now = time.monotonic()
        with self.lock:
            due: list[StoreResult] = []
            reporter = self._reporter
            if self._reported and (self._reported[0].study_uid != result.study_uid
                                   or now - self._reported_since >= every
                                   or reporter is not who):
                due, self._reported = self._reported, []
            if not self._reported:
                self._reported_since = now
            self._reported.append(result)
            self._reporter = who
            return reporter, due

    def take_reports(self, older_than: float | None = None
                     ) -> tuple[Principal | None, list[StoreResult]]:
        """What is held: all of it (the association ended), or only when the first held
        result is ``older_than`` seconds old (an association that went quiet)."""
        with self.lock:
            if (older_than is not None and self._reported
                    and time.monotonic() - self._reported_since < older_than):
                return self._reporter, []
            held, self._reported = self._reported, []
            return self._reporter, held

    def install(self) -> None:
        """Give each new DIMSE message a Sink for its data set; run after-response work
        once pynetdicom has sent the response of the request being served."""
        dimse, assoc = self.assoc.dimse, self.assoc
        receive, serve = dimse.receive_primitive, assoc._serve_request
        # With DICOMSHARE_DICOM_EVENT_LOOPS=false the upper layer polls its socket: 0.5 ms
        # between polls halves pynetdicom's 1 ms (reactor.py replaces the polling).
        assoc.dul._run_loop_delay = 0.0005

        def receive_primitive(primitive: Any) -> None:
            if dimse.message is None:
                message = DIMSEMessage()
                message.data_set = Sink(self, message)
                dimse.message = message
            receive(primitive)

        def serve_request(msg: Any, context_id: int) -> None:
            serve(msg, context_id)
            while self._after:
                work = self._after.pop(0)
                assoc._is_paused = True  # lets send_* run from the reactor thread
                try:
                    work()
                except Exception:
                    log.exception("after-response work failed")
                finally:
                    assoc._is_paused = False

        setattr(dimse, "receive_primitive", receive_primitive)  # noqa: B010
        setattr(assoc, "_serve_request", serve_request)  # noqa: B010

    def after_response(self, work: Callable[[], None]) -> None:
        self._after.append(work)

    def begin(self, sink: Sink, message: Any) -> bool:
        """Give a C-STORE data set a temp blob holding the Part 10 header; False for any
        other message (or a context pynetdicom will refuse anyway)."""
        if not isinstance(message, C_STORE_RQ):
            return False
        cx = self.assoc._accepted_cx.get(cast(int, message.context_id))
        if cx is None:
            return False
        command = message.command_set
        header = wire.file_meta(str(command.AffectedSOPClassUID),
                                str(command.AffectedSOPInstanceUID), str(cx.transfer_syntax[0]))
        temp = self.archive.new_temp()
        try:
            temp.write(header)
        except BaseException:
            self.archive.blobs.discard(temp)  # type: ignore[arg-type]
            raise
        with self.lock:
            sink.attach(temp)
            self.open.add(sink)
        return True

    def discard_all(self) -> None:
        """The association ended: whatever was not handed to the archive goes."""
        with self.lock:
            sinks, self.open = list(self.open), set()
            for sink in sinks:
                sink.discard()


class Sink(io.BytesIO):
    """Where pynetdicom writes the data set of a received DIMSE message.

    For a C-STORE the bytes go to an archive temp blob as they arrive; for anything else
    (identifiers, N-ACTION information) they stay in memory as pynetdicom expects.
    """

    def __init__(self, inbox: Inbox, message: Any) -> None:
        super().__init__()
        self._inbox = inbox
        self._message = message
        self._temp: TempBlob | None = None
        self._started = False
        self._error: str | None = None
        self.streaming = False

    def write(self, data: Any) -> int:
        if not self._started:
            self._started = True
            try:
                self.streaming = self._inbox.begin(self, self._message)
            except Exception as exc:  # noqa: BLE001 - never break pynetdicom's reader
                self._error = f"{type(exc).__name__}: {exc}"
                self.streaming = True
                log.warning("cannot receive a C-STORE data set: %s", self._error)
        if not self.streaming:
            return super().write(data)
        with self._inbox.lock:
            if self._temp is not None and self._error is None:
                try:
                    self._temp.write(data)  # bytes, or a memoryview of a received PDU
                except Exception as exc:  # noqa: BLE001 - disk full: report it in the status
                    self._error = f"{type(exc).__name__}: {exc}"
        return len(data)

    def fragment_writer(self) -> Callable[[Any], int] | None:
        """Where the upper layer may write data set fragments directly (reactor.py): a
        C-STORE whose command set is complete streams its data set; None otherwise."""
        if not self._started and isinstance(self._message, C_STORE_RQ):
            self.write(b"")  # the temp blob and its Part 10 header, as the first fragment
        return self.write if self._started and self.streaming else None

    def take(self) -> TempBlob:
        """Hand the complete blob to the caller (who now owns it); raises when it is gone."""
        with self._inbox.lock:
            self._inbox.open.discard(self)
            temp, self._temp = self._temp, None
            error = self._error
        if temp is None or error is not None:
            if temp is not None:
                self._inbox.archive.blobs.discard(temp)  # type: ignore[arg-type]
            raise StorageFailure(f"could not receive the data set: {error or 'association ended'}")
        return temp

    def attach(self, temp: TempBlob) -> None:
        """Called with the inbox lock held: the blob receiving this data set."""
        if self._error is None:
            self._temp = temp
        else:  # the association ended meanwhile
            self._inbox.archive.blobs.discard(temp)  # type: ignore[arg-type]

    def discard(self) -> None:
        """Called with the inbox lock held."""
        if self._temp is not None:
            self._inbox.archive.blobs.discard(self._temp)  # type: ignore[arg-type]
            self._temp = None
        self._error = self._error or "association ended"
