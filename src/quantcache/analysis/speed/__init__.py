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
  ``DynamicCache`` in the same run. How far a cache's decode repetitions spread is reported
  too, and where ``DynamicCache``'s spread by more than 10 % the table says the machine was
  busy: ratios closer than that are not told apart by such a run.
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

from quantcache.analysis.speed.contenders import (
    Contender,
    calibrate_presets,
    compiled_twins,
    default_contenders,
    dynamic_contender,
    quantized_contender,
    static_contender,
)
from quantcache.analysis.speed.measure import decode_step_seconds, fill, kv_bytes, prefill_seconds, prefill_states
from quantcache.analysis.speed.peak_memory import PeakMeter
from quantcache.analysis.speed.results import TABLE_COLUMNS, SpeedResult, SpeedRow, format_speed_table
from quantcache.analysis.speed.runs import bench_speed

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
