"""Include/exclude patterns on attention module names (``model.layers.{0,1}.self_attn``).

Globs as :mod:`fnmatch` reads them (``*`` crosses dots), case-sensitive on every OS,
plus ``{a,b}`` alternatives, which may nest.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from quantcache.errors import ConfigError

__all__ = ["expand_braces", "match_module_names", "matches_any"]

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives (nesting allowed) into plain glob patterns.

    >>> expand_braces("model.layers.{0,1}.self_attn")
    ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    """
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ConfigError(f"pattern {pattern!r} has unbalanced braces")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    expanded: list[str] = []
    for alternative in match.group(1).split(","):
        expanded.extend(expand_braces(head + alternative + tail))
    return expanded


def _matches(name: str, pattern: str) -> bool:
    # fnmatch's ``*`` already crosses dots; ``fnmatchcase`` keeps it case-sensitive on every OS.
    return any(fnmatch.fnmatchcase(name, glob) for glob in expand_braces(pattern))


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(_matches(name, pattern) for pattern in patterns)


def match_module_names(pattern: str, module_names: Iterable[str]) -> list[str]:
    """The names among ``module_names`` that ``pattern`` matches."""
    return [name for name in module_names if _matches(name, pattern)]
