"""Packed storage: a frozen cache that keeps codes returns exactly what fake quantization returns.

The promise of ``storage="packed"`` is that it changes the bytes a cache holds and nothing else: for the
same parameters, every key and value ``update`` hands to attention, and so every logit, is bit-identical
to ``storage="fake"``. That is checked for every number format x scope x symmetry x rotation on a model
with full attention (Llama) and one with sliding-window layers (Gemma 3), then through everything
Transformers does with a cache (greedy, beams, assisted decoding, batch expansion and selection, crop,
copies, reset, save/reload). The rest pins the layout the memory claims rest on: ``uint8`` rows of the
documented width, ``memory_report()`` against a real ``DynamicCache``, exact compression ratios, and
non-finite states that stay non-finite.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS, SLIDING_WINDOW, build_model, count_calls, packed_row_bytes
from conftest import random_tokens as _tokens
from transformers import DynamicCache, PreTrainedModel

from quantcache import CalibrationError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.cache.storage_layers import MIN_ROOM_TOKENS, PackedDynamicLayer, PackedSlidingWindowLayer
from quantcache.scheme.args import QuantArgs, QuantScope
from quantcache.scheme.number_formats import FORMATS, FormatKind, QuantDtype

ARCHS = ("llama", "gemma3")  # Llama: full attention only; Gemma 3: sliding-window layers (window 8) and full ones
PROMPT = 10  # longer than Gemma 3's window, so its sliding layers trim packed rows from the first update
DECODE_STEPS = 3

# ---------------------------------------------------------------------------- the scheme matrix
_SCOPES: dict[str, dict[str, Any]] = {
    "channel": {"scope": "per_channel"},
    "tensor": {"scope": "per_tensor"},
    "head": {"scope": "per_head"},
    "group8": {"scope": "group", "group_size": 8},
    "dyn-token": {"scope": "per_token", "dynamic": True},
    "dyn-group8": {"scope": "group", "group_size": 8, "dynamic": True},
}


def _scheme_id(args: QuantArgs) -> str:
    scope = ("dyn-" if args.dynamic else "") + args.scope.value.replace("per_", "") + str(args.group_size or "")
    rotated = ["rot"] if args.rotation.value != "none" else []
    scale = [args.scale_format.value] if args.scale_format.value != "float16" else []
    zero_point = [f"zp{args.zero_point_format.value}"] if args.zero_point_format.value != "int16" else []
    grid = "sym" if args.zero_level else "midrise"
    return "-".join([args.dtype.value, scope, grid if args.symmetric else "asym", *rotated, *scale, *zero_point])


# One-byte (log8) scales, for the dynamic rows of every width: byte, packed nibbles, 3-bit words, fp8.
LOG8_SCHEMES = [
    QuantArgs(scope="per_token", dynamic=True, scale_format="log8"),
    QuantArgs(dtype="int4", scope="per_token", dynamic=True, rotation="hadamard", scale_format="log8"),
    QuantArgs(dtype="int3", scope="group", group_size=8, dynamic=True, symmetric=False, scale_format="log8"),
    QuantArgs(dtype="int2", scope="per_token", dynamic=True, symmetric=False, method="mse", scale_format="log8"),
    QuantArgs(dtype="fp8_e4m3", scope="group", group_size=8, dynamic=True, scale_format="log8"),
]
LOG8 = {"scale_format": "log8"}
# One-byte zero points (zero_point_format int8): a signed byte after the scale, for codes of every width.
ONE_BYTE = {"scale_format": "log8", "zero_point_format": "int8"}
INT8_ZERO_POINT_SCHEMES = [
    QuantArgs(scope="per_token", dynamic=True, symmetric=False, zero_point_format="int8"),
    QuantArgs(scope="group", group_size=8, dynamic=True, symmetric=False, rotation="hadamard", **ONE_BYTE),
    QuantArgs(dtype="int3", scope="group", group_size=8, dynamic=True, symmetric=False, zero_point_format="int8"),
    QuantArgs(dtype="int2", scope="per_token", dynamic=True, symmetric=False, method="mse", zero_point_format="int8"),
    # groups that do not divide head_dim 16: a shorter last group (12 + 4), and one group longer than the head
    QuantArgs(dtype="int4", scope="group", group_size=12, dynamic=True, symmetric=False, zero_point_format="int8"),
    QuantArgs(scope="group", group_size=32, dynamic=True, symmetric=False, rotation="hadamard", **ONE_BYTE),
    QuantArgs(dtype="int3", scope="group", group_size=24, dynamic=True, method="mse"),
]
# The mid-rise grid (zero_level false): symmetric rows without a zero point, decoded half a step off the codes.
MID_RISE_SCHEMES = [
    QuantArgs(dtype="int2", scope="per_token", dynamic=True, method="mse", zero_level=False, **LOG8),
    QuantArgs(dtype="int3", scope="group", group_size=8, dynamic=True, rotation="hadamard", zero_level=False),
    QuantArgs(dtype="int4", scope="group", group_size=12, dynamic=True, zero_level=False, **LOG8),
    QuantArgs(scope="per_token", dynamic=True, rotation="hadamard", zero_level=False),
]
MATRIX = [
    QuantArgs(dtype=dtype, symmetric=symmetric, rotation=rotation, **scope)
    for dtype in QuantDtype
    for scope in _SCOPES.values()
    for symmetric in ((True,) if FORMATS[dtype].kind is FormatKind.FLOAT else (True, False))
    for rotation in ("none", "hadamard")
] + LOG8_SCHEMES + INT8_ZERO_POINT_SCHEMES + MID_RISE_SCHEMES

# The drop-in matrix uses fewer schemes: a static one (flag byte, calibrated zero points) and a mixed one
# (keys: 3-bit codes in grouped dynamic rows, rotated; values: static float8 per head) whose two streams
# have rows of different widths.
STATIC_INT4 = (QuantArgs(dtype="int4", symmetric=False), QuantArgs(dtype="int4", symmetric=False))
MIXED = (
    QuantArgs(dtype="int3", scope="group", group_size=8, dynamic=True, symmetric=False, rotation="hadamard"),
    QuantArgs(dtype="fp8_e4m3", scope="per_head"),
)
DROP_IN = {"static-int4": STATIC_INT4, "mixed": MIXED}


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def draft() -> PreTrainedModel:
    """A one-layer Llama of another seed with the same vocabulary: a draft model that is often wrong."""
    return build_model("llama", seed=1, num_hidden_layers=1)




def _frozen_pair(
    model: PreTrainedModel, key: QuantArgs, value: QuantArgs, **config: Any
) -> tuple[QuantizedCalibratingCache, QuantizedCalibratingCache]:
    """Empty frozen caches, fake and packed, with the same parameters (calibrated once, loaded into the other)."""
    quant_config = KVQuantConfig(key=key, value=value, **config)
    fake = QuantizedCalibratingCache(model, quant_config)
    with torch.no_grad():
        model(_tokens(2, 16, seed=1), **{CACHE_KEYWORD: fake})
    fake = fake.freeze().empty_copy()
    packed = QuantizedCalibratingCache(model, quant_config, storage="packed")
    packed.load_state_dict(fake.state_dict())
    if not packed.is_frozen:  # an all-dynamic scheme has no parameters to load
        packed.freeze()
    assert fake.storage.value == "fake" and packed.storage.value == "packed"
    return fake, packed


def _decoded(cache: QuantizedCalibratingCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's stored keys and values as states (packed rows decoded with the layer's own quantizer)."""
    states = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if keys is not None and keys.dtype == torch.uint8:
            keys = layer.quantizer.key.decode(keys, torch.float32)
            values = layer.quantizer.value.decode(values, torch.float32)
        states.append((keys, values))
    return states


