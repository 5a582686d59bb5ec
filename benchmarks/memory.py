"""KV-cache bytes actually held, per scheme and storage, at a given context (no model forward needed).

Each contender is built for the model's config and filled through ``cache.update`` with
``(batch, kv_heads, context, head_dim)`` states of the model dtype, layer by layer, exactly
as a forward pass hands them over; then the bytes of every tensor the cache holds are
summed (``memory_report`` for quantcache, the layers' tensors for a ``DynamicCache``).
The bytes depend on the shapes, not on the values, so random states measure them
exactly. Prints the ratio to a ``DynamicCache`` in the same dtype, and the bits per
element held next to ``cache.effective_bits``.

    python benchmarks/memory.py --model smollm2-135m --contexts 2048 8192 --dtype bfloat16 --markdown
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

from quantcache import KVQuantConfig, QuantizedCalibratingCache
from quantcache.models.loading import load_model
from quantcache.scheme.presets import PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config(model: str) -> object:
    """The model's config (the model is loaded once for it; its weights are not used)."""
    loaded, _ = load_model(model, progress=False)
    return loaded.config


def _fill(cache: DynamicCache, config: object, kv_heads: int, head_dim: int, context: int, dtype: torch.dtype) -> None:
    """Hand every layer ``context`` random tokens; a calibrating cache with query-aware keys gets queries too."""
    text = config.get_text_config()  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    for index in range(text.num_hidden_layers):
        keys = torch.randn(1, kv_heads, context, head_dim, generator=generator).to(dtype)
        cache.update(keys, keys.clone(), index)
        if isinstance(cache, QuantizedCalibratingCache) and cache.observes_queries and not cache.is_frozen:
            queries = torch.randn(1, text.num_attention_heads, context, head_dim, generator=generator)
            cache.observe_queries(index, queries)


def _dynamic_bytes(cache: DynamicCache) -> int:
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    config = _config(args.model)
    text = config.get_text_config()  # type: ignore[attr-defined]
    kv_heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    print(f"# python {' '.join(sys.argv)}")
    print("| context | cache | KV bytes | vs DynamicCache | bits/element held | effective_bits |")
    print("|---|---|---|---|---|---|")
    for context in args.contexts:
        plain = DynamicCache(config=config)
        _fill(plain, config, kv_heads, head_dim, context, dtype)
        reference = _dynamic_bytes(plain)
        elements = reference / torch.empty((), dtype=dtype).element_size()
        bits = 8 * reference / elements
        print(f"| {context} | DynamicCache ({args.dtype}) | {reference:,} | 1.000x | {bits:.3f} | |")
        for name in PRESETS:
            for storage in ("fake", "packed") if name == "seed" else ("packed",):
                cache = QuantizedCalibratingCache(config, KVQuantConfig.preset(name), storage=storage)
                if any(stream.calibrates for q in cache.quantizers for _, stream in q.streams):
                    warm = cache.empty_copy()  # ranges from the same kind of states, so freeze() has statistics
                    _fill(warm, config, kv_heads, head_dim, 16, dtype)
                    cache = warm.freeze().empty_copy()
                else:
                    cache.freeze()
                _fill(cache, config, kv_heads, head_dim, context, dtype)
                held = sum(entry["total"] for entry in cache.memory_report())
                bits = cache.effective_bits(context, unquantized_bits=8 * torch.empty((), dtype=dtype).element_size())
                print(
                    f"| {context} | {name} ({storage}) | {held:,} | {held / reference:.3f}x | "
                    f"{8 * held / elements:.3f} | {bits:.3f} |"
                )


if __name__ == "__main__":
    main()
