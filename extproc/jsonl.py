"""Appending JSON lines to a file that several processes share, without a lock or a thread.

Each line goes in one ``write`` of a descriptor opened with ``O_APPEND`` (the kernel puts the
whole line at the end, so processes never interleave), opened per line (a file moved away by log
rotation is simply created again) and created with its directory on first use. For logs written
a few times a second at most: the admin API's access log, the alert delivery log. Attribution
records, one per request, use the kept-open rotating sink in attribution.py instead.
"""

from __future__ import annotations

import os
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def append_line(path: Path, line: bytes) -> None:
    """Append `line` (ending in a newline) to `path`; raises OSError as `os.open` / `os.write` do."""
    try:
        fd = os.open(path, _FLAGS, 0o640)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, _FLAGS, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
