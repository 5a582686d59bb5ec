"""Query-aware keys: calibrated per-channel key scaling weighed by the queries that read them.

``query_aware: true`` on a centred dynamic key stream scales every centred key channel by
``(query energy / key variance) ** (1 / 4)`` before quantizing and back after. It must:
be refused where it cannot work, with a message that says why; collect exactly the
energy of the queries attention computes (recomputed from hidden states, for every
architecture), leaving padding out; minimise the logit error it is built for; refuse
to freeze without queries and say how to get them; round-trip through state files and
packed storage bit for bit; refuse altered states; merge across ranks; count its bits.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GENERATION_MODES, HEAD_DIM, KV_HEADS, assert_packed_generates_like_fake
from conftest import random_tokens as _tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from quantcache import CalibrationError, ConfigError, KVQuantConfig, QuantizedCalibratingCache
from quantcache.analysis.state_report import config_text
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.queries import layer_queries, observe_queries
from quantcache.errors import QuantStateError
from quantcache.ops.bits import stream_bits
from quantcache.ops.observers import QUERY_AWARE_SCALE_LIMIT, QueryAwareCenterObserver, query_aware_scale
from quantcache.scheme.args import QuantArgs
from quantcache.state.file import read_state_file, validate_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CENTRED = QuantArgs(dtype="int4", scope="per_token", dynamic=True, symmetric=False, center=True, rotation="hadamard")
AWARE = replace(CENTRED, query_aware=True)
CONFIG = KVQuantConfig(key=AWARE, value=CENTRED)


def _captured_queries(model: PreTrainedModel, ids: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
    """What each layer's q_proj (and q_norm) produced in a forward pass, ``(batch, heads, seq, head_dim)``."""
    captured: list[torch.Tensor] = []
    handles = []
    for layer in model.model.layers:
        attention = layer.self_attn
        last = getattr(attention, "q_norm", None) or attention.q_proj

        def hook(module: Any, inputs: Any, output: torch.Tensor) -> None:
            queries = output if output.dim() == 4 else output.view(*output.shape[:-1], -1, HEAD_DIM)
            if queries.shape[1] == ids.shape[1]:  # (batch, seq, heads, head_dim): Gemma 3 norms after transposing
                queries = queries.transpose(1, 2)
            captured.append(queries.detach())

        handles.append(last.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------------------- config
def test_query_aware_needs_a_centred_dynamic_scheme() -> None:
    with pytest.raises(ConfigError, match="query_aware: true needs dynamic: true and center: true"):
        QuantArgs(dtype="int4", scope="per_token", dynamic=True, query_aware=True)
    with pytest.raises(ConfigError, match="query_aware: expected true or false"):
        QuantArgs(query_aware="yes")


def test_values_cannot_be_query_aware_and_the_error_says_where_to_put_it() -> None:
    with pytest.raises(ConfigError, match=r"set query_aware under qconfig\.key"):
        KVQuantConfig(dtype="int4", scope="per_token", dynamic=True, center=True, query_aware=True)
    with pytest.raises(ConfigError, match="only keys"):
        KVQuantConfig(key=AWARE, value=AWARE)
    with pytest.raises(ConfigError, match="only keys"):
        KVQuantConfig(key=AWARE, value=CENTRED, layers=[{"include": ["*0*"], "qconfig": {"query_aware": True}}])


def test_query_aware_round_trips_through_yaml() -> None:
    text = CONFIG.to_yaml()
    assert "query_aware: true" in text
    assert KVQuantConfig.from_yaml(text) == CONFIG
    assert "query_aware" not in CENTRED.to_dict()
    assert "query-aware" in config_text(CONFIG) and config_text(CONFIG).count("query-aware") == 1


# ---------------------------------------------------------------------------- the math
_positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


def _pairs(tensor: torch.Tensor) -> torch.Tensor:
    return 0.5 * (tensor + tensor.roll(tensor.shape[-1] // 2, -1))


@settings(max_examples=60, deadline=None)
@given(st.lists(_positive, min_size=16, max_size=16), st.lists(_positive, min_size=16, max_size=16), _positive)
def test_scale_is_the_least_logit_error_per_token_range(variance: list[float], energy: list[float], k: float) -> None:
    """The scaled keys' total energy times the query-weighted error (what a per-token step makes of the logit
    error) is never above what no scaling gives; scales are positive, pair-equal, RMS 1 and scale-free."""
    v, q = torch.tensor([variance], dtype=torch.float64), torch.tensor([energy], dtype=torch.float64)
    scale = query_aware_scale(v, q).double()
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert torch.equal(scale, scale.roll(8, -1))
    v, q = _pairs(v), _pairs(q)

    def logit_error(s: torch.Tensor, v: torch.Tensor = v, q: torch.Tensor = q) -> float:
        return float((s.square() * v).sum() * (q / s.square()).sum())

    assert logit_error(scale) <= logit_error(torch.ones_like(scale)) * (1 + 1e-5)
    torch.testing.assert_close(scale, query_aware_scale(v * k, q / k).double(), rtol=1e-5, atol=0)
    if bool((scale < QUERY_AWARE_SCALE_LIMIT).all() & (scale > 1 / QUERY_AWARE_SCALE_LIMIT).all()):
        torch.testing.assert_close(scale.square().mean(), torch.tensor(1.0, dtype=torch.float64))
        # Cauchy-Schwarz equality: the optimum is (sum sqrt(q v))^2, for the variances and energies the scales are
        # made from, each floored by 1e-4 of its mean (a pair far below its head's mean is set by its floor).
        v_floored, q_floored = v + 1e-4 * v.mean(-1, keepdim=True), q + 1e-4 * q.mean(-1, keepdim=True)
        optimum = float(torch.sqrt(q_floored * v_floored).sum() ** 2)
        assert logit_error(scale, v_floored, q_floored) == pytest.approx(optimum, rel=1e-5)


def test_scale_is_bounded_and_finite_at_the_edges() -> None:
    energy = torch.ones(1, 8)
    energy[0, [0, 4]] = 0.0  # a pair no calibration query reads
    scale = query_aware_scale(torch.ones(1, 8), energy)
    assert float(scale.min()) == pytest.approx(1 / QUERY_AWARE_SCALE_LIMIT)
    for variance, queries in [(torch.zeros(2, 8), torch.zeros(2, 8)), (torch.zeros(2, 8), torch.ones(2, 8))]:
        scale = query_aware_scale(variance, queries)
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    odd = query_aware_scale(torch.ones(1, 5), torch.tensor([[1.0, 16.0, 1.0, 1.0, 1.0]]))
    assert float(odd[0, 1]) > float(odd[0, 0])  # an odd head_dim has no RoPE pairs to average


def test_observer_sums_keys_and_grouped_queries_apart_and_leaves_padding_out() -> None:
    observer = QueryAwareCenterObserver(AWARE)
    keys = torch.randn(2, 2, 5, 4)
    queries = torch.randn(2, 6, 5, 4)  # 3 query heads per kv head
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    observer.merge(observer.measure(keys, mask))
    assert observer.observed and not observer.queries_observed
    observer.merge(observer.measure_queries(queries, 2, mask))
    assert observer.queries_observed
    stats = observer.statistics
    kept = mask[:, None, :, None]
    torch.testing.assert_close(stats["key_square_sum"], torch.where(kept, keys, 0).square().sum(dim=(0, 2)))
    grouped = torch.where(kept, queries, 0).square().reshape(2, 2, 3, 5, 4).sum(dim=(0, 2, 3))
    torch.testing.assert_close(stats["query_square_sum"], grouped)
    assert torch.equal(stats["query_count"], torch.full((2, 4), 8.0))
    assert torch.equal(stats["center_count"], torch.full((2, 4), 8.0))
    assert observer.measure_queries(queries, 2, torch.zeros(2, 5, dtype=torch.bool)) == {}
    queries_only = QueryAwareCenterObserver(AWARE)
    queries_only.merge(queries_only.measure_queries(queries, 2))
    assert not queries_only.observed  # queries give no center


# ---------------------------------------------------------------------------- queries from hidden states
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_queries_recomputed_from_hidden_states_are_the_models_own(arch: str, request: pytest.FixtureRequest) -> None:
    """q_proj (and q_norm) applied to the hidden states equal what attention computed: checked with hooks here,
    which the package itself never uses."""
    model = request.getfixturevalue(arch)
    ids = _tokens(2, 10, seed=5)
    captured = _captured_queries(model, ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    cache = QuantizedCalibratingCache(model, CONFIG)
    for index, name in enumerate(cache.layer_names):
        torch.testing.assert_close(layer_queries(model, name, hidden[index], HEAD_DIM), captured[index])


def test_calibration_collects_the_energy_of_the_real_queries(llama: PreTrainedModel) -> None:
    ids = _tokens(2, 12, seed=6)
    captured = _captured_queries(llama, ids)
    cache = calibrate(llama, ids, quant_config=CONFIG, batch_size=2, freeze=False, progress=False).new_cache()
    for index, queries in enumerate(captured):
        stats = cache.quantizers[index].key.statistics
        expected = queries.square().reshape(2, KV_HEADS, -1, 12, HEAD_DIM).sum(dim=(0, 2, 3))
        torch.testing.assert_close(stats["query_square_sum"], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats["query_count"], torch.full((KV_HEADS, HEAD_DIM), 24.0))
        assert set(cache.quantizers[index].value.statistics) == {"center_sum", "center_count"}
    frozen = cache.freeze()
    for quantizer in frozen.quantizers:
        expected_scale = QueryAwareCenterObserver.channel_scale_from(quantizer.key.statistics)
        assert quantizer.key.channel_scale is not None and torch.equal(quantizer.key.channel_scale, expected_scale)
        assert quantizer.value.channel_scale is None


def test_padding_a_batch_leaves_the_query_statistics_alone(llama: PreTrainedModel) -> None:
    ids = _tokens(1, 10, seed=8)
    plain = calibrate(llama, ids, quant_config=CONFIG, freeze=False, progress=False).new_cache()
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    batch = {"input_ids": padded_ids, "attention_mask": mask}
    padded = calibrate(llama, [batch], quant_config=CONFIG, freeze=False, progress=False).new_cache()
    for mine, theirs in zip(plain.quantizers, padded.quantizers, strict=True):
        for field in ("query_square_sum", "query_count", "key_square_sum", "center_count"):
            torch.testing.assert_close(mine.key.statistics[field], theirs.key.statistics[field], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- without queries
def test_freezing_without_queries_says_how_to_get_them(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama, CONFIG)
    ids = _tokens(1, 8, seed=2)
    with torch.no_grad():
        outputs = llama(ids, output_hidden_states=True, **{CACHE_KEYWORD: cache})
    with pytest.raises(CalibrationError, match=r"layer 0 .*calibration saw no queries.*quantcache.calibrate"):
        cache.freeze()
    observe_queries(cache, llama, outputs.hidden_states)  # a hand-written loop's way
    cache.freeze()
    assert all(q.key.channel_scale is not None for q in cache.quantizers)


def test_a_calibrating_state_saved_before_any_query_reloads_and_still_asks_for_them(
    llama: PreTrainedModel, tmp_path: Path
) -> None:
    cache = QuantizedCalibratingCache(llama, CONFIG)
    with torch.no_grad():
        llama(_tokens(1, 8, seed=2), **{CACHE_KEYWORD: cache})
    assert float(cache.state_dict()["layers.0.key.query_count"].max()) == 0.0
    path = cache.save(tmp_path / "calibrating.safetensors")
    reloaded = QuantizedCalibratingCache.from_file(path, llama)
    assert not reloaded.is_frozen
    with pytest.raises(CalibrationError, match="calibration saw no queries"):
        reloaded.freeze()


def test_observe_queries_refuses_what_it_cannot_use(llama: PreTrainedModel) -> None:
    cache = QuantizedCalibratingCache(llama, CONFIG)
    with pytest.raises(CalibrationError, match="run the model with output_hidden_states=True"):
        observe_queries(cache, llama, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer_idx must be a layer index"):
        cache.observe_queries(len(cache.quantizers), torch.zeros(1, 4, 2, HEAD_DIM))
    with pytest.raises(CalibrationError, match=r"queries of shape \(1, 3, 2, 16\) do not fit"):
        cache.observe_queries(0, torch.zeros(1, 3, 2, HEAD_DIM))
    with pytest.raises(CalibrationError, match="calibration queries contain NaN"):
        cache.observe_queries(0, torch.full((1, 4, 2, HEAD_DIM), float("nan")))
    with pytest.raises(CalibrationError, match="has no such modules"):
        layer_queries(llama, "model.layers.0.mlp", torch.zeros(1, 2, 64), HEAD_DIM)
    plain = QuantizedCalibratingCache(llama, KVQuantConfig(key=CENTRED, value=CENTRED))
    plain.observe_queries(0, torch.full((1, 4, 2, HEAD_DIM), float("nan")))  # not query-aware: ignored
    with pytest.raises(CalibrationError, match="only a query-aware key stream"):
        plain.quantizers[0].key.measure_queries(torch.zeros(1, 4, 2, HEAD_DIM))
    frozen = calibrate(llama, _tokens(1, 8, seed=2), quant_config=CONFIG, progress=False).new_cache()
    with pytest.raises(CalibrationError, match="the cache is frozen"):
        frozen.observe_queries(0, torch.zeros(1, 4, 2, HEAD_DIM))


# ---------------------------------------------------------------------------- what it buys
def test_query_aware_keys_cut_the_error_queries_see() -> None:
    """Keys whose variance lies where queries hardly look: weighing channels by query energy moves the error there,
    so the logit error ``q . (k - k')`` falls several times over, while the keys' own error rises."""
    from quantcache.cache.stream import StreamQuantizer

    generator = torch.Generator().manual_seed(0)
    spread = torch.ones(HEAD_DIM)
    spread[: HEAD_DIM // 4] = 6.0
    spread[HEAD_DIM // 2 : HEAD_DIM // 2 + HEAD_DIM // 4] = 6.0  # the loud channels and their RoPE partners
    keys = torch.randn(1, KV_HEADS, 64, HEAD_DIM, generator=generator) * spread
    weight = 1.0 / spread.square()
    queries = torch.randn(1, 2 * KV_HEADS, 64, HEAD_DIM, generator=generator) * weight.sqrt()
    errors = {}
    for args in (CENTRED, AWARE):
        stream = StreamQuantizer("layer 0 keys", args, (KV_HEADS, HEAD_DIM))
        stream.merge(stream.measure(keys))
        if args.query_aware:
            stream.merge(stream.measure_queries(queries))
        stream.freeze()
        error = stream.fake_quantize(keys) - keys
        errors[args.query_aware] = (float((error.square() * weight).sum()), float(error.square().sum()))
    assert errors[True][0] < errors[False][0] / 2
    assert errors[True][1] > errors[False][1]


# ---------------------------------------------------------------------------- state and storage
def test_state_round_trips_and_alterations_are_refused(llama: PreTrainedModel, tmp_path: Path) -> None:
    cache = calibrate(llama, _tokens(2, 8, seed=3), quant_config=CONFIG, progress=False).new_cache()
    state = cache.state_dict()
    assert {k.rsplit(".", 1)[1] for k in state if ".key." in k} == {
        *QueryAwareCenterObserver.fields,
        "center",
        "channel_scale",
    }
    path = tmp_path / "aware.safetensors"
    cache.save(path)
    loaded = QuantizedCalibratingCache.from_file(path, llama)
    for mine, theirs in zip(cache.quantizers, loaded.quantizers, strict=True):
        assert theirs.key.channel_scale is not None and torch.equal(mine.key.channel_scale, theirs.key.channel_scale)
    ids = _tokens(1, 9, seed=4)
    with torch.no_grad():
        expected = llama(ids, **{CACHE_KEYWORD: cache.empty_copy()}).logits
        assert torch.equal(llama(ids, **{CACHE_KEYWORD: loaded}).logits, expected)
    stored = read_state_file(path)
    assert validate_state(stored) == []
    bad = {**state, "layers.0.key.channel_scale": state["layers.0.key.channel_scale"] * 1.01}
    altered = type(stored)(**{**stored.__dict__, "tensors": bad})
    assert any("channel_scale differs from what its statistics imply" in p for p in validate_state(altered))
    fresh = QuantizedCalibratingCache(llama, CONFIG)
    with pytest.raises(QuantStateError, match="channel_scale differs"):
        fresh.load_state_dict(bad)
    for value, message in ((-1.0, "holds negative values"), (0.0, "holds zeros")):
        broken = {**state, "layers.1.key.channel_scale": torch.full_like(state["layers.1.key.channel_scale"], value)}
        with pytest.raises(QuantStateError, match=message):
            QuantizedCalibratingCache(llama, CONFIG).load_state_dict(broken)
    broken = {**state, "layers.0.key.query_count": -state["layers.0.key.query_count"]}
    with pytest.raises(QuantStateError, match="query_count holds negative values"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(broken)
    broken = {**state, "layers.0.key.query_count": torch.zeros_like(state["layers.0.key.query_count"])}
    with pytest.raises(QuantStateError, match="channel_scale differs"):  # frozen: its scale needs queries
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(broken)
    missing = {k: v for k, v in state.items() if k != "layers.0.key.channel_scale"}
    with pytest.raises(QuantStateError, match="channel_scale"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(missing)
    imported = {k: v for k, v in state.items() if k.endswith(("center", "channel_scale"))}
    with pytest.raises(QuantStateError, match="frozen parameters without the statistics they were calibrated from"):
        QuantizedCalibratingCache(llama, CONFIG).load_state_dict(imported)  # what a save would refuse
    QuantizedCalibratingCache(llama, CONFIG).load_state_dict(imported, origin="imported from test")  # another tool's


@pytest.mark.parametrize("rounding", ["nearest", "query_aware"])
@pytest.mark.parametrize("mode", GENERATION_MODES, ids=["greedy", "beam", "assisted"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_generates_exactly_what_fake_generates(
    arch: str, mode: dict[str, Any], rounding: str, request: Any
) -> None:
    """Query-aware keys, rounded to nearest or query-aware (:mod:`quantcache.ops.rounding`), in generation."""
    model = request.getfixturevalue(arch)
    config = KVQuantConfig(
        key=replace(AWARE, scale_format="log8", rounding=rounding),
        value=replace(CENTRED, scale_format="log8"),
        residual_window=3,
        sink_tokens=1,
        pre_rope_keys=True,
    )
    assert_packed_generates_like_fake(model, config, _tokens(2, 12, seed=9), _tokens(1, 6, seed=10), mode)


def test_bits_count_the_channel_scale() -> None:
    for seq_len in (16, 1024):
        extra = stream_bits(AWARE, KV_HEADS, HEAD_DIM, seq_len) - stream_bits(CENTRED, KV_HEADS, HEAD_DIM, seq_len)
        assert extra == pytest.approx(32 / seq_len)
