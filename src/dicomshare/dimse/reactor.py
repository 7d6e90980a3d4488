"""Event-driven loops for the associations the SCP accepts.

pynetdicom runs two threads per association and both poll: the upper layer (DUL) sleeps
between looks at its socket and queues, the association thread sleeps 1 ms between looks
for a complete DIMSE message. Every C-STORE pays those sleeps on its way in and its
response on its way out, and every idle association wakes thousands of times a second,
so several modalities at once mostly fight over the GIL.

:func:`install` (called before the association's threads start: on the SCP when a peer
connects, in :class:`EventLoopAE` for the associations we open) makes both threads wait
for what they wait for instead:

- the DUL thread blocks in ``select()`` on its socket and on a wake-up socket pair, which
  is written to whenever a primitive is queued for it to send;
- the association thread blocks on an event set whenever the DUL hands it a DIMSE
  message or an ACSE primitive (release, abort).

Both still wake at least every ``_TICK`` seconds, for what nothing signals (timers, a
dead peer thread, a kill from elsewhere). The loops keep pynetdicom's steps and their
order, including the pause checkpoint that C-GET / C-MOVE senders rely on; only the
waiting differs. The upper layer also writes :class:`RawPData` (PDUs wire.py encoded) to
the socket as they are, which only these loops know how to do: :func:`send_raw` is for
associations with them (:func:`installed`). Tied to pynetdicom 3.0's internals (as scp.py
is): the version is pinned.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AddressInformation, AssociationSocket

log = logging.getLogger(__name__)

_TICK = 0.01  # seconds: the longest wait without a signal
_QUEUED_RAW = 2  # encoded chunks waiting for the socket before a sender waits
_SENDING_STATES = ("Sta6", "Sta7")  # established, or awaiting a release (PS3.8 9.2)
_PREALLOCATE = 1 << 20  # bytes of a PDU read ahead of what has arrived
_P_DATA_TF = 0x04
_STRAIGHT_MAX = 16 << 20  # larger P-DATA-TF PDUs are left to pynetdicom (and its errors)
_PDU_HEAD = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L")


class RawPData(P_DATA):
    """P-DATA-TF PDUs already encoded; the upper layer writes them to the socket as
    they are (DT-1 / AR-7 of PS3.8 without building PDU objects)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw


class _SignalQueue(queue.Queue[Any]):
    """A queue that calls ``signal`` after every put."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class _Waker:
    """A socket pair: a byte written to one end makes ``select()`` on the other return."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        try:
            self.writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed at the end

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def install(assoc: Association) -> None:
    """Replace the polling of an accepted association's two threads (before they start)."""
    dul = assoc.dul
    if dul.is_alive():  # too late to change its loop: leave this association as it is
        return
    waker = _Waker()
    news = threading.Event()
    dul.to_provider_queue = _SignalQueue(waker.wake)
    assoc._dicomshare_loops = True  # type: ignore[attr-defined]
    dul.to_user_queue = _SignalQueue(news.set)
    assoc.dimse.msg_queue = _SignalQueue(news.set)
    # threading.Thread keeps the target pynetdicom bound at __init__ in _target.
    setattr(dul, "_target", lambda: _run_dul(dul, waker))  # noqa: B010
    setattr(assoc, "_run_reactor", lambda: _run_association(assoc, news))  # noqa: B010
    if dul.socket is not None:  # an acceptor's; an outbound one gets it in EventLoopAE
        read_whole_pdus(dul.socket)


def read_whole_pdus(sock: AssociationSocket) -> None:
    setattr(sock, "recv", _Receiver(sock))  # noqa: B010


