"""The parent process of ``dicomshare serve`` with several workers, once it has checked.

Before workers start, ``serve`` opens the archive (migrations), creates the first admin,
checks that the DICOM ports and TLS settings work and binds the DICOM ports. That needs
most of dicomshare imported: about 90 MiB that the parent then kept for nothing, since
it only watches its workers. So ``serve`` replaces itself (``exec``: same process ID,
same signals) with :func:`main`, which imports only the configuration, uvicorn's worker
manager and the hand-over of the DICOM listening sockets to the workers
(dimse/listeners.py). The bound sockets cross the ``exec`` as inherited descriptors,
named in ``DICOMSHARE_SUPERVISE_SOCKETS`` (``dicom=5,dicom-tls=6``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from typing import Any, NoReturn

from dicomshare.config import Settings, load_settings, settings_environment

SOCKETS = "DICOMSHARE_SUPERVISE_SOCKETS"


def become(settings: Settings, sockets: dict[str, socket.socket]) -> NoReturn:
    """Replace this process with the supervisor; ``settings.workers`` must be set."""
    for sock in sockets.values():
        sock.set_inheritable(True)
    env = dict(os.environ, **settings_environment(settings))
    env[SOCKETS] = ",".join(f"{name}={sock.fileno()}" for name, sock in sockets.items())
    sys.stdout.flush()
    sys.stderr.flush()
    # The command line stays readable in ps: ... -m dicomshare.supervisor serve --http-port ...
    os.execve(sys.executable, [sys.executable, "-m", __name__, *sys.argv[1:]], env)


def main() -> int:
    from dicomshare.dimse import listeners

    settings = load_settings()
    sockets = {}
    for part in filter(None, os.environ.pop(SOCKETS, "").split(",")):
        name, fd = part.split("=", 1)
        sockets[name] = socket.socket(fileno=int(fd))
        sockets[name].set_inheritable(False)  # the workers fetch them from the handout
    handout = listeners.Handout(sockets) if sockets else None
    if handout is not None:
        settings = dataclasses.replace(settings, dicom_listeners=handout.address)
        os.environ.update(settings_environment(settings))  # what the workers read
    try:
        run_workers(settings)
    finally:
        if handout is not None:
            handout.close()
    return 0


def http_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn serves HTTP, with one worker or several."""
    return dict(host=settings.http_host, port=settings.http_port,
                log_level=settings.log_level, access_log=False, timeout_keep_alive=30)


def run_workers(settings: Settings) -> None:
    """uvicorn's worker manager: ``settings.workers`` processes, each building the app
    from the environment (which must hold ``settings``)."""
    import uvicorn

    # uvicorn kills a worker that does not answer its health ping in time (5 s by
    # default), dropping the requests in flight; a busy worker on a loaded machine
    # (de-identifying, rendering) can be that slow without being hung.
    uvicorn.run("dicomshare.web.app:app_from_env", factory=True, workers=settings.workers,
                timeout_worker_healthcheck=60, **http_options(settings))


if __name__ == "__main__":
    sys.exit(main())
