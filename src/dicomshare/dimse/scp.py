"""The DICOM network service (DIMSE SCP) that ``dicomshare serve`` runs beside DICOMweb.

Verification; Storage of every storage SOP class; Query/Retrieve FIND, MOVE and GET in
the Patient Root and Study Root models; Storage Commitment Push Model. Handlers only
translate between the wire and the archive, so every rule holds for DIMSE as for
DICOMweb: C-STORE goes through :meth:`Archive.store_received`, C-FIND through
:meth:`Archive.search` with the QIDO-RS matching engine, C-MOVE / C-GET / commitment
through :meth:`Archive.locate`, :meth:`Archive.search` and the blobs.

Where pynetdicom does not do what an archive needs, this module adjusts one association
at a time, never pynetdicom's process-wide ``_config`` (the SCU side shares it):

- a received C-STORE data set is written into an archive temp blob as it arrives, after
  the Part 10 header built from the request (inbox.py): memory stays bounded per
  association, the stored file is the received bytes, and an aborted transfer leaves
  nothing behind;
- associations wait on their sockets and queues instead of polling (reactor.py);
- TLS listeners and TLS to peers registered with ``--tls`` (tls.py);
- C-MOVE and C-GET sub-operations send the stored bytes from the blob (decompressed
  only when the peer accepted nothing but uncompressed syntaxes for that instance;
  outbound.py), the messages of every instance encoded directly (wire.py);
- the calling AE title is checked against the registry on every association, so
  ``dicomshare ae add`` takes effect without a restart;
- each presentation context is accepted with the transfer syntax its proposer put first.

With ``dicom_tls_port`` a second listener speaks DICOM TLS (``dimse/tls.py``): the same
AE title, handlers and registry check, over TLS. Associations we open (C-MOVE
destinations, commitment reports) use TLS when the peer is registered with ``--tls``.

C-STORE statuses (PS3.4 B.2.3; ErrorComment always says why):

    0x0000  stored, or the identical bytes were stored before
    0x0111  another object with this SOP Instance UID is stored (the first is kept).
            PS3.4 B.2.3 has no status for this; A9xx would say "data set does not match
            SOP class", which is not what happened. 0111 "Duplicate SOP Instance" (PS3.7
            C) is exact, and is the failure reason STOW-RS reports for the same refusal.
    0xA900  a required UID is missing or invalid, or the data set is not the SOP
            Instance / SOP Class the request names
    0xC000  the data set cannot be parsed
    0xA700  the archive could not make it durable (disk, database)
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts, _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicomshare.access.grants import Grants
from dicomshare.access.identity import Identities
from dicomshare.access.policy import Action, Principal, Visibility
from dicomshare.access.service import Access
from dicomshare.archive import Archive, StoreResult
from dicomshare.config import Settings
from dicomshare.dicom import transfer
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.json import first as json_first
from dicomshare.dicom.matching import Condition, Kind, Query
from dicomshare.dimse import listeners, outbound, reactor, tls, translate, wire
from dicomshare.dimse.aes import AERegistry, RemoteAE
from dicomshare.dimse.commitment import COMMITMENT, StorageCommitment
from dicomshare.dimse.inbox import PREAMBLE, Inbox, Sink
from dicomshare.errors import DicomshareError, Forbidden, InvalidInput, NotFound
from dicomshare.storage.base import StoredInstance, TempBlob

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
PENDING, CANCEL, SUCCESS = 0xFF00, 0xFE00, 0x0000
PAGE = 500  # C-FIND matches read from the index at a time; also the UID-list chunk size
PAGE_OVERLAP = 50  # matches each C-FIND page re-reads of the page before (see _on_find)
STORE_ACCESS_TTL = 2.0  # seconds an association's store permissions are reused
REPORT_EVERY = 1.0  # seconds of an association's C-STORE results one audit record covers
NATIVE = outbound.NATIVE
_NO_CONNECT = "_dicomshare_no_connect"  # see _ArchiveAE.associate
_PEER = "_dicomshare_peer"  # the RemoteAE an outbound association goes to, when known


# -- the service -----------------------------------------------------------------------------
class DicomService(StorageCommitment):
    """One AE listening on ``dicom_host:dicom_port`` and, with TLS, on ``dicom_tls_port``
    (either port may be 0: not that one); start() returns at once."""

    def __init__(self, settings: Settings, archive: Archive, access: Access | None = None,
                 shared: dict[str, socket.socket] | None = None) -> None:
        self.settings = settings
        self.shared = shared or {}  # listening sockets `serve` hands its workers
        self.archive = archive
        self.registry = AERegistry(archive.index.engine)
        if access is None:
            from dicomshare.access.audit import AuditLog

            access = Access(archive, Grants(archive.index.engine),
                            AuditLog.open(settings, archive.index.engine))
        self.access = access
        self.ae = _ArchiveAE(self, settings.ae_title)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._inboxes: dict[int, Inbox] = {}
        self._callers: dict[int, Principal] = {}  # association -> who it acts for
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._reporter: threading.Thread | None = None

    def associations(self) -> int:
        """How many associations this process serves now."""
        with self._lock:
            return len(self._inboxes)

    @property
    def port(self) -> int:
        """The plain listener's port; 0 when there is none."""
        return int(self._server.server_address[1]) if self._server else 0

    @property
    def tls_port(self) -> int:
        """The DICOM TLS listener's port; 0 when there is none."""
        return int(self._tls_server.server_address[1]) if self._tls_server else 0

    def describe(self) -> str:
        """Where it listens, for the start-up line."""
        s = self.settings
        parts = [f"AE {s.ae_title}" + (f" on {s.dicom_host}:{self.port}" if self._server else "")]
        if self._tls_server:
            clients = (f"client certificates required, signed by {s.dicom_tls_ca}"
                       if s.dicom_tls_ca else "no client certificates asked for")
            parts.append(f"DICOM TLS on {s.dicom_host}:{self.tls_port} ({clients})")
        return ", ".join(parts)

    def start(self) -> None:
        """Listen; raises OSError (filename: the address) when an address is taken,
        InvalidInput when the TLS settings are unusable (before anything listens)."""
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one line per PDU at INFO
        ae, s = self.ae, self.settings
        context = tls.server_context(s) if s.dicom_tls_port else None
        if tls.configured(s):
            tls.client_context(s)  # for TLS peers: fail now, not at the first C-MOVE
        ae.maximum_pdu_size = s.dicom_max_pdu
        ae.maximum_associations = s.dicom_max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.dicom_timeout
        ae.connection_timeout = s.dicom_timeout
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION)
        for cx in AllStoragePresentationContexts:  # both roles: C-GET's stores go out on them
            ae.add_supported_context(cast(str, cx.abstract_syntax), STORAGE_SYNTAXES,
                                     scu_role=True, scp_role=True)
        for uid in translate.MODELS:
            ae.add_supported_context(uid, NATIVE)
        ae.add_supported_context(COMMITMENT, NATIVE)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_close), (evt.EVT_ABORTED, self._on_close),
            (evt.EVT_C_ECHO, lambda _event: SUCCESS), (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get), (evt.EVT_N_ACTION, self._on_n_action),
        ]
        try:
            if s.dicom_port:
                self._server = self._listen(s.dicom_port, handlers, None)
            if context is not None:
                self._tls_server = self._listen(s.dicom_tls_port, handlers, context)
        except BaseException:
            self.stop()
            raise
        self._stopping.clear()
        self._reporter = threading.Thread(target=self._report_quiet, daemon=True,
                                          name="dicom-store-audit")
        self._reporter.start()

    def _listen(self, port: int, handlers: list[Any],
                context: Any) -> ThreadedAssociationServer:
        address = (self.settings.dicom_host, port)
        try:
            server = self.ae.start_server(address, block=False, evt_handlers=handlers,
                                          ssl_context=context)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), f"{address[0]}:{port}") from exc
        assert server is not None  # block=False
        server.contexts = _Contexts(server.contexts)
        return server

    def stop(self) -> None:
        """Stop listening and end the associations in progress (their temp blobs go)."""
        self.ae.shutdown()  # every listener this AE started
        self._server = self._tls_server = None
        self._stopping.set()
        if self._reporter is not None:
            self._reporter.join(timeout=5)
            self._reporter = None
        with self._lock:
            inboxes = list(self._inboxes.values())
            self._inboxes.clear()
        for inbox in inboxes:
            inbox.discard_all()
            self._report_held(inbox, None)

    # -- association life ------------------------------------------------------------------
    def _on_open(self, event: evt.Event) -> None:
        """Small DIMSE responses must not wait for Nagle; received data sets go to blobs."""
        _no_delay(event)
        assoc = event.assoc
        if not assoc.is_acceptor:
            return
        inbox = Inbox(self.archive, assoc)
        with self._lock:
            self._inboxes[id(assoc)] = inbox
        inbox.install()
        _quiet(assoc)
        _lean_responses(assoc, self.settings.dicom_pending_interval)
        if self.settings.dicom_event_loops:
            reactor.install(assoc)

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            inbox = self._inboxes.pop(id(event.assoc), None)
            self._callers.pop(id(event.assoc), None)
        if inbox is not None:
            inbox.discard_all()
            self._report_held(inbox, None)

    def _report_held(self, inbox: Inbox, older_than: float | None) -> None:
        reporter, held = inbox.take_reports(older_than)
        if reporter is not None and held:
            self.access.report_stores(reporter, held)

    def _report_quiet(self) -> None:
        """Audit what associations that went quiet still hold: a modality that keeps its
        association open after a study is audited within about 2 * REPORT_EVERY, not when
        it next sends or disconnects (nor never, if the process dies meanwhile)."""
        while not self._stopping.wait(REPORT_EVERY):
            with self._lock:
                inboxes = list(self._inboxes.values())
            for inbox in inboxes:
                try:
                    self._report_held(inbox, REPORT_EVERY)
                except Exception:  # the audit store is down: the next turn tries again
                    log.exception("cannot audit the C-STORE results of an association")

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse callers the registry does not know (A-ASSOCIATE-RJ: calling AE title not
        recognised), and prefer each context's first proposed transfer syntax."""
        assoc = event.assoc
        primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling = str(primitive.calling_ae_title or "").strip()
        source = f"{calling}@{assoc.requestor.address}"
        try:
            who = self._principal(calling, source)
        except Exception:  # the database is down: try again later
            log.exception("cannot check AE title %r", calling)
            _reject(assoc, 0x02, 0x01)
            return
        if who is None:
            log.warning("refused association from unregistered AE title %r (%s); register "
                        "it with `dicomshare ae add`", calling, assoc.requestor.address)
            self.access.record("association", None, "denied", user_name=f"AE {calling}",
                               details={"reason": "unregistered calling AE title",
                                        "source": source})
            _reject(assoc, 0x01, 0x03)
            return
        with self._lock:
            self._callers[id(assoc)] = who
        _prefer_proposed(assoc)

    def _principal(self, calling: str, source: str) -> Principal | None:
        """The registered AE's principal; for an unknown caller with --dicom-accept-unknown,
        a store-only device of the archive's only organisation (None when it has several)."""
        peer = self.registry.get(calling)
        if peer is not None:
            return peer.principal(source)
        if not self.settings.dicom_accept_unknown:
            return None
        orgs = Identities(self.archive.index.engine).organisations()
        if len(orgs) != 1:
            log.warning("--dicom-accept-unknown needs an archive with one organisation")
            return None
        return Principal(f"AE {calling}", orgs[0].name, "uploader", organisation_pk=orgs[0].id,
                         scopes=frozenset({"write"}), kind="ae", source=source)

    def _caller(self, assoc: Association) -> Principal:
        with self._lock:
            who = self._callers.get(id(assoc))
        if who is None:  # cannot happen: every accepted association has one
            raise Forbidden("the association has no registered caller")
        return who

    def _inbox(self, assoc: Association) -> Inbox | None:
        with self._lock:
            return self._inboxes.get(id(assoc))

    # -- C-STORE ---------------------------------------------------------------------------
    def _on_store(self, event: evt.Event) -> int | Dataset:
        request = cast(C_STORE, event.request)
        try:
            temp = self._received(event)
        except DicomshareError as exc:
            return translate.failure(exc.failure_reason, exc.reason)
        named = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        check = partial(translate.check_names, named)
        try:
            who = self._caller(event.assoc)
            may = self._may_store(event.assoc, who)
            result = self.access.store(who, [temp], check_header=check, store_access=may,
                                       report=False)[0]
            self._report(event.assoc, who, result)
        except Forbidden as exc:  # the AE may not store at all (a read-only AE)
            self.archive.blobs.discard(temp)  # type: ignore[arg-type]
            return translate.failure(exc.failure_reason, exc.reason)
        except Exception:  # a bug, not the object: nothing is acknowledged, nothing kept
            log.exception("C-STORE failed")
            self.archive.blobs.discard(temp)  # type: ignore[arg-type]
            return translate.failure(0xA700, "internal error while storing")
        if not result.ok:
            log.info("C-STORE from %s refused: %s", event.assoc.requestor.ae_title,
                     result.error.reason if result.error else "")
        return translate.store_status(result)

    def _report(self, assoc: Association, who: Principal, result: StoreResult) -> None:
        """Audit (and tell monitoring about) C-STORE results per study and REPORT_EVERY
        seconds of an association, when the next study begins, and when it ends: one
        record for a modality's 2,000-slice CT rather than 2,000."""
        inbox = self._inbox(assoc)
        if inbox is None:
            self.access.report_stores(who, [result])
            return
        reporter, due = inbox.hold_report(who, result, REPORT_EVERY)
        if reporter is not None and due:
            self.access.report_stores(reporter, due)

    def _may_store(self, assoc: Association, who: Principal) -> Visibility:
        """Where the caller may store, read again at most every STORE_ACCESS_TTL seconds of
        an association: a modality sending a study asked the database for its grants
        once per instance (a fifth of the index work). A grant revoked meanwhile stops
        counting within that time; a refusal is never remembered."""
        inbox, now = self._inbox(assoc), time.monotonic()
        if inbox is not None and inbox.may_store is not None and now < inbox.may_store[0]:
            return inbox.may_store[1]
        may = self.access.store_access(who)
        if inbox is not None:  # only this association's thread reads and writes it
            inbox.may_store = (now + STORE_ACCESS_TTL, may)
        return may

    def _received(self, event: evt.Event) -> TempBlob:
        """The temp blob holding the received object as a Part 10 file."""
        data = cast(C_STORE, event.request).DataSet
        if isinstance(data, Sink) and data.streaming:
            return data.take()
        temp = self.archive.new_temp()  # not streamed: pynetdicom kept it in memory
        try:
            temp.write(PREAMBLE + encode_file_meta(event.file_meta))
            temp.write(data.getvalue() if data is not None else b"")
        except Exception as exc:
            self.archive.blobs.discard(temp)  # type: ignore[arg-type]
            raise InvalidInput(f"invalid C-STORE request: {exc}") from exc
        return temp

    # -- C-FIND ----------------------------------------------------------------------------
    def _on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        try:
            root = translate.model_root(str(event.request.AffectedSOPClassUID))
            request = translate.find_request(event.identifier, root)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            yield translate.query_failure(exc), None
            return
        # Pages by offset over an index that may change meanwhile: a study stored (or
        # deleted) ahead of the read position shifts the rest by one. Each page re-reads
        # the last PAGE_OVERLAP matches of the one before, and matches already sent are
        # skipped, so a match is neither sent twice nor lost to a few concurrent changes.
        query, offset, sent = request.query, 0, set()
        unique = f"{translate.UNIQUE_KEY[query.level]:08X}"
        while True:
            try:
                query.limit, query.offset = PAGE, max(0, offset - PAGE_OVERLAP)
                page = self.access.search(self._caller(event.assoc), query,
                                          audit=offset == 0)
                found = []
                for r in page:
                    key = (json_first(r, unique), json_first(r, "00100021"))
                    if key not in sent:
                        sent.add(key)
                        found.append(translate.result_dataset(r, request,
                                                              self.settings.ae_title))
            except Exception as exc:  # noqa: BLE001
                yield translate.query_failure(exc), None
                return
            for ds in found:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                yield PENDING, ds
            if len(page) < PAGE:
                return
            offset = max(0, offset - PAGE_OVERLAP) + PAGE

    # -- C-MOVE and C-GET ------------------------------------------------------------------
    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        title = event.move_destination or ""
        try:
            peer = self.registry.get(title)
            who = self._caller(event.assoc)
            if peer is not None and peer.organisation_pk != who.organisation_pk:
                peer = None  # another organisation's peer: as unknown as an unregistered one
        except Exception:  # noqa: BLE001 - the registry is unreadable: destination unknown
            log.exception("cannot look up move destination %r", title)
            peer = None
        if peer is None:
            log.warning("C-MOVE to unknown destination %r (register it with `dicomshare ae "
                        "add`)", title)
            yield None, None  # pynetdicom answers 0xA801
            return
        try:
            found = self._retrieve(event)
        except Exception as exc:  # noqa: BLE001
            yield peer.host, peer.port, {_NO_CONNECT: True}
            yield 1
            yield translate.query_failure(exc), None
            return
        yield peer.host, peer.port, {"contexts": outbound.contexts_for(found), _PEER: peer,
                                     "max_pdu": self.settings.dicom_max_pdu}
        yield from self._sub_operations(event, found)

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        outbound.send_from_blobs(self.archive, event.assoc)
        try:
            found = self._retrieve(event)
        except Exception as exc:  # noqa: BLE001
            yield 1
            yield translate.query_failure(exc), None
            return
        yield from self._sub_operations(event, found)

    def _sub_operations(self, event: evt.Event, found: list[StoredInstance]) -> Iterator[Any]:
        yield len(found)
        originator = str(event.assoc.requestor.ae_title).strip()
        for inst in found:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, outbound.Stored(inst, originator)

    def _retrieve(self, event: evt.Event) -> list[StoredInstance]:
        """The instances a C-MOVE / C-GET identifier names, in archive order, once each."""
        root = translate.model_root(str(event.request.AffectedSOPClassUID))
        request = translate.retrieve_request(event.identifier, root)
        uids, level = request.uids, request.level
        who = self._caller(event.assoc)
        self.access.grants.visibility(who, Action.DOWNLOAD)  # Forbidden for a store-only AE
        if level is Level.PATIENT:
            conds = [Condition((0x00100020,), Kind.LIST, uids[Level.PATIENT], "LO")]
            if request.issuer:
                conds.append(Condition((0x00100021,), Kind.SINGLE, request.issuer, "LO"))
            rows = self.access.search(who, Query(Level.STUDY, conds))
            places: list[tuple[str, str | None]] = [
                (translate.first_value(r, "0020000D"), None) for r in rows]
        elif level is Level.STUDY:
            places = [(uid, None) for uid in uids[Level.STUDY]]
        else:
            places = self._places(who, request)
        found: dict[str, StoredInstance] = {}
        only = set(uids[Level.IMAGE]) if level is Level.IMAGE else None
        for study, series in dict.fromkeys(places):
            try:
                located = self.access.locate(who, Action.DOWNLOAD, study, series)
            except NotFound:
                continue
            for inst, _ in located:
                if only is None or inst.sop_uid in only:
                    found.setdefault(inst.sop_uid, inst)
        return list(found.values())

    def _places(self, who: Principal,
                request: translate.RetrieveRequest) -> list[tuple[str, str | None]]:
        """(study, series) of the series or instances named at SERIES / IMAGE level."""
        level = request.level
        above = [translate.uid_condition(translate.UNIQUE_KEY[lvl], request.uids[lvl])
                 for lvl in (Level.STUDY, Level.SERIES)[:1 if level is Level.SERIES else 2]
                 if lvl in request.uids]
        places: list[tuple[str, str | None]] = []
        for chunk in translate.chunks(request.uids[level]):
            cond = translate.uid_condition(translate.UNIQUE_KEY[level], chunk)
            for row in self.access.search(who, Query(level, [*above, cond]), audit=False):
                places.append((translate.first_value(row, "0020000D"),
                               translate.first_value(row, "0020000E")))
        return places


