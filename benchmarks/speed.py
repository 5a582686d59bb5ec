"""Speed and memory of every KV cache, measured side by side: what a quantized cache costs and what it saves.

People quantize the KV cache to fit longer contexts and bigger batches into the same memory,
so the two questions are how much slower a decode step gets and how many bytes the cache
really holds. Five measurements, each printed with the command that made it:

1. **decode**: ms per decode step and KV-cache bytes at ``--contexts`` x ``--batches`` for
   ``DynamicCache``, quantcache in calibrate mode, frozen with fake quantization, frozen
   with packed storage (every scheme, as soon as the installed quantcache has
   ``storage="packed"``; see ``schemes.packed_variant``) and the peers (quanto int4, HQQ
   int4/int8, FP8 by default). Every repetition runs every contender in turn (the order
   rotates), medians are reported, with ratios to ``DynamicCache`` of the same run. The
   cache is filled with the key/value states of one real prefill of the context (made once
   per context, repeated over the batch) through each cache's own ``update``, then decoding
   steps run through the model. KV bytes are measured, not computed: every tensor storage
   reachable from the cache object (``peers.held_bytes``), after the timed steps.
2. **overhead**: the same data as quantization overhead per decode step (ms above
   ``DynamicCache``) against context length, batch 1.
3. **calibration**: tokens/s of a forward pass with a calibrating cache and of
   ``quantcache.calibration.calibrate`` against a plain forward pass.
4. **fit**: the longest context (batch 1) and the largest batch at ``--fit-batch-context``
   whose cache fits ``--budget-mib``, found by actually filling caches (doubling, then
   bisection) and measuring what they hold after one decode step.
5. **peak**: peak process memory (RSS high-water mark; on CUDA also the allocator's peak) of
   a ``--peak-context``-token generation per contender, each in its own subprocess that
   loads the model, resets the high-water mark (Linux ``/proc/self/clear_refs``, so the
   model loading's own peak stays out; ``resource.getrusage``'s max RSS is recorded too but
   keeps the loader threads' peak), prefills in chunks and decodes ``--peak-new-tokens``
   tokens.

Runs unchanged on CUDA (``--device cuda --dtype bfloat16``). Examples::

    python benchmarks/speed.py --markdown                                      # everything, SmolLM2, CPU
    python benchmarks/speed.py --sections decode --contexts 512 2048 --batches 1 --markdown
    python benchmarks/speed.py --device cuda --dtype bfloat16 --markdown
    nice -n 10 python benchmarks/speed.py --contexts 256 512 --batches 1 2 --steps 4 --repeats 2 \\
        --budget-mib 16 --peak-context 1024 --sections decode fit

Peers come from ``bash benchmarks/install_peers.sh``; missing ones are listed and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peers import PEER_SPECS, build_peers, held_bytes, kv_shape
from quality import DTYPES, command_line, finite
from schemes import calibrated, calibration_windows, packed_variant, schemes
from torch import nn
from transformers import DynamicCache

from quantcache import QuantizedCalibratingCache
from quantcache.analysis.speed import decode_step_seconds
from quantcache.cache.attention import ATTENTION_NAME, register_code_attention, set_attention
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.models.loading import load_model

SECTIONS = ("decode", "calibration", "fit", "peak")
DEFAULT_SPEED_PEERS = ("quanto-int4", "hqq-int4", "hqq-int8", "fp8")
MIB = 1 << 20


# ---------------------------------------------------------------------------- contenders
@dataclass
class SpeedContender:
    """A cache under test: a key the peak subprocess can rebuild it from, a table name, a factory."""

    key: str
    name: str
    new_cache: Callable[[], Any]
    reads_codes: bool = False
    """Decode with ``attn_implementation="quantcache"`` (the attention from codes); the others use the model's."""


