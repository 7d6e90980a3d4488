"""Storage Commitment Push Model SCP (PS3.4 Annex J), a part of the DICOM service.

N-ACTION asks whether instances are safely stored; the answer (N-EVENT-REPORT) goes on
the same association when it is still open, else on a new one to the registered AE.
Only instances the caller may see count: commitment never confirms someone else's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from pynetdicom.presentation import build_context, build_role
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicomshare.access.policy import Action, Principal, visibility
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.matching import Query
from dicomshare.dimse import translate
from dicomshare.errors import DicomshareError

if TYPE_CHECKING:
    from pynetdicom import AE

    from dicomshare.access.service import Access
    from dicomshare.archive import Archive
    from dicomshare.config import Settings
    from dicomshare.dimse.aes import AERegistry

log = logging.getLogger(__name__)
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
SUCCESS = 0x0000


class StorageCommitment:
    """Mixed into DicomService, whose attributes it uses."""

    settings: Settings
    archive: Archive
    access: Access
    registry: AERegistry
    ae: AE
    _inbox: Callable[[Association], Any]
    _caller: Callable[[Association], Principal]

    def _on_n_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """Accept the request now; answer it with N-EVENT-REPORT once the response is out."""
        request = event.request
        if str(getattr(request, "RequestedSOPInstanceUID", "")) != COMMITMENT_INSTANCE:
            return translate.failure(0x0112, "not the Storage Commitment SOP Instance "
                            f"{COMMITMENT_INSTANCE}"), None
        if event.action_type != 1:
            return translate.failure(0x0123, f"no action type {event.action_type} (only 1)"), None
        try:
            transaction, refs = translate.commitment_request(event.action_information)
        except Exception as exc:  # noqa: BLE001
            reason = exc.reason if isinstance(exc, DicomshareError) else str(exc)
            return translate.failure(0x0115, f"invalid Action Information: {reason}"), None
        assoc = event.assoc
        report = partial(self._commitment_report, assoc, transaction, refs)
        inbox = self._inbox(assoc)
        if inbox is not None:
            inbox.after_response(report)
        else:
            threading.Thread(target=report, daemon=True).start()
        return SUCCESS, None

    def _commitment_report(self, assoc: Association, transaction: str,
                           refs: list[tuple[str, str]]) -> None:
        """On the same association when it is still open, else on a new one to the AE."""
        try:
            info, event_type = self._commitment(self._caller(assoc), transaction, refs)
        except Exception:
            log.exception("storage commitment %s failed", transaction)
            return
        if assoc.is_established and not isinstance(assoc.dul.peek_next_pdu(),
                                                   A_RELEASE | A_ABORT | A_P_ABORT):
            try:
                status, _ = assoc.send_n_event_report(info, event_type, COMMITMENT,
                                                      COMMITMENT_INSTANCE)
                if code_to_category(status.get("Status", 0xC000)) in (STATUS_SUCCESS,
                                                                      STATUS_WARNING):
                    return
                log.info("storage commitment %s: refused on this association, reporting on "
                         "a new one", transaction)
            except Exception:  # noqa: BLE001 - the association went away meanwhile
                log.info("storage commitment %s: association closed, reporting on a new one",
                         transaction)
        calling = str(assoc.requestor.ae_title).strip()
        threading.Thread(target=self._report_elsewhere, args=(calling, info, event_type),
                         daemon=True).start()

    def _report_elsewhere(self, calling: str, info: Dataset, event_type: int) -> None:
        peer = self.registry.get(calling)
        if peer is None:
            log.warning("cannot report storage commitment to %r: it is not registered",
                        calling)
            return
        assoc = self.ae.associate(peer.host, peer.port, contexts=[build_context(COMMITMENT)],
                                  ae_title=peer.ae_title,
                                  ext_neg=[build_role(COMMITMENT, scp_role=True)])
        if not assoc.is_established:
            log.warning("cannot report storage commitment to %s at %s:%d", peer.ae_title,
                        peer.host, peer.port)
            return
        try:
            assoc.send_n_event_report(info, event_type, COMMITMENT, COMMITMENT_INSTANCE)
        finally:
            assoc.release()

    def _commitment(self, who: Principal, transaction: str,
                    refs: list[tuple[str, str]]) -> tuple[Dataset, int]:
        """PS3.4 J.3.3: event type 1 when all are safely stored, 2 when some are not
        (0x0112 no such object instance, 0x0119 stored with another SOP class). Only what
        the caller may see counts: commitment never confirms someone else's instance."""
        stored: dict[str, str] = {}
        vis = visibility(who, Action.VIEW, self.access.grants.live_for(who))
        for chunk in translate.chunks(dict.fromkeys(uid for _, uid in refs)):
            cond = translate.uid_condition(0x00080018, chunk)
            for row in self.archive.search(Query(Level.IMAGE, [cond]), visibility=vis):
                sop = translate.first_value(row, "00080018")
                stored[sop] = translate.first_value(row, "00080016")
        done: list[Dataset] = []
        failed: list[Dataset] = []
        for sop_class, uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = uid
            if uid not in stored:
                item.FailureReason = 0x0112
            elif stored[uid] != sop_class:
                item.FailureReason = 0x0119
            (failed if "FailureReason" in item else done).append(item)
        info = Dataset()
        info.TransactionUID = transaction
        info.RetrieveAETitle = self.settings.ae_title
        if done:
            info.ReferencedSOPSequence = done
        if failed:
            info.FailedSOPSequence = failed
        return info, 2 if failed else 1

