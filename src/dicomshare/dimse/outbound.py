"""C-STORE sub-operations from the archive's blobs: what C-MOVE and C-GET send.

pynetdicom's retrieve loop hands each instance to ``send_c_store`` as a Dataset; here it
gets a :class:`Stored` placeholder, and the association's ``send_c_store`` sends the
stored file's data set as it is on disk (wire.py's PDUs on associations with our loops,
pynetdicom's file streaming otherwise), converting to an uncompressed syntax only when the
peer accepted no context in the stored one.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext, build_context

from dicomshare.archive import Archive
from dicomshare.dicom import pixels, transfer
from dicomshare.dimse import reactor, wire
from dicomshare.storage.base import StoredInstance

MAX_CONTEXTS = 128
NATIVE = (transfer.EXPLICIT_VR_LE, transfer.IMPLICIT_VR_LE)


class Stored(Dataset):
    """A stored instance in pynetdicom's retrieve loop (which wants a Dataset); the
    association's send_c_store (see send_from_blobs) sends it from its blob."""

    def __init__(self, inst: StoredInstance, originator: str) -> None:
        super().__init__()
        self.SOPClassUID = inst.sop_class_uid
        self.SOPInstanceUID = inst.sop_uid
        self.instance = inst
        self.originator = originator


def send_from_blobs(archive: Archive, assoc: Association) -> None:
    """Make this association's send_c_store send Stored instances from their blobs."""
    original = assoc.send_c_store
    if getattr(original, "func", None) is _send_stored:
        return
    setattr(assoc, "send_c_store", partial(_send_stored, archive, assoc, original))  # noqa: B010


def _send_stored(archive: Archive, assoc: Association, original: Callable[..., Dataset],
                 dataset: Any, msg_id: int = 1, priority: int = 2,
                 originator_aet: str | None = None, originator_id: int | None = None
                 ) -> Dataset:
    if not isinstance(dataset, Stored):
        return original(dataset, msg_id, priority, originator_aet, originator_id)
    inst = dataset.instance
    if originator_aet is not None:  # pynetdicom names itself; PS3.7 wants the requestor
        originator_aet = dataset.originator or originator_aet
    contexts = [cx for cx in assoc.accepted_contexts
                if cx.abstract_syntax == inst.sop_class_uid and cx.as_scu]
    exact = next((cx for cx in contexts if cx.transfer_syntax[0] == inst.transfer_syntax_uid),
                 None)
    send = partial(_c_store, assoc, inst, msg_id, priority, originator_aet, originator_id)
    with archive.blobs.local_path(inst.blob_key) as path:
        if exact is not None:
            return send(exact, path)
        native = next((cx for cx in contexts if cx.transfer_syntax[0] in NATIVE), None)
        if native is None:
            raise ValueError(f"the peer accepted no context for {inst.sop_class_uid} in "
                             f"{transfer.name(inst.transfer_syntax_uid)} or uncompressed")
        with tempfile.NamedTemporaryFile(suffix=".dcm") as converted:
            pixels.transcode_to(path, str(native.transfer_syntax[0]), cast(BinaryIO, converted))
            converted.flush()
            return send(native, Path(converted.name))


def _c_store(assoc: Association, inst: StoredInstance, msg_id: int, priority: int,
             originator_aet: str | None, originator_id: int | None,
             context: PresentationContext, path: Path) -> Dataset:
    """Association.send_c_store for a file whose data set is sent as it is on disk."""
    if reactor.installed(assoc):
        send: Callable[[], None] = partial(_send_file, assoc, inst, msg_id, priority,
                                           originator_aet, originator_id, context, path)
    else:
        request = _store_request(inst, msg_id, priority, originator_aet, originator_id, path)
        send = partial(assoc.dimse.send_msg, request, cast(int, context.context_id))
    outbound = getattr(assoc, "_dicomshare_outbound", False)
    if not outbound or not getattr(assoc, "_dicomshare_held", False):
        _hold_reactor(assoc, robust=outbound)
    try:
        send()
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        if not outbound:
            assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        failed = Dataset()
        failed.Status = 0xA700  # the retrieve loop counts it as a failed sub-operation
        return failed
    return assoc._check_received_status(response)


def _send_file(assoc: Association, inst: StoredInstance, msg_id: int, priority: int,
               originator_aet: str | None, originator_id: int | None,
               context: PresentationContext, path: Path) -> None:
    """C-STORE-RQ and the file's data set as PDUs encoded here (wire.py)."""
    command = wire.c_store_rq(inst.sop_class_uid, inst.sop_uid, msg_id, priority,
                              originator_aet, originator_id)
    with open(path, "rb") as f:
        offset = wire.data_set_offset(f.read(8192))
        if offset is None:
            offset = split_dataset(path)[1]
        length = f.seek(0, os.SEEK_END) - offset
        f.seek(offset)
        reactor.send_raw(assoc, wire.message(cast(int, context.context_id), command,
                                             assoc.dimse.maximum_pdu_size, f, length))


def _store_request(inst: StoredInstance, msg_id: int, priority: int,
                   originator_aet: str | None, originator_id: int | None,
                   path: Path) -> C_STORE:
    _, offset = split_dataset(path)
    request = C_STORE()
    request.MessageID = msg_id
    request.Priority = priority
    request.AffectedSOPClassUID = inst.sop_class_uid
    request.AffectedSOPInstanceUID = inst.sop_uid
    request.MoveOriginatorApplicationEntityTitle = originator_aet
    request.MoveOriginatorMessageID = originator_id
    request._dataset_path = (path, offset)
    return request


def _hold_reactor(assoc: Association, robust: bool) -> None:
    """Stop the association's reactor from reading the responses we wait for.

    pynetdicom's own pause (clear, then wait for ``_is_paused``) can pass while the
    reactor is between its flag and its wait, and the reactor then swallows a C-STORE
    response ("unexpected C-STORE service message"; the sub-operation hangs until the
    DIMSE timeout). On associations we opened for C-MOVE the reactor has nothing else to
    do, so it is held once, checked twice, and stays held until the release (which
    resumes it)."""
    assoc._reactor_checkpoint.clear()
    for _ in range(2 if robust else 1):
        while not assoc._is_paused:
            time.sleep(0.0001)
        if robust:
            time.sleep(0.005)  # longer than one reactor iteration
    if robust:
        assoc._dicomshare_held = True  # type: ignore[attr-defined]


def contexts_for(found: list[StoredInstance]) -> list[PresentationContext]:
    """Each stored (SOP class, transfer syntax) first, then uncompressed fallbacks."""
    pairs = dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in found)
    contexts = [build_context(sop_class, ts) for sop_class, ts in pairs]
    contexts += [build_context(sop_class, list(NATIVE))
                 for sop_class in dict.fromkeys(sop_class for sop_class, _ in pairs)]
    return contexts[:MAX_CONTEXTS]