class _NotConnected:
    """Stands in for the C-MOVE destination association when the request already failed."""

    is_established = True

    def release(self) -> None:
        pass


class _NoForcedCollect:
    """pynetdicom's accept loop runs a full ``gc.collect()`` every 60 turns (for
    association threads it saw linger): with an archive's heap that is a pause of a tenth
    of a second with the GIL held, which every association of the process waits out.
    Python's own collector frees those cycles anyway."""

    def service_actions(self) -> None:
        pass


class _Server(_NoForcedCollect, ThreadedAssociationServer):
    pass


class _TLSServer(_NoForcedCollect, tls.TLSServer):
    pass


def serve_in_worker(settings: Settings, archive: Archive, access: Access
                    ) -> DicomService | None:
    """This worker process's share of the DICOM listener(s) ``serve`` holds (it checked
    the ports and settings before starting the workers); None when it cannot have it."""
    if not settings.dicom_listeners or not (settings.dicom_port or settings.dicom_tls_port):
        return None
    try:
        shared = listeners.fetch(settings.dicom_listeners)
    except OSError as exc:
        log.error("this worker does not listen for DICOM: %s", exc)
        return None
    service = DicomService(settings, archive, access, shared)
    try:
        service.start()
    except (OSError, DicomshareError) as exc:
        log.error("this worker does not listen for DICOM: %s", exc)
        return None
    return service