def _assert_same_content(fake: QuantizedCalibratingCache, packed: QuantizedCalibratingCache) -> None:
    assert fake.get_seq_length() == packed.get_seq_length()
    pairs = zip(_decoded(packed), _decoded(fake), strict=True)
    for index, ((keys, values), (ref_keys, ref_values)) in enumerate(pairs):
        assert (keys is None) == (ref_keys is None), f"layer {index}"
        if keys is not None:
            assert torch.equal(keys, ref_keys), f"layer {index} keys"
            assert torch.equal(values, ref_values), f"layer {index} values"


def _assert_packed_rows(cache: QuantizedCalibratingCache, key: QuantArgs, value: QuantArgs) -> None:
    for layer in cache.layers:
        assert isinstance(layer, PackedDynamicLayer | PackedSlidingWindowLayer)
        assert layer.keys.dtype == torch.uint8 and layer.values.dtype == torch.uint8
        assert layer.keys.shape[-1] == packed_row_bytes(key) and layer.values.shape[-1] == packed_row_bytes(value)
        assert layer.keys.shape[1] == KV_HEADS


def _recording(cache: QuantizedCalibratingCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record what every ``update`` of ``cache`` returns (what attention reads)."""
    returned: list[tuple[torch.Tensor, torch.Tensor]] = []
    update = cache.update

    def record(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        result = update(*args, **kwargs)
        returned.append(result)
        return result

    cache.update = record  # type: ignore[method-assign]
    return returned


def _prefill_and_decode(model: PreTrainedModel, cache: QuantizedCalibratingCache) -> list[torch.Tensor]:
    logits = []
    steps = _tokens(2, DECODE_STEPS, seed=3)
    with torch.no_grad():
        logits.append(model(_tokens(2, PROMPT, seed=2), **{CACHE_KEYWORD: cache}).logits)
        for step in range(DECODE_STEPS):
            position = torch.full((2, 1), PROMPT + step)
            logits.append(model(steps[:, step : step + 1], position_ids=position, **{CACHE_KEYWORD: cache}).logits)
    return logits


# ================================================================================ 1. bit identity
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("args", MATRIX, ids=_scheme_id)
def test_packed_returns_exactly_what_fake_returns(
    models: dict[str, PreTrainedModel], arch: str, args: QuantArgs
) -> None:
    """Prefill (past the sliding window) and decode steps: every ``update`` result, every stored state and every
    logit of the packed cache equal the fake cache's, while the packed layers really hold ``uint8`` rows."""
    model = models[arch]
    fake, packed = _frozen_pair(model, args, args)
    fake_returned, packed_returned = _recording(fake), _recording(packed)
    fake_logits = _prefill_and_decode(model, fake)
    packed_logits = _prefill_and_decode(model, packed)
    assert all(torch.equal(a, b) for a, b in zip(packed_logits, fake_logits, strict=True))
    assert len(packed_returned) == len(fake_returned) == len(packed.layers) * (1 + DECODE_STEPS)
    for (keys, values), (ref_keys, ref_values) in zip(packed_returned, fake_returned, strict=True):
        assert keys.dtype == ref_keys.dtype == torch.float32
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    _assert_packed_rows(packed, args, args)
    _assert_same_content(fake, packed)
    if arch == "gemma3":  # the sliding layers dropped rows: they hold window - 1 tokens, the full ones all
        lengths = [layer.keys.shape[-2] for layer in packed.layers]
        assert lengths == [SLIDING_WINDOW - 1 if sliding else PROMPT + DECODE_STEPS for sliding in packed.is_sliding]
    # Quantization acted: the first layer's stored keys are not the unquantized ones.
    reference = DynamicCache(config=model.config)
    _prefill_and_decode(model, reference)
    assert not torch.equal(_decoded(packed)[0][0], reference.layers[0].keys)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("args", [STATIC_INT4[0], *MIXED], ids=_scheme_id)
def test_packed_equals_fake_in_half_precision(llama: PreTrainedModel, args: QuantArgs, dtype: torch.dtype) -> None:
    """Rows decode to the model dtype through the same float32 math as fake quantization, so a bf16/fp16 model
    gets the same bits from both storages (and attention receives its own dtype)."""
    model = copy.deepcopy(llama).to(dtype)
    fake, packed = _frozen_pair(model, args, args)
    fake_returned, packed_returned = _recording(fake), _recording(packed)
    try:
        fake_logits = _prefill_and_decode(model, fake)
    except RuntimeError as error:  # some CPU builds of torch cannot run every op in float16
        pytest.skip(f"this CPU build of torch cannot run the model in {dtype}: {error}")
    packed_logits = _prefill_and_decode(model, packed)
    assert all(torch.equal(a, b) for a, b in zip(packed_logits, fake_logits, strict=True))
    for (keys, values), (ref_keys, ref_values) in zip(packed_returned, fake_returned, strict=True):
        assert keys.dtype == values.dtype == dtype
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    assert all(layer.keys.dtype == torch.uint8 for layer in packed.layers)
    assert {entry["dynamic_cache"] for entry in packed.memory_report()} == {2 * 2 * KV_HEADS * 13 * HEAD_DIM * 2}


def test_packed_calibration_is_calibration(llama: PreTrainedModel) -> None:
    """A packed cache calibrates as a plain one (bit-identical to ``DynamicCache``) and freezes to the same state."""
    config = KVQuantConfig(dtype="int4", symmetric=False)
    fake = QuantizedCalibratingCache(llama, config)
    packed = QuantizedCalibratingCache(llama, config, storage="packed")
    reference = DynamicCache(config=llama.config)
    prompt = _tokens(2, 12, seed=4)
    with torch.no_grad():
        expected = llama(prompt, **{CACHE_KEYWORD: reference}).logits
        assert torch.equal(llama(prompt, **{CACHE_KEYWORD: fake}).logits, expected)
        assert torch.equal(llama(prompt, **{CACHE_KEYWORD: packed}).logits, expected)
    assert all(layer.keys.dtype == torch.float32 for layer in packed.layers)  # nothing packed while calibrating
    fake_state, packed_state = fake.freeze().state_dict(), packed.freeze().state_dict()
    assert fake_state.keys() == packed_state.keys()
    assert all(torch.equal(tensor, packed_state[name]) for name, tensor in fake_state.items())


def test_a_packed_layer_refuses_the_states_it_stored_while_calibrating(llama: PreTrainedModel) -> None:
    """Fake and packed return the same keys and values. A cache frozen in place still holds
    full-precision states from calibration, which fake keeps unquantized and packed cannot hold: packed
    refuses clearly (naming the way out) instead of returning something else, and its empty copy works."""
    cache = QuantizedCalibratingCache(llama, KVQuantConfig(), storage="packed")
    with torch.no_grad():
        llama(_tokens(1, 8, seed=5), **{CACHE_KEYWORD: cache})
        cache.freeze()
        with pytest.raises(CalibrationError, match=r"layer 0 .*still holds.*empty_copy\(\) after freeze"):
            llama(_tokens(1, 1, seed=6), position_ids=torch.tensor([[8]]), **{CACHE_KEYWORD: cache})
        fresh = cache.empty_copy()
        llama(_tokens(1, 9, seed=5), **{CACHE_KEYWORD: fresh})
    assert fresh.layers[0].keys.dtype == torch.uint8


# ================================================================================ 2. the drop-in matrix
def _generate(model: PreTrainedModel, prompt: torch.Tensor, cache: QuantizedCalibratingCache, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    return model.generate(
        prompt,
        max_new_tokens=kwargs.pop("max_new_tokens", 6),
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        **{CACHE_KEYWORD: cache},
        **kwargs,
    )


GENERATE_MODES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False},
    "beams": {"do_sample": False, "num_beams": 3},
    "sample-x2": {"do_sample": True, "num_return_sequences": 2},
    "beams-x2": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
    "assisted-self": {"do_sample": False, "max_new_tokens": 10},
    "assisted-draft": {"do_sample": False, "max_new_tokens": 10},
}


