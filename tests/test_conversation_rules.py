"""Rules a cache keeps for the conversation it holds: its dtype, bf16 keys before RoPE, sink-only calibration.

* One conversation, one dtype: a cache answers in the dtype it holds, so an update in another
  dtype (or keys and values of different dtypes) is refused, for fake and packed storage alike.
* Keys turned back before RoPE are quantized in float32: a bf16 model's keys get exactly the
  codes their float32 values get (rounding the turned keys to bf16 first moves elements across
  code boundaries).
* A calibration whose every token fell inside ``sink_tokens`` says so, and names the fix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS, random_tokens
from transformers import PreTrainedModel

from quantcache import CalibrationError, KVQuantConfig, KVQuantizer, calibrate
from quantcache.scheme.args import QuantArgs

DYNAMIC_INT4 = QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False)


def _states(seed: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=generator) * 3 + 1).to(dtype)


@pytest.fixture(scope="module")
def pre_rope(llama: PreTrainedModel) -> KVQuantizer:
    return KVQuantizer(llama, KVQuantConfig(key=DYNAMIC_INT4, value=DYNAMIC_INT4, pre_rope_keys=True)).freeze()


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_bf16_keys_before_rope_get_the_codes_of_their_float32_values(pre_rope: KVQuantizer, storage: str) -> None:
    keys, values = _states(1, 96, torch.bfloat16), _states(2, 96, torch.bfloat16)
    in_bf16, _ = pre_rope.new_cache(storage=storage).update(keys, values, 0)
    in_fp32, _ = pre_rope.new_cache(storage=storage).update(keys.float(), values.float(), 0)
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, in_fp32.to(torch.bfloat16))
    # the comparison has teeth: rounding the turned-back keys to bf16 before quantizing changes codes
    layer = pre_rope.quantizers[0]
    assert layer.key_rope is not None
    rounded = layer.key_rope.rotate(keys, 0, undo=True).float()
    exact = layer.keys_to_quantize(keys, 0)
    assert not torch.equal(layer.key.fake_quantize(rounded), layer.key.fake_quantize(exact))


@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "calibrating"])
def test_a_cache_refuses_states_of_another_dtype(llama: PreTrainedModel, storage: str, frozen: bool) -> None:
    quantizer = KVQuantizer(llama, KVQuantConfig())
    calibrating = quantizer.new_cache()
    for layer in range(len(quantizer.layer_names)):
        calibrating.update(_states(3, 4, torch.float32), _states(4, 4, torch.float32), layer)
    if frozen:
        quantizer.freeze()
    cache = quantizer.new_cache(storage=storage)
    cache.update(_states(5, 4, torch.bfloat16), _states(6, 4, torch.bfloat16), 0)
    with pytest.raises(ValueError, match=r"dtype torch.float32 .* holding torch.bfloat16: a cache holds one"):
        cache.update(_states(7, 1, torch.float32), _states(8, 1, torch.float32), 0)
    with pytest.raises(ValueError, match=r"values torch.float32"):
        cache.update(_states(7, 1, torch.bfloat16), _states(8, 1, torch.float32), 0)
    kept, _ = cache.update(_states(9, 1, torch.bfloat16), _states(10, 1, torch.bfloat16), 0)
    assert kept.dtype == torch.bfloat16 and kept.shape[2] == 5  # the refused updates stored nothing


def test_calibration_inside_the_sinks_names_the_fix(llama: PreTrainedModel) -> None:
    config = KVQuantConfig(sink_tokens=1000)
    with pytest.raises(CalibrationError, match=r"every calibration token fell inside the first sink_tokens \(1000\)"):
        calibrate(llama, random_tokens(2, 48, seed=11), quant_config=config, progress=False)
    # a window longer than the sinks calibrates
    config = KVQuantConfig(sink_tokens=4)
    quantizer = calibrate(llama, random_tokens(1, 12, seed=12), quant_config=config, progress=False)
    assert quantizer.is_frozen
