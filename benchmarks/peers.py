"""Other KV-cache quantizers ("peers"), wrapped so that each works as ``cache=`` of a Transformers 5 model.

A comparison is only fair if every contender sees the same model, the same tokens and the
same evaluation loop, and if its size is counted the same way. This module gives the
benchmarks one object per peer: a fresh cache on demand, a name, and its **effective bits
per element** at a given sequence length, computed from the peer's actual settings (codes,
scales, zero points, norms, and the tokens it keeps in full precision).

The peers, installed for the benchmarks only (``benchmarks/install_peers.sh``):

* Transformers' own ``QuantizedCache`` with the ``quanto`` (int2/int4) and ``hqq``
  (int4/int8) backends: KIVI-like, a window of up to ``residual_length`` recent tokens in
  full precision, everything older re-quantized in groups of ``q_group_size`` whenever the
  window fills. The prefill forward itself reads the unquantized states (that is how
  ``QuantizedLayer.update`` works), so quantization reaches the model from the first decode
  chunk on. Transformers refuses to build it for models with sliding-window layers
  (Gemma 3); the adapter then builds the same layer class for every layer itself: those
  layers keep their whole history, and the attention mask still applies the window, so the
  model computes the same function.
* Transformers' ``fp8`` backend: float8 e4m3 with one scale per layer and stream, fixed by
  the prefill, nothing kept in full precision.
* TurboQuant (``tqai``): random orthogonal rotation per layer, Lloyd-Max codebook per
  coordinate, an fp16 norm per token vector. Its ``update`` does not accept the ``kwargs=``
  keyword that Transformers 5 attention passes, and it never fills ``Cache.layers``, so the
  mask sizes Transformers asks the cache for would be wrong for any forward after the
  first; the adapter fixes both. On PyTorch it keeps *dequantized* buffers (its
  compressed mode is Apple-Metal only), so it saves no memory here: its effective bits are
  those of its format, while ``speed.py`` measures what it really holds.
* KIVI (``tiny-turboquant``, which despite its name implements KIVI, not TurboQuant, in
  its cache): keys per channel and values per token, in blocks of 128 tokens, codes packed
  two (4-bit) or four (2-bit) per byte, fp16 scales and zero points, a full-precision window
  of 128 to 255 recent tokens. Same ``kwargs=`` adapter.

``python benchmarks/peers.py`` checks each peer on a small random Llama model: it runs a
prefill, a chunk and a decode step, compares the stored bytes with the effective-bits
formula, and prints what is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_PEERS",
    "PEER_SPECS",
    "KVShape",
    "Peer",
    "PeerSpec",
    "build_peers",
    "dtype_bits",
    "held_bytes",
    "kv_shape",
]


# ---------------------------------------------------------------------------- model facts
@dataclass(frozen=True)
class KVShape:
    """What the effective-bits formulas need to know about a model's KV cache."""

    num_layers: int
    kv_heads: int
    head_dim: int


def kv_shape(model: nn.Module) -> KVShape:
    """The KV geometry declared by the model's (text) config."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if callable(getter) else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVShape(int(text.num_hidden_layers), kv_heads, int(head_dim))


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of one element of ``dtype`` (32 for float32, 16 for bfloat16)."""
    return torch.empty((), dtype=dtype).element_size() * 8


