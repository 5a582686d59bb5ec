"""Speed and memory of QuantizedCalibratingCache next to a plain DynamicCache, measured side by side.

Each repetition times the same decode steps with every cache variant in turn (round
robin), so machine noise hits all of them alike; the table reports medians and the
ratio to DynamicCache. Run::

    python benchmarks/overhead.py                 # SmolLM2-135M, CPU
    python benchmarks/overhead.py --contexts 256 1024 --steps 16 --repeats 5 --markdown

What it shows: the calibrate mode's cost (one min/max reduction per update), the frozen
mode's cost (fake quantization of the new tokens only, so the overhead per decode step
does not grow with the context), and the memory: fake quantization stores the dequantized
values in the model dtype, so the KV cache takes the bytes of a DynamicCache plus the room
a layer reserves for the next tokens (1/64 of its history); the calibrated state itself is
a few kilobytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from quantcache import QuantizedCalibratingCache
from quantcache.calibration.calibrate import calibrate
from quantcache.models.loading import load_model


def _kv_bytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def _prefill(model: PreTrainedModel, cache: DynamicCache, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids, cache=cache, use_cache=True).logits
    return logits[:, -1:].argmax(-1)


@torch.inference_mode()
def _decode(model: PreTrainedModel, cache: DynamicCache, token: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="quantcache model name, Hub id, directory or .gguf")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for README")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = load_model(args.model, progress=False)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, vocab, (2, 128), generator=generator)
    calibrated = calibrate(model, calibration, progress=False)
    frozen_template = calibrated.new_cache()
    state_bytes = sum(t.numel() * t.element_size() for t in frozen_template.state_dict().values())

    variants: dict[str, Callable[[], DynamicCache]] = {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        "calibrate mode": lambda: QuantizedCalibratingCache(model),
        "frozen INT8 (fake quant)": frozen_template.empty_copy,
    }
    warmup = DynamicCache(config=model.config)
    _decode(model, warmup, _prefill(model, warmup, torch.randint(0, vocab, (1, 64), generator=generator)), 4)
    rows = []
    for context in args.contexts:
        ids = torch.randint(0, vocab, (1, context), generator=generator)
        times: dict[str, list[float]] = {name: [] for name in variants}
        kv_bytes: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, make in variants.items():
                cache = make()
                token = _prefill(model, cache, ids)
                times[name].append(_decode(model, cache, token, args.steps))
                kv_bytes[name] = _kv_bytes(cache)
        base = statistics.median(times["DynamicCache"])
        for name in variants:
            median = statistics.median(times[name])
            rows.append((context, name, median * 1e3, median / base, kv_bytes[name] / kv_bytes["DynamicCache"]))

    header = ("context", "cache", "ms / decode step", "time vs DynamicCache", "KV bytes vs DynamicCache")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for context, name, ms, ratio, mem in rows:
            print(f"| {context} | {name} | {ms:.1f} | {ratio:.3f}x | {mem:.2f}x |")
    else:
        print(f"{header[0]:>8}  {header[1]:<26} {header[2]:>16} {header[3]:>22} {header[4]:>26}")
        for context, name, ms, ratio, mem in rows:
            print(f"{context:>8}  {name:<26} {ms:>16.1f} {ratio:>21.3f}x {mem:>25.2f}x")
    print(f"\ncalibrated state: {state_bytes / 1024:.1f} KiB for {len(frozen_template.quantized_layers)} layers "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