class _ArchiveAE(reactor.EventLoopAE):
    """pynetdicom's AE; associations it opens send stored instances from their blobs, and
    go over TLS to peers registered with ``--tls``; its TLS listener handshakes per
    connection (tls.TLSServer)."""

    def __init__(self, service: DicomService, ae_title: str) -> None:
        super().__init__(ae_title)
        self._service = service
        self.event_loops = service.settings.dicom_event_loops

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        tls_server = kwargs.get("ssl_context") is not None
        base = _TLSServer if tls_server else _Server
        shared = self._service.shared.get(listeners.TLS if tls_server else listeners.PLAIN)
        kwargs["server_class"] = (base if shared is None else
                                  listeners.adopting(base, shared, self._service.associations))
        return super().make_server(*args, **kwargs)

    def associate(self, *args: Any, **kwargs: Any) -> Association:
        """Every association the SCP opens comes here (C-MOVE sub-operations, storage
        commitment reports): the one place that decides TLS for them."""
        if kwargs.pop(_NO_CONNECT, False):
            return cast(Association, _NotConnected())
        settings = self._service.settings
        peer: RemoteAE | None = kwargs.pop(_PEER, None)
        if peer is None and kwargs.get("ae_title"):
            peer = self._service.registry.get(str(kwargs["ae_title"]))
        handshake = tls.for_peer(settings, peer)
        if handshake is not None:
            kwargs["tls_args"] = handshake.tls_args
        kwargs["evt_handlers"] = [*(kwargs.get("evt_handlers") or []),
                                  (evt.EVT_CONN_OPEN, _no_delay)]
        kwargs.setdefault("max_pdu", settings.dicom_max_pdu)
        assoc = super().associate(*args, **kwargs)
        if handshake is not None and handshake.error and not assoc.is_established:
            log.warning("cannot associate with %s: %s", kwargs["ae_title"], handshake.error)
        assoc.dul._run_loop_delay = 0.0005  # see Inbox.install
        outbound.send_from_blobs(self._service.archive, assoc)
        assoc._dicomshare_outbound = True  # type: ignore[attr-defined]
        return assoc