# ---------------------------------------------------------------------------- measured bytes
def held_bytes(obj: Any) -> int:
    """Bytes of every tensor storage reachable from ``obj`` (a cache), each storage counted once.

    Walks attributes, dicts, lists and tuples recursively. Tensor subclasses that hold their
    data in inner tensors (optimum-quanto's packed ``QBitsTensor``) are opened with
    ``__tensor_flatten__`` so the packed bytes are counted, not the logical size. A plain
    tensor counts its whole storage: a slice that keeps a larger buffer alive costs the
    buffer. Modules are skipped (a cache holds no model).
    """
    seen_objects: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    total = 0

    def tensor_bytes(tensor: torch.Tensor) -> int:
        flatten = getattr(tensor, "__tensor_flatten__", None)
        if type(tensor) not in (torch.Tensor, nn.Parameter) and callable(flatten):
            names, _ = flatten()
            return sum(visit_tensor(getattr(tensor, name)) for name in names)
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return tensor.numel() * tensor.element_size()
        key = (str(tensor.device), storage.data_ptr())
        if storage.data_ptr() != 0 and key in seen_storages:
            return 0
        seen_storages.add(key)
        return int(storage.nbytes())

    def visit_tensor(tensor: Any) -> int:
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen_objects:
            return 0
        seen_objects.add(id(tensor))
        return tensor_bytes(tensor)

    stack: list[Any] = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += visit_tensor(item)
            continue
        if id(item) in seen_objects or isinstance(item, (nn.Module, type, str, bytes, int, float, bool)):
            continue
        if callable(item) and not hasattr(item, "__dict__"):
            continue
        seen_objects.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        else:
            stack.extend(vars(item).values() if hasattr(item, "__dict__") else ())
            for slot in getattr(type(item), "__slots__", ()):
                stack.append(getattr(item, slot, None))
    return total


# ---------------------------------------------------------------------------- peers
@dataclass
class Peer:
    """One ready-to-use peer for one model.

    ``new_cache()`` gives an empty cache for a new sequence; ``effective_bits(seq_len, dtype)``
    the bits per key/value element it stores after ``seq_len`` tokens of one sequence when
    the model's KV states are ``dtype`` (which sets the size of full-precision tokens and of
    model-dtype scales); ``formula`` says how. ``stores_dequantized`` marks peers that keep
    dequantized states in memory (their memory saving is nil whatever their format).
    """

    key: str
    name: str
    new_cache: Callable[[], Any]
    effective_bits: Callable[[int, torch.dtype], float]
    formula: str
    stores_dequantized: bool = False


@dataclass(frozen=True)
class PeerSpec:
    """How to build a peer: the packages it needs and a builder taking the model and its KV shape."""

    key: str
    name: str
    requires: tuple[str, ...]
    build: Callable[[nn.Module, KVShape], Peer]


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [module for module in modules if importlib.util.find_spec(module.split(".")[0]) is None]


# --- Transformers QuantizedCache (quanto, HQQ, FP8) ------------------------------------------
def _windowed_bits(
    seq_len: int, dtype: torch.dtype, *, code_bits: float, param_bits_per_group: float, group: int, window: int
) -> float:
    """Bits per element of a cache that quantizes in groups and keeps up to ``window`` recent tokens in full precision.

    The full-precision tokens are counted at the window's capacity (``min(window, seq_len)``):
    a ``QuantizedLayer`` holds up to ``window - 1`` of them between flushes and all of them
    (plus the new chunk) while it re-quantizes, so that is what memory must be planned for.
    """
    full = dtype_bits(dtype)
    kept = min(window, seq_len)
    quantized = seq_len - kept
    return (quantized * (code_bits + param_bits_per_group / group) + kept * full) / seq_len


def _quantized_cache_factory(model: nn.Module, backend: str, layer_kwargs: dict[str, Any]) -> Callable[[], Any]:
    """A factory of Transformers ``QuantizedCache`` objects, built by hand where Transformers refuses the model.

    ``QuantizedCache`` raises for configs with non-full-attention layers. The same layer
    class for every layer is then a correct cache for the model (the mask keeps the sliding
    window), only one that stores the whole history of the sliding layers.
    """
    from transformers import QuantizedCache
    from transformers.cache_utils import Cache, Fp8QuantizedLayer, HQQQuantizedLayer, QuantoQuantizedLayer

    layer_class = {"quanto": QuantoQuantizedLayer, "hqq": HQQQuantizedLayer, "fp8": Fp8QuantizedLayer}[backend]
    shape = kv_shape(model)
    try:
        QuantizedCache(backend, model.config, **layer_kwargs)
    except ValueError as error:
        if "only supported for models with only full attention" not in str(error):
            raise

        def by_hand() -> Any:
            return Cache(layers=[layer_class(**layer_kwargs) for _ in range(shape.num_layers)])

        return by_hand

    def standard() -> Any:
        return QuantizedCache(backend, model.config, **layer_kwargs)

    return standard


