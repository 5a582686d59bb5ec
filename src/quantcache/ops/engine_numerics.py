"""Serving engines' KV-cache arithmetic as pure tensor math: what an engine stores and reads back.

quantcache's own cache computes in float32 with float32 parameters (:mod:`quantcache.ops.quantize`).
An engine serving the exported checkpoint computes otherwise: it holds the scales in its own dtype,
multiplies by a reciprocal or divides, saturates or not, decodes with or without the offset.
``quantcache evaluate --as ENGINE`` measures a frozen state under that arithmetic, so
``quantcache import`` followed by ``evaluate --as`` answers "what will this checkpoint do when served".

Each engine is one :class:`EngineNumerics` (per model: which parameters it derives from the
state) that makes one :class:`EngineStream` per quantized stream (those parameters and the
engine's quantize and decode rules). States are ``(batch, kv_heads, seq, head_dim)`` in the model
dtype; a stream's frozen parameters arrive as ``(kv_heads, head_dim)`` tensors
(:class:`FrozenStream`), the ones the exporters (:mod:`quantcache.export`) write from.

What each engine does, read in its source:

``ascend``: vLLM-Ascend C8 (``vllm-project/vllm-ascend``, commit 182b75e of August 2026).

* ``vllm_ascend/quantization/methods/kv_c8.py``, ``AscendC8KVCacheAttentionMethod.create_weights``:
  ``k_cache_scale`` / ``k_cache_offset`` (and ``v_``) are parameters of ``torch.get_default_dtype()``,
  which vLLM sets to the model dtype while it builds the model; the loader copies the checkpoint's
  float32 values into them. A bf16 model therefore holds bf16 scales and offsets: with the rest of the
  arithmetic below, that moves 9.2 % of SmolLM2-135M's INT8 codes (symmetric state, 2 x 256 tokens),
  none by more than one step.
* ``vllm_ascend/attention/attention_v1.py``, ``AscendC8AttentionBackendImpl._prepare_c8_scales``:
  ``inv_scale = 1.0 / scale`` in that dtype; ``_quantize_kv_to_int8``:
  ``clamp(round(key * inv_scale + offset), -128, 127).to(int8)``. A multiplication by the
  reciprocal, not a division, and no float32: the key arrives in the model dtype and each of the
  reciprocal, the product and the sum is rounded to it.
* ``_dequant_paged_kv_to_dense`` ("scale-only dequant (symmetric)"): ``int8.to(dtype) * scale``;
  the decode kernel (``npu_fused_infer_attention_score``) gets ``key_antiquant_scale`` and no
  offset. The offset is applied when writing and ignored when reading.
* ``AscendC8AttentionBackendImpl.forward``: a sequence's first forward pass (``PrefillNoCache``,
  or a chunked prefill with nothing cached) attends to the keys and values it was given, before
  quantization; they are written quantized, and every later pass reads the INT8 cache, its own
  new tokens included (:attr:`EngineNumerics.prefill_reads_unquantized`).

``vllm`` and ``modelopt``: vLLM's FP8 e4m3 KV cache (``vllm-project/vllm``).

* ``csrc/quantization/fp8/nvidia/quant_utils.cuh``, ``scaled_vec_conversion<uint8_t, __nv_bfloat16>``:
  ``__nv_cvt_float_to_fp8(__bfloat162float(a) / scale, __NV_SATFINITE, __NV_E4M3)``: the state
  widened to float32, divided (not multiplied by a reciprocal) by the float32 scale, saturated to
  +-448 (``SATFINITE``: no NaN for a value past the range) and rounded to nearest even. Decoding
  (``scaled_vec_conversion<__nv_bfloat16, uint8_t>``): FP8 to float32, ``* scale`` in float32,
  rounded once to the model dtype. The Triton writer
  (``vllm/v1/attention/ops/triton_reshape_and_cache_flash.py``) also divides in float32 and
  stores through a saturating cast.
* ``vllm/v1/attention/backends/flash_attn.py``, ``FlashAttentionImpl.forward``: the new keys and
  values are written to the cache (``reshape_and_cache_flash``) before attention, which then reads
  the cache for every token, the prefill's own included.
* Not modelled: FlashAttention 3 attends in FP8 directly (the same function quantizes the query
  with ``_q_scale``, 1.0 without one) instead of decoding keys and values to the model dtype;
  TensorRT-LLM, which also reads ModelOpt checkpoints, was not read.

Non-finite states pass through unchanged, as in every quantcache cache (an engine's INT8 cast of
NaN is undefined and ``SATFINITE`` would turn an Inf into +-448: a fault to see, not to measure).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch

from quantcache.scheme.settings import Engine, enum_value

__all__ = [
    "FP8_E4M3_MAX",
    "FP8_STRATEGIES",
    "AscendC8Numerics",
    "AscendC8Stream",
    "EngineNumerics",
    "EngineStream",
    "Fp8Numerics",
    "Fp8Strategy",
    "Fp8Stream",
    "FrozenStream",
    "engine_numerics",
    "fp8_scales",
    "fp8_strategy_of",
]

FP8_E4M3_MAX = 448.0
"""Largest finite float8 e4m3 value: an FP8 scale maps the calibrated absmax onto it."""

Fp8Strategy = Literal["tensor", "attn_head"]
FP8_STRATEGIES: tuple[Fp8Strategy, Fp8Strategy] = ("tensor", "attn_head")
"""One FP8 scale per layer and stream (``tensor``) or per KV head (``attn_head``): compressed-tensors' names."""