@pytest.mark.parametrize("mode", sorted(GENERATE_MODES))
@pytest.mark.parametrize("scheme", sorted(DROP_IN))
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_packed_equals_fake(
    models: dict[str, PreTrainedModel], draft: PreTrainedModel, arch: str, scheme: str, mode: str
) -> None:
    """Every way ``generate`` drives a cache (beam reordering, returned-sequence expansion, assisted decoding's
    crops of rejected draft tokens, sliding windows) gives the same tokens, logits and cache content packed."""
    if mode.startswith("assisted") and arch == "gemma3" and CACHE_KEYWORD != "cache":
        pytest.skip("transformers 4.x cannot crop a sliding-window layer past its window (assisted decoding)")
    model = models[arch]
    key, value = DROP_IN[scheme]
    fake, packed = _frozen_pair(model, key, value)
    settings = dict(GENERATE_MODES[mode])
    if mode == "assisted-self":  # the same tiny model, unquantized, drafts for the quantized target
        settings["assistant_model"] = model
    if mode == "assisted-draft":  # another model drafts: many of its tokens are rejected and cropped away
        settings["assistant_model"] = draft
    prompt = _tokens(1, 8, seed=7)
    reorders, crops = count_calls(packed, "reorder_cache"), count_calls(packed, "crop")
    expected = _generate(model, prompt, fake, **dict(settings))
    got = _generate(model, prompt, packed, **dict(settings))
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))
    _assert_same_content(fake, packed)
    _assert_packed_rows(packed, key, value)
    if "num_beams" in settings:
        assert reorders, "beam search never reordered the packed cache"
    if mode.startswith("assisted"):
        assert crops, "assisted decoding never cropped the packed cache"
    if mode == "assisted-draft" and CACHE_KEYWORD == "cache":  # transformers 4.x crops to a length instead
        assert any(args[0] < 0 for args in crops), "no draft token was rejected: crop removed nothing"


