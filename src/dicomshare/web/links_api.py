"""/api/links: create, list and revoke share links (sharing/links.py)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