def build_contenders(
    model: nn.Module, tokenizer: Any, args: argparse.Namespace, log: Callable[[str], None], only: str | None = None
) -> list[SpeedContender]:
    """DynamicCache, calibrate mode, frozen fake / packed per scheme, and the peers (``only``: just that key)."""

    def wanted(key: str) -> bool:
        return only is None or only == key

    found = []
    if wanted("dynamic"):
        found.append(SpeedContender("dynamic", "DynamicCache", lambda: DynamicCache(config=model.config)))
    if wanted("calibrate"):
        found.append(SpeedContender("calibrate", "quantcache calibrate mode", lambda: QuantizedCalibratingCache(model)))
    scheme_list = schemes(args.schemes)
    needs_calibration = [
        scheme for scheme in scheme_list
        if wanted(f"fake:{scheme.key}") or wanted(f"packed:{scheme.key}") or wanted(f"codes:{scheme.key}")
    ]
    if needs_calibration:
        # Speed does not depend on the calibrated values; a little real text gives realistic ranges.
        windows = calibration_windows(tokenizer, "builtin", samples=2, seq_len=256, seed=0)
        for scheme in needs_calibration:
            frozen = calibrated(model, scheme, windows)
            if scheme.key in args.fake_schemes and wanted(f"fake:{scheme.key}"):
                found.append(SpeedContender(f"fake:{scheme.key}", f"frozen fake {scheme.key}", frozen.empty_copy))
            packed = packed_variant(model, frozen)
            if packed is None:
                if only is None and scheme is scheme_list[0]:
                    log("quantcache has no packed storage yet (schemes.packed_variant found no storage option)")
            else:
                if wanted(f"packed:{scheme.key}"):
                    found.append(
                        SpeedContender(f"packed:{scheme.key}", f"frozen packed {scheme.key}", packed.empty_copy)
                    )
                if args.read_codes and wanted(f"codes:{scheme.key}"):
                    reading = packed.quantizer.new_cache(storage="packed", read_codes=True)
                    found.append(
                        SpeedContender(f"codes:{scheme.key}", f"packed {scheme.key} read from codes",
                                       reading.empty_copy, reads_codes=True)
                    )
    peer_keys = [key for key in args.peers if wanted(f"peer:{key}")]
    if peer_keys:
        peers, skipped = build_peers(model, peer_keys)
        for key, reason in skipped.items():
            log(f"peer {key} skipped: {reason}")
        found += [SpeedContender(f"peer:{peer.key}", peer.name, peer.new_cache) for peer in peers]
    return found


# ---------------------------------------------------------------------------- helpers
def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def prefill_states(model: nn.Module, context: int, chunk: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Key/value states of every layer after a real prefill of ``context`` random tokens (batch 1).

    The prefill runs into a ``DynamicCache`` without config, which keeps the whole history
    in every layer (sliding-window layers included; their mask still applies the window),
    in chunks of ``chunk`` tokens to bound the attention's memory.
    """
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(model.config.vocab_size), (1, context), generator=generator).to(device)
    cache = DynamicCache()
    for start in range(0, context, chunk):
        model(ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def tiled(states: torch.Tensor, length: int, batch: int) -> torch.Tensor:
    """``states`` (1, heads, L0, dim) repeated along the sequence to ``length`` tokens and over ``batch`` rows."""
    repeats = math.ceil(length / states.shape[2])
    return states.repeat(batch, 1, repeats, 1)[:, :, :length].contiguous()


@torch.inference_mode()
def fill(cache: Any, states: list[tuple[torch.Tensor, torch.Tensor]], length: int, batch: int) -> None:
    """Put ``length`` tokens x ``batch`` rows of the given states into ``cache`` through its own ``update``."""
    for index, (keys, values) in enumerate(states):
        cache.update(tiled(keys, length, batch), tiled(values, length, batch), index)


@torch.inference_mode()
def decode(model: nn.Module, cache: Any, batch: int, steps: int, seed: int) -> float:
    """Seconds per greedy decode step, ``steps`` steps of ``batch`` rows continuing ``cache``: ``quantcache
    bench``'s own step timing, under inference mode as this script fills its caches."""
    return decode_step_seconds(model, cache, batch, steps, seed=seed)


def dense_bytes(model: nn.Module, length: int, batch: int, dtype: torch.dtype) -> int:
    """What a plain cache of ``dtype`` holds for ``length`` tokens x ``batch`` rows (for the bits column)."""
    shape = kv_shape(model)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * shape.kv_heads * shape.head_dim * length * batch * element


def markdown_or_plain(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(item)) for item in column) for column in zip(header, *rows, strict=False)]
    return "\n".join("  ".join(str(item).rjust(width) for item, width in zip(row, widths, strict=True))
                     for row in [header, *rows])


