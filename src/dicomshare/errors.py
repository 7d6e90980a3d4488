"""The project's error tree. Third-party errors are translated into these at the boundary.

Each adapter maps the tree to its protocol: HTTP status + DICOM failure reason for
DICOMweb, a DIMSE status for the network service, an exit code for the CLI.

    DicomshareError
    ├── InvalidInput                400  the request or object is wrong; fix it and retry
    │   ├── InvalidDicom            400  not parseable / truncated DICOM        (0xC000)
    │   ├── MissingAttribute        400  a required attribute is absent          (0xA900)
    │   ├── InvalidUID              400  a UID is syntactically invalid          (0xA900)
    │   └── InvalidQuery            400  a search or retrieve parameter is wrong
    ├── Unauthenticated             401  no valid credentials
    ├── Forbidden                   403  authenticated, not allowed             (0x0124)
    ├── NotFound                    404  no such study / series / instance / resource
    ├── NotAcceptable               406  cannot produce any representation the client accepts
    ├── Conflict                    409  contradicts what is stored
    │   ├── DuplicateConflict       409  same SOP Instance UID, different bytes (0x0111)
    │   └── StudyMismatch           409  instance is not in the study named by the URL (0xA900)
    ├── Gone                        410  a link that existed: expired, revoked or used up
    ├── PayloadTooLarge             413  request body above the configured limit
    ├── UnsupportedMediaType        415  request body media type not supported
    ├── Locked                      423  locked after too many wrong PINs
    ├── TooManyRequests             429  throttled; ``retry_after`` seconds
    ├── StorageFailure              503  the archive could not make the object durable (0xA700)
    └── RemoteError                 502  a DICOM peer answered a request with a failure
        └── PeerUnavailable         502  peer unreachable, association rejected or aborted
"""

from __future__ import annotations


class DicomshareError(Exception):
    """Base of every error the project raises on purpose."""

    http_status = 500
    # PS3.4 / PS3.18 failure reason reported for a failed SOP instance.
    failure_reason = 0x0110  # processing failure

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidInput(DicomshareError):
    http_status = 400
    failure_reason = 0xC000


class InvalidDicom(InvalidInput):
    failure_reason = 0xC000


class MissingAttribute(InvalidInput):
    failure_reason = 0xA900


class InvalidUID(InvalidInput):
    failure_reason = 0xA900


class InvalidQuery(InvalidInput):
    pass


class Unauthenticated(DicomshareError):
    http_status = 401


class Forbidden(DicomshareError):
    http_status = 403
    failure_reason = 0x0124  # PS3.7 C.5: Refused: Not Authorized


class NotFound(DicomshareError):
    http_status = 404


class NotAcceptable(DicomshareError):
    http_status = 406


class Conflict(DicomshareError):
    http_status = 409


class DuplicateConflict(Conflict):
    failure_reason = 0x0111


class StudyMismatch(Conflict):
    failure_reason = 0xA900


class Gone(DicomshareError):
    http_status = 410


class Locked(DicomshareError):
    http_status = 423


class TooManyRequests(DicomshareError):
    http_status = 429

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = max(1, int(retry_after))


class PayloadTooLarge(DicomshareError):
    http_status = 413
    failure_reason = 0xA700


class UnsupportedMediaType(DicomshareError):
    http_status = 415


class StorageFailure(DicomshareError):
    http_status = 503
    failure_reason = 0xA700


class RemoteError(DicomshareError):
    """A DICOM peer we called failed the request: the fault is upstream, not the caller's."""

    http_status = 502


class PeerUnavailable(RemoteError):
    """No usable association with the peer: unreachable, rejected, aborted or timed out."""
