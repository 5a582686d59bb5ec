"""Shared fixtures: tiny, seeded, randomly initialised Transformers models (no downloads).

Every model has hidden size 64, grouped-query attention (4 query heads, 2 KV heads of
16 channels), a 128-token vocabulary and 2-4 layers, so a forward pass takes
milliseconds on a CPU. Models are built once per session and only ever used in eval
mode under ``torch.no_grad``; tests must not modify them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
SLIDING_WINDOW = 8
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama_config(**overrides: Any) -> LlamaConfig:
    return LlamaConfig(**{**_COMMON, "num_hidden_layers": 2, **overrides})


def qwen2_config(**overrides: Any) -> Qwen2Config:
    return Qwen2Config(**{**_COMMON, "num_hidden_layers": 3, "use_sliding_window": False, **overrides})


def qwen3_config(**overrides: Any) -> Qwen3Config:
    return Qwen3Config(**{**_COMMON, "num_hidden_layers": 2, "head_dim": HEAD_DIM, **overrides})


def gemma3_config(**overrides: Any) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **{
            **_COMMON,
            "num_hidden_layers": len(GEMMA3_LAYER_TYPES),
            "head_dim": HEAD_DIM,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": list(GEMMA3_LAYER_TYPES),
            **overrides,
        }
    )


_BUILDERS: dict[str, tuple[Callable[..., Any], type[PreTrainedModel]]] = {
    "llama": (llama_config, LlamaForCausalLM),
    "qwen2": (qwen2_config, Qwen2ForCausalLM),
    "qwen3": (qwen3_config, Qwen3ForCausalLM),
    "gemma3": (gemma3_config, Gemma3ForCausalLM),
}


def build_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random ``arch`` model in eval mode, float32, seeded."""
    make_config, model_class = _BUILDERS[arch]
    torch.manual_seed(seed)
    model = model_class(make_config(**overrides)).eval()
    # Random weights emit the EOS id at random; generation must run for as many steps as asked.
    model.generation_config.eos_token_id = None
    return model.to(torch.float32)


@pytest.fixture(scope="session")
def make_model() -> Callable[..., PreTrainedModel]:
    """Factory for models with non-default shapes (``make_model("llama", num_key_value_heads=4)``)."""
    return build_model


@pytest.fixture(scope="session")
def llama() -> PreTrainedModel:
    return build_model("llama")


@pytest.fixture(scope="session")
def qwen2() -> PreTrainedModel:
    return build_model("qwen2")


@pytest.fixture(scope="session")
def qwen3() -> PreTrainedModel:
    return build_model("qwen3")


@pytest.fixture(scope="session")
def gemma3() -> PreTrainedModel:
    return build_model("gemma3")


@pytest.fixture(params=sorted(_BUILDERS))
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """Each architecture in turn (session-cached through the named fixtures)."""
    model: PreTrainedModel = request.getfixturevalue(request.param)
    return model


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A seeded ``(1, 12)`` prompt of ordinary token ids (no special tokens)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (1, 12), generator=generator)


# ---------------------------------------------------------------------------- shared helpers
@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The models and tensors are tiny: extra intra-op threads only contend with each other and other jobs.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(llama: PreTrainedModel, gemma3: PreTrainedModel) -> dict[str, PreTrainedModel]:
    """The dense and the hybrid sliding-window tiny models, by architecture name."""
    return {"llama": llama, "gemma3": gemma3}


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded token ids ``(batch, length)`` that avoid the pad, BOS and EOS ids."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def frozen_cache_states(model: Any, config: Any) -> torch.Tensor:
    """Every layer's keys and values, concatenated, held by a ``QuantizedCalibratingCache`` of ``config`` that
    calibrated on 24 tokens, froze and then took 9 more (seeded tokens: the same for every config)."""
    from quantcache import QuantizedCalibratingCache
    from quantcache.cache.model_facts import CACHE_KEYWORD

    cache = QuantizedCalibratingCache(model, config)
    with torch.no_grad():
        model(random_tokens(1, 24, seed=5), **{CACHE_KEYWORD: cache})
    cache.freeze()
    with torch.no_grad():
        model(random_tokens(1, 9, seed=6), **{CACHE_KEYWORD: cache})
    return torch.cat([layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers])


def packed_row_bytes(args: Any) -> int:
    """The documented packed row of ``args`` (a ``QuantArgs``) at :data:`HEAD_DIM`: packed codes, then 1 flag byte
    (static) or, per group, a scale (2 bytes float16, 1 log8) and a zero point when asymmetric (2 bytes int16, 1
    int8)."""
    codes = HEAD_DIM * args.format.bits // 8
    if not args.dynamic:
        return codes + 1
    groups = 1 if args.scope.value == "per_token" else -(-HEAD_DIM // args.group_size)  # a last group may be short
    scale = 1 if args.scale_format.value == "log8" else 2
    zero_point = 2 if args.zero_point_format.value == "int16" else 1
    return codes + groups * (scale + (0 if args.symmetric else zero_point))


def count_calls(obj: Any, method: str) -> list[tuple[Any, ...]]:
    """Wrap ``obj.method`` on the instance and record every call's arguments."""
    calls: list[tuple[Any, ...]] = []
    original: Callable[..., Any] = getattr(obj, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    setattr(obj, method, wrapper)
    return calls


def generate_greedy(model: Any, cache: Any, prompt: torch.Tensor, **settings: Any) -> Any:
    """Six greedy tokens after ``prompt`` with ``cache``, logits kept (``settings``: beams, an assistant ...)."""
    from quantcache.cache.model_facts import CACHE_KEYWORD

    return model.generate(
        prompt,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        **{CACHE_KEYWORD: cache},
        **settings,
    )


GENERATION_MODES: list[dict[str, Any]] = [{}, {"num_beams": 2}, {"assistant_model": "self"}]
"""Greedy, beam search, and assisted decoding with the model as its own assistant (it crops the cache)."""


def assert_packed_generates_like_fake(
    model: Any, config: Any, calibration: torch.Tensor, prompt: torch.Tensor, mode: dict[str, Any]
) -> None:
    """Packed storage generates bit-exactly what fake storage does, under one of :data:`GENERATION_MODES`."""
    from quantcache import QuantizedCalibratingCache
    from quantcache.cache.model_facts import CACHE_KEYWORD
    from quantcache.calibration.calibrate import calibrate

    sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or ())
    if sliding and "assistant_model" in mode and CACHE_KEYWORD != "cache":
        pytest.skip("transformers 4.x cannot crop a sliding-window layer past its window (assisted decoding)")
    settings = {**mode, "assistant_model": model} if "assistant_model" in mode else mode
    fake = calibrate(model, calibration, quant_config=config, progress=False).new_cache()
    packed = QuantizedCalibratingCache(model, config, storage="packed")
    packed.load_state_dict(fake.state_dict())
    expected = generate_greedy(model, fake.empty_copy(), prompt, **settings)
    got = generate_greedy(model, packed, prompt, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


def forge_state_file(path: Any, stored: Any) -> Any:
    """Write ``stored`` (a ``StateFile``) with a valid checksum but past the validator, as a bug or a hand edit
    could: ``write_state_file`` refuses an invalid state, so only the reader's validator stands between such a
    file and a cache."""
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in stored.tensors.items()}
    save_file(tensors, str(path), metadata=replace(stored, tensors=tensors).metadata())
    return Path(path)
