"""De-identification faithful to DICOM PS3.15: the Basic Profile and its options.

Usable as a library (``Deidentifier``), from ``dicomshare deidentify`` and from export
jobs. Built from the standard's own tables, shipped in ``data/`` (edition ``EDITION``).
See docs/deidentification.md for what each action does and the choices made.
"""

from dicomshare.deid.engine import Deidentifier, read_instance, write_instance
from dicomshare.deid.pixels import HoldBack, PixelHook, burned_in_risk
from dicomshare.deid.profile import EDITION, OPTIONS, Profile
from dicomshare.deid.pseudonyms import Pseudonyms
from dicomshare.deid.report import InstanceReport, RunReport

__all__ = ["EDITION", "OPTIONS", "Deidentifier", "HoldBack", "InstanceReport", "PixelHook",
           "Profile", "Pseudonyms", "RunReport", "burned_in_risk", "read_instance",
           "write_instance"]
