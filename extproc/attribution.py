"""The attribution record: one per request, the single source for "who spent what".

Records go to sinks: callables that take one record. Fields are added, never renamed, so log
pipelines keep working.

* :func:`stdout_sink`: one JSON line per record on stdout (the first form, for terminals and log
  shippers).
* :class:`RotatingJsonlSink`: JSON lines appended to day files under a directory, so records
  outlive the bounded Redis stream. :func:`read_records` reads them back.
* :func:`tee`: one sink that feeds several (stdout and the files).

Files of :class:`RotatingJsonlSink`
-----------------------------------
``DIR/attribution-YYYY-MM-DD.NAME.jsonl``, then ``DIR/attribution-YYYY-MM-DD.NAME.1.jsonl``,
``.2``, ... as the day's file passes ``max_bytes``:

* ``YYYY-MM-DD`` is the UTC day of the record's ``ts`` (ISO 8601; a record without a readable
  ``ts`` goes to the sink clock's UTC day). A late record (a settle replayed after midnight) lands
  in the file of the day it belongs to, so a day's files hold exactly that day's records.
* ``NAME`` is the writer: the ``name`` given (for example ``extproc-0``), or ``pid-<pid>``. Every
  process writing to the directory must have its own name, so no two processes ever append to
  one file and lines never interleave. A name starts with a letter and holds only letters,
  digits, ``-`` and ``_`` (no dot), so file names parse back unambiguously. A process restarted
  under the same name appends to its latest file of the day.
* Each line is one record (orjson) and ``\\n``. A file is rotated before a line would take it past
  ``max_bytes``, so files stay under it unless one record alone is larger.
* Files whose day is more than ``retention_days`` before the clock's UTC day are deleted, by
  whichever writer sweeps first (all writers of a directory should share one retention). The
  sweep lists the directory at most once an hour, on the write path.

Durability: records are flushed to the OS by the end of the event-loop turn that wrote them (one
write for every record of the turn; at once when no loop runs), with no fsync. A process crash
(even SIGKILL) loses nothing flushed: the kernel has the bytes; it can lose the records of the one
turn it cut, which the settle had already put in Redis's stream. A power loss or kernel crash
can lose what the OS had not yet written back (seconds of records). A crash inside a write can
leave a partial last line: the next writer of that file ends it with a newline first, and
:func:`read_records` skips lines that are not a whole JSON object.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

import orjson

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any]], None]


class _TurnFlush:
    """Flushes a buffered file once per turn of the running event loop, right after the turn's
    callbacks that wrote to it: under load the settles of several requests finish in one turn (their
    Redis replies arrive in one read), and one `write` now carries all their records, where a flush per
    record cost two write syscalls per request (about 6% of the ext_proc's Python under load). Without
    a running loop (the CLI, tests) it flushes at once."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._due = False

    def __call__(self) -> None:
        if self._due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        self._due = True
        loop.call_soon(self._run)

    def _run(self) -> None:
        self._due = False
        try:
            self._flush()
        except Exception as e:  # noqa: BLE001 - a callback has no caller to raise to; the sink reopens
            log.error("flushing attribution records failed: %s", e)


class StdoutSink:
    """Each record as one JSON line on stdout (or `stream`), flushed by the end of the loop turn
    that wrote it (see `_TurnFlush`), so a crash loses at most the records of the turn it cut."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._out = stream or sys.stdout.buffer
        self._flush = _TurnFlush(self._out.flush)

    def __call__(self, record: dict[str, Any]) -> None:
        self.write_line(orjson.dumps(record) + b"\n", record)

    def write_line(self, line: bytes, record: dict[str, Any]) -> None:
        """Write a record already encoded (by `tee`, once for every sink)."""
        self._out.write(line)
        self._flush()


def stdout_sink(stream: BinaryIO | None = None) -> Sink:
    return StdoutSink(stream)


def tee(*sinks: Sink) -> Sink:
    """One sink that hands each record to every sink in turn, encoded once for the sinks that take
    a line (`write_line`). A sink that raises does not keep the record from the others; the first
    error is raised once all have had it."""
    writers = [getattr(s, "write_line", None) for s in sinks]

    def write(record: dict[str, Any]) -> None:
        first: BaseException | None = None
        line: bytes | None = None
        for sink, write_line in zip(sinks, writers):
            try:
                if write_line is None:
                    sink(record)
                else:
                    if line is None:
                        line = orjson.dumps(record) + b"\n"
                    write_line(line, record)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other sinks
                first = first or e
        if first is not None:
            raise first

    return write


# --------------------------------------------------------------------------------------------
# rotating JSON-lines files
# --------------------------------------------------------------------------------------------

PREFIX = "attribution-"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_FILE = re.compile(r"attribution-(\d{4}-\d{2}-\d{2})\.([A-Za-z][A-Za-z0-9_-]*)(?:\.(\d+))?\.jsonl")
SWEEP_INTERVAL_S = 3600.0
DEFAULT_MAX_BYTES = 128 * 1024 * 1024
DEFAULT_RETENTION_DAYS = 30


def file_name(day: str, name: str, segment: int = 0) -> str:
    """``attribution-DAY.NAME.jsonl`` for segment 0, ``attribution-DAY.NAME.K.jsonl`` after."""
    return f"{PREFIX}{day}.{name}.jsonl" if segment == 0 else f"{PREFIX}{day}.{name}.{segment}.jsonl"


def parse_file_name(fname: str) -> tuple[str, str, int] | None:
    """``(day, name, segment)`` of an attribution file name, or None for any other file."""
    m = _FILE.fullmatch(fname)
    if m is None:
        return None
    return m.group(1), m.group(2), int(m.group(3) or 0)


def _utc_day_of_epoch(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).date().isoformat()


def record_day(record: dict[str, Any], now: Callable[[], float] = time.time) -> str:
    """The UTC day (``YYYY-MM-DD``) of the record's ``ts``; ``now()``'s day when it has none.

    The records' own ``ts`` is UTC (``...+00:00``), so the common case is a slice; other offsets
    are converted, a naive time is taken as UTC."""
    ts = record.get("ts")
    day = ts_day(ts) if isinstance(ts, str) else None
    return day if day is not None else _utc_day_of_epoch(now())


def ts_day(ts: str) -> str | None:
    """The UTC day (``YYYY-MM-DD``) of an ISO 8601 time, None if it is not one: a slice for UTC
    (``...+00:00``, ``Z``), other offsets converted, a naive time taken as UTC."""
    if len(ts) < 10:
        return None
    if ts.endswith(("+00:00", "Z")) and _DAY.fullmatch(ts, 0, 10):
        return ts[:10]
    try:
        dt = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return dt.date().isoformat()
    return dt.astimezone(timezone.utc).date().isoformat()


class RotatingJsonlSink:
    """A sink appending each record to this writer's file of the record's UTC day (see the
    module docstring for the file scheme, rotation, retention and durability).

    One file is open at a time and kept open between records; the hot path is one dumps, one
    write, and one flush per loop turn. Not thread-safe: it is meant for the one asyncio loop of a process."""

    def __init__(self, directory: str | os.PathLike[str], *, name: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, retention_days: int | None = DEFAULT_RETENTION_DAYS,
                 clock: Callable[[], float] = time.time) -> None:
        """``directory`` is created if missing; ``name`` defaults to ``pid-<pid>``;
        ``retention_days=None`` keeps every file; ``clock`` (epoch seconds) drives the
        retention sweep and the day of records without ``ts``."""
        self.name = name if name is not None else f"pid-{os.getpid()}"
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"attribution sink name {self.name!r}: a letter, then letters, digits, '-' or '_'")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if retention_days is not None and retention_days < 0:
            raise ValueError("retention_days must be >= 0 (or None to keep every file)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self.clock = clock
        self._file: BinaryIO | None = None
        self._day = ""
        self._segment = 0
        self._size = 0
        self._next_sweep = float("-inf")  # the first write sweeps
        self._flush = _TurnFlush(self._flush_file)

    # ---- the sink ------------------------------------------------------------------------
    def __call__(self, record: dict[str, Any]) -> None:
        self.write_line(orjson.dumps(record) + b"\n", record)

    def write_line(self, line: bytes, record: dict[str, Any]) -> None:
        """Append a record already encoded (by `tee`, once for every sink)."""
        day = record_day(record, self.clock)
        if self._file is None or day != self._day:
            self._open(day)
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        f = self._file
        assert f is not None
        try:
            f.write(line)
        except OSError:
            # Disk full or the file went away: drop the handle, so the next record reopens (and
            # ends a partial line first) instead of writing after a half-flushed buffer.
            self.close()
            raise
        self._flush()
        self._size += len(line)
        if self.retention_days is not None and self.clock() >= self._next_sweep:
            self.sweep()

    @property
    def path(self) -> Path | None:
        """The file being appended to, if one is open."""
        return self.directory / file_name(self._day, self.name, self._segment) if self._file else None

    def _flush_file(self) -> None:
        f = self._file
        if f is None:
            return
        try:
            f.flush()
        except OSError:
            self.close()  # as a failed write: the next record reopens the file
            raise

    def close(self) -> None:
        """Close the open file (the next record reopens it); call at shutdown."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as e:
                log.warning("closing attribution file failed: %s", e)

    # ---- files ---------------------------------------------------------------------------
    def _open(self, day: str) -> None:
        """Open this writer's latest file of ``day``; the caller rotates if it is full."""
        self.close()
        segments = [seg for d, _, seg in self._own_files() if d == day]
        self._open_segment(day, max(segments, default=0))

    def _rotate(self) -> None:
        self.close()
        self._open_segment(self._day, self._segment + 1)

    def _open_segment(self, day: str, segment: int) -> None:
        path = self.directory / file_name(day, self.name, segment)
        f = open(path, "ab")  # noqa: SIM115 - kept open across records on purpose
        size = os.fstat(f.fileno()).st_size
        if size and not _ends_with_newline(path):
            f.write(b"\n")  # a crash cut the last line: end it so the next record stands alone
            f.flush()
            size += 1
        self._file, self._day, self._segment, self._size = f, day, segment, size

    def _own_files(self) -> Iterator[tuple[str, str, int]]:
        for fname in os.listdir(self.directory):
            parsed = parse_file_name(fname)
            if parsed is not None and parsed[1] == self.name:
                yield parsed

    def sweep(self) -> list[Path]:
        """Delete every writer's files older than the retention; returns what it deleted.
        Runs from the write path at most once per :data:`SWEEP_INTERVAL_S` of the clock."""
        now = self.clock()
        self._next_sweep = now + SWEEP_INTERVAL_S
        if self.retention_days is None:
            return []
        oldest_kept = (datetime.fromtimestamp(now, timezone.utc).date()
                       - timedelta(days=self.retention_days)).isoformat()
        deleted = []
        current = self.path
        for fname in os.listdir(self.directory):
            parsed = parse_file_name(fname)
            path = self.directory / fname
            if parsed is None or parsed[0] >= oldest_kept or path == current:
                continue
            try:
                path.unlink()
            except FileNotFoundError:  # another writer's sweep got there first
                continue
            deleted.append(path)
        if deleted:
            log.info("attribution retention: deleted %d file(s) older than %s", len(deleted), oldest_kept)
        return deleted


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# --------------------------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------------------------


def record_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every attribution file under ``directory``, by day, then writer name, then segment."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for fname in os.listdir(d):
        parsed = parse_file_name(fname)
        if parsed is not None:
            found.append((parsed, d / fname))
    return [path for _, path in sorted(found)]


def read_records(directory: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every record in ``directory``'s attribution files, in :func:`record_files` order and, in
    a file, in write order. One day's records from several writers are not merged by time (sort
    by ``ts`` for that). Lines that are not a whole JSON object (a write cut by a crash) are
    skipped; a file deleted while reading (retention) is skipped too."""
    for path in record_files(directory):
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; a generator keeps it open between yields
        except FileNotFoundError:
            continue
        with f:
            for line in f:
                record = _parse_line(line)
                if record is not None:
                    yield record


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        if line.strip():
            log.debug("skipping a partial attribution line (%d bytes)", len(line))
        return None
    return obj if isinstance(obj, dict) else None
