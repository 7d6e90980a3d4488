"""The public side of share links: landing page, PIN, viewer, zip download, and a
DICOMweb root per link."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
