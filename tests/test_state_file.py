"""The state file (format version 2) can be trusted: damage and inconsistency never load.

Earlier releases had states that loaded without a word although a byte was flipped or the
parameters contradicted the statistics. Two defences exist and each is tested on its
own: the sha256 checksum (any flipped bit of the file is refused, fuzzed here over the
whole file, header included) and the one validator, ``validate_state`` /
``stream_problems`` (each of its rules is tested with a forged file, its checksum valid,
so only the validator can refuse it; ``write_state_file`` refuses to write such a state
in the first place, and the same rules are exercised through ``load_state_dict`` for
in-memory dicts). Also: the file respects the umask, and version-1 files still load and
validate.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import forge_state_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from quantcache import KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.scheme.args import QuantArgs
from quantcache.state.file import StateFile, read_state_file, validate_state, write_state_file

DATA = Path(__file__).parent / "data"
V1_FILES = sorted(DATA.glob("v1_*.safetensors"))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALIDATOR_FUZZ = settings(max_examples=150, deadline=None)


# ================================================================================ fixtures
def _calibrated(model: PreTrainedModel, config: KVQuantConfig) -> QuantizedCalibratingCache:
    """A cache that has seen two short prompts (statistics only, still calibrating)."""
    cache = QuantizedCalibratingCache(model, config)
    for seed in (3, 4):
        ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            model(ids, **{CACHE_KEYWORD: cache})
        cache = cache.empty_copy()
    return cache


@pytest.fixture(scope="session")
def states(llama: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, StateFile]:
    """Good states as read back from disk: frozen symmetric / asymmetric and calibrate-mode symmetric."""
    folder = tmp_path_factory.mktemp("good_states")
    made: dict[str, StateFile] = {}
    for name, symmetric, freeze in (("sym", True, True), ("asym", False, True), ("calib", True, False)):
        cache = _calibrated(llama, KVQuantConfig(symmetric=symmetric))
        if freeze:
            cache.freeze()
        made[name] = read_state_file(cache.save(folder / f"{name}.safetensors"))
    return made


@pytest.fixture(scope="session")
def frozen_file(states: dict[str, StateFile], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """One small frozen asymmetric state file (zero points are not all 0) and its bytes, for the fuzz."""
    path = write_state_file(tmp_path_factory.mktemp("fuzz") / "kv_scales.safetensors", states["asym"])
    return path, path.read_bytes()


def _tensors(stored: StateFile) -> dict[str, torch.Tensor]:
    """A private, writable copy of a state's tensors."""
    return {name: tensor.clone() for name, tensor in stored.tensors.items()}


def _flip_bit(tensor: torch.Tensor, element: int, bit: int) -> None:
    """Flip one bit of one element in place (float32 or int32 tensors)."""
    tensor.view(torch.int32).view(-1)[element] ^= 1 << bit if bit < 31 else -(2**31)