# -- helpers ------------------------------------------------------------------------------
# Every public syntax, compressed ones first: a proposer that offers its native syntax
# beside uncompressed fallbacks gets the native one (see _prefer_proposed for the order).
STORAGE_SYNTAXES = sorted((str(uid) for uid in AllTransferSyntaxes),
                          key=lambda uid: transfer.is_native(uid))


class _Contexts(list[PresentationContext]):
    """The supported contexts, which pynetdicom deep-copies for every association (35 ms
    for ~200 contexts of ~40 syntaxes each). Only the transfer syntax lists change per
    association (_prefer_proposed) and UIDs are immutable: copy the lists, not the UIDs."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        out = []
        for cx in self:
            clone = copy.copy(cx)
            clone._transfer_syntax = list(cx._transfer_syntax)
            out.append(clone)
        return out


def _prefer_proposed(assoc: Association) -> None:
    """pynetdicom gives each context the first syntax of *our* list that it offers; order
    our list (for this association) so that this is the proposer's first choice."""
    proposed: dict[str, list[list[str]]] = {}
    primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
    for cx in primitive.presentation_context_definition_list:
        proposed.setdefault(str(cx.abstract_syntax), []).append(
            [str(ts) for ts in cx.transfer_syntax])
    for cx in assoc.acceptor.supported_contexts:
        lists = proposed.get(str(cx.abstract_syntax))
        if lists:
            order = _syntax_order(lists, [str(ts) for ts in cx.transfer_syntax])
            cx.transfer_syntax = [UID(ts) for ts in order]