_EPS = float(torch.finfo(torch.float32).eps)
_INT8_MIN, _INT8_MAX = -128, 127


class FrozenStream(NamedTuple):
    """One stream's frozen state as exporters read it, each ``(kv_heads, head_dim)``.

    ``min``/``max`` are the calibrated range (float32), ``scale``/``zero_point`` quantcache's INT8
    parameters (float32, int32).
    """

    min: torch.Tensor
    max: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


# ---------------------------------------------------------------------------- the FP8 scale
def fp8_scales(low: torch.Tensor, high: torch.Tensor, strategy: Fp8Strategy) -> torch.Tensor:
    """FP8 e4m3 scales from per-channel ranges: ``absmax / 448``, float32.

    ``low``/``high`` are ``(kv_heads, head_dim)``. ``tensor`` reduces over everything and returns
    shape ``(1,)``; ``attn_head`` reduces over ``head_dim`` and returns ``(kv_heads,)``. The
    division runs in float64 and rounds once. A range of all zeros gets the float32-eps floor:
    engines treat a scale <= 0 as "not loaded". The ``vllm`` and ``modelopt`` exporters write
    exactly these scales, and their numerics here quantize with them, so what ``evaluate --as``
    measures is what the checkpoint holds.
    """
    absmax = torch.maximum(low.double().abs(), high.double().abs())
    reduced = absmax.amax().reshape(1) if strategy == "tensor" else absmax.amax(dim=1)
    return torch.clamp(reduced / FP8_E4M3_MAX, min=_EPS).float()


