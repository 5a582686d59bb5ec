"""What a new conversation costs: ``quantizer.new_cache()`` next to reading the state file again and ``DynamicCache``.

A server keeps one calibrated :class:`~quantcache.KVQuantizer` and makes a cache per request.
This times, round robin over repetitions (machine noise hits every variant alike), the median of:

* ``DynamicCache(config=...)``: what Transformers itself pays for an empty cache;
* ``quantizer.new_cache(storage=...)``: a cache that shares the quantizer's parameters;
* ``QuantizedCalibratingCache.from_file(path, config, storage=...)``: the one-object path, which
  reads, checks and validates the file for every cache.

Run (no model weights needed; the shapes are SmolLM2-135M's, 30 layers)::

    python benchmarks/new_cache.py
    python benchmarks/new_cache.py --presets seed int4 --storage packed --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig

from quantcache import KVQuantConfig, KVQuantizer, QuantizedCalibratingCache


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M's decoder shape: 30 layers, 3 KV heads of 64 channels."""
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    )


def frozen_quantizer(config: LlamaConfig, preset: str) -> KVQuantizer:
    """A quantizer frozen on random states of the model's shape (statistics, not quality, are what is timed)."""
    quantizer = KVQuantizer(config, KVQuantConfig.preset(preset))
    cache = quantizer.new_cache()
    generator = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        states = torch.randn(1, 3, 32, 64, generator=generator)
        cache.update(states, states * 0.5, layer)
        if quantizer.quantizers[layer].observes_queries:
            quantizer.observe_queries(layer, torch.randn(1, 9, 32, 64, generator=generator))
    return quantizer.freeze()


def median_ms(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, make in variants.items():
            start = time.perf_counter()
            make()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["seed", "int8", "int4"])
    parser.add_argument("--storage", choices=["fake", "packed"], default="packed")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    config = smollm2_config()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repetitions, medians")
    print("| preset | DynamicCache | new_cache() | from_file() | new_cache / DynamicCache | from_file / new_cache |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for preset in args.presets:
            quantizer = frozen_quantizer(config, preset)
            path = quantizer.save(Path(folder) / f"{preset}.safetensors")
            ms = median_ms(
                {
                    "dynamic": lambda: DynamicCache(config=config),
                    "new_cache": lambda quantizer=quantizer: quantizer.new_cache(storage=args.storage),
                    "from_file": lambda path=path: QuantizedCalibratingCache.from_file(
                        path, config, storage=args.storage
                    ),
                },
                args.repeats,
            )
            print(
                f"| {preset} | {ms['dynamic']:.3f} ms | {ms['new_cache']:.3f} ms | {ms['from_file']:.2f} ms | "
                f"{ms['new_cache'] / ms['dynamic']:.1f}x | {ms['from_file'] / ms['new_cache']:.0f}x |"
            )


if __name__ == "__main__":
    main()
