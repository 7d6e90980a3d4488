"""/api/inbox, /api/consults and /api/notifications (sharing/inbox.py, consults.py, notify.py)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