def _hf_grouped_peer(
    key: str, name: str, backend: str, nbits: int, axis: int, group: int = 64, window: int = 128
) -> PeerSpec:
    def build(model: nn.Module, shape: KVShape) -> Peer:
        kwargs = {
            "nbits": nbits, "axis_key": axis, "axis_value": axis, "q_group_size": group, "residual_length": window
        }

        def bits(seq_len: int, dtype: torch.dtype) -> float:
            # One scale and one zero point (shift) per group, both in the model dtype.
            return _windowed_bits(
                seq_len, dtype, code_bits=nbits, param_bits_per_group=2 * dtype_bits(dtype), group=group, window=window
            )

        return Peer(
            key=key,
            name=name,
            new_cache=_quantized_cache_factory(model, backend, kwargs),
            effective_bits=bits,
            formula=(
                f"(L-R)/L * ({nbits} + 2*d/{group}) + R/L * d, R = min({window}, L), d = model dtype bits "
                f"(codes packed; scale and zero point per group of {group}, in the model dtype)"
            ),
        )

    requires = ("optimum.quanto",) if backend == "quanto" else ("hqq", "termcolor")
    return PeerSpec(key, name, requires, build)


def _fp8_peer() -> PeerSpec:
    def build(model: nn.Module, shape: KVShape) -> Peer:
        def bits(seq_len: int, dtype: torch.dtype) -> float:
            # One float32 scale per layer and stream, over seq_len * kv_heads * head_dim elements (batch 1).
            return 8.0 + 32.0 / (seq_len * shape.kv_heads * shape.head_dim)

        return Peer(
            key="fp8",
            name="FP8 e4m3 per-tensor (Transformers)",
            new_cache=_quantized_cache_factory(model, "fp8", {}),
            effective_bits=bits,
            formula="8 + 32 / (L * kv_heads * head_dim): float8 codes, one fp32 scale per layer and stream",
        )

    return PeerSpec("fp8", "FP8 e4m3 per-tensor (Transformers)", (), build)


