"""What to quantize: a validated, serialisable KV-cache quantization config.

The config is the single description of a quantization scheme. It is read from
msModelSlim's ``dynamic_cache`` processor YAML unchanged, written back to the same
shape, and stored as JSON inside every saved calibration state, so a state always
says how it was made.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantcache.errors import ConfigError
from quantcache.scheme.args import (
    STREAM_KEYS,
    LayerOverride,
    QuantArgs,
    QuantDtype,
    QuantMethod,
    QuantScope,
    Rotation,
    Rounding,
    ScaleFormat,
    Storage,
    ZeroPointFormat,
    enum_value,
    short_repr,
)
from quantcache.scheme.patterns import expand_braces, match_module_names, matches_any

__all__ = [
    "ConfigError",
    "KVQuantConfig",
    "LayerOverride",
    "QuantArgs",
    "QuantDtype",
    "QuantMethod",
    "QuantScope",
    "ScaleFormat",
    "Storage",
    "ZeroPointFormat",
    "expand_braces",
    "match_module_names",
]


_PROCESSOR_TYPE = "dynamic_cache"
# The flat fields of KVQuantConfig that describe both streams (QuantArgs' fields).
_SHARED_FIELDS = STREAM_KEYS
# The processor item's own keys beside ``type`` and ``qconfig``: each is a KVQuantConfig field of that name.
_ITEM_FIELDS = ("include", "exclude", "layers", "storage", "sink_tokens", "residual_window", "pre_rope_keys")
_ITEM_KEYS = ("type", "qconfig", *_ITEM_FIELDS)
_STREAMS = ("key", "value")
# A config is a short list of patterns; a document that expands past these is not a config
# (an alias-chain "billion laughs" YAML, say) and is refused before anything quotes it.
_MAX_PATTERNS = 1024
_MAX_PATTERN_LENGTH = 512
_MAX_SINK_TOKENS = 1024  # a handful is what helps; more is a full-precision window, not sinks
_MAX_RESIDUAL_WINDOW = 65536  # tokens; a window that long is an unquantized cache, not a window


def _key_text(key: Any) -> str:
    """A mapping key as an error message shows it: the string itself (cut), or a bounded repr."""
    return key[:80] if isinstance(key, str) else short_repr(key)


def _check_token_count(key: str, value: Any, maximum: int) -> None:
    """A whole number of tokens from 0 to ``maximum``, or a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ConfigError(f"{key}: expected a whole number of tokens from 0 to {maximum}, got {short_repr(value)}")


def _pattern_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a list of glob patterns, got {type(value).__name__}")
    if isinstance(value, Sequence) and len(value) > _MAX_PATTERNS:
        raise ConfigError(f"{key}: {len(value)} patterns; at most {_MAX_PATTERNS} are accepted")
    patterns = tuple(value)
    if len(patterns) > _MAX_PATTERNS:
        raise ConfigError(f"{key}: {len(patterns)} patterns; at most {_MAX_PATTERNS} are accepted")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{key}: every pattern must be a non-empty string, got {short_repr(pattern)}")
        if len(pattern) > _MAX_PATTERN_LENGTH:
            raise ConfigError(f"{key}: a pattern of {len(pattern)} characters; at most {_MAX_PATTERN_LENGTH}")
        expand_braces(pattern)  # raises on unbalanced braces
    return patterns


