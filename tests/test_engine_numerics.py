"""Engine-faithful evaluation: ``quantizer.new_cache(engine=...)`` and ``quantcache evaluate --as ENGINE``.

Every check compares against a reference written here, independently of
:mod:`quantcache.ops.engine_numerics`:

* the math, on hypothesis-drawn values: FP8 codes against the nearest e4m3 value picked from
  the table of all 256 codes (ties to the even code, saturation at +-448), C8 codes against the
  vLLM-Ascend formula evaluated in float64 with every rounding to the model dtype written out;
* the caches, on tiny random models: logits bit-equal to a ``DynamicCache`` subclass that
  quantizes by hand (``(x / s).clamp(-448, 448).to(float8_e4m3fn)``, or the C8 reciprocal rule
  with bf16 parameters), for calibrated states and for states imported from checkpoints that
  our exporters wrote, whose scale tensors the simulation reads from the shard itself;
* the command: ``evaluate --as`` reports the engine and measures what the library measures,
  and refuses (exit 3, naming the fix) a state its export format cannot write.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import VOCAB, build_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import char_tokenizer
from transformers import DynamicCache, PreTrainedModel

from quantcache import KVQuantConfig, KVQuantizer, cli
from quantcache.analysis.evaluation import evaluate
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.cli import _steps
from quantcache.errors import CalibrationError, ConfigError
from quantcache.export import FORMATS, export_checkpoint, get_format, import_checkpoint
from quantcache.export.api import served_numerics
from quantcache.export.checkpoint import SCALE_SHARD
from quantcache.export.common import KVState, UnsupportedSchemeError
from quantcache.models.data import TextSource, token_windows
from quantcache.ops import engine_numerics as numerics_module
from quantcache.ops.engine_numerics import AscendC8Stream, Fp8Stream
from quantcache.ops.quantize import QuantParams, quantize
from quantcache.scheme.settings import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8_MAX = 448.0
EPS32 = float(torch.finfo(torch.float32).eps)
# Every finite float8 e4m3fn value, by code, as float64: 0x7f and 0xff are NaN, and -0.0 (0x80) is left to the sign.
E4M3_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
E4M3_FINITE = torch.isfinite(E4M3_CODES.float()) & (torch.arange(256) != 0x80)
E4M3_VALUES = E4M3_CODES.float().double()[E4M3_FINITE]
E4M3_EVEN = (torch.arange(256)[E4M3_FINITE] % 2) == 0


def windows(seed: int = 0, rows: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bf16_llama() -> PreTrainedModel:
    return build_model("llama").to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_gemma3() -> PreTrainedModel:
    return build_model("gemma3").to(torch.bfloat16)


@pytest.fixture(scope="module")
def symmetric(bf16_llama: PreTrainedModel) -> KVQuantizer:
    return calibrate(bf16_llama, windows(), progress=False)


@pytest.fixture(scope="module")
def asymmetric(bf16_llama: PreTrainedModel) -> KVQuantizer:
    return calibrate(bf16_llama, windows(), quant_config=KVQuantConfig(symmetric=False), progress=False)


@pytest.fixture(scope="module")
def model_dir(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    llama.save_pretrained(path)
    return path


# ================================================================================ independent references
def nearest_e4m3_saturated(values: torch.Tensor) -> torch.Tensor:
    """Round float64 ``values`` to the nearest finite e4m3 value, ties to the even code, past +-448 to +-448."""
    flat = values.double().reshape(-1, 1).clamp(-FP8_MAX, FP8_MAX)
    distance = (flat - E4M3_VALUES.reshape(1, -1)).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    tied = nearest.sum(dim=1) > 1
    chosen = torch.where(tied.unsqueeze(1), nearest & E4M3_EVEN.reshape(1, -1), nearest)
    picked = E4M3_VALUES.reshape(1, -1).expand_as(chosen)[chosen]
    # +0.0 and -0.0 are both nearest to a zero: keep the sign of the value, as the hardware does
    return torch.copysign(picked.reshape(values.shape), values.double())


def fp8_reference(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """vLLM's FP8 write and read in float64: ``fp8(sat(f32(x) / s))`` then ``dtype(f32(fp8 * s))``.

    Both the quotient and the product of float32 operands are exact enough in float64 that one
    rounding to float32 afterwards is the correctly rounded float32 result.
    """
    s = scale.double().reshape(-1, 1, 1) if scale.numel() > 1 else scale.double().reshape(())
    quotient = (states.double() / s).float().double()
    return (nearest_e4m3_saturated(quotient) * s).float().to(states.dtype)


def as_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded once to ``dtype`` and widened back to float64 (one model-dtype operation's result)."""
    return values.to(dtype).double()


