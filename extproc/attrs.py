"""Glob matching over request attributes, shared by budgets and model access rules.

Attributes are `str` or `list[str]` (e.g. `groups`). A string matches if any glob matches it; a
list if any element does; a missing attribute never matches. Matching is case-sensitive.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

Attrs = Mapping[str, "str | list[str]"]


def value_matches(value: str | list[str] | None, globs: list[str]) -> bool:
    if value is None:
        return False
    values = [value] if isinstance(value, str) else value
    return any(fnmatchcase(v, g) for v in values for g in globs)


def where_matches(where: Mapping[str, str | list[str]], attrs: Attrs) -> bool:
    """All attribute conditions hold (an empty `where` always holds)."""
    return all(value_matches(attrs.get(k), [g] if isinstance(g, str) else g) for k, g in where.items())