@pytest.mark.parametrize("scheme", sorted(DROP_IN))
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_operations_packed_equal_fake(
    models: dict[str, PreTrainedModel], arch: str, scheme: str, tmp_path: Path
) -> None:
    """``batch_repeat_interleave``, ``batch_select_indices``, ``crop``, ``copy.deepcopy``, ``empty_copy``,
    ``reset`` and save/reload (``from_file(..., storage="packed")``) on packed rows, each followed by a decode
    step, match the same operations on a fake cache exactly."""
    if CACHE_KEYWORD != "cache":
        pytest.skip("transformers 4.x crops to a length and cannot crop sliding layers; the crop contract is 5.x's")
    model = models[arch]
    key, value = DROP_IN[scheme]
    fake, packed = _frozen_pair(model, key, value)

    def step(cache: QuantizedCalibratingCache, ids: torch.Tensor, position: int) -> torch.Tensor:
        with torch.no_grad():
            positions = torch.full((ids.shape[0], ids.shape[1]), position) + torch.arange(ids.shape[1])
            logits: torch.Tensor = model(ids, position_ids=positions, **{CACHE_KEYWORD: cache}).logits
        return logits

    def both(action: Callable[[QuantizedCalibratingCache], Any]) -> None:
        action(fake)
        action(packed)
        _assert_same_content(fake, packed)

    def same_step(ids: torch.Tensor, position: int) -> None:
        assert torch.equal(step(packed, ids, position), step(fake, ids, position))
        _assert_same_content(fake, packed)
        _assert_packed_rows(packed, key, value)

    prompt = _tokens(2, 6, seed=8)  # below Gemma 3's window: crop works on every layer
    same_step(prompt, 0)
    both(lambda cache: cache.batch_repeat_interleave(3))
    assert packed.layers[0].keys.shape[0] == 6
    same_step(_tokens(6, 1, seed=9), 6)
    both(lambda cache: cache.crop(-3))  # (Gemma 3's sliding layers crop only below the window of 8)
    assert packed.get_seq_length() == 4
    same_step(_tokens(6, 2, seed=10), 4)
    both(lambda cache: cache.batch_select_indices(torch.tensor([0, 4])))
    assert packed.layers[0].keys.shape[0] == 2
    same_step(_tokens(2, 1, seed=11), 6)

    twin_fake, twin_packed = copy.deepcopy(fake), copy.deepcopy(packed)
    _assert_same_content(twin_fake, twin_packed)
    assert twin_packed.layers[0].quantizer is twin_packed.quantizers[0] is not packed.quantizers[0]
    same_step(_tokens(2, 1, seed=12), 7)  # advancing the originals leaves the copies as they were
    assert twin_packed.get_seq_length() == 7 < packed.get_seq_length()
    assert torch.equal(step(twin_packed, _tokens(2, 1, seed=12), 7), step(twin_fake, _tokens(2, 1, seed=12), 7))
    _assert_same_content(twin_fake, twin_packed)

    fresh_packed, fresh_fake = packed.empty_copy(), fake.empty_copy()
    assert fresh_packed.get_seq_length() == 0 and fresh_packed.is_frozen
    assert fresh_packed.quantizer is packed.quantizer and fresh_packed.layers[0] is not packed.layers[0]
    assert torch.equal(step(fresh_packed, prompt, 0), step(fresh_fake, prompt, 0))
    _assert_same_content(fresh_fake, fresh_packed)
    _assert_packed_rows(fresh_packed, key, value)

    both(lambda cache: cache.reset())
    assert packed.get_seq_length() == 0
    same_step(prompt, 0)
    _assert_same_content(packed, fresh_packed)  # a reset cache is as good as a new one

    path = fake.save(tmp_path / "state.safetensors")
    reloaded = QuantizedCalibratingCache.from_file(path, model, storage="packed")
    assert reloaded.is_frozen and reloaded.storage.value == "packed"
    assert reloaded.quant_config == fake.quant_config
    reloaded_fake = QuantizedCalibratingCache.from_file(path, model)
    assert torch.equal(step(reloaded, prompt, 0), step(reloaded_fake, prompt, 0))
    _assert_same_content(reloaded_fake, reloaded)
    _assert_same_content(reloaded, fresh_packed)
    _assert_packed_rows(reloaded, key, value)