def c8_reference_codes(states: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """vLLM-Ascend's ``clamp(round(x * (1 / scale) + offset))`` in float64, each step rounded to the states' dtype.

    ``scale``/``offset`` are ``(kv_heads, head_dim)`` float32 as in the checkpoint. Rounding
    through float32 first would give the same results (float32 has more than twice bf16's bits).
    """
    dtype = states.dtype
    scale_held = as_dtype(scale.unsqueeze(1), dtype)
    offset_held = as_dtype(offset.unsqueeze(1), dtype)
    inverse = as_dtype(1.0 / scale_held, dtype)
    product = as_dtype(states.double() * inverse, dtype)
    levels = as_dtype(product + offset_held, dtype).round()
    return levels.clamp(-128, 127)


def c8_reference(states: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """What vLLM-Ascend reads back: ``code * scale`` in the model dtype, the offset not subtracted."""
    codes = c8_reference_codes(states, scale, offset)
    return as_dtype(codes * as_dtype(scale.unsqueeze(1), states.dtype), states.dtype).to(states.dtype)


def fp8_scale_from_range(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """One ``absmax / 448`` for a ``(kv_heads, head_dim)`` range, computed here (float64, one rounding, eps floor)."""
    absmax = torch.stack([low.double().abs(), high.double().abs()]).amax()
    return (absmax / FP8_MAX).clamp(min=EPS32).float().reshape(1)


class HandQuantizedCache(DynamicCache):
    """A ``DynamicCache`` whose every update stores ``rule(states, layer, stream)`` instead of the states.

    ``fresh_reads_input``: a layer's first update returns the incoming states themselves (it still
    stores the quantized ones), as vLLM-Ascend's first forward pass of a sequence attends.
    """

    def __init__(
        self,
        config: Any,
        rule: Callable[[torch.Tensor, int, str], torch.Tensor],
        *,
        fresh_reads_input: bool = False,
    ) -> None:
        super().__init__(config=config)
        self.rule = rule
        self.fresh_reads_input = fresh_reads_input

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = self.get_seq_length(layer_idx) == 0
        keys, values = super().update(
            self.rule(key_states, layer_idx, "key"),
            self.rule(value_states, layer_idx, "value"),
            layer_idx,
            *args,
            **kwargs,
        )
        if fresh and self.fresh_reads_input:
            return key_states, value_states
        return keys, values


def chunked_logits(
    model: PreTrainedModel, cache: DynamicCache, ids: torch.Tensor, bounds: Sequence[int]
) -> list[torch.Tensor]:
    """Logits of each forward call: a prefill up to ``bounds[0]``, then the chunks up to each next bound."""
    out = []
    start = 0
    with torch.inference_mode():
        for end in bounds:
            out.append(model(ids[:, start:end], **{CACHE_KEYWORD: cache}).logits)
            start = end
    return out


def assert_bit_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"forward call {index}: max |diff| {(a.float() - b.float()).abs().max().item()}"


BOUNDS = (16, 20, 21, 28)  # a prefill, a chunk of 4, one decode step, a chunk of 7
PROMPT = windows(seed=7, rows=1, length=BOUNDS[-1])


def state_of(quantizer: KVQuantizer, layer: int, stream: str, field: str) -> torch.Tensor:
    return quantizer.state_dict()[f"layers.{layer}.{stream}.{field}"]


# ================================================================================ the math
@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=48),
    scale=st.floats(2.0**-13, 50.0, width=32),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_fp8_stream_is_the_saturating_float32_division_rounded_to_nearest_e4m3(
    values: list[float], scale: float, dtype: torch.dtype
) -> None:
    states = torch.tensor(values, dtype=torch.float32).clamp(-6e4, 6e4).to(dtype).reshape(1, 1, -1, 1)
    stream = Fp8Stream(torch.tensor([scale]))
    codes = stream.quantize(states)
    assert codes.dtype == torch.float8_e4m3fn
    quotient = (states.double() / torch.tensor(scale, dtype=torch.float32).double()).float().double()
    assert torch.equal(codes.double(), nearest_e4m3_saturated(quotient))
    assert torch.equal(stream.round_trip(states), fp8_reference(states, torch.tensor([scale])))
    expected_clipped = quotient.abs() > FP8_MAX
    assert torch.equal(stream.saturated(states), expected_clipped)


def test_fp8_reference_values() -> None:
    """Hand-worked codes with scale 0.01: 1.0 -> 100, halfway between 96 and 104, goes to the even code (96);
    past 448 saturates; 1e-5 -> 1e-3 is nearer the smallest subnormal 2**-9 than 0; zeros keep their sign."""
    states = torch.tensor([1.0, 4.48, 1e9, -1e9, 0.0, -0.0, 1.0e-5]).reshape(1, 1, -1, 1)
    codes = Fp8Stream(torch.tensor([0.01])).quantize(states).float().flatten().tolist()
    assert codes[:4] == [96.0, 448.0, 448.0, -448.0]
    assert [str(code) for code in codes[4:6]] == ["0.0", "-0.0"]
    assert codes[6] == 2.0**-9
    # A division, not a reciprocal: 700 / 7 is exactly the tie 100 (-> 96), while 700 * float32(1/7) is
    # 100.0000076 (-> 104).
    assert Fp8Stream(torch.tensor([7.0])).quantize(torch.full((1, 1, 1, 1), 700.0)).float().item() == 96.0


def test_fp8_saturates_where_a_plain_cast_gives_nan_and_passes_non_finite_states_through() -> None:
    stream = Fp8Stream(torch.tensor([1.0]))
    states = torch.tensor([500.0, -1e30, 447.0, float("inf"), float("nan")]).reshape(1, 1, -1, 1)
    # A plain float8 cast past the range gives NaN in older torch releases (this one's CPU cast saturates):
    # the stream saturates first, as SATFINITE does, whatever the torch version or device.
    restored = stream.round_trip(states).flatten()
    assert restored[:3].tolist() == [448.0, -448.0, 448.0]  # 447 rounds to 448 (the step is 32 there)
    assert restored[3] == float("inf") and torch.isnan(restored[4])
    assert stream.saturated(states).flatten().tolist() == [True, True, False, True, False]


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=32, max_size=32),
    scales=st.lists(st.floats(2.0**-13, 1.0, width=32), min_size=8, max_size=8),
    offsets=st.lists(st.integers(-300, 300), min_size=8, max_size=8),
    spread=st.floats(1.0, 300.0),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_c8_stream_is_the_reciprocal_rule_in_the_model_dtype(
    data: list[float], scales: list[float], offsets: list[int], spread: float, dtype: torch.dtype
) -> None:
    scale = torch.tensor(scales).reshape(2, 4)
    offset = torch.tensor(offsets, dtype=torch.float32).reshape(2, 4)
    # (batch 1, 2 heads, 4 tokens, 4 channels), reaching past the code range
    states = (torch.tensor(data).reshape(1, 2, 4, 4) * scale.unsqueeze(1) * spread).to(dtype)
    stream = AscendC8Stream(scale, offset)
    codes = stream.quantize(states)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.double(), c8_reference_codes(states, scale, offset))
    assert torch.equal(stream.round_trip(states), c8_reference(states, scale, offset))
    unclamped = as_dtype(
        as_dtype(states.double() * as_dtype(1.0 / as_dtype(scale.unsqueeze(1), dtype), dtype), dtype)
        + as_dtype(offset.unsqueeze(1), dtype),
        dtype,
    ).round()
    assert torch.equal(stream.saturated(states), (unclamped < -128) | (unclamped > 127))