# --- TurboQuant (tqai) --------------------------------------------------------------------
def _turboquant_peer(bits_per_coordinate: int) -> PeerSpec:
    key = f"turboquant-{bits_per_coordinate}"
    name = f"TurboQuant {bits_per_coordinate}-bit (tqai)"

    def build(model: nn.Module, shape: KVShape) -> Peer:
        from tqai.cache.hf import TurboQuantDynamicCache
        from tqai.config import TurboQuantConfig

        device = next(model.parameters()).device

        class TurboQuantPeerCache(TurboQuantDynamicCache):  # type: ignore[misc]
            """tqai's cache with Transformers 5's ``update`` keywords and correct mask sizes."""

            def update(
                self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = super().update(key_states, value_states, layer_idx)
                return keys, values

            def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
                # Cache.layers stays empty here, so the inherited method would report no past at all.
                return self.get_seq_length(layer_idx) + query_length, 0

        def new_cache() -> Any:
            config = TurboQuantConfig(
                bits_k=bits_per_coordinate, bits_v=bits_per_coordinate, backend="torch", device=str(device)
            )
            return TurboQuantPeerCache(config)

        def bits(seq_len: int, dtype: torch.dtype) -> float:
            # Codes per coordinate plus one fp16 L2 norm per (token, head) vector; the rotation is
            # regenerated from a seed and the codebook is shared, so neither is per-sequence storage.
            return bits_per_coordinate + 16.0 / shape.head_dim

        return Peer(
            key=key,
            name=name,
            new_cache=new_cache,
            effective_bits=bits,
            formula=f"{bits_per_coordinate} + 16 / head_dim: Lloyd-Max code per coordinate, fp16 norm per vector",
            stores_dequantized=True,
        )

    return PeerSpec(key, name, ("tqai",), build)


# --- KIVI (tiny-turboquant) ---------------------------------------------------------------
def _kivi_peer(key_bits: int, value_bits: int, window: int = 128, block: int = 128) -> PeerSpec:
    key = f"kivi-k{key_bits}v{value_bits}"
    name = f"KIVI K{key_bits}/V{value_bits} (tiny-turboquant)"

    def packed_width(bits: int, head_dim: int) -> int:
        # tiny-turboquant packs 4-bit codes when head_dim is even, 3-bit when divisible by 8,
        # 2-bit when divisible by 4; otherwise it stores one code per byte.
        divisor = {4: 2, 3: 8, 2: 4}.get(bits)
        return bits if divisor is not None and head_dim % divisor == 0 else 8

    def build(model: nn.Module, shape: KVShape) -> Peer:
        from tiny_turboquant import TinyKVCache

        class KiviPeerCache(TinyKVCache):  # type: ignore[misc]
            """tiny-turboquant's cache with Transformers 5's ``update`` keywords."""

            def update(
                self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = super().update(key_states, value_states, layer_idx)
                return keys, values

        def new_cache() -> Any:
            return KiviPeerCache(key_bits=key_bits, value_bits=value_bits, residual_len=window, block_size=block)

        def bits(seq_len: int, dtype: torch.dtype) -> float:
            # Blocks of `block` tokens are quantized once the window holds window + block tokens,
            # so the window holds exactly this many full-precision tokens at seq_len:
            kept = seq_len if seq_len < window + block else window + (seq_len - window) % block
            quantized = seq_len - kept
            key_code = packed_width(key_bits, shape.head_dim) + 32.0 / block  # fp16 scale+zero per channel per block
            value_code = packed_width(value_bits, shape.head_dim) + 32.0 / shape.head_dim  # fp16 scale+zero per token
            return (quantized * (key_code + value_code) / 2 + kept * dtype_bits(dtype)) / seq_len

        return Peer(
            key=key,
            name=name,
            new_cache=new_cache,
            effective_bits=bits,
            formula=(
                f"keys {key_bits} + 32/{block}, values {value_bits} + 32/head_dim on quantized tokens; "
                f"{window}..{window + block - 1} recent tokens at model dtype bits"
            ),
        )

    return PeerSpec(key, name, ("tiny_turboquant",), build)


PEER_SPECS: tuple[PeerSpec, ...] = (
    _hf_grouped_peer("quanto-int4", "quanto int4, g64, R128 (Transformers)", "quanto", 4, axis=0),
    _hf_grouped_peer("quanto-int2", "quanto int2, g64, R128 (Transformers)", "quanto", 2, axis=0),
    # HQQ's axis 1 groups 64 contiguous channels of one token and head, the same groups as
    # quanto's axis 0; HQQ's axis 0 would group elements strided across the whole tensor.
    _hf_grouped_peer("hqq-int4", "HQQ int4, g64, R128 (Transformers)", "hqq", 4, axis=1),
    _hf_grouped_peer("hqq-int8", "HQQ int8, g64, R128 (Transformers)", "hqq", 8, axis=1),
    _fp8_peer(),
    _turboquant_peer(4),
    _turboquant_peer(3),
    _turboquant_peer(2),
    _turboquant_peer(8),
    _kivi_peer(4, 4),
    _kivi_peer(2, 2),
)
"""Every peer the benchmarks know, by key."""

DEFAULT_PEERS: tuple[str, ...] = (
    "quanto-int4",
    "quanto-int2",
    "hqq-int4",
    "hqq-int8",
    "fp8",
    "turboquant-4",
    "turboquant-3",
    "turboquant-2",
    "kivi-k4v4",
    "kivi-k2v2",
)
"""The peers a quality run includes unless told otherwise."""


def build_peers(
    model: nn.Module, keys: tuple[str, ...] | list[str] = DEFAULT_PEERS
) -> tuple[list[Peer], dict[str, str]]:
    """The requested peers that can be built for ``model``, and why each of the others cannot."""
    specs = {spec.key: spec for spec in PEER_SPECS}
    unknown = [key for key in keys if key not in specs]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(specs)}")
    shape = kv_shape(model)
    peers: list[Peer] = []
    skipped: dict[str, str] = {}
    for key in keys:
        spec = specs[key]
        missing = _missing(spec.requires)
        if missing:
            skipped[key] = f"not installed: {', '.join(missing)} (run benchmarks/install_peers.sh)"
            continue
        try:
            peers.append(spec.build(model, shape))
        except Exception as error:  # a peer that cannot be built is reported, not fatal
            skipped[key] = f"{type(error).__name__}: {error}"
    return peers, skipped


# ---------------------------------------------------------------------------- self-check
def _tiny_model(kind: str) -> nn.Module:
    """A small random model: ``llama`` (full attention) or ``gemma3`` (sliding-window and full layers)."""
    torch.manual_seed(0)
    common: dict[str, Any] = {
        "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
    }
    if kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            **common, num_hidden_layers=3, sliding_window=64,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
        return Gemma3ForCausalLM(config).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=2)).eval()


