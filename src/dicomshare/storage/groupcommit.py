"""Group commit: concurrent callers share one index transaction.

Each commit costs an fsync; with several modalities or STOW clients sending at once,
the thread that finds the index idle commits everything queued so far in one
transaction, and the others wait for their share of the outcomes. One caller alone
sees no difference; N callers pay roughly one commit instead of N.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicomshare.storage.base import Index, InstanceRecord, Outcome


@dataclass
class _Slot:
    records: Sequence[InstanceRecord]
    outcomes: list[Outcome] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False


class GroupCommit:
    def __init__(self, index: Index) -> None:
        self.index = index
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._busy = False

    def add(self, records: Sequence[InstanceRecord]) -> list[Outcome]:
        slot = _Slot(records)
        with self._cond:
            self._pending.append(slot)
            while not slot.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                batch, self._pending = self._pending, []
                self._cond.release()
                try:
                    self._commit(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.outcomes

    def _commit(self, batch: list[_Slot]) -> None:
        try:
            outcomes = self.index.add([rec for slot in batch for rec in slot.records])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for slot in batch:
                slot.error, slot.done = exc, True
            return
        start = 0
        for slot in batch:
            slot.outcomes = outcomes[start:start + len(slot.records)]
            start += len(slot.records)
            slot.done = True
