"""``suggest_bits`` / ``quantcache suggest-bits``: per-layer schemes chosen by measured sensitivity within a budget."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import CALIBRATE_SMALL, EVALUATE_SMALL, tokenizer, use_model  # noqa: F401 (fixtures)
from transformers import PreTrainedModel

from quantcache import ConfigError, KVQuantConfig, QuantizedCalibratingCache, cli
from quantcache.analysis.bit_allocation import DEFAULT_CANDIDATES, _choose, parse_candidate, suggest_bits
from quantcache.cli import suggest_bits as suggest_bits_command
from quantcache.state.file import read_state_file


def _windows(count: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(seed))


# ================================================================================ the choice
@settings(max_examples=200, deadline=None)
@given(
    layers=st.integers(1, 4),
    candidates=st.integers(1, 4),
    data=st.data(),
)
def test_the_choice_fits_the_allowance_and_beats_no_upgrade(layers: int, candidates: int, data: st.DataObject) -> None:
    """Any costs and losses: within the allowance, never more loss than every layer at its cheapest, and at
    most the loss of the best assignment plus the largest single loss: the walk along each layer's lower
    convex hull, steepest first, is the LP relaxation's greedy, which is off the optimum by at most the
    one increment it would take fractionally."""
    values = st.floats(0.0, 10.0, allow_nan=False)
    costs = [[data.draw(st.floats(1.0, 10.0)) for _ in range(candidates)] for _ in range(layers)]
    losses = [[data.draw(values) for _ in range(candidates)] for _ in range(layers)]
    cheapest = sum(min(row) for row in costs)
    allowance = cheapest + data.draw(st.floats(0.0, 20.0))
    choice = _choose(costs, losses, allowance)
    spent = sum(costs[i][c] for i, c in enumerate(choice))
    loss = sum(losses[i][c] for i, c in enumerate(choice))
    assert spent <= allowance * (1 + 1e-9)
    start = [
        min(range(candidates), key=lambda c, cost=cost, lost=lost: (cost[c], lost[c]))
        for cost, lost in zip(costs, losses, strict=True)
    ]
    assert loss <= sum(losses[i][c] for i, c in enumerate(start)) + 1e-9
    feasible = [
        sum(losses[i][c] for i, c in enumerate(pick))
        for pick in itertools.product(range(candidates), repeat=layers)
        if sum(costs[i][c] for i, c in enumerate(pick)) <= allowance * (1 + 1e-9)
    ]
    assert loss <= min(feasible) + max(max(row) for row in losses) + 1e-9


def test_the_sensitive_layer_gets_the_bits() -> None:
    """Two layers, a cheap and a dear scheme, room for one upgrade: it goes where it saves the most."""
    costs = [[4.0, 8.0], [4.0, 8.0]]
    losses = [[0.01, 0.001], [0.5, 0.002]]
    assert _choose(costs, losses, 12.0) == [0, 1]
    assert _choose(costs, losses, 16.0) == [1, 1]
    assert _choose(costs, losses, 8.0) == [0, 0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int5", r"unknown preset 'int5'"),
        ("int8/int4/int2", r"expected a preset name or KEYS/VALUES"),
        ("int8/", r"expected a preset name or KEYS/VALUES"),
        ("seed", r"preset 'seed' is static and needs calibration; suggest-bits mixes dynamic presets \(int8"),
    ],
)
def test_bad_schemes_are_errors_naming_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_candidate(spec)


def test_a_pair_takes_keys_from_the_first_preset_and_values_from_the_second() -> None:
    pair = parse_candidate("int8/int4")
    assert pair.key == KVQuantConfig.preset("int8").key_args
    assert pair.value == KVQuantConfig.preset("int4").value_args


def test_the_cli_default_schemes_are_the_librarys() -> None:
    parser = argparse.ArgumentParser()
    suggest_bits_command.add_parser(parser.add_subparsers())
    assert parser.parse_args(["suggest-bits", "--budget", "4"]).schemes == list(DEFAULT_CANDIDATES)


# ================================================================================ on a model
@pytest.fixture(scope="module")
def suggestion(llama: PreTrainedModel) -> Any:
    return suggest_bits(
        llama, _windows(2, 48, seed=0), budget=5.0, candidates=("int8", "int4", "int2"), prefill=16, chunk=16,
        progress=False,
    )


def test_the_mix_fits_the_budget_and_is_what_the_config_says(llama: PreTrainedModel, suggestion: Any) -> None:
    config: KVQuantConfig = suggestion.config
    assert suggestion.effective_bits <= 5.0
    cache = QuantizedCalibratingCache(llama, config)
    assert cache.effective_bits(48) == pytest.approx(suggestion.effective_bits)
    for layer in suggestion.layers:
        expected = parse_candidate(layer.scheme)
        assert (config.stream_args("key", layer.name), config.stream_args("value", layer.name)) == (
            expected.key,
            expected.value,
        )
        assert layer.kl_alone == suggestion.kl_by_scheme[layer.scheme][layer.index]
    assert KVQuantConfig.from_yaml(config.to_yaml()) == config
    assert (config.sink_tokens, config.rope_center) == (1, True)  # the presets' whole-cache settings
    assert suggestion.kl_predicted == pytest.approx(sum(layer.kl_alone for layer in suggestion.layers))
    # head_dim 16 at 48 tokens: a one-byte scale or zero point costs 0.5 bits, a float16 scale 1, the float32
    # center 32 / 48 bits, the keys' float32 channel scales 16 / 48 and (int4, int2) the keys' query model 32 / 48
    # over both streams, so int8 is 10, int4 6.17 and int2 4.67 bits, before the sink token (16 / 48 more)
    assert set(suggestion.kl_uniform) == {"int2"}
    assert json.loads(json.dumps(suggestion.to_dict()))["config"] == config.to_dict()


def test_a_budget_below_every_mix_is_refused(llama: PreTrainedModel) -> None:
    # int2 is 4.17 bits at 48 tokens (2-bit codes, a one-byte scale per 16-channel row and no zero point, the
    # center, the keys' channel scales and query model); the default base keeps the presets' sink token, 16 / 48
    # bits more.
    with pytest.raises(ConfigError, match=r"budget 3\.5 bits is below the cheapest mix of these schemes \(4\.500"):
        suggest_bits(llama, _windows(1, 48, seed=1), budget=3.5, candidates=("int4", "int2"), progress=False)


def test_excluded_layers_count_sixteen_bits(llama: PreTrainedModel) -> None:
    base = KVQuantConfig(exclude=("model.layers.0.self_attn",))
    unrounded = r"scheme 'int4' under the base config: .*set rope_center: true \(or pre_rope_keys: true\)"
    with pytest.raises(ConfigError, match=unrounded):
        suggest_bits(llama, _windows(1, 48, seed=2), budget=9, candidates=["int4"], base_config=base, progress=False)
    base = replace(base, pre_rope_keys=True)  # rounding needs keys centred before RoPE (stored there, here)
    result = suggest_bits(
        llama, _windows(1, 48, seed=2), budget=11.5, candidates=("int4", "int2"), base_config=base, prefill=16,
        chunk=16, progress=False,
    )
    assert [layer.name for layer in result.layers] == ["model.layers.1.self_attn"]
    # int4: 4-bit codes and a one-byte scale per 16-channel row (4.5 bits), its float32 center over 48 tokens, the
    # keys' float32 channel scales (16 / 48 over both streams) and query model (32 / 48).
    assert result.layers[0].scheme == "int4"
    assert result.effective_bits == pytest.approx((16 + 4.5 + 32 / 48 + 16 / 48 + 32 / 48) / 2)
    assert result.config.exclude == base.exclude


# ================================================================================ the command
def test_suggest_bits_writes_a_config_calibrate_reads(
    tmp_path: Path, use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    suggested, measured = tmp_path / "mixed.yaml", tmp_path / "mixed.json"
    arguments = ["--budget", "5", "--schemes", "int8", "int4", "int2", "-o", str(suggested), "--json", str(measured)]
    assert cli.main(["suggest-bits", *EVALUATE_SMALL, *arguments]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn" in printed and "effective bits (budget 5)" in printed
    config = KVQuantConfig.from_yaml(suggested)
    assert json.loads(measured.read_text())["config"] == config.to_dict()
    out = tmp_path / "run"
    assert cli.main(["calibrate", *CALIBRATE_SMALL, "--config", str(suggested), "-o", str(out)]) == 0
    assert read_state_file(out / "kv_scales.safetensors").config == config


def test_suggest_bits_refuses_a_bad_scheme_before_loading_the_model(
    use_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    calls = use_model()
    assert cli.main(["suggest-bits", "--budget", "4", "--schemes", "int4", "seed", "-q"]) == cli.EXIT_INPUT
    assert "preset 'seed' is static" in capsys.readouterr().err and not calls


def test_centred_candidates_learn_their_means_from_the_calibration_windows(
    llama: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each centred preset is calibrated before it is measured, on ``calibration`` when given, and so is the
    mix that is measured at the end."""
    import quantcache.analysis.bit_allocation as bit_allocation

    seen: list[torch.Tensor] = []
    real = bit_allocation.calibrate

    def recording(model: Any, data: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(data)
        return real(model, data, **kwargs)

    monkeypatch.setattr(bit_allocation, "calibrate", recording)
    calibration = _windows(1, 32, seed=9)
    suggest_bits(
        llama, _windows(1, 48, seed=3), budget=6.0, candidates=("int4", "int2"), prefill=16, chunk=16,
        progress=False, calibration=calibration,
    )
    assert len(seen) == 3 and all(data is calibration for data in seen)  # int4, int2, then the mix