def _check(model: nn.Module, keys: list[str], seq_len: int) -> None:
    """Run every peer through prefill, chunk and decode; compare stored and formula bytes."""
    from transformers import DynamicCache

    shape = kv_shape(model)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (1, seq_len), generator=generator)
    bounds = [(0, seq_len // 2), (seq_len // 2, seq_len - 1), (seq_len - 1, seq_len)]

    def run(cache: Any) -> torch.Tensor:
        with torch.inference_mode():
            for start, end in bounds:
                logits = model(ids[:, start:end], cache=cache, use_cache=True).logits
        return logits[0, -1].float()

    reference_cache = DynamicCache(config=model.config)
    reference = run(reference_cache)
    base = held_bytes(reference_cache)
    elements = 2 * shape.num_layers * shape.kv_heads * shape.head_dim * seq_len
    print(f"{'peer':<42} {'status':<7} {'formula bits':>12} {'stored bits':>11} {'max |dlogit|':>12}")
    print(f"{'DynamicCache':<42} {'ok':<7} {dtype_bits(dtype):>12.3f} {8 * base / elements:>11.3f} {0.0:>12.2e}")
    peers, skipped = build_peers(model, keys)
    for peer in peers:
        try:
            cache = peer.new_cache()
            logits = run(cache)
            stored = 8 * held_bytes(cache) / elements
            formula = peer.effective_bits(seq_len, dtype)
            note = "  (stores dequantized states)" if peer.stores_dequantized else ""
            error = float((logits - reference).abs().max())
            print(f"{peer.name:<42} {'ok':<7} {formula:>12.3f} {stored:>11.3f} {error:>12.2e}{note}")
        except Exception as failure:
            print(f"{peer.name:<42} FAILED  {type(failure).__name__}: {failure}")
    for key, reason in skipped.items():
        print(f"{key:<42} skipped {reason}")
    print(
        "formula bits count a full-precision window at its capacity; stored bits are the storages held right now "
        "(a window partly empty, a slice keeping a larger buffer alive, constant per-layer tensors)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(
            "Check which KV-cache peers are installed and work with this Transformers: each runs a prefill, a "
            "chunk and a decode step on a small random Llama model; the effective-bits formula is printed next "
            "to the bits the cache really stores (constant per-layer tensors such as rotation matrices included, "
            "which is why short sequences show more stored than formula bits)."
        ),
        epilog="Examples: python benchmarks/peers.py --seq-len 1024; python benchmarks/peers.py --model gemma3",
    )
    parser.add_argument("--peers", nargs="+", default=[spec.key for spec in PEER_SPECS], help="peer keys to check")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per check sequence (default 512)")
    parser.add_argument("--model", choices=["llama", "gemma3"], default="llama", help="small random model to check "
                        "on: llama (full attention, default) or gemma3 (sliding-window layers)")
    args = parser.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    _check(_tiny_model(args.model), args.peers, args.seq_len)


if __name__ == "__main__":
    main()
