"""The attribution sinks: rotating JSON-lines files, tee, and the reader."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from extproc.attribution import (
    SWEEP_INTERVAL_S,
    RotatingJsonlSink,
    file_name,
    parse_file_name,
    read_records,
    record_day,
    record_files,
    stdout_sink,
    tee,
)

def epoch(text: str) -> float:
    """Epoch seconds of an ISO 8601 UTC time."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


class Clock:
    """An injected clock the tests move by hand."""

    def __init__(self, start: str) -> None:
        self.now = epoch(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rec(i: int, ts: str = "2026-12-01T10:00:00.000+00:00", **extra: object) -> dict:
    """A record shaped like the gateway's (the sink only reads ``ts``)."""
    return {"request_id": f"r{i:04d}", "ts": ts, "user": "demo", "cost_usd": 0.00021, **extra}


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def lines_of(path: Path) -> list[dict]:
    return [orjson.loads(ln) for ln in path.read_bytes().splitlines()]


# ---------------------------------------------------------------------------- one file


def test_one_line_per_record_and_read_back(tmp_path: Path) -> None:
    sink = RotatingJsonlSink(tmp_path / "attr", name="extproc-0", clock=Clock("2026-12-01T10:00:00"))
    written = [rec(i) for i in range(3)]
    for r in written:
        sink(r)
    path = tmp_path / "attr" / "attribution-2026-12-01.extproc-0.jsonl"
    assert sink.path == path
    raw = path.read_bytes()
    assert raw == b"".join(orjson.dumps(r) + b"\n" for r in written)  # flushed per record, file still open
    assert list(read_records(tmp_path / "attr")) == written
    sink.close()
    assert sink.path is None


def test_default_name_is_the_pid_and_names_are_checked(tmp_path: Path) -> None:
    sink = RotatingJsonlSink(tmp_path, clock=Clock("2026-12-01T10:00:00"))
    sink(rec(1))
    assert names(tmp_path) == [f"attribution-2026-12-01.pid-{os.getpid()}.jsonl"]
    sink.close()
    for bad in ("a.b", "../x", "1abc", "", "x/y", "naïve"):
        with pytest.raises(ValueError):
            RotatingJsonlSink(tmp_path, name=bad)


def test_file_names_parse_back() -> None:
    assert file_name("2026-12-01", "extproc-0") == "attribution-2026-12-01.extproc-0.jsonl"
    assert file_name("2026-12-01", "extproc-0", 2) == "attribution-2026-12-01.extproc-0.2.jsonl"
    assert parse_file_name("attribution-2026-12-01.extproc-0.2.jsonl") == ("2026-12-01", "extproc-0", 2)
    assert parse_file_name("attribution-2026-12-01.pid-77.jsonl") == ("2026-12-01", "pid-77", 0)
    for other in ("attribution-2026-12-01.jsonl", "attribution-2026-12-01.x.jsonl.gz", "notes.txt",
                  "attribution-2026-12-01.1.jsonl"):
        assert parse_file_name(other) is None


# ---------------------------------------------------------------------------- rotation


def test_rotation_by_size(tmp_path: Path) -> None:
    line = len(orjson.dumps(rec(0))) + 1
    sink = RotatingJsonlSink(tmp_path, name="w", max_bytes=3 * line, clock=Clock("2026-12-01T10:00:00"))
    written = [rec(i) for i in range(10)]
    for r in written:
        sink(r)
    assert names(tmp_path) == ["attribution-2026-12-01.w.1.jsonl", "attribution-2026-12-01.w.2.jsonl",
                               "attribution-2026-12-01.w.3.jsonl", "attribution-2026-12-01.w.jsonl"]
    sizes = [p.stat().st_size for p in record_files(tmp_path)]
    assert sizes == [3 * line, 3 * line, 3 * line, line]  # rotated before passing max_bytes
    assert list(read_records(tmp_path)) == written  # segments read in order
    sink.close()

    # a writer restarted under the same name continues its latest file, then rotates on
    again = RotatingJsonlSink(tmp_path, name="w", max_bytes=3 * line, clock=Clock("2026-12-01T11:00:00"))
    more = [rec(i) for i in range(10, 14)]
    for r in more:
        again(r)
    assert [p.stat().st_size for p in record_files(tmp_path)][-2:] == [3 * line, 2 * line]
    assert list(read_records(tmp_path)) == written + more
    again.close()


def test_a_record_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    sink = RotatingJsonlSink(tmp_path, name="w", max_bytes=200, clock=Clock("2026-12-01T10:00:00"))
    big = rec(1, blob="x" * 500)
    for r in (rec(0), big, rec(2)):
        sink(r)
    assert [len(lines_of(p)) for p in record_files(tmp_path)] == [1, 1, 1]
    assert list(read_records(tmp_path)) == [rec(0), big, rec(2)]
    sink.close()


def test_rotation_by_day_follows_each_records_ts(tmp_path: Path) -> None:
    clock = Clock("2026-12-02T00:00:05")
    sink = RotatingJsonlSink(tmp_path, name="w", clock=clock)
    before = rec(1, "2026-12-01T23:59:59.999+00:00")
    after = rec(2, "2026-12-02T00:00:00.001+00:00")
    late = rec(3, "2026-12-01T23:59:58.000+00:00")  # settled after midnight, belongs to the 1st
    offset = rec(4, "2026-12-01T23:30:00-02:00")  # 01:30 UTC on the 2nd
    zulu = rec(5, "2026-12-03T08:00:00Z")
    no_ts = {"request_id": "r0006"}  # the clock's day
    for r in (before, after, late, offset, zulu, no_ts):
        sink(r)
    assert names(tmp_path) == ["attribution-2026-12-01.w.jsonl", "attribution-2026-12-02.w.jsonl",
                               "attribution-2026-12-03.w.jsonl"]
    assert lines_of(tmp_path / "attribution-2026-12-01.w.jsonl") == [before, late]
    assert lines_of(tmp_path / "attribution-2026-12-02.w.jsonl") == [after, offset, no_ts]
    assert list(read_records(tmp_path)) == [before, late, after, offset, no_ts, zulu]
    sink.close()


def test_record_day() -> None:
    now = Clock("2026-06-30T12:00:00")
    assert record_day({"ts": "2026-12-01T10:00:00.000+00:00"}, now) == "2026-12-01"
    assert record_day({"ts": "2026-12-01T22:00:00+05:00"}, now) == "2026-12-01"
    assert record_day({"ts": "2026-12-01T22:00:00-05:00"}, now) == "2026-12-02"
    assert record_day({"ts": "2026-12-01T22:00:00"}, now) == "2026-12-01"  # naive: taken as UTC
    for unreadable in ({}, {"ts": None}, {"ts": 17}, {"ts": "yesterday"}, {"ts": "../../etc/+00:00"}):
        assert record_day(unreadable, now) == "2026-06-30"


# ---------------------------------------------------------------------------- retention


def test_retention_deletes_old_days_at_most_once_an_hour(tmp_path: Path) -> None:
    clock = Clock("2026-12-01T23:30:00")
    old_writer = RotatingJsonlSink(tmp_path, name="old", retention_days=None, clock=clock)
    for day in ("2026-11-20", "2026-11-28", "2026-11-29", "2026-11-30"):
        old_writer(rec(1, f"{day}T12:00:00+00:00"))
    old_writer.close()
    (tmp_path / "notes.txt").write_text("not an attribution file")

    sink = RotatingJsonlSink(tmp_path, name="w", retention_days=2, clock=clock)
    sink(rec(2, "2026-12-01T23:30:00+00:00"))  # the first write sweeps: today and two days back stay
    assert names(tmp_path) == ["attribution-2026-11-29.old.jsonl", "attribution-2026-11-30.old.jsonl",
                               "attribution-2026-12-01.w.jsonl", "notes.txt"]

    clock.advance(45 * 60)  # 00:15 on the 2nd: the 29th is now too old, but the last sweep was 45 min ago
    sink(rec(3, "2026-12-02T00:15:00+00:00"))
    assert "attribution-2026-11-29.old.jsonl" in names(tmp_path)

    clock.advance(SWEEP_INTERVAL_S - 45 * 60)  # an hour after the last sweep: the next write sweeps
    sink(rec(4, "2026-12-02T00:30:00+00:00"))
    assert names(tmp_path) == ["attribution-2026-11-30.old.jsonl", "attribution-2026-12-01.w.jsonl",
                               "attribution-2026-12-02.w.jsonl", "notes.txt"]
    sink.close()


def test_retention_never_deletes_the_open_file_and_none_keeps_all(tmp_path: Path) -> None:
    clock = Clock("2026-12-10T10:00:00")
    sink = RotatingJsonlSink(tmp_path, name="w", retention_days=1, clock=clock)
    sink(rec(1, "2026-12-01T10:00:00+00:00"))  # a very late record: written to its own day's file
    assert names(tmp_path) == ["attribution-2026-12-01.w.jsonl"]
    sink(rec(2, "2026-12-10T10:00:00+00:00"))
    clock.advance(SWEEP_INTERVAL_S)
    assert [p.name for p in sink.sweep()] == ["attribution-2026-12-01.w.jsonl"]  # once closed
    sink.close()

    keep = RotatingJsonlSink(tmp_path, name="k", retention_days=None, clock=clock)
    keep(rec(3, "2020-01-01T00:00:00+00:00"))
    assert keep.sweep() == []
    assert "attribution-2020-01-01.k.jsonl" in names(tmp_path)
    keep.close()


# ---------------------------------------------------------------------------- several writers


def test_two_writers_with_different_names_share_a_directory(tmp_path: Path) -> None:
    clock = Clock("2026-12-01T10:00:00")
    a = RotatingJsonlSink(tmp_path, name="extproc-0", clock=clock)
    b = RotatingJsonlSink(tmp_path, name="extproc-1", clock=clock)
    for i in range(20):
        (a if i % 2 == 0 else b)(rec(i, writer=i % 2))
    assert names(tmp_path) == ["attribution-2026-12-01.extproc-0.jsonl", "attribution-2026-12-01.extproc-1.jsonl"]
    assert {r["writer"] for r in lines_of(tmp_path / "attribution-2026-12-01.extproc-0.jsonl")} == {0}
    assert {r["writer"] for r in lines_of(tmp_path / "attribution-2026-12-01.extproc-1.jsonl")} == {1}
    got = list(read_records(tmp_path))
    assert [r["request_id"] for r in got] == [f"r{i:04d}" for i in range(0, 20, 2)] + [
        f"r{i:04d}" for i in range(1, 20, 2)]  # by writer name, then write order
    a.close()
    b.close()


# ---------------------------------------------------------------------------- crashes


def test_a_partial_last_line_is_skipped_and_the_next_writer_ends_it(tmp_path: Path) -> None:
    clock = Clock("2026-12-01T10:00:00")
    sink = RotatingJsonlSink(tmp_path, name="w", clock=clock)
    first = [rec(i) for i in range(3)]
    for r in first:
        sink(r)
    path = sink.path
    assert path is not None
    sink.close()
    with open(path, "ab") as f:  # a process killed in the middle of a write
        f.write(orjson.dumps(rec(99))[:25])

    assert list(read_records(tmp_path)) == first  # skipped, no exception

    restarted = RotatingJsonlSink(tmp_path, name="w", clock=clock)
    restarted(rec(3))
    assert restarted.path == path  # same file, the cut line ended first
    assert list(read_records(tmp_path)) == first + [rec(3)]
    restarted.close()


def test_reader_skips_garbage_and_tolerates_a_missing_directory(tmp_path: Path) -> None:
    assert list(read_records(tmp_path / "nope")) == []
    (tmp_path / "attribution-2026-12-01.w.jsonl").write_bytes(
        b'{"request_id":"a"}\n\n[1,2]\nnot json\n{"request_id":"b"}\n{"request_id":"c"}')
    # a final line without its newline but whole is a record; lists and junk are not
    assert [r["request_id"] for r in read_records(tmp_path)] == ["a", "b", "c"]


def test_a_failed_write_reopens_on_the_next_record(tmp_path: Path) -> None:
    sink = RotatingJsonlSink(tmp_path, name="w", clock=Clock("2026-12-01T10:00:00"))
    sink(rec(1))

    class Broken(io.BytesIO):
        def write(self, b: object) -> int:
            raise OSError(28, "No space left on device")

    sink._file = Broken()  # the disk fills up
    with pytest.raises(OSError):
        sink(rec(2))
    assert sink.path is None
    sink(rec(3))  # space again: the file is reopened
    assert [r["request_id"] for r in read_records(tmp_path)] == ["r0001", "r0003"]
    sink.close()


# ---------------------------------------------------------------------------- tee


def test_tee_feeds_every_sink_even_when_one_fails(tmp_path: Path) -> None:
    out = io.BytesIO()
    files = RotatingJsonlSink(tmp_path, name="w", clock=Clock("2026-12-01T10:00:00"))
    seen: list[dict] = []

    def failing(record: dict) -> None:
        raise RuntimeError("sink down")

    sink = tee(stdout_sink(out), failing, files, seen.append)
    with pytest.raises(RuntimeError, match="sink down"):
        sink(rec(1))
    tee(stdout_sink(out), files)(rec(2))
    assert out.getvalue().splitlines() == [orjson.dumps(rec(1)), orjson.dumps(rec(2))]
    assert list(read_records(tmp_path)) == [rec(1), rec(2)]
    assert seen == [rec(1)]
    files.close()
