"""What to quantize: a validated, serialisable KV-cache quantization config.

The config is the single description of a quantization scheme. It is read from
msModelSlim's ``dynamic_cache`` processor YAML unchanged, written back to the same
shape, and stored as JSON inside every saved calibration state, so a state always
says how it was made.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "KVQuantConfig",
    "QuantDtype",
    "QuantMethod",
    "QuantScope",
    "expand_braces",
    "match_module_names",
]


class QuantDtype(str, Enum):
    """Integer format of the quantized cache."""

    INT8 = "int8"


class QuantScope(str, Enum):
    """Granularity of the quantization parameters.

    ``per_channel`` keeps one scale (and zero point) per (kv_head, head_dim channel),
    i.e. per column of ``states.transpose(1, 2).reshape(-1, kv_heads * head_dim)``.
    """

    PER_CHANNEL = "per_channel"


class QuantMethod(str, Enum):
    """How calibration statistics become quantization parameters."""

    MINMAX = "minmax"


_QCONFIG_KEYS = ("scope", "dtype", "symmetric", "method")
_PROCESSOR_TYPE = "dynamic_cache"


def _enum_value(enum_type: type[Enum], key: str, value: Any) -> Any:
    allowed = [member.value for member in enum_type]
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str) and value.lower() in allowed:
        return enum_type(value.lower())
    raise ConfigError(f"qconfig.{key}: unsupported value {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _pattern_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a list of glob patterns, got {type(value).__name__}")
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{key}: every pattern must be a non-empty string, got {pattern!r}")
        expand_braces(pattern)  # raises on unbalanced braces
    return patterns


@dataclass(frozen=True)
class KVQuantConfig:
    """How the key/value cache is quantized and which attention modules take part.

    Attributes:
        dtype: integer format (``int8``).
        scope: parameter granularity (``per_channel``: one per kv_head and head_dim channel).
        symmetric: symmetric (zero point 0, range ``[-max|x|, max|x|]``) or asymmetric
            (range ``[min, max]``, zero point shifts it onto ``[-128, 127]``).
        method: statistic used for the range (``minmax``).
        include: glob patterns on attention module names (``model.layers.0.self_attn``);
            ``*`` crosses dots and ``{a,b}`` lists alternatives.
        exclude: patterns removed from ``include``; exclude wins.
    """

    dtype: QuantDtype = QuantDtype.INT8
    scope: QuantScope = QuantScope.PER_CHANNEL
    symmetric: bool = True
    method: QuantMethod = QuantMethod.MINMAX
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _enum_value(QuantDtype, "dtype", self.dtype))
        object.__setattr__(self, "scope", _enum_value(QuantScope, "scope", self.scope))
        object.__setattr__(self, "method", _enum_value(QuantMethod, "method", self.method))
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"qconfig.symmetric: expected true or false, got {self.symmetric!r}")
        object.__setattr__(self, "include", _pattern_tuple("include", self.include))
        object.__setattr__(self, "exclude", _pattern_tuple("exclude", self.exclude))

    # ------------------------------------------------------------------ layer selection
    def is_quantized(self, module_name: str) -> bool:
        """Whether the attention module called ``module_name`` gets its KV cache quantized."""
        return _matches_any(module_name, self.include) and not _matches_any(module_name, self.exclude)

    def select(self, module_names: Sequence[str], *, warn_unmatched: bool = True) -> list[bool]:
        """Which of ``module_names`` are quantized; warn about patterns that match none of them.

        A pattern that matches nothing is almost always a typo (``self_atn``) or a name
        from another architecture, and silently quantizing everything is the failure
        the warning prevents.
        """
        if warn_unmatched:
            for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
                for pattern in patterns:
                    if not match_module_names(pattern, module_names):
                        example = module_names[0] if module_names else "<no layers>"
                        warnings.warn(
                            f"{kind} pattern {pattern!r} matches no attention module "
                            f"(names look like {example!r})",
                            UserWarning,
                            stacklevel=3,
                        )
        return [self.is_quantized(name) for name in module_names]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML data, in msModelSlim's processor-item shape."""
        return {
            "type": _PROCESSOR_TYPE,
            "qconfig": {
                "scope": self.scope.value,
                "dtype": self.dtype.value,
                "symmetric": self.symmetric,
                "method": self.method.value,
            },
            "include": list(self.include),
            "exclude": list(self.exclude),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVQuantConfig:
        """Read a processor item (``type: dynamic_cache``) or a full msModelSlim document.

        A full document is recognised by its ``spec: {process: [...]}`` and must hold
        exactly one ``dynamic_cache`` item; other processors (``linear_quant`` ...) and
        other top-level sections are left to the tools that own them.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping at the top of the config, got {type(data).__name__}")
        if "spec" in data:
            return cls._from_document(data)
        allowed = ("type", "qconfig", "include", "exclude")
        unknown = [key for key in data if key not in allowed]
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in processor item; allowed: {', '.join(allowed)}")
        kind = data.get("type", _PROCESSOR_TYPE)
        if kind != _PROCESSOR_TYPE:
            raise ConfigError(f"type: expected {_PROCESSOR_TYPE!r}, got {kind!r}")
        qconfig = data.get("qconfig", {}) or {}
        if not isinstance(qconfig, Mapping):
            raise ConfigError(f"qconfig: expected a mapping, got {type(qconfig).__name__}")
        unknown = [key for key in qconfig if key not in _QCONFIG_KEYS]
        if unknown:
            raise ConfigError(f"unknown key 'qconfig.{unknown[0]}'; allowed: {', '.join(_QCONFIG_KEYS)}")
        kwargs: dict[str, Any] = {key: qconfig[key] for key in _QCONFIG_KEYS if key in qconfig}
        if "include" in data and data["include"] is not None:
            kwargs["include"] = data["include"]
        if "exclude" in data and data["exclude"] is not None:
            kwargs["exclude"] = data["exclude"]
        return cls(**kwargs)

    @classmethod
    def _from_document(cls, data: Mapping[str, Any]) -> KVQuantConfig:
        spec = data["spec"]
        if not isinstance(spec, Mapping) or "process" not in spec:
            raise ConfigError("spec: expected a mapping with a 'process' list")
        process = spec["process"]
        if not isinstance(process, list):
            raise ConfigError(f"spec.process: expected a list of processor items, got {type(process).__name__}")
        items = [item for item in process if isinstance(item, Mapping) and item.get("type") == _PROCESSOR_TYPE]
        if not items:
            kinds = [item.get("type") for item in process if isinstance(item, Mapping)]
            raise ConfigError(f"spec.process has no 'dynamic_cache' item (found types: {kinds})")
        if len(items) > 1:
            raise ConfigError(f"spec.process has {len(items)} 'dynamic_cache' items; keep exactly one")
        return cls.from_dict(items[0])

    @classmethod
    def from_yaml(cls, source: str | Path) -> KVQuantConfig:
        """Load from a YAML file path or a YAML string.

        Accepts a single processor item, a one-item list of them, or a full document.
        """
        text: str
        if isinstance(source, Path) or (
            "\n" not in source and (source.endswith((".yaml", ".yml")) or Path(source).is_file())
        ):
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            text = path.read_text(encoding="utf-8")
        else:
            text = source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"config is not valid YAML: {error}") from error
        if isinstance(data, list):
            items = [item for item in data if isinstance(item, Mapping) and item.get("type") == _PROCESSOR_TYPE]
            if len(items) != 1:
                raise ConfigError(f"expected exactly one 'dynamic_cache' item in the list, found {len(items)}")
            data = items[0]
        if data is None:
            raise ConfigError("config is empty")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        """The config as a msModelSlim-compatible YAML processor item (a one-item list)."""
        return str(yaml.safe_dump([self.to_dict()], sort_keys=False))


# ---------------------------------------------------------------------- pattern matching
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


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(_matches(name, pattern) for pattern in patterns)


def match_module_names(pattern: str, module_names: Iterable[str]) -> list[str]:
    """The names among ``module_names`` that ``pattern`` matches."""
    return [name for name in module_names if _matches(name, pattern)]