class _Receiver:
    """``AssociationSocket.recv`` reading a PDU in as few calls as the network allows.

    pynetdicom reads 4 KiB per call and appends each piece: 128 calls for a 512 KiB CT
    slice. This reads into one buffer sized from the PDU length, and at most
    ``_PREALLOCATE`` ahead of what arrived (the length is the peer's word, up to 4 GiB).
    Same result: the bytes asked for, or fewer when the peer closed the connection.
    """

    def __init__(self, owner: AssociationSocket) -> None:
        self._owner = owner

    def __call__(self, nr_bytes: int) -> bytearray:
        sock = self._owner.socket
        assert sock is not None
        data = bytearray(min(nr_bytes, _PREALLOCATE))
        got = 0
        while True:
            with memoryview(data) as room:
                while got < len(data):
                    n = sock.recv_into(room[got:])
                    if not n:  # closed by the peer: what arrived so far
                        break
                    got += n
            if got < len(data):
                del data[got:]
                return data
            if got >= nr_bytes:
                return data
            data.extend(bytes(min(nr_bytes - got, _PREALLOCATE)))


def installed(assoc: Association) -> bool:
    """Whether the association runs these loops (and so can take RawPData)."""
    return bool(getattr(assoc, "_dicomshare_loops", False))


def send_raw(assoc: Association, chunks: Iterable[bytes]) -> None:
    """Queue encoded PDUs for the upper layer, in order, with at most a few chunks waiting
    (a large object is read as fast as it is sent, not into memory); stops early when the
    association ends (the caller's wait for a response then notices)."""
    dul = assoc.dul
    for chunk in chunks:
        while _raw_waiting(dul) >= _QUEUED_RAW:
            if not dul.is_alive() or assoc.is_aborted:
                return
            time.sleep(0.0002)
        dul.send_pdu(RawPData(chunk))


def _raw_waiting(dul: Any) -> int:
    return sum(isinstance(p, RawPData) for p in list(dul.to_provider_queue.queue))


class EventLoopAE(AE):
    """pynetdicom's AE whose outbound associations get the event-driven loops: the socket
    is made after the association and before its threads start, the one place to hook."""

    event_loops = True

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if self.event_loops:
            install(assoc)
            read_whole_pdus(sock)
        return sock


def _run_dul(dul: Any, waker: _Waker) -> None:
    """The DUL loop: send what is queued or read what arrived, one step at a time, then
    run the state machine's event; wait only when there was nothing to do."""
    dul._idle_timer.start()
    try:
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if _send_raw_head(dul):
                    continue
                if dul._process_recv_primitive():
                    pass
                elif _receive_data_set(dul) or dul._is_transport_event():
                    dul._idle_timer.restart()
            except Exception:
                log.exception("upper layer failed; aborting the association")
                _abort(dul)
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                _wait(dul, waker)
                continue
            dul.state_machine.do_action(event)
    finally:
        waker.close()


def _send_raw_head(dul: Any) -> bool:
    """Write a RawPData at the head of the send queue (where pynetdicom would run DT-1);
    False when the head is anything else. Outside the sending states it is dropped, as
    pynetdicom would refuse a P-DATA there."""
    pending = dul.to_provider_queue.queue
    if not pending or not isinstance(pending[0], RawPData):
        return False
    primitive = dul.to_provider_queue.get(False)
    if dul.state_machine.current_state in _SENDING_STATES and dul.socket is not None:
        # A memoryview: AssociationSocket.send re-slices what is left after a partial send
        # (TLS, a socket timeout), which must not copy megabytes each time.
        dul.socket.send(memoryview(primitive.raw))  # a failure queues Evt17 (closed)
    return True


