"""Decode speed, prefill throughput, KV bytes and peak memory of caches, measured side by side on this machine.

Whether a quantized cache is worth it depends on the machine: the same scheme that saves
half the memory may cost 10 % per decode step on one GPU and 2x on a laptop CPU. So the
figures are measured where the model will run, against the caches Transformers ships
(``DynamicCache``, and ``StaticCache`` where the model supports it), with one method:

* **The same tokens in every cache.** The key/value states of ONE real prefill of the
  context (batch 1, seeded random token ids, run into a plain ``DynamicCache``) are made
  once per context; every cache under test is filled with them through its own ``update``
  (the states repeated over the batch), so each pays its own storage and quantization cost
  for identical content, without a slow prefill per contender and repetition.
* **Decode** ``ms/token``: after one untimed step, ``steps`` greedy decode steps run through
  the model; one step makes one new token for every row of the batch, so ms per step is the
  latency of a token (``decode_tokens_per_s`` is the batch's throughput).
* **Prefill** ``tokens/s``: one forward of ``(batch, context)`` token ids with a fresh, empty
  cache of each kind (only the last position's logits are computed).
* **Interleaved**: every repetition runs every contender in turn, the order rotated by one
  each repetition, so drift (other load, clocks, the allocator warming up) spreads over all
  of them; medians are reported, and every ratio divides a contender's figure by that of
  ``DynamicCache`` in the same run.
* **KV bytes** are measured from the tensors the cache holds after the timed steps:
  :meth:`~quantcache.cache.cache.QuantizedCalibratingCache.memory_report` for quantized
  caches (codes, parameters, full-precision tokens, reserved room, encoder matrices), the
  layers' key and value tensors for Transformers' caches (a ``StaticCache`` holds its whole
  preallocated length).
* **Peak memory** covers a contender's fill and decode steps: on CUDA the allocator's peak
  (``torch.cuda.max_memory_allocated``, reset per contender); on a Linux CPU the process's
  resident high-water mark (``VmHWM``), reset per contender through ``/proc/self/clear_refs``
  after freed heap memory is handed back to the system (``malloc_trim``). Both include the
  model and the prefill's states, which every contender shares. Anywhere else it is ``None``
  ("n/a"): no figure is better than an invented one.

Caches are filled and models run under ``torch.no_grad``, as ``generate`` runs them.
``torch.cuda.synchronize`` brackets every timed region here; the caches never synchronize.
The same method, with peers and memory budgets, is ``benchmarks/speed.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from quantcache.cache.attention import ATTENTION_NAME, MAX_QUERIES_FROM_CODES, register_code_attention, set_attention
from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import _vocab_size, calibrate, model_device
from quantcache.calibration.length_check import ContextLengthWarning
from quantcache.progress import progress_bar
from quantcache.scheme.args import Storage
from quantcache.scheme.config import KVQuantConfig

__all__ = [
    "TABLE_COLUMNS",
    "Contender",
    "PeakMeter",
    "SpeedResult",
    "SpeedRow",
    "bench_speed",
    "calibrate_presets",
    "compiled_twins",
    "decode_step_seconds",
    "default_contenders",
    "dynamic_contender",
    "fill",
    "format_speed_table",
    "kv_bytes",
    "prefill_seconds",
    "prefill_states",
    "quantized_contender",
    "static_contender",
]

ContenderKind = Literal["dynamic", "static", "quantized"]
PeakKind = Literal["cuda_max_allocated", "rss_high_water"]

MIB = 1 << 20
WARM_UP_TOKENS = 16
"""Tokens of the untimed warm-up per contender (first calls: imports, lazy kernels, allocator pools)."""
COMPILED_WARM_UP_TOKENS = 2 * MAX_QUERIES_FROM_CODES
"""The second warm-up of a compiled contender: a prompt the attention from codes hands to ``sdpa``."""
WARM_UP_LENGTHS = (WARM_UP_TOKENS, COMPILED_WARM_UP_TOKENS)
GRAPHS_PER_COMPILED_CONTENDER = 8
"""Dynamo's recompile limit per compiled contender: its prefills and decode steps at several lengths."""
STATE_CHUNK = 512
"""Tokens per forward of the prefill that makes the states: bounds its attention's memory at long contexts."""