# ================================================================================ 3. memory
def _dynamic_cache_bytes(cache: DynamicCache) -> list[int]:
    return [layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_memory_report_against_a_real_dynamic_cache(
    models: dict[str, PreTrainedModel], arch: str, dtype: torch.dtype
) -> None:
    """``dynamic_cache`` is what a ``DynamicCache`` run on the same tokens really holds (sliding layers
    included, model dtype included); codes, parameters and full-precision bytes follow the row layout."""
    model = copy.deepcopy(models[arch]).to(dtype) if dtype is not torch.float32 else models[arch]
    # Keys: 3-bit codes with per-group fp16 scales and int16 zero points; values: static int4 per head, whose
    # float32 scale and int32 zero point per head are the layer's fixed parameters.
    key, value = MIXED[0], QuantArgs(dtype="int4", scope="per_head", symmetric=False)
    exclude = ["model.layers.1.self_attn"]
    _, packed = _frozen_pair(model, key, value, exclude=exclude)
    reference = DynamicCache(config=model.config)
    prompt, more = _tokens(1, 12, seed=13), _tokens(1, 1, seed=14)
    with torch.no_grad():
        for cache in (packed, reference):
            model(prompt, **{CACHE_KEYWORD: cache})
            model(more, position_ids=torch.tensor([[12]]), **{CACHE_KEYWORD: cache})
    report = packed.memory_report()
    element = torch.empty((), dtype=dtype).element_size()
    assert [entry["dynamic_cache"] for entry in report] == _dynamic_cache_bytes(reference)
    assert [entry["index"] for entry in report] == list(range(len(packed.layers)))
    for entry, layer in zip(report, packed.layers, strict=True):
        rows = layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]
        fixed = 0
        if not entry["quantized"]:  # the excluded layer keeps states in the model dtype
            assert layer.keys.dtype == dtype
            assert entry["codes"] == entry["parameters"] == 0
            assert entry["full_precision"] == entry["dynamic_cache"] == 2 * rows * HEAD_DIM * element
        else:
            key_codes, value_codes = HEAD_DIM * 3 // 8, HEAD_DIM // 2
            assert entry["codes"] == rows * (key_codes + value_codes)
            fixed = KV_HEADS * (4 + 4)
            assert entry["parameters"] == rows * (packed_row_bytes(key) - key_codes + 1) + fixed
            assert entry["full_precision"] == 0
            assert entry["dynamic_cache"] == 2 * rows * HEAD_DIM * element
        # Room ahead: the 12-token prefill made a buffer of 12 + MIN_ROOM_TOKENS tokens, the decode step took one.
        per_token = (entry["codes"] + entry["parameters"] - fixed + entry["full_precision"]) // entry["tokens"]
        assert entry["reserved"] == (0 if layer.is_sliding else (12 + MIN_ROOM_TOKENS - 13) * per_token)
        parts = entry["codes"] + entry["parameters"] + entry["full_precision"] + entry["reserved"] + entry["encoder"]
        assert entry["total"] == parts
        assert entry["name"] == f"model.layers.{entry['index']}.self_attn"


