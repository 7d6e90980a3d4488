"""Upload links: /api/upload-links for the specialist, /upload/{secret} for the sender."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