def fp8_strategy_of(ranges: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fp8Strategy:
    """``attn_head`` when the state's ranges are one per KV head, ``tensor`` otherwise.

    ``ranges`` are every quantized stream's ``(min, max)``, each ``(kv_heads, head_dim)``. A
    state imported from a checkpoint with per-head FP8 scales holds one absmax per head on all of
    that head's channels, and heads that differ; a calibrated state has per-channel ranges, for
    which vLLM reads what ``export --format vllm`` writes by default, one scale per tensor.
    """
    if not ranges:
        return "tensor"
    heads_differ = False
    for low, high in ranges:
        absmax = torch.maximum(low.double().abs(), high.double().abs())
        if not bool((absmax == absmax[:, :1]).all()):
            return "tensor"
        heads_differ = heads_differ or bool((absmax[:, 0] != absmax[0, 0]).any())
    return "attn_head" if heads_differ else "tensor"


# ---------------------------------------------------------------------------- streams
class EngineStream(ABC):
    """One stream's parameters as an engine holds them, and its quantize and decode rules.

    Built from float32 parameters on any device; the forms an engine computes with (its dtype,
    shapes that broadcast against ``(batch, kv_heads, seq, head_dim)`` states) are made once
    per device and dtype and kept.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def held(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The parameters as the engine holds them when serving a model in ``dtype`` on ``device``."""
        key = (device, dtype)
        found = self._held.get(key)
        if found is None:
            found = self._held[key] = self._make_held(device, dtype)
        return found

    @abstractmethod
    def _make_held(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]: ...

    @abstractmethod
    def quantize(self, states: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, seq, head_dim)`` states in the model dtype -> the codes the engine stores."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored codes -> the states attention reads, in the model ``dtype``."""

    @abstractmethod
    def saturated(self, states: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the elements of ``states`` whose code is clamped to the end of the range."""

    def round_trip(self, states: torch.Tensor) -> torch.Tensor:
        """What the engine reads back for ``states``: :meth:`decode` of :meth:`quantize`, same shape and dtype.

        Non-finite elements come back as they went in (see the module docstring).
        """
        decoded = self.decode(self.quantize(states), states.dtype)
        return torch.where(torch.isfinite(states), decoded, states)


class AscendC8Stream(EngineStream):
    """vLLM-Ascend's C8 stream: scale and offset in the model dtype, ``round(x * (1 / scale) + offset)``.

    ``scale`` and ``offset`` are ``(kv_heads, head_dim)`` float32, the checkpoint's
    ``kv_cache_scale`` / ``kv_cache_offset`` (quantcache's scale and zero point, as exported).
    Held as ``(kv_heads, 1, head_dim)`` in the model dtype, like the engine's
    ``(1, kv_heads, head_dim)`` against its ``(tokens, kv_heads, head_dim)`` keys.
    """

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale.detach().to(torch.float32)
        self.offset = offset.detach().to(torch.float32)

    def _make_held(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # The loader copies float32 into parameters of the model dtype: one rounding each.
        scale = self.scale.to(device=device, dtype=dtype).unsqueeze(1)
        offset = self.offset.to(device=device, dtype=dtype).unsqueeze(1)
        return scale, offset, 1.0 / scale  # the reciprocal, computed in the model dtype as the engine does

    def _levels(self, states: torch.Tensor) -> torch.Tensor:
        """``round(x * inv_scale + offset)`` in the states' dtype, before the clamp."""
        _, offset, inverse = self.held(states.device, states.dtype)
        return torch.round(states * inverse + offset)

    def quantize(self, states: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self._levels(states), _INT8_MIN, _INT8_MAX).to(torch.int8)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scale = self.held(codes.device, dtype)[0]
        return codes.to(dtype) * scale  # the offset is not read back

    def saturated(self, states: torch.Tensor) -> torch.Tensor:
        levels = self._levels(states)
        return (levels < _INT8_MIN) | (levels > _INT8_MAX)


class Fp8Stream(EngineStream):
    """vLLM's FP8 e4m3 stream: ``fp8(sat(x / scale))`` in float32, decoded as ``fp8 * scale`` rounded once.

    ``scale`` is float32 ``(1,)`` (per tensor) or ``(kv_heads,)`` (per KV head), exactly what
    the checkpoint holds (:func:`fp8_scales`).
    """

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale.detach().to(torch.float32).reshape(-1)

    def _make_held(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        scale = self.scale.to(device)
        return (scale.reshape(-1, 1, 1) if scale.numel() > 1 else scale.reshape(()),)

    def quantize(self, states: torch.Tensor) -> torch.Tensor:
        scale = self.held(states.device, states.dtype)[0]
        scaled = states.float() / scale  # an IEEE float32 division, as __bfloat162float(a) / scale
        # SATFINITE: a value past the range becomes +-448 (a plain cast would make it NaN); NaN stays NaN.
        return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scale = self.held(codes.device, dtype)[0]
        return (codes.float() * scale).to(dtype)

    def saturated(self, states: torch.Tensor) -> torch.Tensor:
        scale = self.held(states.device, states.dtype)[0]
        return (states.float() / scale).abs() > FP8_E4M3_MAX


# ---------------------------------------------------------------------------- engines
class EngineNumerics(ABC):
    """One serving engine's KV-cache arithmetic, for a whole model.

    :meth:`for_state` makes the per-model choices an engine derives from the state (vLLM's
    per-tensor or per-head scales); :meth:`stream` gives each quantized stream its
    :class:`EngineStream`.
    """

    engine: Engine
    """The engine (and export format) these numerics are for."""
    prefill_reads_unquantized: ClassVar[bool] = False
    """Whether a sequence's first forward pass (nothing cached yet) attends to its keys and values
    before quantization, as vLLM-Ascend does; the cache stores them quantized all the same."""

    def for_state(self, ranges: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> EngineNumerics:
        """These numerics with the choices that depend on the state made (``ranges``: every stream's min, max)."""
        return self

    @property
    @abstractmethod
    def label(self) -> str:
        """What evaluation reports as its numerics (``settings["numerics"]``)."""

    @abstractmethod
    def stream(self, frozen: FrozenStream) -> EngineStream:
        """The engine's stream for one frozen stream of the state."""


@dataclass(frozen=True)
class AscendC8Numerics(EngineNumerics):
    """vLLM-Ascend / MindIE C8: static INT8 per channel (see the module docstring)."""

    engine: Engine = field(default=Engine.ASCEND, init=False)
    prefill_reads_unquantized: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return "ascend (C8 INT8 per channel, scale in the model dtype)"

    def stream(self, frozen: FrozenStream) -> EngineStream:
        return AscendC8Stream(frozen.scale, frozen.zero_point.to(torch.float32))


@dataclass(frozen=True)
class Fp8Numerics(EngineNumerics):
    """vLLM's FP8 e4m3 cache with scales derived from the state as the ``vllm``/``modelopt`` exporters do.

    ``strategy``: ``tensor`` or ``attn_head``; ``None`` (``vllm``) decides from the state
    (:func:`fp8_strategy_of`) in :meth:`for_state`. ModelOpt checkpoints hold one scale per tensor.
    """

    engine: Engine = Engine.VLLM
    strategy: Fp8Strategy | None = None

    def for_state(self, ranges: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fp8Numerics:
        if self.strategy is not None:
            return self
        return Fp8Numerics(self.engine, fp8_strategy_of(ranges))

    @property
    def label(self) -> str:
        per = {"tensor": "per tensor", "attn_head": "per KV head", None: "per tensor or per KV head"}[self.strategy]
        return f"{self.engine.value} (FP8 e4m3 {per})"

    def stream(self, frozen: FrozenStream) -> EngineStream:
        strategy = self.strategy
        if strategy is None:
            raise ValueError("Fp8Numerics: call for_state(ranges) first; it decides per tensor or per KV head")
        return Fp8Stream(fp8_scales(frozen.min.detach().cpu(), frozen.max.detach().cpu(), strategy))


def engine_numerics(engine: Engine | str | EngineNumerics) -> EngineNumerics:
    """The numerics an engine name (``ascend``, ``vllm``, ``modelopt``) stands for; an instance is returned as is."""
    if isinstance(engine, EngineNumerics):
        return engine
    chosen = enum_value(Engine, "engine", engine, section="")
    if chosen is Engine.ASCEND:
        return AscendC8Numerics()
    if chosen is Engine.MODELOPT:
        return Fp8Numerics(Engine.MODELOPT, "tensor")
    return Fp8Numerics(Engine.VLLM, None)