TABLE_COLUMNS = (
    "context",
    "batch",
    "cache",
    "decode ms/token",
    "x dyn",
    "prefill tok/s",
    "x dyn",
    "KV MiB",
    "x dyn",
    "peak MiB",
)
"""The columns of :func:`format_speed_table`; each ``x dyn`` divides the figure to its left by DynamicCache's."""


# ---------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    """A cache under test: its name in tables, its kind, and ``make(max_tokens)`` giving an empty one.

    ``max_tokens`` is the longest sequence the cache will hold (a ``StaticCache`` preallocates
    it; the others grow and ignore it).
    """

    name: str
    kind: ContenderKind
    make: Callable[[int], Any]
    compiled: bool = False
    """Run the model through ``torch.compile`` (one compiled model shared by every compiled contender)."""
    reads_codes: bool = False
    """Run the model with ``attn_implementation="quantcache"``, which reads the cache's codes
    (:mod:`quantcache.cache.attention`); the others run with the model's own attention."""


def compiled_twins(contenders: Sequence[Contender]) -> list[Contender]:
    """``contenders`` followed by a compiled twin of each (``NAME compiled``), measured side by side with them."""
    return [*contenders, *(replace(c, name=f"{c.name} compiled", compiled=True) for c in contenders)]


def dynamic_contender(model: nn.Module) -> Contender:
    """Transformers' ``DynamicCache`` for ``model``: the reference every ratio divides by."""
    config: Any = model.config
    return Contender("DynamicCache", "dynamic", lambda max_tokens: DynamicCache(config=config))


def static_contender(model: nn.Module) -> Contender | None:
    """Transformers' ``StaticCache`` for ``model``, or ``None`` where this Transformers cannot build one for it.

    A ``StaticCache`` allocates ``(batch, kv_heads, max_tokens, head_dim)`` per layer up front
    and attends over all of it, masked; it exists for ``torch.compile``, which is not used
    here, so its figures are those of eager decoding.
    """
    config: Any = model.config
    try:
        StaticCache(config=config, max_cache_len=WARM_UP_TOKENS)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return None
    return Contender("StaticCache", "static", lambda max_tokens: StaticCache(config=config, max_cache_len=max_tokens))


def quantized_contender(
    name: str, quantizer: KVQuantizer, storage: Storage | str, *, read_codes: bool = False
) -> Contender:
    """Caches of a frozen ``quantizer`` with ``storage`` (``"packed"`` codes or ``"fake"`` dequantized states);
    ``read_codes``: packed caches read by the attention from codes (``new_cache(read_codes=True)``)."""
    if not quantizer.is_frozen:
        raise ValueError(f"{name}: the quantizer is still calibrating; freeze it (or calibrate(..., freeze=True))")
    return Contender(
        name,
        "quantized",
        lambda max_tokens: quantizer.new_cache(storage=storage, read_codes=read_codes),
        reads_codes=read_codes,
    )


def default_contenders(
    model: nn.Module,
    quantizers: dict[str, KVQuantizer],
    storage: Storage | str,
    *,
    static: bool = True,
    read_codes: bool = False,
) -> list[Contender]:
    """``DynamicCache``, ``StaticCache`` (when ``static`` and the model supports it), then one per quantizer.

    Quantized contenders are named ``"<name> <storage>"`` (``"int4 packed"``); ``read_codes`` (packed
    storage) adds ``"<name> codes"`` after each, the same cache read by the attention from codes.
    """
    storage_name = Storage(storage).value
    if read_codes and Storage(storage) is not Storage.PACKED:
        raise ValueError("attention reads codes from packed storage only: leave the storage at 'packed'")
    found = [dynamic_contender(model)]
    if static and (fixed := static_contender(model)) is not None:
        found.append(fixed)
    for name, quantizer in quantizers.items():
        found.append(quantized_contender(f"{name} {storage_name}", quantizer, storage))
        if read_codes:
            found.append(quantized_contender(f"{name} codes", quantizer, storage, read_codes=True))
    return found