def test_memory_report_tokens_are_the_stored_tokens(gemma3: PreTrainedModel) -> None:
    """Bytes per token from the report must divide by what the layer holds: 7 rows in a sliding layer after 12
    tokens, not 12."""
    _, packed = _frozen_pair(gemma3, *STATIC_INT4)
    with torch.no_grad():
        gemma3(_tokens(1, 12, seed=13), **{CACHE_KEYWORD: packed})
    report = packed.memory_report()
    assert [entry["tokens"] for entry in report] == [layer.keys.shape[-2] for layer in packed.layers]


# Bytes held by a packed layer over a float32 DynamicCache's, one stream (head_dim 16, 2 kv heads, batch 1):
#   static:  rows * (codes + 1 flag) + kv_heads * head_dim * (4 scale + 4 zero point)  over  rows * 64
#   dynamic: rows * (codes + 2 scale (+ 2 zero point))                                   over  rows * 64
_TOKENS = 128
_ROWS = KV_HEADS * _TOKENS
RATIOS: dict[str, tuple[QuantArgs, float]] = {
    "int8-static": (QuantArgs(symmetric=False), (_ROWS * 17 + KV_HEADS * HEAD_DIM * 8) / (_ROWS * 64)),
    "int4-static": (QuantArgs(dtype="int4", symmetric=False), (_ROWS * 9 + KV_HEADS * HEAD_DIM * 8) / (_ROWS * 64)),
    "int8-per-token": (QuantArgs(scope="per_token", dynamic=True), 18 / 64),
    "int4-per-token-asym": (QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False), 12 / 64),
    "int2-per-token-asym": (QuantArgs(dtype="int2", scope="per_token", dynamic=True, symmetric=False), 8 / 64),
    "int3-group8-asym": (QuantArgs(dtype="int3", scope="group", group_size=8, dynamic=True, symmetric=False), 14 / 64),
    "int8-per-token-log8": (QuantArgs(scope="per_token", dynamic=True, scale_format="log8"), 17 / 64),
    "int4-per-token-asym-log8": (
        QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False, scale_format="log8"),
        11 / 64,
    ),
    "int8-group8-asym-log8-zpint8": (
        QuantArgs(scope="group", group_size=8, dynamic=True, symmetric=False, **ONE_BYTE),
        20 / 64,
    ),
}


