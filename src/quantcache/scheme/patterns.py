"""Include/exclude patterns on attention module names (``model.layers.{0,1}.self_attn``).

Globs as :mod:`fnmatch` reads them (``*`` crosses dots), case-sensitive on every OS,
plus ``{a,b}`` alternatives, which may nest.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from functools import lru_cache

from quantcache.errors import ConfigError

__all__ = ["MAX_EXPANSION", "brace_alternatives", "expand_braces", "match_module_names", "matches_any"]

MAX_EXPANSION = 4096
"""Most plain globs one pattern may expand to. A model has at most a few hundred attention
modules, so a pattern past this is a mistake; ``{a,b}`` written 30 times would otherwise
expand to 2**30 globs (minutes, and gigabytes) before anything could say so."""

_MAX_NESTING = 32  # groups inside groups; counting and expanding recurse this deep

# A pattern parsed: a sequence of parts, each a literal or a group of alternative sequences.
_Sequence = tuple["_Part", ...]
_Part = str | tuple[_Sequence, ...]


def _quoted(pattern: str) -> str:
    """``pattern`` as an error message quotes it: its first 80 characters."""
    return repr(pattern) if len(pattern) <= 80 else repr(pattern[:80]) + "..."


def _parse(pattern: str) -> _Sequence:
    """``pattern`` as nested sequences and groups, without expanding anything (linear in its length).

    ``{`` opens a group, ``,`` separates its alternatives and ``}`` closes it; outside any
    group a comma is an ordinary character. Built with an explicit stack, so the nesting
    depth of a pattern never reaches Python's recursion limit.
    """
    # Each open level: (the alternatives finished so far, the parts of the alternative being read).
    stack: list[tuple[list[_Sequence], list[_Part]]] = [([], [])]
    literal: list[str] = []

    def flush() -> None:
        if literal:
            stack[-1][1].append("".join(literal))
            literal.clear()

    for char in pattern:
        if char == "{":
            flush()
            stack.append(([], []))
            if len(stack) > _MAX_NESTING + 1:
                raise ConfigError(f"pattern {_quoted(pattern)} nests {{a,b}} groups more than {_MAX_NESTING} deep")
        elif char == "}":
            if len(stack) == 1:
                raise ConfigError(f"pattern {pattern!r} has unbalanced braces")
            flush()
            alternatives, parts = stack.pop()
            stack[-1][1].append((*alternatives, tuple(parts)))
        elif char == "," and len(stack) > 1:
            flush()
            stack[-1][0].append(tuple(stack[-1][1]))
            stack[-1][1].clear()
        else:
            literal.append(char)
    if len(stack) != 1:
        raise ConfigError(f"pattern {pattern!r} has unbalanced braces")
    flush()
    return tuple(stack[0][1])


def _count(sequence: _Sequence) -> int:
    """How many globs ``sequence`` expands to (with repeats), capped just past :data:`MAX_EXPANSION`."""
    total = 1
    for part in sequence:
        if not isinstance(part, str):
            total *= min(sum(_count(alternative) for alternative in part), MAX_EXPANSION + 1)
            total = min(total, MAX_EXPANSION + 1)
    return total


def _expand(sequence: _Sequence) -> list[str]:
    expanded = [""]
    for part in sequence:
        if isinstance(part, str):
            expanded = [prefix + part for prefix in expanded]
        else:
            tails = [tail for alternative in part for tail in _expand(alternative)]
            expanded = [prefix + tail for prefix in expanded for tail in tails]
    return expanded


def brace_alternatives(pattern: str) -> int:
    """How many plain globs ``pattern`` expands to, counted without expanding (at most ``MAX_EXPANSION + 1``).

    >>> brace_alternatives("model.layers.{0,1,2}.{self_attn,cross_attn}")
    6
    """
    return _count(_parse(pattern))


@lru_cache(maxsize=1024)
def _expanded(pattern: str) -> tuple[str, ...]:
    tree = _parse(pattern)
    count = _count(tree)
    if count > MAX_EXPANSION:
        raise ConfigError(
            f"pattern {_quoted(pattern)} expands to more than {MAX_EXPANSION} "
            "alternatives through its {a,b} groups; list the module names instead, or use * to match many"
        )
    return tuple(dict.fromkeys(_expand(tree)))


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives (nesting allowed) into plain glob patterns, each once.

    The size of the expansion is counted first, and a pattern past :data:`MAX_EXPANSION`
    globs is a ConfigError, as are unbalanced braces.

    >>> expand_braces("model.layers.{0,1}.self_attn")
    ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    """
    return list(_expanded(pattern))


def _matches(name: str, pattern: str) -> bool:
    # fnmatch's ``*`` already crosses dots; ``fnmatchcase`` keeps it case-sensitive on every OS.
    return any(fnmatch.fnmatchcase(name, glob) for glob in _expanded(pattern))


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(_matches(name, pattern) for pattern in patterns)


def match_module_names(pattern: str, module_names: Iterable[str]) -> list[str]:
    """The names among ``module_names`` that ``pattern`` matches."""
    return [name for name in module_names if _matches(name, pattern)]