def _syntax_order(proposals: list[list[str]], ours: list[str]) -> list[str]:
    """Our syntaxes, each proposal's first one before its others as far as the proposals
    agree (a context may offer the same syntax as another, in another order: the same
    abstract syntax in several contexts, one per stored syntax, is common)."""
    lists = [offered for p in proposals if (offered := [ts for ts in p if ts in ours])]
    nodes = list(dict.fromkeys(ts for offered in lists for ts in offered))
    later: dict[str, set[str]] = {ts: set() for ts in nodes}
    for first, *rest in lists:
        later[first].update(ts for ts in rest if ts != first)
    waiting = {ts: sum(ts in after for after in later.values()) for ts in nodes}
    order: list[str] = []
    while nodes:  # topological order; on a cycle, the earliest proposed goes first
        ts = next((t for t in nodes if waiting[t] == 0), nodes[0])
        nodes.remove(ts)
        order.append(ts)
        for t in later[ts]:
            waiting[t] -= 1
    return order + [ts for ts in ours if ts not in order]


def _reject(assoc: Association, result: int, diagnostic: int) -> None:
    """A-ASSOCIATE-RJ from the service user (PS3.8 9.3.4): 0x01 permanent, 0x02 transient;
    diagnostic 0x03 calling AE title not recognised, 0x01 no reason given."""
    assoc.acse.send_reject(result, 0x01, diagnostic)
    assoc.kill()


