"""What to quantize: a validated, serialisable KV-cache quantization config.

The config is the single description of a quantization scheme. It is read from
msModelSlim's ``dynamic_cache`` processor YAML unchanged, written back to the same
shape, and stored as JSON inside every saved calibration state, so a state always
says how it was made.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
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
    Rounding,
    ScaleFormat,
    ZeroPointFormat,
    short_repr,
)
from quantcache.scheme.msmodelslim import PROCESSOR_TYPE, STORAGE_MOVED, item_fields, read_yaml_item
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
    "ZeroPointFormat",
    "expand_braces",
    "match_module_names",
]


_STREAMS = ("key", "value")
# A config is a short list of patterns; a document that expands past these is not a config
# (an alias-chain "billion laughs" YAML, say) and is refused before anything quotes it.
_MAX_PATTERNS = 1024
_MAX_PATTERN_LENGTH = 512
_MAX_SINK_TOKENS = 1024  # a handful is what helps; more is a full-precision window, not sinks
_MAX_RESIDUAL_WINDOW = 65536  # tokens; a window that long is an unquantized cache, not a window
_MAX_RESIDUAL_BLOCK = 4096  # tokens quantized together; more is a window that grows, not a block


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


def _plain(value: Any) -> Any:
    """An enum member as the config spells it (``'int8'``); anything else as it is."""
    return value.value if isinstance(value, Enum) else value


def _stream_args(stream: str, given: Any, flat: Mapping[str, Any]) -> QuantArgs:
    """One stream's arguments from the constructor's ``key``/``value`` and its flat keywords (see KVQuantConfig)."""
    if given is None or isinstance(given, Mapping):
        return QuantArgs.from_dict({**flat, **(given or {})}, where=f"qconfig.{stream}")
    if not isinstance(given, QuantArgs):
        raise ConfigError(f"{stream}: expected QuantArgs or a mapping, got {type(given).__name__}")
    if flat:
        try:
            merged: QuantArgs | None = QuantArgs.from_dict({**given.to_dict(full=True), **flat})
        except ConfigError:
            merged = None
        differing = [name for name in flat if merged is None or getattr(merged, name) != getattr(given, name)]
        if differing:
            said = ", ".join(f"{name}={short_repr(flat[name])}" for name in differing)
            has = ", ".join(f"{name}={short_repr(_plain(getattr(given, name)))}" for name in differing)
            raise ConfigError(
                f"{stream}: a complete QuantArgs ({has}) and the flat keyword(s) {said}, which describe both "
                f"streams, disagree about the {stream}s. Give {stream} as a mapping of the fields it changes on top "
                f"of the flat keywords, or leave those out; to change both streams of an existing config, use "
                f"config.with_stream_args({said}) (dataclasses.replace keeps the config's complete streams)"
            )
    return given


@dataclass(frozen=True, init=False)
class KVQuantConfig:
    """How the key/value cache is quantized and which attention modules take part.

    ``key`` and ``value`` (each a :class:`~quantcache.scheme.args.QuantArgs`, always set)
    are the whole description of the two streams: nothing else is read. The constructor
    takes them in three ways, the way msModelSlim's ``qconfig`` spells a scheme:

    * flat keywords (``dtype``, ``scope``, ``symmetric``, ``method``, ... the fields of
      ``QuantArgs``, :data:`~quantcache.scheme.args.STREAM_KEYS`) describe both streams:
      ``KVQuantConfig(symmetric=False, dtype="int4")``;
    * ``key`` / ``value`` as a mapping change fields of that stream on top of the flat
      keywords: ``KVQuantConfig(symmetric=True, key={"symmetric": False})``;
    * ``key`` / ``value`` as a ``QuantArgs`` is that stream, complete. A flat keyword that
      disagrees with it is a ConfigError (which one was meant?), so
      ``dataclasses.replace(config, symmetric=False)`` is refused rather than ignored:
      :meth:`with_stream_args` changes both streams of an existing config.

    Two configs that describe the same streams are equal however they were spelled.

    Attributes:
        key, value: how the keys and the values are quantized.
        include: glob patterns on attention module names (``model.layers.0.self_attn``);
            ``*`` crosses dots and ``{a,b}`` lists alternatives.
        exclude: patterns removed from ``include``; exclude wins.
        layers: per-layer overrides (:class:`~quantcache.scheme.args.LayerOverride`, or their
            ``{include, qconfig}`` mappings, merged onto ``key``/``value`` when read): a
            quantized module takes the first override whose patterns match its name.
        sink_tokens: the first tokens of every sequence, kept in full precision and out of
            the statistics in full-attention layers (sliding windows evict them anyway):
            the BOS "attention sink" draws much of every query's attention, and keeping
            it costs one token of the model dtype whatever the context length.
        residual_window: the most recent tokens of every layer, returned in full precision
            until that many newer tokens have followed them (KIVI's residual): queries
            attend most to their nearest keys. A token is quantized when it leaves the window
            and read back from its codes from then on; packed storage keeps a row for it all
            along, so the window is a full-precision copy on top of its codes' bytes, counted
            in effective bits.
        residual_block: how many tokens leave the residual window together (quantized in one
            call): the window then holds from ``residual_window`` to ``residual_window +
            residual_block - 1`` of the newest tokens, and a decode step quantizes once every
            ``residual_block`` steps instead of every step. Quantizing a token costs hundreds of
            small tensor operations (ranges searched, keys rounded for the logits), whatever the
            number of tokens: a block pays them once. 1 (the default): one token at a time.
            Effective bits count the window at its largest.
        pre_rope_keys: quantize keys as they were before the rotary position embedding,
            where channel offsets stand still instead of turning with the position (see
            :mod:`quantcache.ops.rope`). Needs a model with RoPE; not exported (serving
            engines quantize keys after RoPE).
        rope_center: quantize keys after RoPE, centred on their calibrated mean before RoPE turned
            to each key's position (dynamic, centred key streams). What is quantized is the
            pre-RoPE residual turned by RoPE, so it gains what ``pre_rope_keys`` gains, while the
            codes stay in the space attention reads: the attention from codes
            (:mod:`quantcache.cache.attention`) moves every step of decoding to the query instead
            of decoding and turning the history. Calibration is the same as ``pre_rope_keys``'s
            (keys and queries seen before RoPE); query-aware channel scales are one per RoPE pair
            already, so they commute with the turn. Needs a model with RoPE; not exported (dynamic).
    """

    key: QuantArgs = field(default_factory=QuantArgs)
    value: QuantArgs = field(default_factory=QuantArgs)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    layers: tuple[LayerOverride, ...] = field(default_factory=tuple)
    sink_tokens: int = 0
    residual_window: int = 0
    residual_block: int = 1
    pre_rope_keys: bool = False
    rope_center: bool = False

    def __init__(
        self,
        *,
        key: QuantArgs | Mapping[str, Any] | None = None,
        value: QuantArgs | Mapping[str, Any] | None = None,
        include: Iterable[str] | str = ("*",),
        exclude: Iterable[str] | str = (),
        layers: Iterable[LayerOverride | Mapping[str, Any]] = (),
        sink_tokens: int = 0,
        residual_window: int = 0,
        residual_block: int = 1,
        pre_rope_keys: bool = False,
        rope_center: bool = False,
        **flat: Any,
    ) -> None:
        if "storage" in flat:
            raise TypeError(f"KVQuantConfig() takes no storage: {STORAGE_MOVED}")
        unknown = [name for name in flat if name not in STREAM_KEYS]
        if unknown:
            raise TypeError(
                f"KVQuantConfig() got an unexpected keyword argument {unknown[0]!r}; a stream's keywords are "
                f"{', '.join(STREAM_KEYS)}"
            )
        set_ = object.__setattr__
        for stream, given in (("key", key), ("value", value)):
            set_(self, stream, _stream_args(stream, given, flat))
        _check_token_count("sink_tokens", sink_tokens, _MAX_SINK_TOKENS)
        _check_token_count("residual_window", residual_window, _MAX_RESIDUAL_WINDOW)
        set_(self, "sink_tokens", sink_tokens)
        set_(self, "residual_window", residual_window)
        if isinstance(residual_block, bool) or not isinstance(residual_block, int):
            raise ConfigError(f"residual_block: expected a whole number of tokens, got {short_repr(residual_block)}")
        if not 1 <= residual_block <= _MAX_RESIDUAL_BLOCK:
            raise ConfigError(
                f"residual_block: {residual_block} tokens; tokens leave the residual window from 1 (one at a time, "
                f"the default) to {_MAX_RESIDUAL_BLOCK} at a time"
            )
        set_(self, "residual_block", residual_block)
        if not isinstance(pre_rope_keys, bool):
            raise ConfigError(f"pre_rope_keys: expected true or false, got {short_repr(pre_rope_keys)}")
        set_(self, "pre_rope_keys", pre_rope_keys)
        if not isinstance(rope_center, bool):
            raise ConfigError(f"rope_center: expected true or false, got {short_repr(rope_center)}")
        if rope_center and pre_rope_keys:
            raise ConfigError(
                "rope_center and pre_rope_keys both take keys back before RoPE to centre them; rope_center stores "
                "them after RoPE (attention can read its codes), pre_rope_keys before it: choose one"
            )
        set_(self, "rope_center", rope_center)
        set_(self, "include", _pattern_tuple("include", include))
        set_(self, "exclude", _pattern_tuple("exclude", exclude))
        if isinstance(layers, (str, Mapping)) or not isinstance(layers, Iterable):
            raise ConfigError(f"layers: expected a list of {{include, qconfig}} items, got {type(layers).__name__}")
        overrides = []
        for index, item in enumerate(layers):
            where = f"layers[{index}]"
            if not isinstance(item, LayerOverride):
                item = LayerOverride.from_dict(item, key=self.key, value=self.value, where=where)
            overrides.append(LayerOverride(_pattern_tuple(f"{where}.include", item.include), item.key, item.value))
        set_(self, "layers", tuple(overrides))
        if any(args.query_aware for args in (self.value, *(o.value for o in overrides))):
            raise ConfigError(
                "qconfig.value.query_aware: values are weighed by attention, not read by queries, so only keys "
                "can be query-aware; set query_aware under qconfig.key (a flat query_aware applies to both streams)"
            )
        if any(args.rope_radius for args in (self.value, *(o.value for o in overrides))):
            raise ConfigError(
                "qconfig.value.rope_radius: RoPE turns keys, not values, so only keys take ranges from RoPE pairs; "
                "set rope_radius under qconfig.key (a flat rope_radius applies to both streams)"
            )
        if pre_rope_keys and any(args.rope_radius for args in (self.key, *(o.key for o in overrides))):
            raise ConfigError(
                "qconfig.key.rope_radius sets ranges RoPE cannot leave for keys after RoPE; with pre_rope_keys: true "
                "the keys are quantized before RoPE and need no such range: drop one of the two"
            )
        key_schemes = (self.key, *(o.key for o in overrides))
        if rope_center and not all(args.dynamic and args.center for args in key_schemes):
            raise ConfigError(
                "rope_center turns each key stream's calibrated center to the key's position, and a key stream "
                "without one (dynamic: true, center: true under qconfig.key and every layers override) has none "
                "to turn: centre the keys, or drop rope_center"
            )
        roundings = {args.rounding for args in key_schemes}
        if not (pre_rope_keys or rope_center) and Rounding.QUERY_AWARE in roundings:
            raise ConfigError(
                "qconfig.key.rounding 'query_aware' weighs a key's error by queries that reach it through RoPE, "
                "which the cache follows only for keys centred before RoPE: set rope_center: true (or "
                "pre_rope_keys: true)"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> KVQuantConfig:
        """A named scheme (``seed``, ``c8``, ``int8``, ``fp8``, ``int4``, ``int3``, ``int2``; see
        :mod:`quantcache.scheme.presets`).

        ``overrides`` replace fields (``exclude=[...]``, ``sink_tokens=0``, ``symmetric=False`` ...).
        """
        from quantcache.scheme.presets import PRESETS, preset_settings

        try:
            settings = preset_settings(name)
        except KeyError:
            raise ConfigError(f"unknown preset {short_repr(name)}; choose from {', '.join(PRESETS)}") from None
        return cls(**{**settings, **overrides})

    # ------------------------------------------------------------------ the two streams
    @property
    def key_args(self) -> QuantArgs:
        """What the keys use (:attr:`key`)."""
        return self.key

    @property
    def value_args(self) -> QuantArgs:
        """What the values use (:attr:`value`)."""
        return self.value

    def with_stream_args(self, **changes: Any) -> KVQuantConfig:
        """This config with ``changes`` (fields of :class:`QuantArgs`) made to both of its own streams.

        What ``quantcache calibrate --asymmetric`` and the like do to a config. Layer
        overrides keep their own arguments, as they were resolved when the config was read.
        """
        unknown = [name for name in changes if name not in STREAM_KEYS]
        if unknown:
            raise TypeError(f"with_stream_args() got an unexpected keyword argument {unknown[0]!r}")
        key, value = (
            QuantArgs.from_dict({**args.to_dict(full=True), **changes}, where=f"qconfig.{stream}")
            for stream, args in (("key", self.key), ("value", self.value))
        )
        return replace(self, key=key, value=value)

    def stream_args(self, stream: str, module_name: str | None = None) -> QuantArgs:
        """``key`` or ``value`` by name; for ``module_name``, what its layer override says."""
        if stream not in _STREAMS:
            raise ValueError(f"stream must be 'key' or 'value', got {stream!r}")
        for override in self.layers if module_name is not None else ():
            if matches_any(module_name, override.include):  # type: ignore[arg-type]
                return override.key if stream == "key" else override.value
        return self.key if stream == "key" else self.value

    def all_stream_args(self) -> list[QuantArgs]:
        """Every stream scheme the config can use (the config's own two, then each override's)."""
        return [self.key, self.value, *(args for o in self.layers for args in (o.key, o.value))]

    def stream_schemes(self, module_names: Sequence[str] | None = None) -> list[tuple[str, str, QuantArgs]]:
        """``(where, stream, args)`` of every stream scheme in use, ``where`` naming it as the YAML does.

        ``where`` is ``qconfig.key`` for the config's own keys, ``layers[2].qconfig.value`` for
        an override's values. Given ``module_names``, only the schemes some quantized module
        among them uses; otherwise every one the config can use.
        """
        sources: list[tuple[str, LayerOverride | None]] = [("", None)]
        sources += [(f"layers[{index}].", override) for index, override in enumerate(self.layers)]
        if module_names is not None:
            used = set()
            for name in module_names:
                if self.is_quantized(name):
                    matched = (i for i, o in enumerate(self.layers) if matches_any(name, o.include))
                    used.add(next(matched, -1) + 1)
            sources = [source for index, source in enumerate(sources) if index in used]
        schemes = []
        for prefix, override in sources:
            key, value = (self.key, self.value) if override is None else (override.key, override.value)
            schemes += [(f"{prefix}qconfig.key", "key", key), (f"{prefix}qconfig.value", "value", value)]
        return schemes

    def export_problems(self, module_names: Sequence[str] | None = None) -> list[str]:
        """Why serving engines cannot take a state of this config (empty when they can), each naming its setting.

        Every stream scheme in use (:meth:`stream_schemes`; by ``module_names``'s quantized
        modules when given) must be one the exporters read
        (:meth:`~quantcache.scheme.args.QuantArgs.export_problems`), and the whole cache must
        quantize every token after RoPE as engines do. Whether a format can carry zero
        points (:attr:`~quantcache.scheme.args.QuantArgs.stores_zero_point`) is the format's
        own question.
        """
        problems = []
        for where, _, args in self.stream_schemes(module_names):
            reasons = args.export_problems()
            if reasons:
                problems.append(f"{where} is {'; '.join(reasons)}")
        if self.sink_tokens:
            problems.append(
                f"it keeps sink_tokens: {self.sink_tokens} in full precision, which serving engines do not do "
                "(they quantize every token): calibrate without sink_tokens"
            )
        if self.residual_window:
            problems.append(
                f"it reads its newest {self.residual_window} tokens back in full precision (residual_window), "
                "which serving engines do not do: calibrate without residual_window"
            )
        if self.residual_block > 1:
            problems.append(
                f"it holds up to {self.residual_block - 1} of its newest tokens in full precision until they leave "
                "together (residual_block), which serving engines do not do: calibrate with residual_block: 1"
            )
        if self.pre_rope_keys:
            problems.append(
                "it quantizes keys before RoPE (pre_rope_keys), but serving engines quantize them after it: "
                "calibrate without pre_rope_keys"
            )
        return problems

    @property
    def length_safe(self) -> bool:
        """Whether every key stream's ranges hold at positions the calibration windows never reached.

        Keys are the stream RoPE turns with the position: they are safe quantized before RoPE
        (``pre_rope_keys``), dynamic, or with ``rope_radius`` ranges. Values do not turn.
        """
        keys = [args for _, stream, args in self.stream_schemes() if stream == "key"]
        return self.pre_rope_keys or all(args.length_safe for args in keys)

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

        The flat ``qconfig`` keys are the keys' arguments, which msModelSlim reads for both
        streams; values that differ add a complete ``qconfig.value`` mapping. The seed scheme
        writes exactly msModelSlim's four ``qconfig`` keys.
        """
        qconfig: dict[str, Any] = self.key.to_dict()
        if self.value != self.key:
            qconfig["value"] = self.value.to_dict(full=True)
        data: dict[str, Any] = {
            "type": PROCESSOR_TYPE,
            "qconfig": qconfig,
            "include": list(self.include),
            "exclude": list(self.exclude),
        }
        if self.layers:
            data["layers"] = [override.to_dict() for override in self.layers]
        if self.sink_tokens:
            data["sink_tokens"] = self.sink_tokens
        if self.residual_window:
            data["residual_window"] = self.residual_window
        if self.residual_block > 1:
            data["residual_block"] = self.residual_block
        if self.pre_rope_keys:
            data["pre_rope_keys"] = True
        if self.rope_center:
            data["rope_center"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, stored: bool = False) -> KVQuantConfig:
        """Read a processor item (``type: dynamic_cache``) or a full msModelSlim document.

        A full document is recognised by its ``spec: {process: [...]}`` and must hold
        exactly one ``dynamic_cache`` item; other processors (``linear_quant`` ...) and
        other top-level sections are left to the tools that own them
        (:mod:`quantcache.scheme.msmodelslim` reads the shape).

        ``stored``: ``data`` is a config quantcache saved (a state file's), and a ``storage``
        key that earlier versions wrote there as the default of the caches loading it is
        dropped. In a config a user wrote, ``storage`` is an error that says where it goes.
        """
        return cls(**item_fields(data, stored=stored))

    @classmethod
    def from_yaml(cls, source: str | Path) -> KVQuantConfig:
        """Load from a YAML file path or a YAML string.

        Accepts a single processor item, a one-item list of them, or a full document.
        """
        return cls.from_dict(read_yaml_item(source))

    def to_yaml(self) -> str:
        """The config as a msModelSlim-compatible YAML processor item (a one-item list)."""
        return str(yaml.safe_dump([self.to_dict()], sort_keys=False))
