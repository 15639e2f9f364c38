"""The outbox: settles Redis could not take, kept on local disk until Redis takes them.

A settle is one Lua call (extproc/budgets/lua/settle.lua) that charges the counters, rolls the
request up and appends its record. When that call fails (Redis down, restarting, timed out), its
exact KEYS and ARGV are written here, in a SQLite file under the run directory, committed with
`synchronous=FULL` before the request's accounting is considered done. A replay loop runs them
again, oldest first, once Redis answers. Replays are safe to repeat: the script charges a counter
only while it still holds the request's lease or tombstone, so a settle that did land before the
error (a timeout after Redis ran it) comes back as a duplicate.

Guarantee and its limits: a settle is lost only if the process dies between the failed Redis call
and the commit here (microseconds of Python, no await), or the disk fails. Even then the request's
lease expires into a charge of its reservation, so the budget is never under-charged; only its
record then lacks the real usage. Entries are replayed by the process that wrote them, or by the
next process started on the same run directory.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class Entry:
    id: int
    keys: list[str]
    args: list[Any]


class Outbox:
    """An append-only queue of settle calls in one SQLite file (several processes may share it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS settles (id INTEGER PRIMARY KEY AUTOINCREMENT, call BLOB NOT NULL)")

    def put(self, keys: list[str], args: list[Any]) -> None:
        """Keep one settle call; returns once it is on disk."""
        call = orjson.dumps([keys, [a.decode() if isinstance(a, bytes) else a for a in args]])
        with self._lock:
            self._db.execute("INSERT INTO settles (call) VALUES (?)", (call,))

    def peek(self, limit: int = 200) -> list[Entry]:
        """The oldest `limit` entries, not removed."""
        with self._lock:
            rows = self._db.execute("SELECT id, call FROM settles ORDER BY id LIMIT ?", (limit,)).fetchall()
        out = []
        for rid, call in rows:
            keys, args = orjson.loads(call)
            out.append(Entry(rid, keys, args))
        return out

    def remove(self, entry_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM settles WHERE id = ?", (entry_id,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM settles").fetchone()[0])

    def absorb(self, src: Path) -> int:
        """Move another outbox file's entries into this one: copied in one committed transaction,
        then deleted from `src` (entries added to `src` meanwhile have higher ids and stay). A
        crash between the two leaves them in both, and a settle replayed twice is harmless.
        Returns how many moved."""
        s = sqlite3.connect(f"file:{src}?mode=rw", uri=True, timeout=5.0, isolation_level=None)
        try:
            try:
                rows = s.execute("SELECT id, call FROM settles ORDER BY id").fetchall()
            except sqlite3.OperationalError:  # created but no table yet
                return 0
            if not rows:
                return 0
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT INTO settles (call) VALUES (?)", [(call,) for _, call in rows])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            s.execute("PRAGMA synchronous=FULL")
            s.execute("DELETE FROM settles WHERE id <= ?", (rows[-1][0],))
            return len(rows)
        finally:
            s.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
