"""Reading YAML and JSON documents that strangers wrote, with bounds on what they may cost.

A config (``--config``, a YAML processor item) and a state file's metadata (JSON) are read
from files anyone may hand over. Their parsers will happily take a key written twice (and
silently keep the last), nest structures until Python's recursion limit ends the process
with an internal error, or expand a few hundred bytes of YAML aliases into gigabytes. Every
document quantcache reads goes through :func:`load_yaml` or :func:`load_json`, which refuse
each of these with a :class:`~quantcache.errors.ConfigError` that names the problem.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from quantcache.errors import ConfigError

__all__ = ["MAX_DEPTH", "load_json", "load_yaml"]

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists a document may have. A config is four levels deep
(``spec.process[0].layers[0].qconfig.key``); a state file's metadata three."""

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _key_text(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _too_deep(what: str) -> ConfigError:
    return ConfigError(f"{what} nests mappings and lists more than {MAX_DEPTH} levels deep; refusing it as malformed")


# ---------------------------------------------------------------------------- JSON
def _json_depth(text: str) -> int:
    """How deep ``text``'s arrays and objects nest, counted without parsing (brackets inside strings ignored)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ConfigError(f"duplicate key {_key_text(key)} in one JSON object; a reader would keep only one")
        mapping[key] = value
    return mapping


def load_json(text: str | bytes, *, what: str = "JSON document") -> Any:
    """``json.loads(text)``, refusing duplicate keys and nesting past :data:`MAX_DEPTH` (ConfigError).

    Malformed JSON raises :class:`json.JSONDecodeError` as usual. ``what`` names the document
    in the error messages.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if _json_depth(text) > MAX_DEPTH:
        raise _too_deep(what)
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from None


# ---------------------------------------------------------------------------- YAML
class BoundedYamlLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys, deep nesting and documents whose aliases expand into something huge.

    * A key written twice in one mapping is a ConfigError naming it and its line (PyYAML
      keeps the last silently); a key merged in with ``<<`` may still be overridden.
    * Nesting deeper than :data:`MAX_DEPTH` is refused while composing, before the
      recursive composer can reach Python's recursion limit, and so is a node whose
      aliases make it that deep (alias chains nest without nesting text).
    * An alias-chain ("billion laughs") document is a few hundred bytes of YAML whose
      nodes are referenced exponentially often; counting the nodes the composed
      document expands to (each shared node once per reference, memoised) refuses it
      before anything is constructed or quoted.
    """

    _MAX_EXPANDED_NODES = 100_000
    _MAX_ALIAS_USES = 10_000

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0  # nodes being composed, one inside the next
        self._heights: dict[int, int] = {}  # a composed node's expanded depth, by id
        self._alias_uses = 0

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}

            def expanded(item: Any) -> int:  # recursion bounded by the heights compose_node checked
                known = sizes.get(id(item))
                if known is not None:
                    return known
                sizes[id(item)] = 1  # a recursive document counts a cycle once
                total = 1
                if isinstance(item, yaml.SequenceNode):
                    total += sum(expanded(child) for child in item.value)
                elif isinstance(item, yaml.MappingNode):
                    total += sum(expanded(key) + expanded(value) for key, value in item.value)
                sizes[id(item)] = total
                return total

            if expanded(node) > self._MAX_EXPANDED_NODES:
                raise ConfigError(
                    f"config expands to more than {self._MAX_EXPANDED_NODES} YAML nodes through its aliases "
                    "(an alias chain?); refusing it as malformed"
                )
        return node

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._alias_uses += 1
            if self._alias_uses > self._MAX_ALIAS_USES:
                raise ConfigError(
                    f"config uses YAML aliases more than {self._MAX_ALIAS_USES} times; refusing it as malformed"
                )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _too_deep("config")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        # A child still being composed (a recursive alias) has no height yet and counts as a leaf.
        height = 1 + max((self._heights.get(id(child), 0) for child in children), default=0)
        if height > MAX_DEPTH:
            raise _too_deep("config (through its aliases)")
        self._heights[id(node)] = height
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may be overridden; that is what ``<<`` is for
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key {_key_text(key)} (line {mark.line + 1}, column {mark.column + 1}): YAML would "
                    "silently keep only the last one; remove the other"
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """The YAML document ``text`` (safe types only), bounded as :class:`BoundedYamlLoader` says."""
    loader = BoundedYamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