# ================================================================================ 1. checksum: flipped bits never load
def _header_length(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


@FUZZ
@given(data=st.data())
def test_any_flipped_bit_anywhere_in_the_file_is_refused(
    frozen_file: tuple[Path, bytes], llama: PreTrainedModel, data: st.DataObject
) -> None:
    """Every region is drawn equally often (length prefix, JSON header, tensor bytes), so a reader
    that skipped the checksum, trusted the header or mis-parsed the length would be caught."""
    source, raw = frozen_file
    header_end = 8 + _header_length(raw)
    region = data.draw(st.sampled_from(["length", "header", "tensors"]), label="region")
    start, stop = {"length": (0, 8), "header": (8, header_end), "tensors": (header_end, len(raw))}[region]
    bit = data.draw(st.integers(start * 8, stop * 8 - 1), label="bit")
    mutated = bytearray(raw)
    mutated[bit // 8] ^= 1 << (bit % 8)
    target = source.with_name("mutated.safetensors")
    target.write_bytes(bytes(mutated))
    for load in (read_state_file, lambda path: QuantizedCalibratingCache.from_file(path, llama)):
        with pytest.raises(QuantStateError) as caught:
            load(target)
        message = str(caught.value)
        assert str(target) in message and len(message) < 1000  # says which file, and stays readable


def test_every_bit_of_the_length_prefix_is_refused(frozen_file: tuple[Path, bytes]) -> None:
    """The 8-byte header length is read before anything can be checked: each of its 64 flips must fail cleanly."""
    source, raw = frozen_file
    target = source.with_name("length.safetensors")
    for bit in range(64):
        mutated = bytearray(raw)
        mutated[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(bytes(mutated))
        with pytest.raises(QuantStateError):
            read_state_file(target)


def _edit_metadata_value(raw: bytes, key: str, old: str, new: str) -> bytes:
    """``raw`` with one metadata value's text changed in place (same length: offsets stay valid)."""
    assert len(old) == len(new)
    length = _header_length(raw)
    header = json.loads(raw[8 : 8 + length])
    value = header["__metadata__"][key]
    assert old in value
    header["__metadata__"][key] = value.replace(old, new, 1)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    return raw[:8] + text.ljust(length) + raw[8 + length :]


def test_a_changed_metadata_field_that_no_reader_parses_is_refused(frozen_file: tuple[Path, bytes]) -> None:
    """``encoding`` is read by other tools, not by us: only the checksum can notice that it was altered."""
    source, raw = frozen_file
    target = source.with_name("encoding.safetensors")
    target.write_bytes(_edit_metadata_value(raw, "encoding", "round half to even", "round half up!!!!!"))
    with pytest.raises(QuantStateError, match="checksum mismatch"):
        read_state_file(target)
    target.write_bytes(_edit_metadata_value(raw, "encoding", "round", "round"))  # the edit itself is harmless
    assert validate_state(read_state_file(target)) == []


def test_a_statistic_changed_by_one_ulp_in_a_calibrate_state_is_refused(
    states: dict[str, StateFile], tmp_path: Path
) -> None:
    """A calibrate-mode state has no parameters to cross-check: the checksum alone protects its statistics."""
    path = write_state_file(tmp_path / "calib.safetensors", states["calib"])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # lowest mantissa bit of the last element of the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(QuantStateError, match="checksum mismatch"):
        read_state_file(path)


# ================================================================================ 2. the validator, rule by rule
@dataclass(frozen=True)
class Rule:
    """A realistic inconsistency, the good state it is made from, and the problem text that names it."""

    name: str
    state: str
    mutate: Callable[[dict[str, torch.Tensor]], None]
    message: str
    mode: str | None = None  # a changed metadata mode instead of (or as well as) changed tensors


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value(tensors[key].clone())

    return mutate


def _exponent_flip(tensor: torch.Tensor) -> torch.Tensor:
    _flip_bit(tensor, 0, 23)  # lowest exponent bit: the scale doubles or halves, still finite and above eps
    return tensor


def _at(
    index: tuple[int, int], value: float, dtype: torch.dtype | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(dtype) if dtype is not None else tensor
        tensor[index] = value
        return tensor

    return change


def _swap_min_max(tensors: dict[str, torch.Tensor]) -> None:
    low, high = tensors["layers.0.value.min"].clone(), tensors["layers.0.value.max"].clone()
    low[1, 2], high[1, 2] = high[1, 2].item(), low[1, 2].item()
    tensors["layers.0.value.min"], tensors["layers.0.value.max"] = low, high


def _unchanged(tensors: dict[str, torch.Tensor]) -> None:
    del tensors  # the rule lives in the metadata mode


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]

    return mutate


def _add(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(2, 16)

    return mutate


RULES = [
    Rule(
        "flipped exponent bit in a scale",
        "sym",
        _set("layers.0.key.scale", _exponent_flip),
        "scale/zero_point differ from what its min/max imply",
    ),
    Rule(
        "float64 zero point of 1e12",
        "asym",
        _set("layers.1.key.zero_point", _at((0, 0), 1e12, torch.float64)),
        "layers.1.key.zero_point is torch.float64, expected torch.int32",
    ),
    Rule(
        "int64 zero point 2**32+7",
        "asym",
        _set("layers.0.value.zero_point", _at((1, 3), 2**32 + 7, torch.int64)),
        "layers.0.value.zero_point is torch.int64, expected torch.int32",
    ),
    Rule(
        "scale 1e-38",
        "sym",
        _set("layers.1.value.scale", _at((0, 5), 1e-38)),
        "layers.1.value.scale holds zero, negative or values below the float32-eps floor",
    ),
    Rule(
        "negative scale",
        "asym",
        _set("layers.1.value.scale", lambda t: -t),
        "layers.1.value.scale holds zero, negative or values below the float32-eps floor",
    ),
    Rule(
        "scale 1000x what the statistics imply",
        "asym",
        _set("layers.0.key.scale", lambda t: t * 1000),
        "layers.0.key: scale/zero_point differ from what its min/max imply",
    ),
    Rule(
        "zero point off by one",
        "asym",
        _set("layers.1.value.zero_point", lambda t: t + 1),
        "layers.1.value: scale/zero_point differ from what its min/max imply",
    ),
    Rule(
        "F32 relabelled I32",
        "sym",
        _set("layers.0.value.scale", lambda t: t.view(torch.int32)),
        "layers.0.value.scale is torch.int32, expected torch.float32",
    ),
    Rule(
        "symmetric state with a zero point",
        "sym",
        _set("layers.1.key.zero_point", _at((1, 0), 3)),
        "layers.1.key.zero_point is not 0 although the scheme is symmetric",
    ),
    Rule(
        "asymmetric zero point beyond any reach",
        "asym",
        _set("layers.0.key.zero_point", _at((0, 1), 2**30)),
        "layers.0.key.zero_point holds values outside what int8 can need",
    ),
    Rule("min > max in a calibrate-mode state", "calib", _swap_min_max, "layers.0.value: min > max in 1 element(s)"),
    Rule(
        "NaN statistic",
        "calib",
        _set("layers.1.key.max", _at((0, 0), float("nan"))),
        "layers.1.key.max contains NaN or Inf",
    ),
    Rule(
        "Inf scale",
        "sym",
        _set("layers.0.key.scale", _at((0, 0), float("inf"))),
        "layers.0.key.scale contains NaN or Inf",
    ),
    Rule(
        "tensors of another shape",
        "sym",
        _set("layers.1.key.min", lambda t: t[:, :8].contiguous()),
        "layers.1.key tensors have shapes",
    ),
    Rule(
        "mode 'frozen' without parameters",
        "calib",
        _unchanged,
        "missing ['layers.0.key.scale', 'layers.0.key.zero_point']",
        mode="frozen",
    ),
    Rule(
        "mode 'calibrate' with parameters",
        "asym",
        _unchanged,
        "layers.0.key: parameters present although mode is 'calibrate'",
        mode="calibrate",
    ),
    Rule(
        "a frozen stream lacking one parameter",
        "sym",
        _drop("layers.1.value.zero_point"),
        "missing ['layers.1.value.zero_point']",
    ),
    Rule("an unknown tensor", "sym", _add("layers.0.key.mean"), "layers.0.key.mean"),
    Rule(
        "a layer the model does not have",
        "sym",
        _add("layers.7.key.min"),
        "layers.7.key.min: layer 7 is beyond the model's 2 layers",
    ),
]


def _broken(rule: Rule, states: dict[str, StateFile]) -> StateFile:
    stored = states[rule.state]
    tensors = _tensors(stored)
    rule.mutate(tensors)
    return replace(stored, tensors=tensors, mode=rule.mode or stored.mode)


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_each_validator_rule_refuses_a_file_with_a_valid_checksum(
    rule: Rule, states: dict[str, StateFile], llama: PreTrainedModel, tmp_path: Path
) -> None:
    """Forged with a valid checksum, only the validator stands between the file and a silently wrong cache;
    the writer, the reader, the loaders and ``inspect`` (``validate_state``) must name the same problem."""
    broken = _broken(rule, states)
    assert any(rule.message in problem for problem in validate_state(broken)), validate_state(broken)
    with pytest.raises(QuantStateError, match=re.escape(rule.message)):
        write_state_file(tmp_path / "refused.safetensors", broken)  # the writer asks the same validator
    assert not (tmp_path / "refused.safetensors").exists()
    path = forge_state_file(tmp_path / "broken.safetensors", broken)
    with pytest.raises(QuantStateError, match=re.escape(rule.message)):
        read_state_file(path)
    with pytest.raises(QuantStateError, match=re.escape(rule.message)):
        QuantizedCalibratingCache.from_file(path, llama)
    cache = QuantizedCalibratingCache(llama, states[rule.state].config)
    with pytest.raises(QuantStateError, match=re.escape(rule.message)):
        cache.load(path)
    assert cache.state_dict() == {}  # a refused load changes nothing


def test_good_states_have_no_problem(states: dict[str, StateFile], tmp_path: Path) -> None:
    """The other half of every rule: nothing is reported for what quantcache itself wrote."""
    for name, stored in states.items():
        assert validate_state(stored) == []
        assert validate_state(read_state_file(write_state_file(tmp_path / f"{name}.safetensors", stored))) == []


IN_MEMORY = [rule for rule in RULES if rule.mode is None and "unknown" not in rule.name and "does not" not in rule.name]


@pytest.mark.parametrize("rule", IN_MEMORY, ids=[rule.name for rule in IN_MEMORY])
def test_each_validator_rule_refuses_an_in_memory_state_dict(
    rule: Rule, states: dict[str, StateFile], llama: PreTrainedModel
) -> None:
    """``load_state_dict`` takes tensors from anywhere (another process, an importer): the same rules apply,
    and a refused dict leaves a loaded cache exactly as it was."""
    good = states[rule.state]
    cache = QuantizedCalibratingCache(llama, good.config)
    cache.load_state_dict(good.tensors)
    before = cache.state_dict()
    with pytest.raises(QuantStateError, match=re.escape(rule.message)):
        cache.load_state_dict(_broken(rule, states).tensors)
    after = cache.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("extra", ["layers.0.key.mean", "layers.7.key.min", "layers.0.keys.min", "scales"])
def test_unknown_keys_in_memory_are_refused_by_name(
    states: dict[str, StateFile], llama: PreTrainedModel, extra: str
) -> None:
    """The in-memory counterpart of 'unexpected tensor' / 'layer beyond the model': refused, naming the key,
    and nothing loaded."""
    cache = QuantizedCalibratingCache(llama)
    with pytest.raises(QuantStateError, match=re.escape(extra)):
        cache.load_state_dict({**states["sym"].tensors, extra: torch.zeros(2, 16)})
    assert cache.state_dict() == {}


def test_keys_of_layers_the_cache_lacks_are_returned_when_not_strict(
    states: dict[str, StateFile], llama: PreTrainedModel
) -> None:
    cache = QuantizedCalibratingCache(llama)
    assert cache.load_state_dict({**states["sym"].tensors, "layers.7.key.min": torch.zeros(2, 16)}, strict=False) == [
        "layers.7.key.min"
    ]
    assert cache.is_frozen


PARAMETER_KEYS = [f"layers.{i}.{s}.{f}" for i in (0, 1) for s in ("key", "value") for f in ("scale", "zero_point")]


@VALIDATOR_FUZZ
@given(
    which=st.sampled_from(["sym", "asym"]),
    key=st.sampled_from(PARAMETER_KEYS),
    element=st.integers(0, 31),
    bit=st.integers(0, 31),
)
def test_any_flipped_bit_in_a_parameter_is_caught_by_the_validator_alone(
    states: dict[str, StateFile], which: str, key: str, element: int, bit: int
) -> None:
    """Parameters must equal what the statistics imply, exactly: a one-bit change of any scale or zero
    point of a frozen state with statistics (sign, exponent, mantissa) is a problem even with a valid checksum."""
    tensors = _tensors(states[which])
    _flip_bit(tensors[key], element, bit)
    assert validate_state(replace(states[which], tensors=tensors)) != []


def test_tensors_for_a_dynamic_stream_are_reported(states: dict[str, StateFile]) -> None:
    """A dynamic stream computes its parameters per token and saves none: anything stored for it is garbage
    that loads silently (and ``inspect`` calls valid)."""
    good = states["sym"]
    config = KVQuantConfig(key=QuantArgs(scope="per_token", dynamic=True))
    tensors = {name: tensor for name, tensor in good.tensors.items() if ".value." in name}
    tensors["layers.0.key.scale"] = torch.full((2, 16), float("nan"))
    tensors["layers.0.key.zero_point"] = torch.full((2, 16), 1e12, dtype=torch.float64)
    assert validate_state(replace(good, config=config, tensors=tensors)) != []


# ================================================================================ 3. the state as a whole
def _rewrite_metadata(source: Path, target: Path, **changes: str) -> Path:
    """``source`` copied to ``target`` with metadata values replaced and the old checksum kept (a hand edit)."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(target), metadata={**metadata, **changes})
    return target


def test_an_edited_origin_is_refused_by_the_checksum(
    frozen_file: tuple[Path, bytes], llama: PreTrainedModel, tmp_path: Path
) -> None:
    """``origin`` decides whether the parameters must be what the statistics imply: a state relabelled
    'imported' would let altered parameters through, so the checksum must cover it."""
    source, _ = frozen_file
    target = _rewrite_metadata(source, tmp_path / "relabelled.safetensors", origin=json.dumps("imported from ascend"))
    for load in (read_state_file, lambda path: QuantizedCalibratingCache.from_file(path, llama)):
        with pytest.raises(QuantStateError, match="checksum mismatch"):
            load(target)
    untouched = _rewrite_metadata(source, tmp_path / "same.safetensors", origin=json.dumps("calibrated"))
    assert read_state_file(untouched).origin == "calibrated"


@pytest.mark.parametrize("origin", ["imported", "imported from ", "calibrated by hand", ""])
def test_an_origin_this_reader_does_not_know_is_a_problem(states: dict[str, StateFile], origin: str) -> None:
    assert validate_state(replace(states["sym"], origin=origin)) == [
        f"origin {origin!r} is neither 'calibrated' nor 'imported from FORMAT'"
    ]


def _parameters_only(stored: StateFile) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in stored.tensors.items() if name.endswith((".scale", ".zero_point"))}


def test_a_calibrated_frozen_state_must_carry_its_statistics(
    states: dict[str, StateFile], llama: PreTrainedModel, tmp_path: Path
) -> None:
    """Without min/max nothing can show that a calibrated state's parameters are what calibration made (a
    scale 1000x too large would load), so such a state is refused everywhere, naming the ways out."""
    stripped = replace(states["asym"], tensors=_parameters_only(states["asym"]))
    problems = validate_state(stripped)
    assert len(problems) == 4  # two layers, two streams
    assert problems[0].startswith(
        "layers.0.key: frozen parameters without the statistics they were calibrated from (min, max)"
    )
    assert "recalibrate" in problems[0] and "origin='imported from TOOL'" in problems[0]
    with pytest.raises(QuantStateError, match="without the statistics they were calibrated from"):
        write_state_file(tmp_path / "refused.safetensors", stripped)
    assert not (tmp_path / "refused.safetensors").exists()
    forged = forge_state_file(tmp_path / "stripped.safetensors", stripped)
    for load in (read_state_file, lambda path: QuantizedCalibratingCache.from_file(path, llama)):
        with pytest.raises(QuantStateError, match="without the statistics they were calibrated from"):
            load(forged)


def test_an_imported_frozen_state_may_lack_statistics(
    states: dict[str, StateFile], llama: PreTrainedModel, tmp_path: Path
) -> None:
    """Another tool's checkpoint holds parameters only; what they came from is not ours to check."""
    imported = replace(states["asym"], tensors=_parameters_only(states["asym"]), origin="imported from ascend")
    assert validate_state(imported) == []
    path = write_state_file(tmp_path / "imported.safetensors", imported)
    assert read_state_file(path).origin == "imported from ascend"
    assert QuantizedCalibratingCache.from_file(path, llama).is_frozen


def _observe_layer_zero(llama: PreTrainedModel) -> QuantizedCalibratingCache:
    """A calibrating cache whose layer 0 saw states and layer 1 none (as when a caller drives ``update`` itself)."""
    cache = QuantizedCalibratingCache(llama)
    states = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    cache.update(states, states, 0)
    return cache


MISSING_LAYER = "quantized layers [1] (model.layers.1.self_attn ...) have no tensors"


def test_a_state_without_a_quantized_layer_is_refused_by_save_read_and_load(
    llama: PreTrainedModel, states: dict[str, StateFile], tmp_path: Path
) -> None:
    """Save, read, load and ``inspect`` (tests/test_cli.py) decide alike: a cache cannot load a state that
    leaves a quantized layer without statistics, so neither may it be written nor called valid."""
    cache = _observe_layer_zero(llama)
    with pytest.raises(QuantStateError, match=re.escape(MISSING_LAYER)) as refused:
        cache.save(tmp_path / "partial.safetensors")
    assert "run the calibration text through the whole model" in str(refused.value)
    assert not (tmp_path / "partial.safetensors").exists()
    for name in ("calib", "sym"):
        layer_zero = {key: t for key, t in states[name].tensors.items() if key.startswith("layers.0.")}
        (problem,) = validate_state(replace(states[name], tensors=layer_zero))
        assert problem.startswith(MISSING_LAYER)
        partial = replace(states[name], tensors=layer_zero)
        forged = forge_state_file(tmp_path / f"{name}.safetensors", partial)
        for load in (read_state_file, lambda path: QuantizedCalibratingCache.from_file(path, llama)):
            with pytest.raises(QuantStateError, match=re.escape(MISSING_LAYER)):
                load(forged)


def test_recorded_quantized_layers_decide_which_layers_a_state_must_cover(
    states: dict[str, StateFile], tmp_path: Path
) -> None:
    """A layer the config quantizes may still hold no KV of its own (it shares another's, or is a linear-attention
    layer): the writer records the layers it quantized, and the validator expects exactly those."""
    layer_zero = {key: t for key, t in states["sym"].tensors.items() if key.startswith("layers.0.")}
    recorded = replace(states["sym"], tensors=layer_zero, quantized_layers=[0])
    assert validate_state(recorded) == []
    back = read_state_file(write_state_file(tmp_path / "recorded.safetensors", recorded))
    assert back.quantized_layers == [0] and back.tensors.keys() == layer_zero.keys()
    unrecorded = replace(states["sym"], quantized_layers=None)  # as files written before the list was recorded
    assert read_state_file(write_state_file(tmp_path / "plain.safetensors", unrecorded)).quantized_layers is None
    (problem,) = validate_state(replace(unrecorded, tensors=layer_zero))  # then the config decides: layer 1 too
    assert problem.startswith(MISSING_LAYER)
    (problem,) = validate_state(replace(recorded, quantized_layers=[0, 1]))
    assert problem.startswith(MISSING_LAYER)
    excluded = replace(recorded, config=KVQuantConfig(exclude=("model.layers.1.self_attn",)))
    assert validate_state(excluded) == []
    assert validate_state(replace(excluded, quantized_layers=[0, 1])) == [
        "model.quantized_layers names layers [1] (model.layers.1.self_attn ...) that the stored config does not "
        "quantize"
    ]
    for bad in ([1, 0], [0, 0], [2], [-1], ["0"]):
        (problem,) = validate_state(replace(recorded, quantized_layers=bad))  # type: ignore[arg-type]
        assert problem.startswith("model.quantized_layers") and "ascending list of layer indices below 2" in problem


# ================================================================================ 5. permissions follow the umask
@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test and restore it afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_state_gets_the_permissions_the_umask_gives(
    states: dict[str, StateFile], llama: PreTrainedModel, tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    """Not mkstemp's 0600: a state shared with a serving engine's user must be as readable as its sidecars."""
    umask(mask)
    direct = write_state_file(tmp_path / "direct.safetensors", states["sym"])
    cache = QuantizedCalibratingCache(llama)
    cache.load_state_dict(states["sym"].tensors)
    saved = cache.save(tmp_path / "saved.safetensors")
    sidecar = tmp_path / "summary.json"
    sidecar.write_text("{}")
    for path in (direct, saved):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask == stat.S_IMODE(sidecar.stat().st_mode)
    replaced = write_state_file(direct, states["sym"])  # overwriting keeps to the rule too
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o666 & ~mask


# ================================================================================ 9. version 1 files
@pytest.mark.parametrize("path", V1_FILES, ids=[path.stem for path in V1_FILES])
def test_version_1_files_validate(path: Path, llama: PreTrainedModel) -> None:
    """What ``inspect`` does: read (migrating version 1) and validate with the one validator."""
    stored = read_state_file(path)
    assert stored.format_version == 1
    assert validate_state(stored) == []
    assert QuantizedCalibratingCache.from_file(path, llama).state_dict().keys() == stored.tensors.keys()


def test_a_damaged_version_1_file_is_still_refused_by_the_validator(tmp_path: Path) -> None:
    """Version 1 has no checksum; its frozen parameters are still cross-checked against the statistics."""
    source = DATA / "v1_llama_asymmetric_frozen.safetensors"
    raw = bytearray(source.read_bytes())
    length = _header_length(bytes(raw))
    start, _ = json.loads(raw[8 : 8 + length])["layers.1.key.scale"]["data_offsets"]
    raw[8 + length + start + 3] ^= 0x01  # an exponent bit (bit 24) of the first scale
    target = tmp_path / "v1.safetensors"
    target.write_bytes(bytes(raw))
    with pytest.raises(QuantStateError, match=re.escape("layers.1.key: scale/zero_point differ")):
        read_state_file(target)


def test_states_saved_to_a_directory_or_missing_file_name_the_path(tmp_path: Path) -> None:
    """The reader's own refusals say which path is at fault."""
    with pytest.raises(QuantStateError, match="is a directory"):
        read_state_file(tmp_path)
    with pytest.raises(QuantStateError, match="not found"):
        read_state_file(tmp_path / "absent.safetensors")