@pytest.mark.parametrize("name", sorted(RATIOS))
def test_packed_bytes_over_dynamic_cache_bytes_is_the_layout_ratio(llama: PreTrainedModel, name: str) -> None:
    """At 128 tokens the ratio is exactly the layout's; INT8 stays under 0.3 and static INT4 under 0.17 of fp32
    even with head_dim 16 (the flag byte, fp16 scales and int16 zero points weigh 4x more than at head_dim 64)."""
    args, expected = RATIOS[name]
    _, packed = _frozen_pair(llama, args, args)
    with torch.no_grad():
        llama(_tokens(1, _TOKENS, seed=15), **{CACHE_KEYWORD: packed})
    report = packed.memory_report()
    held = sum(entry["total"] - entry["reserved"] - entry["encoder"] for entry in report)
    dynamic = sum(entry["dynamic_cache"] for entry in report)
    assert dynamic == len(report) * 2 * _ROWS * HEAD_DIM * 4
    assert held / dynamic == pytest.approx(expected, rel=1e-12)
    # The room reserved after one 128-token prefill: MIN_ROOM_TOKENS more tokens' rows (fixed parameters excluded).
    fixed = 0 if args.dynamic else len(report) * 2 * KV_HEADS * HEAD_DIM * 8
    assert sum(entry["reserved"] for entry in report) == (held - fixed) * MIN_ROOM_TOKENS // _TOKENS
    if name == "int8-static":
        assert held / dynamic < 0.3
    if name == "int4-static":
        assert held / dynamic < 0.17


