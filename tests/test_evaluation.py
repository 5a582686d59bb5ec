"""quantcache.analysis.evaluation and quantcache.analysis.report on tiny random models (conftest.py).

Each number evaluate() reports is checked against an independent computation: the
reference perplexity against one plain full-sequence forward, SQNR and clipping against
the states a recording cache sees, and the whole comparison against a quantized cache
that quantizes nothing (which must give KL 0). The sensitivity search must agree with
evaluate() on single-layer caches, with and without its stored reference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import VOCAB
from transformers import DynamicCache, PreTrainedModel

from quantcache import CalibrationError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis import sensitivity as sensitivity_module
from quantcache.analysis.evaluation import EvaluationResult, LayerError, evaluate
from quantcache.analysis.report import (
    format_suggestion,
    format_table,
    plot_layers,
    suggestion_to_yaml,
    to_json,
    to_markdown,
)
from quantcache.analysis.sensitivity import ExcludeSuggestion, LayerSensitivity, layer_sensitivity, suggest_exclude
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.ops.quantize import QuantParams, fake_quantize

PREFILL, CHUNK, LENGTH = 16, 8, 61  # the last chunk is a partial one


def _ids(seed: int, samples: int, length: int = LENGTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, length), generator=generator)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return _ids(100, 2)


@pytest.fixture(scope="module")
def frozen(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    """Symmetric INT8 calibrated on other text than ``windows``."""
    return calibrate(llama, _ids(200, 4, 48), progress=False).new_cache()


@pytest.fixture(scope="module")
def result(llama: PreTrainedModel, frozen: QuantizedCalibratingCache, windows: torch.Tensor) -> EvaluationResult:
    return evaluate(llama, frozen, windows, prefill=PREFILL, chunk=CHUNK, progress=False)


@pytest.fixture(scope="module")
def deep() -> PreTrainedModel:
    """Four layers, so that layers can differ in sensitivity."""
    from conftest import build_model

    return build_model("llama", seed=3, num_hidden_layers=4)


@pytest.fixture(scope="module")
def deep_frozen(deep: PreTrainedModel) -> QuantizedCalibratingCache:
    return calibrate(deep, _ids(300, 2, 48), quant_config=KVQuantConfig(symmetric=False), progress=False).new_cache()


def _disabled(cache: QuantizedCalibratingCache) -> QuantizedCalibratingCache:
    return cache.quantizer.restricted_to([]).new_cache()


@torch.no_grad()
def _one_shot_ppl(model: PreTrainedModel, windows: torch.Tensor) -> float:
    """Perplexity from one full-sequence forward per window, no cache."""
    nll, count = 0.0, 0
    for row in windows:
        logits = model(row.unsqueeze(0), use_cache=False).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(nll / count)


# ---------------------------------------------------------------------------- evaluate
def test_nothing_quantized_gives_identical_runs(
    llama: PreTrainedModel, frozen: QuantizedCalibratingCache, windows: torch.Tensor
) -> None:
    plain = evaluate(llama, _disabled(frozen), windows, prefill=PREFILL, chunk=CHUNK, progress=False)
    assert plain.ppl_quantized == plain.ppl_reference
    assert plain.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert plain.top1_agreement == 1.0
    assert plain.ppl_relative_change == 0.0
    for layer in plain.layers:
        assert not layer.quantized
        assert layer.key_sqnr_db == layer.value_sqnr_db == math.inf
        assert layer.key_clip_fraction == layer.value_clip_fraction == 0.0


@pytest.mark.parametrize(
    ("arch", "prefill", "chunk", "ppl_change"),
    [  # ppl_change: ppl_quantized / ppl_reference - 1, measured (seeded)
        ("llama", PREFILL, CHUNK, 5.9972e-4),
        ("llama", 30, 1, 5.9956e-4),
        ("llama", 100, 32, 5.9977e-4),
        ("qwen2", PREFILL, CHUNK, -3.7113e-4),
        # Gemma 3's sliding-window attention computes otherwise in transformers 4.x
        ("gemma3", 5, 4, 7.6440e-4 if CACHE_KEYWORD == "cache" else 2.7248e-3),
    ],
)
def test_chunked_reference_equals_one_shot_perplexity(
    request: pytest.FixtureRequest, arch: str, prefill: int, chunk: int, ppl_change: float
) -> None:
    """Prefill + chunks through a DynamicCache must give the full-sequence forward's perplexity.

    Gemma 3 has sliding-window layers (window 8), so later chunks see a truncated cache.
    A prefill longer than the window is one forward call.
    """
    model: PreTrainedModel = request.getfixturevalue(arch)
    windows = _ids(7, 2, 40)
    cache = calibrate(model, _ids(8, 1, 40), progress=False).new_cache()
    measured = evaluate(model, cache, windows, prefill=prefill, chunk=chunk, progress=False)
    assert measured.num_tokens == 2 * 39
    assert measured.ppl_reference == pytest.approx(_one_shot_ppl(model, windows), rel=1e-4)
    assert measured.ppl_quantized / measured.ppl_reference - 1 == pytest.approx(ppl_change, rel=0.01)


def test_int8_gives_small_nonzero_kl(result: EvaluationResult, windows: torch.Tensor) -> None:
    """The measured values (seeded model, text and calibration), to the tolerance float32 sums allow."""
    assert result.kl_mean == pytest.approx(1.0981e-6, rel=0.02)
    assert result.ppl_relative_change == pytest.approx(-5.3293e-5, rel=0.02)
    assert result.top1_agreement == 117 / 120
    assert result.num_tokens == windows.shape[0] * (windows.shape[1] - 1) == 120
    assert [layer.quantized for layer in result.layers] == [True, True]
    sqnr = [(layer.key_sqnr_db, layer.value_sqnr_db) for layer in result.layers]
    assert sqnr == [pytest.approx((33.766, 36.607), abs=0.01), pytest.approx((34.415, 32.374), abs=0.01)]
    clipped = [(layer.key_clip_fraction, layer.value_clip_fraction) for layer in result.layers]
    assert clipped == [pytest.approx((0.0035861, 0.0020492), rel=1e-3), pytest.approx((0.0071721, 0.0064037), rel=1e-3)]


def test_settings_are_recorded(result: EvaluationResult, frozen: QuantizedCalibratingCache) -> None:
    assert result.settings["prefill"] == PREFILL and result.settings["chunk"] == CHUNK
    assert result.settings["num_windows"] == 2 and result.settings["window_length"] == LENGTH
    assert result.settings["config"] == frozen.quant_config.to_dict()


def test_evaluate_leaves_the_cache_alone(
    llama: PreTrainedModel, frozen: QuantizedCalibratingCache, windows: torch.Tensor
) -> None:
    before = frozen.state_dict()
    evaluate(llama, frozen, windows[:1], prefill=PREFILL, chunk=CHUNK, progress=False)
    assert frozen.get_seq_length() == 0 and type(frozen) is QuantizedCalibratingCache
    after = frozen.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


class _Recorder(DynamicCache):
    """Records the states layer 0 receives."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, list[torch.Tensor]] = {"key": [], "value": []}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        if layer_idx == 0:
            self.seen["key"].append(key_states.clone())
            self.seen["value"].append(value_states.clone())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _layer0_states(model: PreTrainedModel, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Layer 0's keys and values for every window in one full forward (they do not depend on the cache)."""
    seen: dict[str, list[torch.Tensor]] = {"key": [], "value": []}
    with torch.no_grad():
        for row in windows:
            recorder = _Recorder(config=model.config)
            model(row.unsqueeze(0), **{CACHE_KEYWORD: recorder}, use_cache=True)
            for stream in seen:
                seen[stream] += recorder.seen[stream]
    return {stream: torch.cat(states, dim=2) for stream, states in seen.items()}


def _independent_error(states: torch.Tensor, params: QuantParams) -> tuple[float, float]:
    """(SQNR dB, clip fraction) straight from the definitions."""
    x = states.double()
    noise = (x - fake_quantize(states, params).double()).square().sum()
    sqnr = 10 * math.log10(float(x.square().sum() / noise))
    levels = states / params.scale[:, None, :] + params.zero_point[:, None, :]
    clipped = (levels < -128.5) | (levels > 127.5)
    return sqnr, float(clipped.double().mean())


@pytest.mark.parametrize("shrink", [1.0, 0.25])
def test_sqnr_and_clipping_match_an_independent_computation(
    llama: PreTrainedModel, frozen: QuantizedCalibratingCache, windows: torch.Tensor, shrink: float
) -> None:
    cache = frozen.empty_copy()
    for stream in (cache.quantizers[0].key, cache.quantizers[0].value):
        assert stream.params is not None
        stream.set_params(QuantParams(stream.params.scale * shrink, stream.params.zero_point))
    measured = evaluate(llama, cache, windows, prefill=PREFILL, chunk=CHUNK, progress=False).layers[0]
    states = _layer0_states(llama, windows)
    for stream in ("key", "value"):
        params = getattr(cache.quantizers[0], stream).params
        sqnr, clip = _independent_error(states[stream], params)
        assert getattr(measured, f"{stream}_sqnr_db") == pytest.approx(sqnr, abs=0.01)
        assert getattr(measured, f"{stream}_clip_fraction") == pytest.approx(clip, abs=1e-3)
        if shrink < 1.0:
            assert clip > 0.01


@pytest.mark.parametrize("symmetric", [True, False])
def test_no_clipping_on_the_calibration_text(llama: PreTrainedModel, windows: torch.Tensor, symmetric: bool) -> None:
    """Evaluated on its own calibration text, layer 0 (whose states the cache cannot change) never saturates.

    Later layers see states perturbed by the quantization of earlier ones, so a value at
    the edge of the calibrated range may cross it: rarely, and never by much.
    """
    cache = calibrate(llama, windows, quant_config=KVQuantConfig(symmetric=symmetric), progress=False).new_cache()
    measured = evaluate(llama, cache, windows, prefill=PREFILL, chunk=CHUNK, progress=False)
    first, *later = measured.layers
    assert first.key_clip_fraction == 0.0 and first.value_clip_fraction == 0.0
    for layer in later:
        assert layer.key_clip_fraction < 2e-3 and layer.value_clip_fraction < 2e-3
    assert all(math.isfinite(layer.key_sqnr_db) and layer.key_sqnr_db > 30 for layer in measured.layers)


def test_evaluate_errors(llama: PreTrainedModel, frozen: QuantizedCalibratingCache, windows: torch.Tensor) -> None:
    unfrozen = QuantizedCalibratingCache(llama)
    with pytest.raises(CalibrationError, match="frozen"):
        evaluate(llama, unfrozen, windows, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(llama, frozen, windows[:, :1], progress=False)
    with pytest.raises(ValueError, match="chunk"):
        evaluate(llama, frozen, windows, chunk=0, progress=False)
    with pytest.raises(ValueError, match="integer"):
        evaluate(llama, frozen, windows.float(), progress=False)
    from conftest import build_model

    with pytest.raises(CalibrationError, match="another model"):
        evaluate(build_model("llama", num_hidden_layers=3), frozen, windows, progress=False)


def test_progress_goes_to_stderr(
    llama: PreTrainedModel,
    frozen: QuantizedCalibratingCache,
    windows: torch.Tensor,
    capsys: pytest.CaptureFixture[str],
) -> None:
    evaluate(llama, frozen, windows[:1], prefill=PREFILL, chunk=CHUNK, progress=True)
    shown = capsys.readouterr()
    assert "tok" in shown.err and shown.out == ""


# ---------------------------------------------------------------------------- sensitivity
def test_layer_sensitivity_ranks_every_quantized_layer(
    deep: PreTrainedModel, deep_frozen: QuantizedCalibratingCache
) -> None:
    windows = _ids(9, 2, 40)
    ranking = layer_sensitivity(deep, deep_frozen, windows, prefill=PREFILL, chunk=CHUNK, progress=False)
    assert sorted(item.index for item in ranking) == [0, 1, 2, 3]
    assert [item.kl_mean for item in ranking] == sorted((item.kl_mean for item in ranking), reverse=True)
    assert all(item.kl_mean > 0 for item in ranking)
    assert all(item.name == f"model.layers.{item.index}.self_attn" for item in ranking)
    # Each entry is what evaluate() measures with only that layer quantized.
    top = ranking[0]
    alone = deep_frozen.quantizer.restricted_to([top.index]).new_cache()
    direct = evaluate(deep, alone, windows, prefill=PREFILL, chunk=CHUNK, progress=False)
    assert top.kl_mean == pytest.approx(direct.kl_mean, rel=1e-6)
    assert top.ppl_relative_change == pytest.approx(direct.ppl_relative_change, rel=1e-6, abs=1e-12)
    assert deep_frozen.quantized_layers == [0, 1, 2, 3]  # the cache is not modified


def test_layer_sensitivity_without_a_stored_reference(
    deep: PreTrainedModel, deep_frozen: QuantizedCalibratingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = _ids(10, 1, 30)
    stored = layer_sensitivity(deep, deep_frozen, windows, prefill=PREFILL, chunk=CHUNK, progress=False)
    monkeypatch.setattr(sensitivity_module, "REFERENCE_STORE_BYTES", 0)
    recomputed = layer_sensitivity(deep, deep_frozen, windows, prefill=PREFILL, chunk=CHUNK, progress=False)
    assert [item.index for item in stored] == [item.index for item in recomputed]
    for one, two in zip(stored, recomputed, strict=True):
        assert one.kl_mean == pytest.approx(two.kl_mean, rel=1e-6)


def test_layer_sensitivity_skips_excluded_layers(llama: PreTrainedModel, windows: torch.Tensor) -> None:
    cache = calibrate(
        llama, _ids(11, 2, 32), quant_config=KVQuantConfig(exclude=("*.0.*",)), progress=False
    ).new_cache()
    ranking = layer_sensitivity(llama, cache, windows[:1], prefill=PREFILL, chunk=CHUNK, progress=False)
    assert [item.index for item in ranking] == [1]


@pytest.fixture(scope="module")
def loose(deep: PreTrainedModel, deep_frozen: QuantizedCalibratingCache) -> ExcludeSuggestion:
    return suggest_exclude(
        deep, deep_frozen, _ids(12, 1, 40), kl_budget=1.0, prefill=PREFILL, chunk=CHUNK, progress=False
    )


def test_suggest_exclude_loose_budget_excludes_nothing(loose: ExcludeSuggestion) -> None:
    assert loose.exclude == [] and loose.met_budget
    assert loose.kl_with_exclude == loose.kl_all_quantized > 0
    assert len(loose.ranking) == 4


def test_suggest_exclude_tight_budget(
    deep: PreTrainedModel, deep_frozen: QuantizedCalibratingCache, loose: ExcludeSuggestion
) -> None:
    budget = loose.kl_all_quantized * 0.7
    tight = suggest_exclude(
        deep, deep_frozen, _ids(12, 1, 40), kl_budget=budget, prefill=PREFILL, chunk=CHUNK, progress=False
    )
    assert tight.kl_all_quantized == pytest.approx(loose.kl_all_quantized, rel=1e-9)
    assert 1 <= len(tight.exclude) <= 4
    assert tight.exclude == [item.name for item in tight.ranking[: len(tight.exclude)]]  # most sensitive first
    assert tight.met_budget and tight.kl_with_exclude <= budget
    # The combined KL with the exclusions is what evaluate() measures for that config.
    kept = [index for index, name in enumerate(deep_frozen.layer_names) if name not in tight.exclude]
    remaining = deep_frozen.quantizer.restricted_to(kept).new_cache()
    if kept:
        direct = evaluate(deep, remaining, _ids(12, 1, 40), prefill=PREFILL, chunk=CHUNK, progress=False)
        assert tight.kl_with_exclude == pytest.approx(direct.kl_mean, rel=1e-6)


def test_suggest_exclude_zero_budget_excludes_everything(
    llama: PreTrainedModel, frozen: QuantizedCalibratingCache
) -> None:
    none_left = suggest_exclude(llama, frozen, _ids(13, 1, 24), kl_budget=0.0, prefill=8, chunk=8, progress=False)
    assert sorted(none_left.exclude) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert none_left.kl_with_exclude == 0.0 and none_left.met_budget
    with pytest.raises(ValueError, match="kl_budget"):
        suggest_exclude(llama, frozen, _ids(13, 1, 24), kl_budget=-1.0, progress=False)


# ---------------------------------------------------------------------------- report
def test_format_table(result: EvaluationResult) -> None:
    text = format_table(result)
    for expected in ("PPL reference", "PPL quantized", "PPL change", "mean KL", "top-1 agreement", "K SQNR dB"):
        assert expected in text
    layer_lines = [line for line in text.splitlines() if "model.layers." in line]
    assert len(layer_lines) == 2
    assert f"{result.layers[1].value_sqnr_db:.1f}" in layer_lines[1]
    assert f"{result.ppl_relative_change * 100:+.3f} %" in text
    widths = {len(line) for line in text.splitlines()[-3:]}
    assert len(widths) == 1  # fixed-width layer rows


def test_unquantized_layers_in_reports(result: EvaluationResult) -> None:
    layers = [result.layers[0], LayerError(1, "model.layers.1.self_attn", False, math.inf, math.inf, 0.0, 0.0)]
    partial = EvaluationResult(**{**result.__dict__, "layers": layers})
    row = next(line for line in format_table(partial).splitlines() if "model.layers.1" in line)
    assert row.split()[2:] == ["-", "-", "-", "-"]
    data = json.loads(to_json(partial))
    assert data["layers"][1]["key_sqnr_db"] is None and data["layers"][1]["quantized"] is False


def test_markdown(result: EvaluationResult) -> None:
    text = to_markdown(result)
    assert "| layer | name | K SQNR dB | V SQNR dB | K clip % | V clip % |" in text
    assert "| PPL reference |" in text and text.count("| model.layers.") == 2


def test_json_round_trip(result: EvaluationResult) -> None:
    data = json.loads(to_json(result))
    assert data == json.loads(json.dumps(result.to_dict()))
    assert data["ppl_reference"] == result.ppl_reference and data["kl_mean"] == result.kl_mean
    assert data["ppl_relative_change"] == pytest.approx(result.ppl_relative_change)
    assert data["settings"]["config"]["type"] == "dynamic_cache"
    assert [layer["name"] for layer in data["layers"]] == [layer.name for layer in result.layers]


def test_plot_writes_a_png(result: EvaluationResult, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = plot_layers(result, tmp_path / "layers.png")
    assert path == tmp_path / "layers.png"
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib(result: EvaluationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import: Callable[..., Any] = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_layers(result, tmp_path / "layers.png")
    assert not (tmp_path / "layers.png").exists()


def _suggestion() -> ExcludeSuggestion:
    ranking = [
        LayerSensitivity(1, "model.layers.1.self_attn", 2e-3, 0.004),
        LayerSensitivity(0, "model.layers.0.self_attn", 1e-4, -0.0001),
    ]
    return ExcludeSuggestion(ranking, ["model.layers.1.self_attn"], 2.2e-3, 1.1e-4, 5e-4, True)


def test_format_suggestion() -> None:
    text = format_suggestion(_suggestion())
    rows = [line for line in text.splitlines() if "self_attn" in line and not line.strip().startswith("-")]
    assert rows[0].split()[:3] == ["1", "1", "model.layers.1.self_attn"] and rows[0].rstrip().endswith("yes")
    assert not rows[1].rstrip().endswith("yes")
    assert "5.000e-04" in text and "2.200e-03" in text and "  - model.layers.1.self_attn" in text


def test_suggestion_yaml_is_a_config_with_the_exclusions() -> None:
    base = KVQuantConfig(symmetric=False, exclude=("model.layers.7.self_attn",))
    text = suggestion_to_yaml(_suggestion(), base)
    config = KVQuantConfig.from_yaml(text)
    assert config.exclude == ("model.layers.7.self_attn", "model.layers.1.self_attn")
    assert config.key.symmetric is False and config.include == base.include
    document = yaml.safe_load(text)
    assert isinstance(document, list) and document[0]["type"] == "dynamic_cache"
