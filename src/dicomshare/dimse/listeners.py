"""One DICOM listening socket shared by every worker process, and who accepts from it.

With SO_REUSEPORT each worker had a socket of its own and the kernel spread connections
over them by a hash of the addresses: four modalities landed 2+2, 3+1 or 4+0 on two
workers, and one worker's GIL then held three or four associations while the other
idled (measured: 247 inst/s for 2+2, 195-223 for 3+1, 170 for 4+0). Now ``serve`` binds
the port once and hands the listening socket to each worker over a Unix socket
(SCM_RIGHTS, only to processes of the same user); all workers accept from it, and one
that already serves associations waits a little before it takes the next connection
(:class:`Balanced`), so an idle worker gets it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WAIT_PER_ASSOCIATION = 0.002  # seconds a worker yields the next connection per association
WAIT_MAX = 0.02
PLAIN, TLS = "dicom", "dicom-tls"
_NAMES = (PLAIN, TLS)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (non-blocking: several processes accept from it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Handout:
    """In ``serve``: gives the listening sockets to the worker processes that ask."""

    def __init__(self, sockets: dict[str, socket.socket]) -> None:
        self.sockets = sockets
        # Linux: the abstract namespace (no file; "@" stands for the NUL an environment
        # cannot hold), limited to this user's processes by SO_PEERCRED. Elsewhere a
        # socket file in a private folder.
        name = f"dicomshare-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._folder = None if sys.platform == "linux" else tempfile.mkdtemp()
        self.address = (f"@{name}" if self._folder is None
                        else os.path.join(self._folder, "dicom.sock"))
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(_unix(self.address))
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, name="dicom-listeners",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        names = [n for n in _NAMES if n in self.sockets]
        fds = [self.sockets[n].fileno() for n in names]
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    pid, uid = _peer(conn)
                    if uid != os.getuid():
                        log.warning("refused DICOM listeners to process %d of user %d",
                                    pid, uid)
                        continue
                    socket.send_fds(conn, [",".join(names).encode()], fds)
                except OSError as exc:
                    log.warning("could not hand the DICOM listeners over: %s", exc)

    def close(self) -> None:
        self._server.close()
        for sock in self.sockets.values():
            sock.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and user id (the folder's mode guards elsewhere)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return -1, os.getuid()
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def fetch(address: str) -> dict[str, socket.socket]:
    """In a worker: the listening sockets ``serve`` holds (OSError when it cannot)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(_unix(address))
        message, fds, _, _ = socket.recv_fds(conn, 1024, len(_NAMES))
    names = message.decode().split(",") if message else []
    if len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise OSError(f"the DICOM listeners did not arrive ({len(fds)} of {len(names)})")
    return {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}


def _unix(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


class Balanced:
    """For a socketserver class: adopt an already listening, shared socket instead of
    binding, and take a new connection only after waiting ``WAIT_PER_ASSOCIATION`` per
    association this process already serves (another, idler worker takes it first)."""

    shared: socket.socket
    busy: Callable[[], int]

    def server_bind(self) -> None:
        own: socket.socket = self.socket  # type: ignore[has-type]
        own.close()
        self.socket = self.shared
        self.server_address = self.shared.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def get_request(self) -> Any:
        wait = min(WAIT_MAX, WAIT_PER_ASSOCIATION * self.busy())
        if wait:
            time.sleep(wait)
        return super().get_request()  # type: ignore[misc]  # BlockingIOError: taken


def adopting(base: type, shared: socket.socket, busy: Callable[[], int]) -> type:
    """``base`` (a pynetdicom server class) serving the shared socket."""
    return type(f"Balanced{base.__name__}", (Balanced, base), {"shared": shared,
                                                               "busy": staticmethod(busy)})