# ---------------------------------------------------------------------------- 1 + 2: decode
def section_decode(
    model: nn.Module, contenders: list[SpeedContender], args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    device = device_of(model)
    dtype = next(model.parameters()).dtype
    results: list[dict[str, Any]] = []
    own_attention = str(model.config._attn_implementation or "sdpa")
    register_code_attention()

    def attend_as(contender: SpeedContender) -> None:
        set_attention(model, ATTENTION_NAME if contender.reads_codes else own_attention)

    warm = prefill_states(model, 64, 64, args.seed)
    for contender in contenders:  # first calls (imports, lazy kernels) stay out of the timings
        try:
            attend_as(contender)
            cache = contender.new_cache()
            fill(cache, warm, 64, 1)
            decode(model, cache, 1, 2, args.seed)
        except Exception as error:
            log(f"warm-up of {contender.name} failed: {type(error).__name__}: {error}")
    del warm
    for context in args.contexts:
        set_attention(model, own_attention)
        states = prefill_states(model, context, args.prefill_chunk, args.seed)
        for batch in args.batches:
            times: dict[str, list[float]] = {c.key: [] for c in contenders}
            kv: dict[str, int] = {}
            errors: dict[str, str] = {}
            for repeat in range(args.repeats):
                shift = repeat % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    if contender.key in errors:
                        continue
                    try:
                        attend_as(contender)
                        cache = contender.new_cache()
                        fill(cache, states, context, batch)
                        decode(model, cache, batch, 1, args.seed)  # untimed first step after the fill
                        times[contender.key].append(decode(model, cache, batch, args.steps, args.seed + repeat))
                        kv[contender.key] = held_bytes(cache)
                    except Exception as error:  # report and go on
                        errors[contender.key] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
                    finally:
                        cache = None
                        release(device)
            dense = dense_bytes(model, context + 1 + args.steps, batch, dtype)
            base = statistics.median(times["dynamic"]) if times.get("dynamic") else math.nan
            base_kv = kv.get("dynamic", math.nan)
            for contender in contenders:
                row: dict[str, Any] = {"context": context, "batch": batch, "key": contender.key,
                                       "name": contender.name, "error": errors.get(contender.key)}
                if times[contender.key] and contender.key in kv:
                    median = statistics.median(times[contender.key])
                    row.update(ms=median * 1e3, time_ratio=median / base, kv_bytes=kv[contender.key],
                               kv_ratio=kv[contender.key] / base_kv,
                               bits=8 * kv[contender.key] / dense * torch.empty((), dtype=dtype).element_size())
                results.append(row)
            log(f"decode context {context} batch {batch}: done")
        del states
        release(device)
    set_attention(model, own_attention)
    return {"rows": results}


def print_decode(data: dict[str, Any], args: argparse.Namespace) -> None:
    header = ("context", "batch", "cache", "ms / decode step", "time vs DynamicCache", "KV MiB",
              "KV bytes vs DynamicCache", "stored bits / element")
    rows = []
    for row in data["rows"]:
        if row["error"] or "ms" not in row:
            rows.append((str(row["context"]), str(row["batch"]), row["name"], "failed", (row["error"] or "")[:60],
                         "", "", ""))
            continue
        rows.append((str(row["context"]), str(row["batch"]), row["name"], f"{row['ms']:.1f}",
                     f"{row['time_ratio']:.3f}x", f"{row['kv_bytes'] / MIB:.1f}", f"{row['kv_ratio']:.3f}x",
                     f"{row['bits']:.2f}"))
    print(markdown_or_plain(header, rows, args.markdown))
    print(f"\nMedians of {args.repeats} repetitions x {args.steps} decode steps after a fill of the context; "
          "KV bytes: every tensor storage the cache object holds after the steps.")

    # 2: overhead per decode step against context length, batch 1.
    batch = 1 if 1 in args.batches else args.batches[0]
    contexts = sorted({row["context"] for row in data["rows"]})
    by = {(row["key"], row["context"]): row for row in data["rows"] if row["batch"] == batch and "ms" in row}
    names = list(dict.fromkeys((row["key"], row["name"]) for row in data["rows"]))
    header2 = ("cache", *(f"+ms @ {context}" for context in contexts))
    rows2 = []
    for key, name in names:
        if key == "dynamic":
            continue
        cells = []
        for context in contexts:
            mine, base = by.get((key, context)), by.get(("dynamic", context))
            cells.append(f"{mine['ms'] - base['ms']:+.1f}" if mine and base else "")
        rows2.append((name, *cells))
    print(f"\nQuantization overhead per decode step (ms above DynamicCache, batch {batch}) against context length:\n")
    print(markdown_or_plain(header2, rows2, args.markdown))


# ---------------------------------------------------------------------------- 3: calibration
def section_calibration(model: nn.Module, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    device = device_of(model)
    windows = calibration_windows(tokenizer, "builtin", samples=args.calib_batch, seq_len=args.calib_len,
                                  seed=args.seed).to(device)
    tokens = int(windows.numel())
    statistics_cache = QuantizedCalibratingCache(model)

    @torch.inference_mode()
    def plain() -> None:
        model(windows, use_cache=False, logits_to_keep=1)

    @torch.inference_mode()
    def dynamic() -> None:
        model(windows, use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: DynamicCache(config=model.config)})

    @torch.inference_mode()
    def calibrating() -> None:
        model(windows, use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: statistics_cache.empty_copy()})

    def whole() -> None:
        calibrate(model, windows, batch_size=int(windows.shape[0]), progress=False)

    variants = {
        "forward, no cache": plain,
        "forward, DynamicCache": dynamic,
        "forward, calibrating cache (observe)": calibrating,
        "quantcache.calibration.calibrate()": whole,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    plain()  # warm-up
    for repeat in range(args.calib_repeats):
        names = list(variants)
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["forward, no cache"])
    rows = [{"variant": name, "tokens_per_s": tokens / statistics.median(values),
             "ratio": base / statistics.median(values)} for name, values in times.items()]
    return {"rows": rows, "tokens": tokens, "shape": list(windows.shape)}