@dataclass(frozen=True)
class KVQuantConfig:
    """How the key/value cache is quantized and which attention modules take part.

    The flat fields (``dtype``, ``scope``, ``symmetric``, ``method``, ``dynamic``,
    ``group_size``) describe both streams, as msModelSlim's ``qconfig`` does; ``key``
    or ``value`` replace them for one stream. :attr:`key_args` / :attr:`value_args`
    are what each stream actually uses.

    Attributes:
        dtype: number format (``int8``).
        scope: parameter granularity (``per_channel``: one per kv_head and head_dim channel).
        symmetric: symmetric (zero point 0, range ``[-max|x|, max|x|]``) or asymmetric
            (range ``[min, max]``, zero point shifts it onto ``[-128, 127]``).
        method: observer used for the range (``minmax``).
        include: glob patterns on attention module names (``model.layers.0.self_attn``);
            ``*`` crosses dots and ``{a,b}`` lists alternatives.
        exclude: patterns removed from ``include``; exclude wins.
        dynamic, group_size, scale_format, zero_point_format, query_aware, rounding, zero_level: see
            :class:`~quantcache.scheme.args.QuantArgs`.
        key, value: per-stream arguments that replace the flat fields for that stream.
        layers: per-layer overrides (:class:`~quantcache.scheme.args.LayerOverride`, or their
            ``{include, qconfig}`` mappings, merged onto ``key``/``value`` when read): a
            quantized module takes the first override whose patterns match its name.
        storage: what a frozen cache keeps, ``fake`` (dequantized states in the model
            dtype, no memory saved; the default) or ``packed`` (codes, see
            :mod:`quantcache.cache.storage_layers`). Both return the same keys and values.
        sink_tokens: the first tokens of every sequence, kept in full precision and out of
            the statistics in full-attention layers (sliding windows evict them anyway):
            the BOS "attention sink" draws much of every query's attention, and keeping
            it costs one token of the model dtype whatever the context length.
        residual_window: the most recent tokens of every layer, returned in full precision
            until that many newer tokens have followed them (KIVI's residual): queries
            attend most to their nearest keys. Every token is still stored quantized when it
            arrives, so the window is a full-precision copy on top of its codes, counted in
            effective bits; a token is read back from its codes once it leaves the window.
        pre_rope_keys: quantize keys as they were before the rotary position embedding,
            where channel offsets stand still instead of turning with the position (see
            :mod:`quantcache.ops.rope`). Needs a model with RoPE; not exported (serving
            engines quantize keys after RoPE).
    """

    dtype: QuantDtype = QuantDtype.INT8
    scope: QuantScope = QuantScope.PER_CHANNEL
    symmetric: bool = True
    method: QuantMethod = QuantMethod.MINMAX
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    dynamic: bool = False
    group_size: int | None = None
    observer_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    rotation: Rotation = Rotation.NONE
    rotation_seed: int = 0
    center: bool = False
    scale_format: ScaleFormat = ScaleFormat.FLOAT16
    zero_point_format: ZeroPointFormat = ZeroPointFormat.INT16
    query_aware: bool = False
    rounding: Rounding = Rounding.NEAREST
    zero_level: bool = True
    key: QuantArgs | None = None
    value: QuantArgs | None = None
    layers: tuple[LayerOverride, ...] = field(default_factory=tuple)
    storage: Storage = Storage.FAKE
    sink_tokens: int = 0
    residual_window: int = 0
    pre_rope_keys: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "storage", enum_value(Storage, "storage", self.storage, section=""))
        _check_token_count("sink_tokens", self.sink_tokens, _MAX_SINK_TOKENS)
        _check_token_count("residual_window", self.residual_window, _MAX_RESIDUAL_WINDOW)
        if not isinstance(self.pre_rope_keys, bool):
            raise ConfigError(f"pre_rope_keys: expected true or false, got {short_repr(self.pre_rope_keys)}")
        shared = QuantArgs(**{name: getattr(self, name) for name in _SHARED_FIELDS})
        for name in _SHARED_FIELDS:
            set_(self, name, getattr(shared, name))
        for stream in _STREAMS:
            args = getattr(self, stream)
            if isinstance(args, Mapping):
                args = QuantArgs.from_dict(args, where=f"qconfig.{stream}")
            if args is not None and not isinstance(args, QuantArgs):
                raise ConfigError(f"{stream}: expected QuantArgs or a mapping, got {type(args).__name__}")
            set_(self, stream, None if args == shared else args)
        set_(self, "include", _pattern_tuple("include", self.include))
        set_(self, "exclude", _pattern_tuple("exclude", self.exclude))
        if isinstance(self.layers, (str, Mapping)) or not isinstance(self.layers, Iterable):
            raise ConfigError(
                f"layers: expected a list of {{include, qconfig}} items, got {type(self.layers).__name__}"
            )
        overrides = []
        for index, item in enumerate(self.layers):
            where = f"layers[{index}]"
            if not isinstance(item, LayerOverride):
                item = LayerOverride.from_dict(item, key=self.key_args, value=self.value_args, where=where)
            overrides.append(LayerOverride(_pattern_tuple(f"{where}.include", item.include), item.key, item.value))
        set_(self, "layers", tuple(overrides))
        if any(args.query_aware for args in (self.value_args, *(o.value for o in overrides))):
            raise ConfigError(
                "qconfig.value.query_aware: values are weighed by attention, not read by queries, so only keys "
                "can be query-aware; set query_aware under qconfig.key (a flat query_aware applies to both streams)"
            )
        roundings = {args.rounding for args in (self.key_args, *(o.key for o in overrides))}
        if not self.pre_rope_keys and Rounding.QUERY_AWARE in roundings:
            raise ConfigError(
                "qconfig.key.rounding 'query_aware' weighs a key's error by queries that reach it through RoPE, "
                "which the cache can follow only for keys it holds before RoPE: set pre_rope_keys: true"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> KVQuantConfig:
        """A named scheme (``seed``, ``int8``, ``fp8``, ``int4``, ``int3``, ``int2``; see :mod:`quantcache.scheme.presets`).

        ``overrides`` replace fields (``exclude=[...]``, ``storage="packed"`` ...).
        """
        from quantcache.scheme.presets import PRESETS, preset_settings

        try:
            settings = preset_settings(name)
        except KeyError:
            raise ConfigError(f"unknown preset {short_repr(name)}; choose from {', '.join(PRESETS)}") from None
        return cls(**{**settings, **overrides})

    # ------------------------------------------------------------------ the two streams
    @property
    def shared_args(self) -> QuantArgs:
        """The arguments the flat fields describe."""
        return QuantArgs(**{name: getattr(self, name) for name in _SHARED_FIELDS})

    @property
    def key_args(self) -> QuantArgs:
        """What the keys use."""
        return self.key if self.key is not None else self.shared_args

    @property
    def value_args(self) -> QuantArgs:
        """What the values use."""
        return self.value if self.value is not None else self.shared_args

    def stream_args(self, stream: str, module_name: str | None = None) -> QuantArgs:
        """``key_args`` or ``value_args`` by name; for ``module_name``, what its layer override says."""
        if stream not in _STREAMS:
            raise ValueError(f"stream must be 'key' or 'value', got {stream!r}")
        for override in self.layers if module_name is not None else ():
            if matches_any(module_name, override.include):  # type: ignore[arg-type]
                return override.key if stream == "key" else override.value
        return self.key_args if stream == "key" else self.value_args

    def all_stream_args(self) -> list[QuantArgs]:
        """Every stream scheme the config can use (the config's own two, then each override's)."""
        return [self.key_args, self.value_args, *(args for o in self.layers for args in (o.key, o.value))]

    # ------------------------------------------------------------------ layer selection
    def is_quantized(self, module_name: str) -> bool:
        """Whether the attention module called ``module_name`` gets its KV cache quantized."""
        return matches_any(module_name, self.include) and not matches_any(module_name, self.exclude)

    def select(self, module_names: Sequence[str], *, warn_unmatched: bool = True) -> list[bool]:
        """Which of ``module_names`` are quantized; warn about patterns that match none of them.

        A pattern that matches nothing is almost always a typo (``self_atn``) or a name
        from another architecture, and silently quantizing everything is the failure
        the warning prevents.
        """
        if warn_unmatched:
            overridden = tuple(pattern for override in self.layers for pattern in override.include)
            for kind, patterns in (("include", self.include), ("exclude", self.exclude), ("layers", overridden)):
                for pattern in patterns:
                    if not match_module_names(pattern, module_names):
                        example = module_names[0] if module_names else "<no layers>"
                        warnings.warn(
                            f"{kind} pattern {pattern!r} matches no attention module (names look like {example!r})",
                            UserWarning,
                            stacklevel=3,
                        )
        return [self.is_quantized(name) for name in module_names]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML data, in msModelSlim's processor-item shape.

        Streams configured apart add ``qconfig.key`` / ``qconfig.value`` mappings; the
        seed scheme writes exactly msModelSlim's four ``qconfig`` keys.
        """
        qconfig = self.shared_args.to_dict()
        for stream in _STREAMS:
            args: QuantArgs | None = getattr(self, stream)
            if args is not None:
                qconfig[stream] = args.to_dict(full=True)
        data: dict[str, Any] = {
            "type": _PROCESSOR_TYPE,
            "qconfig": qconfig,
            "include": list(self.include),
            "exclude": list(self.exclude),
        }
        if self.layers:
            data["layers"] = [override.to_dict() for override in self.layers]
        if self.storage is not Storage.FAKE:
            data["storage"] = self.storage.value
        if self.sink_tokens:
            data["sink_tokens"] = self.sink_tokens
        if self.residual_window:
            data["residual_window"] = self.residual_window
        if self.pre_rope_keys:
            data["pre_rope_keys"] = True
        return data

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
        unknown = [key for key in data if key not in _ITEM_KEYS]
        if unknown:
            raise ConfigError(
                f"unknown key '{_key_text(unknown[0])}' in processor item; allowed: {', '.join(_ITEM_KEYS)}"
            )
        kind = data.get("type", _PROCESSOR_TYPE)
        if kind != _PROCESSOR_TYPE:
            raise ConfigError(f"type: expected {_PROCESSOR_TYPE!r}, got {short_repr(kind)}")
        qconfig = data.get("qconfig", {}) or {}
        if not isinstance(qconfig, Mapping):
            raise ConfigError(f"qconfig: expected a mapping, got {type(qconfig).__name__}")
        allowed = (*STREAM_KEYS, *_STREAMS)
        unknown = [key for key in qconfig if key not in allowed]
        if unknown:
            raise ConfigError(f"unknown key 'qconfig.{_key_text(unknown[0])}'; allowed: {', '.join(allowed)}")
        kwargs: dict[str, Any] = {key: qconfig[key] for key in STREAM_KEYS if key in qconfig}
        shared = QuantArgs.from_dict(kwargs)
        for stream in _STREAMS:
            if stream in qconfig:
                overrides = qconfig[stream]
                if not isinstance(overrides, Mapping):
                    raise ConfigError(f"qconfig.{stream}: expected a mapping, got {type(overrides).__name__}")
                kwargs[stream] = QuantArgs.from_dict({**shared.to_dict(), **overrides}, where=f"qconfig.{stream}")
        for key in _ITEM_FIELDS:
            if key in data and data[key] is not None:
                kwargs[key] = data[key]
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
            kinds = short_repr([item.get("type") for item in process[:20] if isinstance(item, Mapping)])
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
                what = "is a directory, not a config file" if path.is_dir() else "not found"
                raise ConfigError(f"config file {what}: {path}")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start})") from error
            except OSError as error:
                raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from error
        else:
            text = source
        try:
            data = yaml.load(text, Loader=_BoundedLoader)
        except yaml.YAMLError as error:
            raise ConfigError(f"config is not valid YAML: {str(error)[:300]}") from error
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


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses documents whose aliases expand into something huge.

    An alias-chain ("billion laughs") document is a few hundred bytes of YAML whose
    nodes are referenced exponentially often; counting the nodes the composed
    document expands to (each shared node once per reference, memoised) refuses it
    before anything is constructed or quoted.
    """

    _MAX_EXPANDED_NODES = 100_000

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}

            def expanded(item: Any) -> int:
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

    _MAX_ALIAS_USES = 10_000

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._alias_uses = getattr(self, "_alias_uses", 0) + 1
            if self._alias_uses > self._MAX_ALIAS_USES:
                raise ConfigError(
                    f"config uses YAML aliases more than {self._MAX_ALIAS_USES} times; refusing it as malformed"
                )
        return super().compose_node(parent, index)