# ================================================================================ 4. non-finite states
NON_FINITE_SCHEMES = [
    QuantArgs(),
    QuantArgs(dtype="int4", symmetric=False, rotation="hadamard"),
    QuantArgs(dtype="int3", scope="group", group_size=8),
    QuantArgs(dtype="fp8_e4m3", scope="per_tensor"),
    QuantArgs(scope="per_token", dynamic=True),
    QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False, rotation="hadamard"),
    QuantArgs(dtype="int2", scope="group", group_size=8, dynamic=True, symmetric=False),
    QuantArgs(dtype="fp8_e5m2", scope="per_token", dynamic=True),
    *LOG8_SCHEMES,
    *INT8_ZERO_POINT_SCHEMES,
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("args", NON_FINITE_SCHEMES, ids=_scheme_id)
def test_a_non_finite_state_never_comes_back_finite(llama: PreTrainedModel, args: QuantArgs, bad: float) -> None:
    """A code cannot hold NaN or Inf. Static rows carry a flag byte and decode as a NaN row; dynamic rows carry
    the non-finite range in their own parameters and decode non-finite over the group the element shares them
    with. Rows without a bad element decode exactly as the fake cache's."""
    fake, packed = _frozen_pair(llama, args, args)
    states = torch.randn(2, KV_HEADS, 5, HEAD_DIM, generator=torch.Generator().manual_seed(16))
    dirty = states.clone()
    dirty[1, 0, 3, 5] = bad
    keys, values = packed.update(dirty, states, 0)
    fake_keys, _ = fake.update(dirty, states, 0)
    row = keys[1, 0, 3]
    assert not torch.isfinite(row[5])
    if not args.dynamic:
        assert torch.isnan(row).all()
        assert packed.layers[0].keys[1, 0, 3, -1] == 1 and packed.layers[0].keys[..., -1].sum() == 1
    elif args.scope is QuantScope.PER_TOKEN or args.rotation.value != "none":
        assert not torch.isfinite(row).any()
    else:  # the group of element 5, which may be a shorter last group
        size = args.group_size or HEAD_DIM
        start, end = 5 // size * size, min(5 // size * size + size, HEAD_DIM)
        assert not torch.isfinite(row[start:end]).any()
        outside = torch.ones(HEAD_DIM, dtype=torch.bool)
        outside[start:end] = False
        assert torch.equal(row[outside], fake_keys[1, 0, 3][outside])
    clean = torch.ones(keys.shape[:-1], dtype=torch.bool)
    clean[1, 0, 3] = False
    assert torch.equal(keys[clean], fake_keys[clean])
    assert torch.isfinite(keys[clean]).all()
    assert torch.equal(values, fake.layers[0].values)