def calibrate_presets(
    model: nn.Module, windows: torch.Tensor, presets: Sequence[str], *, progress: bool = False
) -> dict[str, KVQuantizer]:
    """A frozen quantizer per preset name, each calibrated on ``windows`` ``(samples, seq_len)`` token ids.

    Speed hardly depends on the calibrated values, but a scheme's cost can (sink tokens,
    outlier handling), so every preset is calibrated on real text as a user would. Whether the
    ranges would hold at serving lengths is not this measurement's question: its warning is not given.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLengthWarning)
        return {
            name: calibrate(model, windows, quant_config=KVQuantConfig.preset(name), progress=progress)
            for name in presets
        }


# ---------------------------------------------------------------------------- measuring one cache
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device, *, full: bool = False) -> None:
    """Free what the last contender left, so the next one starts from the same memory.

    The caches hold no reference cycles (reference counting frees them), so between runs a
    young-generation collection suffices (~10 ms); a ``full`` one walks every object of the
    loaded libraries (~0.25 s), done once per context.
    """
    gc.collect(2 if full else 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _random_ids(model: nn.Module, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Seeded token ids of ``shape`` over the whole vocabulary, on the model's device."""
    config: Any = model.config
    vocab = _vocab_size(model) or int(config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=generator).to(model_device(model))


