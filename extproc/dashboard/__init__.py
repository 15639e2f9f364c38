"""The spend dashboard: one HTML page (inline script, style and hand-drawn SVG charts: no CDN, no
network dependency) served by the admin API (`GET /dashboard`), and the pure assembly of what it
shows from the usage rollups and budget counters (`data.py`). docs/dashboard.md."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

PAGE = "index.html"


@lru_cache(maxsize=1)
def page() -> bytes:
    """The page's bytes, from package data (pyproject's package-data includes extproc/dashboard/*.html)."""
    return (resources.files(__package__) / PAGE).read_bytes()
