"""The attribution record: one per request, the single source for "who spent what".

First form: a JSON line on stdout. Fields are added, never renamed, so log pipelines keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson

Sink = Callable[[dict[str, Any]], None]


def stdout_sink(stream: BinaryIO | None = None) -> Sink:
    """Write each record as one JSON line and flush, so a crash loses nothing already settled."""
    out = stream or sys.stdout.buffer

    def write(record: dict[str, Any]) -> None:
        out.write(orjson.dumps(record) + b"\n")
        out.flush()

    return write