def prefill_states(
    model: nn.Module, context: int, *, seed: int = 0, chunk: int = STATE_CHUNK
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(keys, values)``, each ``(1, kv_heads, context, head_dim)``, after one real prefill.

    ``context`` seeded random token ids run through the model in chunks of ``chunk`` tokens
    into a ``DynamicCache`` made without the model's config, which keeps the whole history in
    every layer (sliding-window layers too); each cache under test then keeps what its own
    ``update`` keeps.
    """
    ids = _random_ids(model, (1, context), seed)
    cache = DynamicCache()
    with torch.inference_mode():
        for start in range(0, context, chunk):
            model(ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache})
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def fill(cache: Any, states: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int) -> None:
    """Put ``states`` (batch 1, as :func:`prefill_states` gives) repeated over ``batch`` rows into ``cache``.

    Each layer receives ``(batch, kv_heads, context, head_dim)`` through the cache's own
    ``update``, as a prefill would hand them over. A ``StaticCache`` is also given the
    positions (``cache_kwargs``), which Transformers 4.x needs to place them.
    """
    with torch.no_grad():
        for index, (keys, values) in enumerate(states):
            rows_k, rows_v = keys.repeat(batch, 1, 1, 1), values.repeat(batch, 1, 1, 1)
            if isinstance(cache, StaticCache):
                positions = torch.arange(keys.shape[2], device=keys.device)
                cache.update(rows_k, rows_v, index, {"cache_position": positions})
            else:
                cache.update(rows_k, rows_v, index)


def decode_step_seconds(model: nn.Module, cache: Any, batch: int, steps: int, *, seed: int = 0) -> float:
    """Seconds per greedy decode step: ``steps`` steps of ``batch`` rows (one token each) continuing ``cache``."""
    device = model_device(model)
    token = _random_ids(model, (batch, 1), seed)
    with torch.no_grad():
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, use_cache=True, **{CACHE_KEYWORD: cache}).logits[:, -1:].argmax(-1)
        _synchronize(device)
    return (time.perf_counter() - start) / steps


def prefill_seconds(model: nn.Module, cache: Any, ids: torch.Tensor) -> float:
    """Seconds of one forward of ``ids`` ``(batch, context)`` into the empty ``cache`` (last logits only)."""
    device = model_device(model)
    with torch.no_grad():
        _synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache})
        _synchronize(device)
    return time.perf_counter() - start


_KV_PARTS = ("codes", "parameters", "full_precision", "reserved", "encoder")


def kv_bytes(cache: Any) -> tuple[int, dict[str, int] | None]:
    """Bytes of the key/value tensors ``cache`` holds, and for a quantized cache their split by part.

    A :class:`QuantizedCalibratingCache` is measured by its ``memory_report()`` (the sum of its
    layers' ``total``; parts: codes, parameters, full_precision, reserved, encoder). Any other
    cache is the ``numel * element_size`` of every layer's ``keys`` and ``values``: for a
    ``StaticCache`` that is its preallocated length, for a ``DynamicCache`` the tokens it holds.
    """
    if isinstance(cache, QuantizedCalibratingCache):
        report = cache.memory_report()
        parts = {part: sum(int(layer[part]) for layer in report) for part in _KV_PARTS}
        return sum(int(layer["total"]) for layer in report), parts
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total, None


# ---------------------------------------------------------------------------- peak memory
class PeakMeter:
    """The peak memory of a stretch of work: the CUDA allocator's, the process's resident set on Linux, or none.

    ``start()`` resets the high-water mark, ``stop()`` reads it (bytes, or ``None`` where
    :attr:`kind` is ``None``). On a CPU the mark is the whole process's (model weights
    included); freed heap memory is returned to the system first (glibc ``malloc_trim``) so
    that what an earlier contender freed does not count as resident for the next one. The
    caller frees its garbage before :meth:`start`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind: PeakKind | None = None
        self._trim: Callable[[int], int] | None = None
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif device.type == "cpu" and self._reset_rss():
            self.kind = "rss_high_water"
            self._trim = _malloc_trim()

    @staticmethod
    def _reset_rss() -> bool:
        """Reset the process's resident high-water mark (Linux ``/proc/self/clear_refs``); False where impossible."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return _read_hwm() is not None

    def start(self) -> None:
        """Forget the peak so far (after handing freed heap memory back to the system)."""
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss_high_water":
            if self._trim is not None:
                self._trim(0)
            self._reset_rss()

    def stop(self) -> int | None:
        """The peak bytes since :meth:`start`, or ``None`` where it cannot be measured."""
        if self.kind == "cuda_max_allocated":
            _synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_high_water":
            return _read_hwm()
        return None


def _read_hwm() -> int | None:
    """The process's resident high-water mark in bytes (``VmHWM`` of ``/proc/self/status``)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (hands freed heap memory back to the system), or ``None`` without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


# ---------------------------------------------------------------------------- results
@dataclass
class SpeedRow:
    """One contender at one context and batch size: medians of the repetitions, and the runs themselves.

    Every ``*_vs_dynamic`` is the figure divided by ``DynamicCache``'s of the same run (decode
    ms: above 1 is slower; prefill tokens/s: above 1 is faster; KV bytes: below 1 is smaller),
    ``None`` where either side failed. ``error`` says why a contender has no figures (it ran
    out of memory); ``peak_bytes`` is the highest of the repetitions, ``None`` where peak memory
    cannot be measured. ``kv_parts`` splits a quantized cache's ``kv_bytes`` (``None`` for the others).
    """

    context: int
    batch: int
    cache: str
    kind: ContenderKind
    decode_ms: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    kv_bytes: int | None = None
    kv_parts: dict[str, int] | None = None
    peak_bytes: int | None = None
    decode_ms_vs_dynamic: float | None = None
    prefill_tokens_per_s_vs_dynamic: float | None = None
    kv_bytes_vs_dynamic: float | None = None
    decode_seconds_runs: list[float] = field(default_factory=list)
    prefill_seconds_runs: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class SpeedResult:
    """What :func:`bench_speed` measured: one row per context, batch and contender, in that order.

    ``peak_kind`` names what ``peak_bytes`` is (``"cuda_max_allocated"``, ``"rss_high_water"``
    or ``None``); ``settings`` the run's parameters and environment.
    """

    rows: list[SpeedRow]
    steps: int
    repeats: int
    peak_kind: PeakKind | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (``None`` for what was not measured)."""
        return asdict(self)


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _failure(contender: Contender, error: BaseException) -> str | None:
    """What a row reports for ``error`` (running out of memory, or a compiled contender failing to compile), or
    ``None`` for an error that must propagate (a bug)."""
    if _out_of_memory(error):
        return f"out of memory: {' '.join(str(error).split())[:160]}"
    compile_errors = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)
    if contender.compiled and isinstance(error, compile_errors):
        return f"compile failed: {type(error).__name__}: {' '.join(str(error).split())[:160]}"
    return None


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA, or the CPU allocator's), which a contender may hit."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---------------------------------------------------------------------------- the benchmark
def _check_sizes(contexts: Sequence[int], batches: Sequence[int], steps: int, repeats: int) -> None:
    if not contexts or not batches:
        raise ValueError("give at least one context and one batch size")
    for context in contexts:
        if context < 2:
            raise ValueError(f"context {context}: a context needs at least 2 tokens (a prefill and a decode step)")
    for batch in batches:
        if batch < 1:
            raise ValueError(f"batch {batch}: a batch needs at least 1 row")
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps ({steps}) and repeats ({repeats}) must be at least 1")


def _warm_up(models: _Runners, contenders: Sequence[Contender], seed: int) -> dict[str, str]:
    """Run every contender once, small and untimed: first calls (lazy kernels, imports, compilation) stay out of
    the figures.

    Compiled contenders run twice, at :data:`WARM_UP_TOKENS` and at :data:`COMPILED_WARM_UP_TOKENS`, decoding
    three steps each time, so that every graph the timed runs need exists before them: the prompt and cache
    lengths already dynamic, a prompt long enough for the attention from codes to decode the rows and run
    ``sdpa``, and both layouts of a cache's rows (a freshly filled cache holds views of room reserved ahead,
    compiled steps concatenate).

    Returns the contenders that failed as a row reports it (:func:`_failure`: out of memory, or a compilation
    that failed), by name, with what to report; they are not measured. Other errors propagate.
    """
    lengths = WARM_UP_LENGTHS if any(contender.compiled for contender in contenders) else WARM_UP_LENGTHS[:1]
    prompts = {
        tokens: (_random_ids(models.eager, (1, tokens), seed), prefill_states(models.eager, tokens, seed=seed))
        for tokens in lengths
    }
    failed: dict[str, str] = {}
    for contender in contenders:
        runner = models.of(contender)
        steps = 3 if contender.compiled else 2
        try:
            for tokens in lengths if contender.compiled else lengths[:1]:
                ids, states = prompts[tokens]
                prefill_seconds(runner, contender.make(tokens), ids)
                cache = contender.make(tokens + steps)
                fill(cache, states, 1)
                decode_step_seconds(runner, cache, 1, steps, seed=seed)
        except Exception as error:
            failure = _failure(contender, error)
            if failure is None:
                raise
            failed[contender.name] = failure
    return failed


class _CompiledForward(nn.Module):
    """``model`` called through ``torch.compile`` of a function with a code object of its own.

    Dynamo keeps its graphs, and the sizes it has seen change, per code object: one compiled
    ``model`` shared by several caches would mix them (one cache's changing sizes made dynamic in
    another's graphs) and count every cache's graphs against one recompile limit. A code object
    per contender keeps each cache's graphs to itself.
    """

    def __init__(self, model: nn.Module, backend: str | Callable[..., Any], tag: str) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # what the measuring helpers read of a model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return model(*args, **kwargs)

        code = forward.__code__.replace(co_name=f"forward_{tag}")
        own = types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)
        self.compiled = torch.compile(own, backend=backend)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)


@dataclass
class _Runners:
    """The model, and a compiled forward of it per compiled contender (made on first use)."""

    eager: nn.Module
    backend: str | Callable[..., Any] | None = None
    attention: str = "sdpa"
    """The model's own attention implementation, which contenders that do not read codes run with."""
    compiled: dict[str, nn.Module] = field(default_factory=dict)

    def of(self, contender: Contender) -> nn.Module:
        """The model to run ``contender`` with, set to the attention it reads with."""
        set_attention(self.eager, ATTENTION_NAME if contender.reads_codes else self.attention)
        if not contender.compiled:
            return self.eager
        if self.backend is None:
            raise ValueError(f"{contender.name} runs compiled, but no compile backend was given")
        if contender.name not in self.compiled:
            self.compiled[contender.name] = _CompiledForward(self.eager, self.backend, str(len(self.compiled)))
        return self.compiled[contender.name]


def bench_speed(
    model: nn.Module,
    contenders: Sequence[Contender],
    *,
    contexts: Sequence[int],
    batches: Sequence[int],
    steps: int = 8,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
    compile_backend: str | Callable[..., Any] = "inductor",
) -> SpeedResult:
    """Measure every contender at every context and batch size, interleaved (see the module's docstring).

    Args:
        model: a Transformers causal LM in eval mode, on the device to measure.
        contenders: the caches; one must be ``kind="dynamic"`` for the ratios (else they are ``None``).
        contexts: tokens in the cache before decoding (each >= 2).
        batches: rows per forward (each >= 1).
        steps: timed decode steps per repetition (after one untimed step).
        repeats: repetitions; each runs every contender once, the order rotated by one each time.
        seed: of the random token ids (the same ids for every contender).
        progress: a bar on stderr counting contender runs.
        settings: copied into the result (what the caller wants recorded with it).
        compile_backend: the ``torch.compile`` backend of contenders with ``compiled=True``
            (:func:`compiled_twins`); each compiled contender runs its own compiled forward of the
            model, sizes made dynamic where they change.

    A contender that runs out of memory gets ``error`` and no figures; it is not run again
    at that context and batch. So does a compiled contender whose compilation fails (in the warm-up:
    then at every context and batch). Any other exception propagates.
    """
    _check_sizes(contexts, batches, steps, repeats)
    if len({c.name for c in contenders}) != len(contenders):
        raise ValueError("contender names must be unique")
    device = model_device(model)
    meter = PeakMeter(device)
    rows: list[SpeedRow] = []
    total = len(contexts) * len(batches) * repeats * len(contenders)
    config: Any = model.config
    models = _Runners(model, attention=str(config._attn_implementation or "sdpa"))
    if any(contender.reads_codes for contender in contenders):
        register_code_attention()
    if any(contender.compiled for contender in contenders):
        # Shapes become dynamic where they change (the cache length, the prompt length), others stay fixed: with
        # ``dynamic=True`` every size is a symbol, and inductor indexes the codes through runtime divisions.
        models.backend = compile_backend
    # A compiled contender's graphs (prefills, a first decode step, the steps after it) past Dynamo's limit would
    # run eagerly and be timed as compiled: fail it instead.
    limits = torch._dynamo.config.patch(
        recompile_limit=max(torch._dynamo.config.recompile_limit, GRAPHS_PER_COMPILED_CONTENDER),
        fail_on_recompile_limit_hit=True,
    )
    with limits:
        bar = progress_bar(total, "bench", progress, unit="run", unit_scale=False)
        try:
            failed = _warm_up(models, contenders, seed)
            _release(device, full=True)
            for context in contexts:
                set_attention(model, models.attention)  # the reference prefill runs with the model's own attention
                states = prefill_states(model, context, seed=seed)
                for batch in batches:
                    rows += _measure(
                        models, contenders, states, context, batch, steps, repeats, seed, meter, bar, failed
                    )
                del states
                _release(device, full=True)
        finally:
            bar.close()
            set_attention(model, models.attention)
    return SpeedResult(rows=rows, steps=steps, repeats=repeats, peak_kind=meter.kind, settings=dict(settings or {}))


def _measure(
    models: _Runners,
    contenders: Sequence[Contender],
    states: list[tuple[torch.Tensor, torch.Tensor]],
    context: int,
    batch: int,
    steps: int,
    repeats: int,
    seed: int,
    meter: PeakMeter,
    bar: Any,
    failed: dict[str, str],
) -> list[SpeedRow]:
    """The rows of one context and batch size: ``repeats`` rounds over every contender, rotating the order."""
    device = model_device(models.eager)
    ids = _random_ids(models.eager, (batch, context), seed + 1)
    rows = {
        c.name: SpeedRow(context=context, batch=batch, cache=c.name, kind=c.kind, error=failed.get(c.name))
        for c in contenders
    }
    peaks: dict[str, list[int]] = {c.name: [] for c in contenders}
    for repeat in range(repeats):
        shift = repeat % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            row = rows[contender.name]
            bar.set_postfix_str(f"{context} x {batch} {contender.name}", refresh=False)
            if row.error is None:
                cache = None
                model = models.of(contender)
                try:
                    row.prefill_seconds_runs.append(prefill_seconds(model, contender.make(context), ids))
                    _release(device)
                    meter.start()
                    cache = contender.make(context + 1 + steps)
                    fill(cache, states, batch)
                    decode_step_seconds(model, cache, batch, 1, seed=seed + repeat)  # untimed: the first step
                    row.decode_seconds_runs.append(decode_step_seconds(model, cache, batch, steps, seed=seed + repeat))
                    peak = meter.stop()
                    if peak is not None:
                        peaks[contender.name].append(peak)
                    row.kv_bytes, row.kv_parts = kv_bytes(cache)
                except Exception as error:
                    failure = _failure(contender, error)
                    if failure is None:
                        raise
                    row.error = failure
                finally:
                    cache = None
                    _release(device)
            bar.update(1)
    for row in rows.values():
        if row.error is not None:
            row.decode_seconds_runs, row.prefill_seconds_runs, row.kv_bytes, row.kv_parts = [], [], None, None
            continue
        decode = statistics.median(row.decode_seconds_runs)
        row.decode_ms = decode * 1e3
        row.decode_tokens_per_s = batch / decode
        row.prefill_tokens_per_s = batch * context / statistics.median(row.prefill_seconds_runs)
        row.peak_bytes = max(peaks[row.cache]) if peaks[row.cache] else None
    base = next((row for row in rows.values() if row.kind == "dynamic" and row.error is None), None)
    for row in rows.values():
        if base is not None and row.error is None:
            row.decode_ms_vs_dynamic = _ratio(row.decode_ms, base.decode_ms)
            row.prefill_tokens_per_s_vs_dynamic = _ratio(row.prefill_tokens_per_s, base.prefill_tokens_per_s)
            row.kv_bytes_vs_dynamic = _ratio(row.kv_bytes, base.kv_bytes)
    return list(rows.values())


# ---------------------------------------------------------------------------- the table
def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_speed_table(result: SpeedResult) -> str:
    """The rows as a plain-text table (:data:`TABLE_COLUMNS`), with a footnote saying what each figure is."""
    lines: list[list[str]] = [list(TABLE_COLUMNS)]
    for row in result.rows:
        head = [str(row.context), str(row.batch), row.cache]
        if row.error is not None:
            lines.append([*head, "failed", row.error[:40], "", "", "", "", ""])
            continue
        lines.append(
            [
                *head,
                _cell(row.decode_ms, ".2f"),
                _cell(row.decode_ms_vs_dynamic, ".3f"),
                _cell(row.prefill_tokens_per_s, ".0f"),
                _cell(row.prefill_tokens_per_s_vs_dynamic, ".3f"),
                _cell(None if row.kv_bytes is None else row.kv_bytes / MIB, ".2f"),
                _cell(row.kv_bytes_vs_dynamic, ".3f"),
                _cell(None if row.peak_bytes is None else row.peak_bytes / MIB, ".0f"),
            ]
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(TABLE_COLUMNS))]
    text = [
        "  ".join(
            cell.ljust(width) if column == 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    peak = {
        "cuda_max_allocated": "the CUDA allocator's peak during fill and decode",
        "rss_high_water": "the process's resident high-water mark during fill and decode (model included)",
        None: "n/a: not measurable on this device",
    }[result.peak_kind]
    text.append(
        f"medians of {result.repeats} interleaved repetitions; decode: {result.steps} steps after a fill of the "
        "context, one new token per row each; x dyn: divided by DynamicCache's figure of the same run; "
        f"KV: bytes of the tensors each cache holds after the steps; peak: {peak}"
    )
    return "\n".join(text)
