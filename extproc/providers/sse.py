"""An incremental Server-Sent Events parser for provider streams.

Envoy hands the response body over in whatever chunks the upstream produced, so an event may be
split across chunks (even between `\r` and `\n`), and one chunk may hold several events.
"""

from __future__ import annotations


class SSEParser:
    """Feed raw chunks, get complete `(event, data)` pairs back in order.

    `event` is the `event:` field ("" when absent, i.e. the default "message" type); `data` joins
    multiple `data:` lines with `\n`. Comment lines (`:` first) and unknown fields are skipped.
    """

    __slots__ = ("_buf", "ends")

    def __init__(self) -> None:
        self._buf = b""
        self.ends: list[int] = []
        """After `feed`: for each event returned, the offset in the chunk just past its blank line
        (where a cut keeps that event whole), or -1 when the chunk used CR line ends."""

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        held = len(self._buf)
        buf = self._buf + chunk
        self.ends = []
        # A trailing "\r" may be the first half of "\r\n": keep it for the next chunk.
        hold = b""
        if buf.endswith(b"\r"):
            buf, hold = buf[:-1], b"\r"
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf + hold
            return []
        self._buf = buf[end + 2 :] + hold
        exact = b"\r" not in chunk and b"\r" not in buf[:held]
        events = []
        pos = 0
        for block in buf[:end].split(b"\n\n"):
            pos += len(block) + 2
            ev = _parse_block(block)
            if ev is not None:
                events.append(ev)
                self.ends.append(pos - held if exact else -1)
        return events

    @property
    def mid_event(self) -> bool:
        """True when the bytes fed so far end inside an event (a blank line has not closed it)."""
        return bool(self._buf.strip(b"\r\n"))

    def flush(self) -> list[tuple[str, bytes]]:
        """At end of stream: a last event not followed by a blank line still counts."""
        buf, self._buf = self._buf, b""
        buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out = []
        for block in buf.split(b"\n\n"):
            ev = _parse_block(block)
            if ev is not None:
                out.append(ev)
        return out


def _parse_block(block: bytes) -> tuple[str, bytes] | None:
    event = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0:1] == b":":
            continue
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if not data:
        return None
    return event, b"\n".join(data)
