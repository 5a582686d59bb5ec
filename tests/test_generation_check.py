"""The generation check: greedy answers to chat prompts with and without a quantized cache, compared."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from conftest import random_tokens
from test_cli import char_tokenizer
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerFast

from quantcache import KVQuantConfig, KVQuantizer, calibrate
from quantcache.analysis.generation_check import (
    CHAT_PROMPTS,
    ChatPrompt,
    GenerationCheck,
    PromptOutcome,
    first_difference,
    generation_check,
    prompt_ids,
)
from quantcache.analysis.report import generation_line
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.errors import CalibrationError, DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Short prompts of several kinds (the tiny models take 256 positions; the character tokenizer spends one per letter).
PROMPTS = (
    ChatPrompt("factual", (("user", "Why is the sky blue?"),)),
    ChatPrompt("arithmetic", (("user", "What is 17 + 25?"),)),
    ChatPrompt("code", (("user", "def add(a, b):"),)),
    ChatPrompt("multi-turn", (("user", "Hi!"), ("assistant", "Hello."), ("user", "Name a colour."))),
    ChatPrompt("list", (("user", "List three fruits."),)),
    ChatPrompt("list", (("user", "List two rivers."),)),
)
NEW_TOKENS = 8
TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="module")
def int2(llama: PreTrainedModel) -> KVQuantizer:
    """A 2-bit quantizer of the tiny Llama: its answers drift from the unquantized ones."""
    return calibrate(llama, random_tokens(2, 48, seed=21), quant_config=KVQuantConfig.preset("int2"), progress=False)


def greedy_by_hand(model: PreTrainedModel, ids: torch.Tensor, cache: Any, new_tokens: int) -> list[int]:
    """Greedy decoding written out: the argmax of the last position, fed back one token at a time."""
    answer: list[int] = []
    with torch.inference_mode():
        logits = model(ids, use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache}).logits
        for _ in range(new_tokens):
            answer.append(int(logits[0, -1].argmax()))
            step = torch.tensor([[answer[-1]]])
            logits = model(step, use_cache=True, logits_to_keep=1, **{CACHE_KEYWORD: cache}).logits
    return answer


# ---------------------------------------------------------------------------- positions and summaries
@pytest.mark.parametrize(
    ("reference", "quantized", "expected"),
    [
        ([5, 6, 7], [5, 6, 7], None),
        ([5, 6, 7], [9, 6, 7], 1),
        ([5, 6, 7], [5, 6, 8], 3),
        ([5, 6], [5, 6, 7], 3),  # the reference ended (end of sequence) where the other went on
        ([5, 6, 7, 8], [5, 6], 3),
        ([], [], None),
    ],
)
def test_first_difference_counts_generated_tokens_from_one(
    reference: list[int], quantized: list[int], expected: int | None
) -> None:
    assert first_difference(reference, quantized) == expected
    assert PromptOutcome("k", reference, quantized).first_difference == expected
    assert PromptOutcome("k", reference, quantized).same is (expected is None)


def test_the_mean_first_difference_is_over_the_answers_that_differ() -> None:
    check = GenerationCheck(
        new_tokens=4,
        prompts=[
            PromptOutcome("list", [1, 2, 3, 4], [1, 2, 3, 4]),
            PromptOutcome("list", [1, 2, 3, 4], [1, 2, 9, 9]),
            PromptOutcome("code", [1, 2, 3, 4], [1, 2, 3, 4]),
            PromptOutcome("math", [1, 2, 3, 4], [7, 2, 3, 4]),
        ],
        chat_template=True,
    )
    assert (check.same, check.total, check.same_share) == (2, 4, 0.5)
    assert check.mean_first_difference == 2.0  # (3 + 1) / 2: the identical answers have no position
    assert check.by_kind() == {
        "list": {"prompts": 2, "same": 1, "same_share": 0.5, "mean_first_difference": 3.0},
        "code": {"prompts": 1, "same": 1, "same_share": 1.0, "mean_first_difference": None},
        "math": {"prompts": 1, "same": 0, "same_share": 0.0, "mean_first_difference": 1.0},
    }
    data = json.loads(json.dumps(check.to_dict(), allow_nan=False))
    assert (data["same"], data["prompts_total"], data["mean_first_difference"]) == (2, 4, 2.0)
    assert [item["first_difference"] for item in data["prompts"]] == [None, 3, None, 1]
    assert generation_line(check) == (
        "same answer: 2/4, first difference at token 2.0 on average (greedy, up to 4 new tokens per chat prompt)"
    )
    identical = GenerationCheck(new_tokens=4, prompts=[check.prompts[0]], chat_template=True)
    assert identical.mean_first_difference is None
    assert generation_line(identical) == "same answer: 1/1 (greedy, up to 4 new tokens per chat prompt)"


# ---------------------------------------------------------------------------- running it
def test_a_cache_that_does_not_quantize_gives_the_same_answers(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    check = generation_check(
        llama,
        tokenizer,
        lambda: DynamicCache(config=llama.config),
        new_tokens=NEW_TOKENS,
        prompts=PROMPTS,
        progress=False,
    )
    assert (check.same, check.total, check.same_share, check.mean_first_difference) == (6, 6, 1.0, None)
    assert [outcome.kind for outcome in check.prompts] == [prompt.kind for prompt in PROMPTS]
    assert all(len(outcome.reference) == NEW_TOKENS for outcome in check.prompts)  # the tiny models never stop
    assert check.by_kind()["list"] == {"prompts": 2, "same": 2, "same_share": 1.0, "mean_first_difference": None}


def test_a_quantized_cache_gives_the_first_differences_computed_by_hand(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, int2: KVQuantizer
) -> None:
    check = generation_check(llama, tokenizer, int2, new_tokens=NEW_TOKENS, prompts=PROMPTS, progress=False)
    expected_positions = []
    for prompt, outcome in zip(PROMPTS, check.prompts, strict=True):
        ids = prompt_ids(tokenizer, prompt)
        reference = greedy_by_hand(llama, ids, DynamicCache(config=llama.config), NEW_TOKENS)
        quantized = greedy_by_hand(llama, ids, int2.new_cache(), NEW_TOKENS)
        assert (outcome.reference, outcome.quantized) == (reference, quantized), prompt.kind
        position = next(
            (index + 1 for index, (a, b) in enumerate(zip(reference, quantized, strict=True)) if a != b), None
        )
        assert outcome.first_difference == position
        expected_positions.append(position)
    differing = [position for position in expected_positions if position is not None]
    assert differing, "int2 on the tiny model must change some answer, or this test checks nothing"
    assert check.same == len(PROMPTS) - len(differing)
    assert check.mean_first_difference == pytest.approx(sum(differing) / len(differing), abs=1e-12)
    again = generation_check(llama, tokenizer, int2.new_cache(), new_tokens=NEW_TOKENS, prompts=PROMPTS, progress=False)
    assert [outcome.quantized for outcome in again.prompts] == [outcome.quantized for outcome in check.prompts]


def test_without_a_chat_template_the_prompt_is_plain_text(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    multi_turn = PROMPTS[3]
    expected = tokenizer("User: Hi!\nAssistant: Hello.\nUser: Name a colour.\nAssistant:")["input_ids"]
    assert prompt_ids(tokenizer, multi_turn)[0].tolist() == expected
    check = generation_check(
        llama, tokenizer, lambda: DynamicCache(), new_tokens=2, prompts=PROMPTS[:1], progress=False
    )
    assert check.chat_template is False
    assert check.notes == ["the tokenizer has no chat template: the prompts were plain User:/Assistant: text"]


def test_with_a_chat_template_the_prompt_is_rendered_through_it(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = TEMPLATE
    text = "<user>Hi!\n<assistant>Hello.\n<user>Name a colour.\n<assistant>"
    assert prompt_ids(templated, PROMPTS[3])[0].tolist() == templated(text, add_special_tokens=False)["input_ids"]
    check = generation_check(
        llama, templated, lambda: DynamicCache(), new_tokens=2, prompts=PROMPTS[3:4], progress=False
    )
    assert check.chat_template is True and check.notes == []


def test_a_prompt_too_long_for_the_model_is_skipped_with_a_note(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    long = ChatPrompt("summary", (("user", "x" * 230),))  # 230 letters + 17 of framing + 10 new > 256 positions
    check = generation_check(
        llama, tokenizer, lambda: DynamicCache(), new_tokens=10, prompts=[long, PROMPTS[0]], progress=False
    )
    assert [outcome.kind for outcome in check.prompts] == ["factual"]
    assert check.notes[-1] == (
        "the summary prompt was skipped: its 247 tokens and 10 new ones exceed the model's 256 positions"
    )
    with pytest.raises(DataError, match="--generate"):
        generation_check(llama, tokenizer, lambda: DynamicCache(), new_tokens=10, prompts=[long], progress=False)


def test_a_quantizer_still_calibrating_is_refused(llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(CalibrationError, match="frozen"):
        generation_check(llama, tokenizer, KVQuantizer(llama), prompts=PROMPTS[:1], progress=False)
    with pytest.raises(ValueError, match="new_tokens"):
        generation_check(llama, tokenizer, lambda: DynamicCache(), new_tokens=0, progress=False)


def test_the_built_in_prompts_cover_the_kinds_users_ask() -> None:
    kinds = [prompt.kind for prompt in CHAT_PROMPTS]
    assert kinds == ["factual", "code", "arithmetic", "table", "non-english", "summary", "multi-turn", "list"]
    assert all(prompt.turns[-1][0] == "user" for prompt in CHAT_PROMPTS)
    multi_turn = CHAT_PROMPTS[kinds.index("multi-turn")]
    assert [role for role, _ in multi_turn.turns] == ["user", "assistant", "user"]
    assert "city,population" in CHAT_PROMPTS[kinds.index("table")].turns[0][1]
