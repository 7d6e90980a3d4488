"""DICOM TLS (PS3.15 Annex B, secure transport connection profiles): the TLS contexts.

A clinic and a hospital exchange studies over the internet without a VPN: the listener
on ``dicom_tls_port`` and every association we open to a peer registered with ``--tls``
(``dimse/scu.py``, and the SCP's C-MOVE and storage commitment associations) build
their TLS here, so both directions follow one policy:

- TLS 1.2 at least, Python's default (forward-secret) cipher suites
  (``ssl.create_default_context``);
- the listener presents ``dicom_tls_cert`` / ``dicom_tls_key``; with ``dicom_tls_ca`` it
  requires a client certificate signed by that CA (mutual TLS);
- as a client we verify the peer's certificate and host name against ``dicom_tls_ca``
  (else the system CAs) and present our certificate when one is configured.

Misconfiguration is an :class:`InvalidInput` naming the file and what is wrong with it,
raised when the server starts rather than at the first association. pynetdicom only logs
why a handshake failed; :class:`Handshake` keeps the reason so that the caller can say it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.transport import ThreadedAssociationServer

from dicomshare.config import Settings
from dicomshare.errors import InvalidInput

if TYPE_CHECKING:
    from dicomshare.dimse.aes import RemoteAE

log = logging.getLogger(__name__)

_FLAGS = {"cert": "--dicom-tls-cert", "key": "--dicom-tls-key", "ca": "--dicom-tls-ca"}


# -- contexts ---------------------------------------------------------------------------------
def configured(settings: Settings) -> bool:
    """Whether any TLS setting is given (then it must be usable)."""
    return bool(settings.dicom_tls_port or settings.dicom_tls_cert or settings.dicom_tls_key
                or settings.dicom_tls_ca)


def server_context(settings: Settings) -> ssl.SSLContext:
    """The listener's context; InvalidInput when a file is missing, unreadable or wrong."""
    cert, key, ca = settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca
    if not (cert and key):
        raise InvalidInput("--dicom-tls-port needs --dicom-tls-cert and --dicom-tls-key "
                           "(PEM files: our certificate and its private key)")
    if ca:
        _read("ca", ca)
    context = _default(ssl.Purpose.CLIENT_AUTH, ca)
    _load_chain(context, cert, key)
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only clients our CA signed
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context for associations to TLS peers, built once per set of files (a renewed
    certificate, with a new modification time, is read again)."""
    cert, key, ca = settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca
    if bool(cert) != bool(key):
        raise InvalidInput("--dicom-tls-cert and --dicom-tls-key go together")
    stamps = tuple(_mtime(name, path) for name, path in (("cert", cert), ("key", key),
                                                          ("ca", ca)))
    return _client_context(cert, key, ca, stamps)


@functools.lru_cache(maxsize=4)
def _client_context(cert: str, key: str, ca: str, _stamps: tuple[float, ...]) -> ssl.SSLContext:
    if ca:
        _read("ca", ca)
    context = _default(ssl.Purpose.SERVER_AUTH, ca)  # verifies certificate and host name
    if cert:
        _load_chain(context, cert, key)
    context.sslsocket_class = _Recording
    return context


def _default(purpose: ssl.Purpose, ca: str) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(purpose, cafile=ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise InvalidInput(f"DICOM TLS CA file ({_FLAGS['ca']}) {ca}: no usable PEM "
                           f"certificate in it ({_reason(exc)})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    if b"CERTIFICATE-----" not in _read("cert", cert):
        raise InvalidInput(f"DICOM TLS certificate ({_FLAGS['cert']}) {cert} is not a PEM "
                           "certificate")
    key_text = _read("key", key)
    if b"PRIVATE KEY-----" not in key_text:
        raise InvalidInput(f"DICOM TLS key ({_FLAGS['key']}) {key} is not a PEM private key")
    if b"ENCRYPTED" in key_text:
        raise InvalidInput(f"DICOM TLS key ({_FLAGS['key']}) {key} is protected by a "
                           "passphrase: give the key unencrypted, readable by the server only")
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")  # never prompt
    except (ssl.SSLError, OSError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise InvalidInput(f"DICOM TLS key {key} does not belong to the certificate "
                               f"{cert}") from exc
        raise InvalidInput(f"DICOM TLS certificate {cert} with key {key} cannot be used: "
                           f"{_reason(exc)}") from exc


def _read(name: str, path: str) -> bytes:
    what = {"cert": "certificate", "key": "key", "ca": "CA file"}[name]
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"DICOM TLS {what} ({_FLAGS[name]}) {path}: "
                           f"{exc.strerror or exc}") from exc


def _mtime(name: str, path: str) -> float:
    if not path:
        return 0.0
    try:
        return os.stat(path).st_mtime
    except OSError:
        _read(name, path)  # raises the clear error
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason or exc)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- the client side: why a handshake failed ---------------------------------------------
def for_peer(settings: Settings, peer: RemoteAE | None) -> Handshake | None:
    """What an association to ``peer`` passes as ``tls_args`` (``.tls_args``); None for a
    peer not registered with ``--tls``. Every outbound association asks here."""
    if peer is None or not peer.tls:
        return None
    hide_tls_tracebacks()
    return Handshake(client_context(settings), peer.host, peer.port, settings.dicom_tls_ca)


class Handshake:
    """One outbound TLS association's ``tls_args`` for pynetdicom, keeping the reason a
    handshake (or the peer's verdict on our certificate, which TLS 1.3 sends after it)
    failed: pynetdicom logs it and reports nothing but "not connected"."""

    def __init__(self, context: ssl.SSLContext, host: str, port: int, ca: str = "") -> None:
        self._context = context
        self.host, self.port, self.ca = host, port, ca
        self.error: str | None = None

    @property
    def tls_args(self) -> tuple[ssl.SSLContext, str]:
        return cast(ssl.SSLContext, self), self.host  # pynetdicom calls wrap_socket only

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    server_hostname: str | None = None, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = self._context.wrap_socket(sock, server_side=server_side,
                                            server_hostname=server_hostname, **kwargs)
        if isinstance(wrapped, _Recording):
            wrapped.handshake = self
        return wrapped

    def failed(self, exc: OSError) -> None:
        if self.error is not None:
            return
        where = f"{self.host}:{self.port}"
        reason = _reason(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            trusted = f"the CA in {self.ca}" if self.ca else "the system CAs"
            self.error = (f"TLS handshake failed: the certificate of {where} does not verify "
                          f"against {trusted}: {reason}")
        elif isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason or "") and (
                "CERTIFICATE" in str(exc.reason) or "UNKNOWN_CA" in str(exc.reason)):
            self.error = (f"TLS: {where} refused our client certificate ({reason}); it "
                          "needs one its CA signed (--dicom-tls-cert / --dicom-tls-key)")
        elif isinstance(exc, TimeoutError):
            self.error = f"TLS handshake with {where} timed out"
        else:
            self.error = (f"TLS handshake with {where} failed ({reason}); is {self.port} "
                          "the peer's DICOM TLS port?")


class _Recording(ssl.SSLSocket):
    """The client context's sockets: a failure is handed to their Handshake, then raised
    as before (pynetdicom ends the association)."""

    handshake: Handshake | None = None

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            if self.handshake is not None:
                self.handshake.failed(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:  # e.g. TLS 1.3: the server refuses our certificate
            if self.handshake is not None:
                self.handshake.failed(exc)
            raise

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:  # how reactor.py reads PDUs
            return super().recv_into(buffer, nbytes, flags)
        except ssl.SSLError as exc:
            if self.handshake is not None:
                self.handshake.failed(exc)
            raise


# -- the listener -----------------------------------------------------------------------------
class TLSServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the handshake moved out of the accept loop.

    pynetdicom handshakes while accepting, in the one thread that accepts everyone: a
    client that connects and sends nothing would hold the port shut. Here each
    connection's own thread handshakes, within the AE's connection timeout, and a failed
    handshake (a plain DICOM client, a certificate our CA did not sign) is one log line.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        context = cast(ssl.SSLContext, self.ssl_context)
        try:
            wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()
            raise
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._handshake(request, client_address):
            super().finish_request(request, client_address)
        else:
            self.shutdown_request(request)

    def _handshake(self, request: ssl.SSLSocket, client_address: Any) -> bool:
        source = ":".join(str(part) for part in tuple(client_address)[:2])
        before = request.gettimeout()
        try:
            request.settimeout(self.ae.connection_timeout or 30)
            request.do_handshake()
            request.settimeout(before)
        except OSError as exc:
            quiet = isinstance(exc, ssl.SSLEOFError | ConnectionError) or (
                isinstance(exc, ssl.SSLError) and "EOF" in str(exc.reason or ""))
            (log.info if quiet else log.warning)(
                "DICOM TLS: handshake with %s failed: %s", source, _client_fault(exc))
            return False
        log.debug("DICOM TLS: %s connected (%s, client certificate %s)", source,
                  request.version(), _subject(request))
        return True


def _client_fault(exc: OSError) -> str:
    """Why a client's handshake failed, in an operator's words."""
    reason = _reason(exc)
    code = str(getattr(exc, "reason", "") or "")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its client certificate does not verify against --dicom-tls-ca: {reason}"
    if code == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "it sent no client certificate (required: --dicom-tls-ca is set)"
    if code in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return f"it does not speak TLS ({reason}): a plain DICOM client on the TLS port?"
    return reason


def _subject(sock: ssl.SSLSocket) -> str:
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    names = [str(pair[1]) for rdn in cert.get("subject", ()) for pair in rdn
             if pair[0] == "commonName"]
    return ", ".join(names) or "none"


class _HideTLSTracebacks(logging.Filter):
    """pynetdicom logs a TLS failure with its traceback; the reason is reported anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ssl.SSLError):
            record.exc_info, record.exc_text = None, None
            if record.msg is exc:
                record.msg = f"TLS: {_reason(exc)}"
        return True


@functools.cache
def hide_tls_tracebacks() -> None:
    """Once per process, before the first TLS association."""
    for name in ("pynetdicom.transport", "pynetdicom.dul"):
        logging.getLogger(name).addFilter(_HideTLSTracebacks())