def test_c8_reference_values() -> None:
    """Hand-worked bf16 parameters: 1/3 is held as 0.333984375 and its bf16 reciprocal is exactly 3."""
    stream = AscendC8Stream(torch.full((1, 1), 1.0 / 3.0), torch.zeros(1, 1))
    scale, offset, inverse = stream.held(torch.device("cpu"), torch.bfloat16)
    assert scale.item() == 0.333984375 and inverse.item() == 3.0 and offset.item() == 0.0
    states = torch.tensor([41.0, 42.5, -50.0, 10.0], dtype=torch.bfloat16).reshape(1, 1, -1, 1)
    # 41 * 3 = 123; 42.5 * 3 = 127.5 rounds (half to even) to 128 and clamps to 127; -150 clamps to -128
    assert stream.quantize(states).flatten().tolist() == [123, 127, -128, 30]
    # read back as code * 0.333984375 rounded to bf16: 123 * s = 41.08.. -> 41.0; 127 * s = 42.41.. -> 42.5
    assert stream.round_trip(states).flatten().tolist() == [41.0, 42.5, -42.75, 10.0]


def test_c8_decode_ignores_the_offset() -> None:
    scale, offset = torch.full((1, 2), 0.5), torch.tensor([[10.0, -20.0]])
    stream = AscendC8Stream(scale, offset)
    codes = torch.tensor([[[[30, 30]]]], dtype=torch.int8)
    assert stream.decode(codes, torch.float32).flatten().tolist() == [15.0, 15.0]  # not (30 - offset) * 0.5
    states = torch.tensor([[[[1.0, 1.0]]]])
    # written with the offset (1 / 0.5 + 10 = 12, 2 - 20 = -18), read back without it
    assert stream.quantize(states).flatten().tolist() == [12, -18]
    assert stream.round_trip(states).flatten().tolist() == [6.0, -9.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_c8_codes_in_a_half_dtype_differ_from_float32_ones_by_at_most_one_step(
    symmetric: KVQuantizer, bf16_llama: PreTrainedModel, dtype: torch.dtype
) -> None:
    """On the model's real keys and values: the engine's codes are the reference's exactly, and
    differ from quantcache's float32-scale codes (``round(x / scale)``) by one step where they differ."""
    cache = DynamicCache(config=bf16_llama.config)
    with torch.inference_mode():
        bf16_llama(windows(seed=3, rows=2, length=32), **{CACHE_KEYWORD: cache})
    moved, compared = 0, 0
    for index in range(len(cache.layers)):
        for stream_name, states in (("key", cache.layers[index].keys), ("value", cache.layers[index].values)):
            states = states.to(dtype)
            scale = state_of(symmetric, index, stream_name, "scale")
            zero_point = state_of(symmetric, index, stream_name, "zero_point")
            engine = AscendC8Stream(scale, zero_point.float()).quantize(states).long()
            assert torch.equal(engine.double(), c8_reference_codes(states, scale, zero_point.float()))
            ours = quantize(states.float(), QuantParams(scale, zero_point)).long()
            assert int((engine - ours).abs().max()) <= 1
            moved += int((engine != ours).sum())
            compared += engine.numel()
    assert 0.01 < moved / compared < 0.5  # scales rounded to a half dtype move a fraction of the codes


def test_fp8_scales_are_the_exporters_own_function() -> None:
    from quantcache.export import common

    assert common.fp8_scales is numerics_module.fp8_scales
    assert common.FP8_E4M3_MAX == numerics_module.FP8_E4M3_MAX == FP8_MAX


def test_every_export_format_names_the_engine_it_writes_for() -> None:
    assert {name: get_format(name).numerics for name in FORMATS} == {engine.value: engine for engine in Engine}


def test_per_head_scales_are_chosen_only_for_ranges_that_are_one_per_head() -> None:
    per_head = torch.tensor([[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    same = torch.full((2, 3), 2.0)
    calibrated = torch.tensor([[2.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    assert numerics_module.fp8_strategy_of([(-per_head, per_head), (-same, same)]) == "attn_head"
    assert numerics_module.fp8_strategy_of([(-same, same)]) == "tensor"
    assert numerics_module.fp8_strategy_of([(-per_head, per_head), (-calibrated, calibrated)]) == "tensor"


# ================================================================================ caches: FP8
def fp8_rule(scales: dict[tuple[int, str], torch.Tensor]) -> Callable[[torch.Tensor, int, str], torch.Tensor]:
    """vLLM's FP8 write and read, written out with torch casts (what the issue asked the test to do by hand)."""

    def rule(states: torch.Tensor, layer: int, stream: str) -> torch.Tensor:
        scale = scales[(layer, stream)]
        s = scale.reshape(-1, 1, 1) if scale.numel() > 1 else scale.reshape(())
        code = (states.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return (code.float() * s).to(states.dtype)

    return rule


def calibrated_fp8_scales(quantizer: KVQuantizer) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (layer, stream): fp8_scale_from_range(
            state_of(quantizer, layer, stream, "min"), state_of(quantizer, layer, stream, "max")
        )
        for layer in quantizer.quantized_layers
        for stream in ("key", "value")
    }


@pytest.mark.parametrize("engine", ["vllm", "modelopt"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fp8_cache_gives_the_logits_of_a_hand_written_fp8_cache_to_the_bit(
    engine: str, arch: str, request: pytest.FixtureRequest
) -> None:
    model: PreTrainedModel = request.getfixturevalue(f"bf16_{arch}")
    quantizer = calibrate(model, windows(), progress=False)
    cache = quantizer.new_cache(engine=engine)
    assert cache.numerics == f"{engine} (FP8 e4m3 per tensor)"
    reference = HandQuantizedCache(model.config, fp8_rule(calibrated_fp8_scales(quantizer)))
    got = chunked_logits(model, cache, PROMPT, BOUNDS)
    assert_bit_equal(got, chunked_logits(model, reference, PROMPT, BOUNDS))
    plain = chunked_logits(model, DynamicCache(config=model.config), PROMPT, BOUNDS)
    assert not torch.equal(got[0], plain[0])  # vLLM attends over the FP8 cache from the prefill on


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_fp8_cache_of_an_imported_vllm_checkpoint_uses_its_scale_tensors_to_the_bit(
    symmetric: KVQuantizer, bf16_llama: PreTrainedModel, model_dir: Path, tmp_path: Path, strategy: str
) -> None:
    """Calibrate, ``export --format vllm``, ``import``: the engine cache quantizes with the very tensors
    in the checkpoint's scale shard (per tensor or, detected from the imported ranges, per KV head)."""
    out = tmp_path / "ckpt"
    export_checkpoint(symmetric, out, format="vllm", model=model_dir, strategy=strategy)
    shard = safetensors.torch.load_file(out / SCALE_SHARD)
    imported = import_checkpoint(out, format="vllm").cache.quantizer
    cache = imported.new_cache(engine="vllm")
    per = "per tensor" if strategy == "tensor" else "per KV head"
    assert cache.numerics == f"vllm (FP8 e4m3 {per})"
    scales = {
        (layer, stream): shard[f"model.layers.{layer}.self_attn.{suffix}"]
        for layer in (0, 1)
        for stream, suffix in (("key", "k_scale"), ("value", "v_scale"))
    }
    reference = HandQuantizedCache(bf16_llama.config, fp8_rule(scales))
    assert_bit_equal(
        chunked_logits(bf16_llama, cache, PROMPT, BOUNDS), chunked_logits(bf16_llama, reference, PROMPT, BOUNDS)
    )
    if strategy == "tensor":  # served, the imported state is the calibrated one: the same FP8 scales bit for bit
        assert_bit_equal(
            chunked_logits(bf16_llama, imported.new_cache(engine="vllm"), PROMPT, BOUNDS),
            chunked_logits(bf16_llama, symmetric.new_cache(engine="vllm"), PROMPT, BOUNDS),
        )


@pytest.mark.parametrize(
    ("fmt", "suffixes"), [("vllm", ("k_scale", "v_scale")), ("modelopt", ("k_proj.k_scale", "v_proj.v_scale"))]
)
def test_fp8_cache_quantizes_with_the_scales_the_export_writes(
    symmetric: KVQuantizer, tmp_path: Path, fmt: str, suffixes: tuple[str, str]
) -> None:
    export_checkpoint(symmetric, tmp_path / "kv", format=fmt, scales_only=True)
    shard = safetensors.torch.load_file(tmp_path / "kv" / SCALE_SHARD)
    cache = symmetric.new_cache(engine=fmt)
    for layer in symmetric.quantized_layers:
        streams = cache.layers[layer].engine_streams
        assert streams is not None
        for stream, suffix in zip(streams, suffixes, strict=True):
            assert isinstance(stream, Fp8Stream)
            written = shard[f"model.layers.{layer}.self_attn.{suffix}"]
            assert torch.equal(stream.scale, written.reshape(-1)), (layer, suffix)


# ================================================================================ caches: C8
def c8_rule(quantizer: KVQuantizer) -> Callable[[torch.Tensor, int, str], torch.Tensor]:
    """vLLM-Ascend's C8 write and read, by hand from the state's scale and zero point (the checkpoint's tensors)."""

    def rule(states: torch.Tensor, layer: int, stream: str) -> torch.Tensor:
        scale = state_of(quantizer, layer, stream, "scale")
        offset = state_of(quantizer, layer, stream, "zero_point").float()
        return c8_reference(states, scale, offset)

    return rule


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_c8_cache_gives_the_logits_of_a_hand_written_c8_cache_to_the_bit(
    scheme: str, bf16_llama: PreTrainedModel, request: pytest.FixtureRequest
) -> None:
    """Both states the ascend export writes (asymmetric with --allow-asymmetric): the offsets are
    applied when writing and ignored when reading; the first forward pass attends unquantized."""
    quantizer: KVQuantizer = request.getfixturevalue(scheme)
    cache = quantizer.new_cache(engine="ascend")
    assert cache.numerics.startswith("ascend")
    reference = HandQuantizedCache(bf16_llama.config, c8_rule(quantizer), fresh_reads_input=True)
    got = chunked_logits(bf16_llama, cache, PROMPT, BOUNDS)
    assert_bit_equal(got, chunked_logits(bf16_llama, reference, PROMPT, BOUNDS))
    plain = chunked_logits(bf16_llama, DynamicCache(config=bf16_llama.config), PROMPT, BOUNDS)
    assert torch.equal(got[0], plain[0]) and not torch.equal(got[1], plain[1])
    # what the layers hold is the quantized prefill, even though the prefill read it unquantized
    stored = cache.layers[0].keys[:, :, : BOUNDS[0]]
    prompt_keys = plain_keys(bf16_llama, PROMPT[:, : BOUNDS[0]])
    assert torch.equal(stored, c8_rule(quantizer)(prompt_keys, 0, "key"))


def plain_keys(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, **{CACHE_KEYWORD: cache})
    return cache.layers[0].keys


def test_c8_asymmetric_state_is_served_with_the_exports_warning(asymmetric: KVQuantizer) -> None:
    engine, warnings = served_numerics(asymmetric, "ascend")
    assert engine is Engine.ASCEND
    assert any("ignores kv_cache_offset" in warning for warning in warnings)
    ascend = get_format("ascend")
    with pytest.raises(UnsupportedSchemeError, match="allow-asymmetric"):  # the export itself still asks for it
        ascend.check(KVState.load(asymmetric), ascend.options({}), None, None)


def test_evaluation_hears_what_the_engine_stores_and_clips(symmetric: KVQuantizer, bf16_llama: PreTrainedModel) -> None:
    """The cache's quantization events (what evaluation's SQNR and clipping read) carry the engine's values."""
    cache = symmetric.new_cache(engine="ascend")
    events: list[Any] = []
    cache.on_quantize = events.append
    with torch.inference_mode():
        bf16_llama(PROMPT, **{CACHE_KEYWORD: cache})
    assert [(event.layer_idx, event.stream) for event in events] == [(0, "key"), (0, "value"), (1, "key"), (1, "value")]
    for event in events:
        streams = cache.layers[event.layer_idx].engine_streams
        assert streams is not None
        stream = streams[0 if event.stream == "key" else 1]
        assert torch.equal(event.quantized, stream.round_trip(event.states))
        assert torch.equal(event.clipped, stream.saturated(event.states))
    served = evaluate(bf16_llama, cache, windows(), prefill=8, chunk=4, progress=False)
    assert served.settings["numerics"] == cache.numerics != "quantcache"
    ours = evaluate(bf16_llama, symmetric, windows(), prefill=8, chunk=4, progress=False)
    assert ours.settings["numerics"] == "quantcache" and ours.kl_mean != served.kl_mean


# ================================================================================ refusals (library)
def test_engine_caches_refuse_what_engines_cannot_serve(bf16_llama: PreTrainedModel, symmetric: KVQuantizer) -> None:
    int4 = calibrate(bf16_llama, windows(), quant_config=KVQuantConfig.preset("int4"), progress=False)
    with pytest.raises(ConfigError, match=r"--preset c8"):
        int4.new_cache(engine="ascend")
    with pytest.raises(CalibrationError, match="freeze"):
        KVQuantizer(bf16_llama).new_cache(engine="vllm")
    with pytest.raises(ConfigError, match="storage='packed'"):
        symmetric.new_cache("packed", engine="vllm")
    with pytest.raises(ConfigError, match="engine: unsupported value 'tensorrt'"):
        symmetric.new_cache(engine="tensorrt")


# ================================================================================ the command
EVALUATE = ["--samples", "2", "--seq-len", "40", "--prefill", "16", "--chunk", "8", "-q"]


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, llama: PreTrainedModel) -> list[str]:
    """The tiny float32 Llama and a character tokenizer answer every model request; returns what was asked."""
    asked: list[str] = []
    tokenizer = char_tokenizer()

    def load(args: argparse.Namespace) -> tuple[Any, Any]:
        asked.append(args.model)
        return llama, tokenizer

    monkeypatch.setattr(_steps, "load_model_and_tokenizer", load)
    return asked


def test_evaluate_as_vllm_on_an_imported_checkpoint_measures_the_fp8_cache(
    llama: PreTrainedModel, model_dir: Path, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    calibrate(llama, windows(), progress=False).save(tmp_path / "run" / "kv_scales.safetensors")
    assert (
        cli.main(
            [
                "export",
                "--scales",
                str(tmp_path / "run"),
                "--model",
                str(model_dir),
                "--format",
                "vllm",
                "-o",
                str(tmp_path / "ckpt"),
                "-q",
            ]
        )
        == 0
    )
    assert cli.main(["import", "--format", "vllm", str(tmp_path / "ckpt"), "-o", str(tmp_path / "imported"), "-q"]) == 0
    report = tmp_path / "eval.json"
    args = ["evaluate", "--scales", str(tmp_path / "imported"), "--as", "vllm", *EVALUATE, "--json", str(report)]
    assert cli.main(args) == 0
    assert "as served by vllm (FP8 e4m3 per tensor)" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["settings"]["numerics"] == "vllm (FP8 e4m3 per tensor)"
    documents = TextSource(kind="builtin", split="evaluation").load()
    tokens = token_windows(char_tokenizer(), documents, num_samples=2, seq_len=40, seed=0)
    served = KVQuantizer.load(tmp_path / "imported" / "kv_scales.safetensors", llama).new_cache(engine="vllm")
    expected = evaluate(llama, served, tokens, prefill=16, chunk=8, progress=False)
    assert data["kl_mean"] == expected.kl_mean and data["ppl_quantized"] == expected.ppl_quantized
    ours = evaluate(llama, served.quantizer, tokens, prefill=16, chunk=8, progress=False)
    assert ours.kl_mean != expected.kl_mean  # INT8 per channel on the imported ranges is another cache


def test_evaluate_as_refuses_a_state_the_format_cannot_write_before_loading_the_model(
    llama: PreTrainedModel, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    int4 = calibrate(llama, windows(), quant_config=KVQuantConfig.preset("int4"), progress=False)
    int4.save(tmp_path / "int4" / "kv_scales.safetensors")
    assert cli.main(["evaluate", "--scales", str(tmp_path / "int4"), "--as", "ascend", *EVALUATE]) == cli.EXIT_INPUT
    error = capsys.readouterr().err
    assert "--as ascend" in error and "cannot be exported" in error and "--preset c8" in error
    excluded = calibrate(
        llama, windows(), quant_config=KVQuantConfig(exclude=["model.layers.0.self_attn"]), progress=False
    )
    excluded.save(tmp_path / "excluded" / "kv_scales.safetensors")
    assert (
        cli.main(["evaluate", "--scales", str(tmp_path / "excluded"), "--as", "modelopt", *EVALUATE]) == cli.EXIT_INPUT
    )
    error = capsys.readouterr().err
    assert "--as modelopt" in error and "--format vllm" in error
    assert loads == []  # refused before any model loads
