"""A thread that claims and runs queued jobs of one kind (exports, DICOM transfers).

Subclasses say how to run one job (:meth:`Worker.run_once`); this owns the loop: run
jobs while there are any, then wait ``poll`` seconds or until ``wake`` is set (a job was
queued in this process). ``stopping`` is set by :meth:`stop`, for a running job to see.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Worker:
    thread_name = "worker"  # also how a failure is logged

    def __init__(self, poll_seconds: float, wake: threading.Event | None = None) -> None:
        self.poll = poll_seconds
        self.wake = wake or threading.Event()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none to run."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name,
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                ran = self.run_once()
            except Exception:  # noqa: BLE001 - a broken job must not stop the worker
                log.exception("%s", self.thread_name)
                ran = False
            if not ran:
                self.wake.wait(self.poll)
                self.wake.clear()