def _receive_data_set(dul: Any) -> bool:
    """Read a P-DATA-TF PDU that carries only data set fragments of a message whose data
    set is being streamed (a C-STORE: inbox.py), and hand the fragments straight to it;
    False (the socket untouched) for anything else.

    pynetdicom builds PDU, PDV and primitive objects, copies each fragment four times and
    runs DT-2 for every PDU; of the six PDUs a CT slice arrives in from DCMTK (128 KiB
    PDVs) only the command needs that.
    The fragment that ends the data set still goes to pynetdicom's DIMSE provider, alone
    (DT-2 without the PDU objects), so the message completes as before. Commands, other
    PDUs and TLS associations (no peeking there) go pynetdicom's way. EVT_DATA_RECV /
    EVT_PDU_RECV are not raised for the PDUs read here (nothing of ours binds them)."""
    if dul.state_machine.current_state != "Sta6" or dul.socket is None:
        return False
    sink = getattr(dul.assoc.dimse.message, "data_set", None)
    write = getattr(sink, "fragment_writer", lambda: None)()
    sock = dul.socket.socket
    if write is None or sock is None or isinstance(sock, ssl.SSLSocket):
        return False
    try:
        head = sock.recv(_PDU_HEAD.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False  # pynetdicom's own read reports the closed connection
    if len(head) < _PDU_HEAD.size:
        return False
    pdu_type, _, length = _PDU_HEAD.unpack(head)
    if pdu_type != _P_DATA_TF or length > _STRAIGHT_MAX:
        return False
    try:
        pdu = dul.socket.recv(_PDU_HEAD.size + length)
    except (OSError, TimeoutError):
        dul.event_queue.put("Evt17")  # as pynetdicom: the connection closed mid-PDU
        return True
    if len(pdu) != _PDU_HEAD.size + length:
        dul.event_queue.put("Evt17")
        return True
    fragments = _data_fragments(pdu)
    if fragments is None:  # a command fragment, or malformed: pynetdicom's way
        _decoded(dul, pdu)
        return True
    *before, (context_id, control, final) = fragments
    for _, _, fragment in before:
        write(fragment)
    if control & 0x02:  # the message is complete: DT-2 with only its last fragment
        primitive = P_DATA()
        pdv: Any = [context_id, bytes([control]) + final]  # a list: pynetdicom's setter
        primitive.presentation_data_value_list = [pdv]  # checks for lists, not tuples
        dul.assoc.dimse.receive_primitive(primitive)
    else:
        write(final)
    return True


def _data_fragments(pdu: bytearray) -> list[tuple[int, int, memoryview]] | None:
    """(context ID, message control header, value) of each PDV when all are data set
    fragments and only the last may end the data set (PS3.8 E.2); None otherwise."""
    view, offset, end = memoryview(pdu), _PDU_HEAD.size, len(pdu)
    fragments: list[tuple[int, int, memoryview]] = []
    while offset < end:
        if end - offset < 6:
            return None
        (length,) = _PDV_LENGTH.unpack_from(pdu, offset)
        context_id, control = pdu[offset + 4], pdu[offset + 5]
        if (length < 2 or offset + 4 + length > end or control & 0x01
                or (fragments and fragments[-1][1] & 0x02)):
            return None
        fragments.append((context_id, control, view[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return fragments or None


def _decoded(dul: Any, pdu: bytearray) -> None:
    """What pynetdicom's ``_read_pdu_data`` does with a PDU it has read."""
    try:
        decoded, event = dul._decode_pdu(pdu)
    except Exception:
        log.exception("cannot decode a received PDU")
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(decoded)


def _wait(dul: Any, waker: _Waker) -> None:
    """Until the socket is readable, a primitive is queued, or a tick passes."""
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        time.sleep(0.001)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes select() cannot see
    try:
        select.select([sock, waker.reader], [], [], _TICK)
    except (OSError, ValueError):  # closed under us: the next step notices
        time.sleep(0.001)
        return
    waker.drain()


def _abort(dul: Any) -> None:
    """What pynetdicom does when its loop fails: an A-ABORT, then both threads end."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = 0x00
    try:
        dul.socket.send(pdu.encode())
    except Exception:  # the peer may be gone already
        pass
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True
    dul._kill_thread = True


def _run_association(assoc: Any, news: threading.Event) -> None:
    """The acceptor loop: serve each complete DIMSE message, answer a release, notice an
    abort, a dead DUL or the network timeout. Between messages it counts as paused (it
    touches no queue until it has passed the checkpoint), so a sender holding the
    checkpoint never waits for it to wake."""
    dimse, acse, dul = assoc.dimse, assoc.acse, assoc.dul
    assoc._is_paused = False
    while not assoc._kill:
        assoc._is_paused = True
        if dimse.msg_queue.empty() and dul.to_user_queue.empty():
            news.wait(_TICK)
        news.clear()
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False

        context_id, msg = dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)

        if assoc.is_established and acse.is_release_requested():
            acse.send_release(is_response=True)
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if acse.is_aborted():
            dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not dul.is_alive():
            assoc.kill()
            return
        if dul.idle_timer_expired():
            log.error("DICOM network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