def print_calibration(data: dict[str, Any], args: argparse.Namespace) -> None:
    header = ("pass", "tokens / s", "throughput vs plain forward")
    rows = [(row["variant"], f"{row['tokens_per_s']:.0f}", f"{row['ratio']:.3f}x") for row in data["rows"]]
    print(markdown_or_plain(header, rows, args.markdown))
    print(f"\n{data['shape'][0]}x{data['shape'][1]} tokens of the built-in corpus per pass (one batch), medians of "
          f"{args.calib_repeats} repetitions; calibrate() includes its final freeze.")


# ---------------------------------------------------------------------------- 4: fit a budget
def section_fit(
    model: nn.Module, contenders: list[SpeedContender], args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    device = device_of(model)
    budget = int(args.budget_mib * MIB)
    states = prefill_states(model, args.fit_reference_len, args.prefill_chunk, args.seed)

    def held(contender: SpeedContender, length: int, batch: int) -> int:
        cache = contender.new_cache()
        try:
            fill(cache, states, length, batch)
            decode(model, cache, batch, 1, args.seed)
            return held_bytes(cache)
        finally:
            cache = None
            release(device)

    def largest(fits: Callable[[int], bool], start: int, limit: int, resolution: Callable[[int], int]) -> int:
        """Largest n in [0, limit] with fits(n), assuming monotonicity: doubling, then bisection."""
        if not fits(start):
            low, high = 0, start
        else:
            low, high = start, None
            while high is None:
                candidate = min(low * 2, limit)
                if candidate == low:
                    return low
                if fits(candidate):
                    low = candidate
                else:
                    high = candidate
        while high - low > max(resolution(low), 1):
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return low

    rows = []
    for contender in contenders:
        try:
            context = largest(lambda n, c=contender: held(c, n, 1) <= budget, 256, args.fit_max_context,
                              lambda n: max(64, int(n * args.fit_resolution)))
            batch = largest(lambda n, c=contender: held(c, args.fit_batch_context, n) <= budget, 1,
                            args.fit_max_batch, lambda n: 1)
            rows.append({"key": contender.key, "name": contender.name, "context": context, "batch": batch,
                         "error": None})
        except Exception as error:
            rows.append({"key": contender.key, "name": contender.name, "error": f"{type(error).__name__}: {error}"})
        log(f"fit {contender.name}: {rows[-1]}")
    return {"rows": rows, "budget_mib": args.budget_mib}


def print_fit(data: dict[str, Any], args: argparse.Namespace) -> None:
    base = next((row for row in data["rows"] if row["key"] == "dynamic" and not row["error"]), None)
    header = ("cache", "longest context (batch 1)", "vs DynamicCache", f"largest batch @ {args.fit_batch_context}",
              "vs DynamicCache")
    rows = []
    for row in data["rows"]:
        if row["error"]:
            rows.append((row["name"], "failed", row["error"][:60], "", ""))
            continue
        context_ratio = f"{row['context'] / base['context']:.2f}x" if base and base["context"] else ""
        batch_ratio = f"{row['batch'] / base['batch']:.2f}x" if base and base["batch"] else ""
        limit = " (limit)" if row["context"] >= args.fit_max_context else ""
        rows.append((row["name"], f"{row['context']}{limit}", context_ratio, str(row["batch"]), batch_ratio))
    print(markdown_or_plain(header, rows, args.markdown))
    print(f"\nBudget {data['budget_mib']} MiB of KV cache, measured as the bytes each cache holds after being "
          f"filled and one decode step (contexts to within {args.fit_resolution:.0%} or 64 tokens; "
          f"the states are a real prefill of {args.fit_reference_len} tokens repeated).")


# ---------------------------------------------------------------------------- 5: peak memory
def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux ``/proc/self/clear_refs``), so the model load's peak drops out.

    Writing ``5`` resets the address space's ``VmHWM``. ``getrusage``'s ``ru_maxrss`` also
    keeps the peaks of threads that have exited (the model loader's worker threads), which
    no reset clears, so :func:`peak_rss` reads ``VmHWM`` where it can. Returns whether the
    reset worked.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return peak_rss()[1] == "VmHWM"


def peak_rss() -> tuple[int, str]:
    """The RSS high-water mark in bytes and where it came from: ``VmHWM`` (Linux) or ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def child_peak(args: argparse.Namespace) -> None:
    """In a subprocess: load, build one contender, generate, print peak memory as JSON (last stdout line)."""
    dtype = DTYPES[args.dtype]
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype, progress=False)
    device = device_of(model)
    [contender] = build_contenders(model, tokenizer, args, lambda message: None, only=args.peak_child)
    prompt_len = args.peak_context - args.peak_new_tokens
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, int(model.config.vocab_size), (1, prompt_len), generator=generator).to(device)
    cache = contender.new_cache()
    gc.collect()
    was_reset = reset_peak_rss()
    baseline, source = peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    with torch.inference_mode():
        logits = None
        for start in range(0, prompt_len, args.peak_prefill_chunk):
            end = min(start + args.peak_prefill_chunk, prompt_len)
            logits = model(ids[:, start:end], use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache}).logits
        assert logits is not None
        token = logits[:, -1:].argmax(-1)
        for _ in range(args.peak_new_tokens):
            token = model(token, use_cache=True, **{CACHE_KEYWORD: cache}).logits[:, -1:].argmax(-1)
    synchronize(device)
    result = {
        "key": contender.key, "name": contender.name,
        "peak_rss": peak_rss()[0], "baseline_rss": baseline, "peak_source": source, "peak_reset": was_reset,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kv_bytes": held_bytes(cache),
        "seconds": time.perf_counter() - started,
    }
    if device.type == "cuda":
        result["cuda_peak_above_baseline"] = torch.cuda.max_memory_allocated(device) - cuda_base
    print(json.dumps(result))


def section_peak(
    contenders: list[SpeedContender], args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    rows = []
    for contender in contenders:
        command = [
            sys.executable, str(Path(__file__).resolve()), "--peak-child", contender.key, "--model", args.model,
            "--device", args.device, "--dtype", args.dtype, "--peak-context", str(args.peak_context),
            "--peak-new-tokens", str(args.peak_new_tokens), "--peak-prefill-chunk", str(args.peak_prefill_chunk),
            "--seed", str(args.seed), "--peers", *args.peers, "--fake-schemes", *args.fake_schemes,
        ]
        if args.schemes:
            command += ["--schemes", *args.schemes]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            rows.append(json.loads(lines[-1]))
        else:
            tail = " ".join(done.stderr.strip().splitlines()[-1:])[:200]
            rows.append({"key": contender.key, "name": contender.name, "error": f"exit {done.returncode}: {tail}"})
        log(f"peak {contender.name}: {rows[-1]}")
    return {"rows": rows}


def print_peak(data: dict[str, Any], args: argparse.Namespace) -> None:
    base = next((row for row in data["rows"] if row["key"] == "dynamic" and "error" not in row), None)
    cuda = any("cuda_peak_above_baseline" in row for row in data["rows"])
    header = ["cache", "peak RSS MiB", "RSS before generation MiB", "peak above that MiB", "vs DynamicCache",
              "KV MiB at the end"]
    if cuda:
        header.append("CUDA peak above baseline MiB")
    rows = []
    for row in data["rows"]:
        if "error" in row:
            rows.append(tuple([row["name"], "failed", row["error"][:60]] + [""] * (len(header) - 3)))
            continue
        above = row["peak_rss"] - row["baseline_rss"]
        base_above = base["peak_rss"] - base["baseline_rss"] if base else 0
        cells = [row["name"], f"{row['peak_rss'] / MIB:.0f}", f"{row['baseline_rss'] / MIB:.0f}", f"{above / MIB:.0f}",
                 f"{above / base_above:.2f}x" if base_above > 0 else "", f"{row['kv_bytes'] / MIB:.1f}"]
        if cuda:
            cells.append(f"{row.get('cuda_peak_above_baseline', 0) / MIB:.0f}")
        rows.append(tuple(cells))
    print(markdown_or_plain(tuple(header), rows, args.markdown))
    print(f"\nOne subprocess per cache: prompt of {args.peak_context - args.peak_new_tokens} random tokens prefilled "
          f"in chunks of {args.peak_prefill_chunk}, then {args.peak_new_tokens} greedy decode steps "
          f"({args.peak_context} tokens in all); peak RSS is the process's VmHWM, reset after loading the model and "
          "building the cache (getrusage's ru_maxrss, also in the JSON, keeps the model loader's peak).")
    if any(row.get("peak_reset") is False for row in data["rows"]):
        print("The high-water mark could not be reset here (no /proc): peaks are ru_maxrss and include loading.")


# ---------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="quantcache model name, Hub id, directory or .gguf "
                        "(default smollm2-135m; gemma3-270m also exists)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192], help="decode: contexts "
                        "(default 512 2048 8192)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode: batch sizes (default 1 8)")
    parser.add_argument("--steps", type=int, default=8, help="decode: timed steps per repetition (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="decode: repetitions (default 3)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per forward of the prefills that "
                        "make the states (default 512)")
    parser.add_argument("--schemes", nargs="+", default=None, help="quantcache schemes whose frozen variants run "
                        "(default: all; see schemes.py)")
    parser.add_argument("--fake-schemes", nargs="+", default=["seed-sym"], help="schemes also run with fake "
                        "quantization (default seed-sym); packed variants run for every scheme when available")
    parser.add_argument("--read-codes", action="store_true", help="decode: also run each packed scheme read by the "
                        "attention from codes (attn_implementation 'quantcache'), key codes:SCHEME")
    parser.add_argument("--peers", nargs="*", default=list(DEFAULT_SPEED_PEERS), help="peer keys (default: "
                        f"{' '.join(DEFAULT_SPEED_PEERS)}; known: {' '.join(spec.key for spec in PEER_SPECS)})")
    parser.add_argument("--calib-batch", type=int, default=4, help="calibration: windows per pass (default 4)")
    parser.add_argument("--calib-len", type=int, default=512, help="calibration: window length (default 512)")
    parser.add_argument("--calib-repeats", type=int, default=3, help="calibration: repetitions (default 3)")
    parser.add_argument("--budget-mib", type=float, default=256.0, help="fit: KV-cache budget in MiB (default 256)")
    parser.add_argument("--fit-batch-context", type=int, default=2048, help="fit: context for the largest batch "
                        "(default 2048)")
    parser.add_argument("--fit-max-context", type=int, default=262144, help="fit: stop doubling here "
                        "(default 262144)")
    parser.add_argument("--fit-max-batch", type=int, default=1024, help="fit: stop doubling here (default 1024)")
    parser.add_argument("--fit-resolution", type=float, default=0.02, help="fit: relative context resolution "
                        "(default 0.02)")
    parser.add_argument("--fit-reference-len", type=int, default=2048, help="fit: length of the real prefill whose "
                        "states are repeated to fill longer contexts (default 2048)")
    parser.add_argument("--peak-context", type=int, default=8192, help="peak: tokens generated in all, prompt "
                        "included (default 8192, SmolLM2's limit)")
    parser.add_argument("--peak-new-tokens", type=int, default=32, help="peak: decode steps (default 32)")
    parser.add_argument("--peak-prefill-chunk", type=int, default=256, help="peak: prompt tokens per forward "
                        "(default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random token seed (default 0)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", type=Path, default=None, help="write every result as JSON here")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        child_peak(args)
        return

    def log(message: str) -> None:
        print(f"# {message}", file=sys.stderr, flush=True)

    log(command_line())
    model, tokenizer = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype], progress=False)
    contenders = build_contenders(model, tokenizer, args, log)
    log("contenders: " + ", ".join(f"{c.name} [{c.key}]" for c in contenders))
    results: dict[str, Any] = {"command": command_line(), "torch": torch.__version__, "device": args.device,
                               "dtype": args.dtype, "threads": torch.get_num_threads()}
    environment = (f"{args.model}, {args.dtype} on {args.device}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, pid {os.getpid()}")
    titles = {"decode": "Decode step time and KV-cache bytes", "calibration": "Calibration throughput",
              "fit": "What fits a memory budget", "peak": "Peak process memory of a generation"}
    for section in args.sections:
        began = time.perf_counter()
        if section == "decode":
            results[section] = section_decode(model, contenders, args, log)
        elif section == "calibration":
            results[section] = section_calibration(model, tokenizer, args)
        elif section == "fit":
            results[section] = section_fit(model, contenders, args, log)
        else:
            results[section] = section_peak(contenders, args, log)
        log(f"{section}: {time.perf_counter() - began:.0f} s")
        print(f"\n## {titles[section]}\n\nMade by `{command_line()}` ({environment})\n")
        {"decode": print_decode, "calibration": print_calibration, "fit": print_fit, "peak": print_peak}[section](
            results[section], args
        )
        sys.stdout.flush()
    if args.json is not None:
        args.json.write_text(json.dumps(finite(results), indent=2, default=str))
        print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
