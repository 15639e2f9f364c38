"""YAML loading that remembers where every value came from.

Pydantic reports errors by location (`budgets.0.window.calendar`); SREs want `budgets.yaml:12`.
We compose the YAML node tree ourselves, keep a `location path -> (file, line)` map next to the
plain Python data, and translate validation errors through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

Loc = tuple[str | int, ...]


class PolicyError(Exception):
    """One or more problems in the policy files, each `file:line: where: what`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SourceMap:
    """Where each value of the merged policy document was written."""

    def __init__(self, place: str = "") -> None:
        self._where: dict[Loc, tuple[str, int]] = {}
        self.place = place  # named when a problem has no line (e.g. a section missing everywhere)

    def record(self, loc: Loc, file: str, line: int) -> None:
        self._where[loc] = (file, line)

    def shift(self, prefix: Loc, offset: int) -> None:
        """Renumber list items under `prefix` (used when lists from several files are joined)."""
        n = len(prefix)
        moved = {}
        for loc, where in list(self._where.items()):
            if loc[:n] == prefix and len(loc) > n and isinstance(loc[n], int):
                moved[loc[:n] + (loc[n] + offset,) + loc[n + 1 :]] = where
                del self._where[loc]
        self._where.update(moved)

    def merge(self, other: "SourceMap") -> None:
        self._where.update(other._where)

    def lookup(self, loc: Loc) -> tuple[str, int] | None:
        """The nearest recorded location at or above `loc`."""
        for n in range(len(loc), -1, -1):
            hit = self._where.get(tuple(loc[:n]))
            if hit:
                return hit
        return None

    def describe(self, loc: Loc, msg: str) -> str:
        where = self.lookup(loc)
        dotted = _dotted(loc)
        prefix = f"{where[0]}:{where[1]}: " if where else (f"{self.place}: " if self.place else "")
        return f"{prefix}{dotted}: {msg}" if dotted else f"{prefix}{msg}"

    def errors(self, exc: ValidationError, base: Loc = ()) -> list[str]:
        out = []
        for err in exc.errors(include_url=False):
            # Drop pydantic's union-branch names (e.g. 'float', 'TieredLimit') from the path.
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p[:1].isupper() or p in _TYPE_TAGS)))
            out.append(self.describe(base + loc, err["msg"].removeprefix("Value error, ")))
        return out


_TYPE_TAGS = {"float", "int", "str", "bool", "list", "dict", "decimal", "function-after", "function-before"}


def _dotted(loc: Loc) -> str:
    s = ""
    for p in loc:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


def load_yaml(path: Path, display: str, data: bytes | None = None) -> tuple[Any, SourceMap]:
    """Parse one file (or `data`, its bytes as already read) into plain data plus its source
    map; syntax errors carry their line."""
    smap = SourceMap()
    try:
        text = path.read_text(encoding="utf-8") if data is None else data.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark else 0
        raise PolicyError([f"{display}:{line}: YAML syntax error: {e.problem}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError([f"{display}: cannot read: {e}"]) from None
    if node is None:
        return None, smap
    constructor = yaml.SafeLoader(text)
    return _build(node, (), display, smap, constructor), smap


def _build(node: yaml.Node, loc: Loc, file: str, smap: SourceMap, ctor: yaml.SafeLoader) -> Any:
    if loc:  # the document root belongs to no single file once files are merged
        smap.record(loc, file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = ctor.construct_object(knode, deep=True)
            if key in out:
                raise PolicyError([f"{file}:{knode.start_mark.line + 1}: {_dotted(loc + (key,))}: duplicate key"])
            smap.record(loc + (key,), file, knode.start_mark.line + 1)
            out[key] = _build(vnode, loc + (key,), file, smap, ctor)
            # A key's own line is more useful than its value's when the value spans lines.
            smap.record(loc + (key,), file, knode.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, loc + (i,), file, smap, ctor) for i, v in enumerate(node.value)]
    value = ctor.construct_object(node, deep=True)
    if isinstance(value, str) and "${" in value:
        value = _ENV_REF.sub(_expand, value)
    return value


# `${NAME}` or `${NAME:-default}` in any string value is read from the environment at load time,
# so one policy directory serves several deployments (ports, account ids, key file paths).
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(m: "re.Match[str]") -> str:
    value = os.environ.get(m.group(1))
    if value is None or (value == "" and m.group(2) is not None):
        return m.group(2) or ""
    return value