def _lean_responses(assoc: Association, interval: float) -> None:
    """Send sub-operation progress (the pending C-MOVE / C-GET responses, which PS3.4
    C.4.2.3 lets an SCP send or not) for the first sub-operation and then at most every
    ``interval`` seconds; the final response always goes. pynetdicom sends one after every
    sub-operation: encoding them was a third of a C-MOVE's time. A C-STORE response with
    nothing but its status is encoded here (wire.py) on associations that can take it."""
    send = assoc.dimse.send_msg
    last: dict[int, float] = {}  # request message id -> when its last pending response went

    def send_msg(primitive: Any, context_id: int) -> None:
        if (isinstance(primitive, C_STORE) and primitive.Status is not None
                and primitive.ErrorComment is None and primitive.OffendingElement is None
                and reactor.installed(assoc)):
            command = wire.c_store_rsp(primitive.AffectedSOPClassUID,
                                       primitive.AffectedSOPInstanceUID,
                                       int(primitive.MessageIDBeingRespondedTo or 0),
                                       int(primitive.Status))
            reactor.send_raw(assoc, wire.message(context_id, command,
                                                 assoc.dimse.maximum_pdu_size))
            return
        if isinstance(primitive, C_MOVE | C_GET) and primitive.Status is not None:
            key = int(primitive.MessageIDBeingRespondedTo or 0)
            if primitive.Status == 0xFF00:
                now = time.monotonic()
                if key in last and now - last[key] < interval:
                    return
                last[key] = now
            else:
                last.pop(key, None)
        send(primitive, context_id)

    setattr(assoc.dimse, "send_msg", send_msg)  # noqa: B010


def _quiet(assoc: Association) -> None:
    """Unbind pynetdicom's logging handlers while its logger would drop what they say:
    they format every received and sent message and PDU (a few percent of a C-STORE)."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in ((evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
                           (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
                           (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
                           (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler)):
        assoc.unbind(event, handler)


def _no_delay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


