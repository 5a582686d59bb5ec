"""The interleaved run: every contender at every context and batch size, warmed up first, in rotating order."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantcache.analysis.speed.contenders import Contender
from quantcache.analysis.speed.measure import (
    decode_step_seconds,
    fill,
    kv_bytes,
    prefill_seconds,
    prefill_states,
    random_ids,
    release,
)
from quantcache.analysis.speed.peak_memory import PeakMeter
from quantcache.analysis.speed.results import SpeedResult, SpeedRow, dynamic_base, ratio, spread
from quantcache.cache.attention import ATTENTION_NAME, MAX_QUERIES_FROM_CODES, register_code_attention, set_attention
from quantcache.cache.compiled_kernels import compiled_copy
from quantcache.calibration.calibrate import model_device
from quantcache.progress import progress_bar

__all__ = [
    "COMPILED_WARM_UP_TOKENS",
    "GRAPHS_PER_COMPILED_CONTENDER",
    "WARM_UP_LENGTHS",
    "WARM_UP_TOKENS",
    "bench_speed",
]

WARM_UP_TOKENS = 16
"""Tokens of the untimed warm-up per contender (first calls: imports, lazy kernels, allocator pools)."""
COMPILED_WARM_UP_TOKENS = 2 * MAX_QUERIES_FROM_CODES
"""The second warm-up of a compiled contender: a prompt the attention from codes hands to ``sdpa``."""
WARM_UP_LENGTHS = (WARM_UP_TOKENS, COMPILED_WARM_UP_TOKENS)
GRAPHS_PER_COMPILED_CONTENDER = 8
"""Dynamo's recompile limit per compiled contender: its prefills and decode steps at several lengths."""


def _failure(contender: Contender, error: BaseException) -> str | None:
    """What a row reports for ``error`` (running out of memory, or a compiled contender failing to compile), or
    ``None`` for an error that must propagate (a bug)."""
    if _out_of_memory(error):
        return f"out of memory: {' '.join(str(error).split())[:160]}"
    compile_errors = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)
    if contender.compiles and isinstance(error, compile_errors):
        return f"compile failed: {type(error).__name__}: {' '.join(str(error).split())[:160]}"
    return None


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA, or the CPU allocator's), which a contender may hit."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


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

    Compiled contenders (the model's forward, or the cache's kernels) run twice, at :data:`WARM_UP_TOKENS` and at
    :data:`COMPILED_WARM_UP_TOKENS`, decoding three steps each time, so that every graph the timed runs need
    exists before them: the prompt and cache lengths already dynamic, a prompt long enough for the attention
    from codes to decode the rows and run ``sdpa``, tokens leaving a residual window, and both layouts of a
    cache's rows (a freshly filled cache holds views of room reserved ahead, compiled steps concatenate).

    Returns the contenders that failed as a row reports it (:func:`_failure`: out of memory, or a compilation
    that failed), by name, with what to report; they are not measured. Other errors propagate.
    """
    lengths = WARM_UP_LENGTHS if any(contender.compiles for contender in contenders) else WARM_UP_LENGTHS[:1]
    prompts = {
        tokens: (random_ids(models.eager, (1, tokens), seed), prefill_states(models.eager, tokens, seed=seed))
        for tokens in lengths
    }
    failed: dict[str, str] = {}
    for contender in contenders:
        runner = models.of(contender)
        steps = 3 if contender.compiles else 2
        try:
            for tokens in lengths if contender.compiles else lengths[:1]:
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

        self.compiled = compiled_copy(forward, tag, backend=backend)

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
            release(device, full=True)
            for context in contexts:
                set_attention(model, models.attention)  # the reference prefill runs with the model's own attention
                states = prefill_states(model, context, seed=seed)
                for batch in batches:
                    rows += _measure(
                        models, contenders, states, context, batch, steps, repeats, seed, meter, bar, failed
                    )
                del states
                release(device, full=True)
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
    ids = random_ids(models.eager, (batch, context), seed + 1)
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
                    release(device)
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
                    release(device)
            bar.update(1)
    for row in rows.values():
        if row.error is not None:
            row.decode_seconds_runs, row.prefill_seconds_runs, row.kv_bytes, row.kv_parts = [], [], None, None
            continue
        decode = statistics.median(row.decode_seconds_runs)
        row.decode_ms = decode * 1e3
        row.decode_spread = spread(row.decode_seconds_runs)
        row.decode_tokens_per_s = batch / decode
        row.prefill_tokens_per_s = batch * context / statistics.median(row.prefill_seconds_runs)
        row.peak_bytes = max(peaks[row.cache]) if peaks[row.cache] else None
    base = dynamic_base(list(rows.values()))
    for row in rows.values():
        if base is not None and row.error is None:
            row.decode_ms_vs_dynamic = ratio(row.decode_ms, base.decode_ms)
            row.prefill_tokens_per_s_vs_dynamic = ratio(row.prefill_tokens_per_s, base.prefill_tokens_per_s)
            row.kv_bytes_vs_dynamic = ratio(row.kv_bytes, base.kv_bytes)
    return list(rows.values())
