"""Does the quantized cache change what the model answers? Greedy answers to chat prompts, compared.

Perplexity and KL measure the next-token distribution; a user sees answers. :func:`generation_check`
asks the model a small built-in set of chat prompts (:data:`CHAT_PROMPTS`: a factual question, a
short code task, arithmetic, a question on a CSV table, a question in French, a summary of a short
passage, a multi-turn chat and an instruction that asks for a list), rendered through the
tokenizer's chat template, and decodes ``new_tokens`` tokens greedily twice: once with a plain
``DynamicCache`` and once with a new cache of the quantizer, exactly as ``model.generate(...,
past_key_values=cache)`` is used in serving. It reports how many answers are token for token the
same, and where the others first differ.

Positions count generated tokens from 1: a first difference at 1 means the very first token of the
answer differs. An answer that stops early (end of sequence) differs from a longer one at the first
position one of them has and the other does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from quantcache.analysis.evaluation import as_cache
from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cache.model_facts import CACHE_KEYWORD, max_positions
from quantcache.calibration.calibrate import model_device
from quantcache.errors import CalibrationError, DataError
from quantcache.progress import progress_bar

__all__ = [
    "CHAT_PROMPTS",
    "DEFAULT_NEW_TOKENS",
    "ChatPrompt",
    "GenerationCheck",
    "PromptOutcome",
    "first_difference",
    "generation_check",
    "prompt_ids",
]

DEFAULT_NEW_TOKENS = 48

Role = str
CacheSource = KVQuantizer | QuantizedCalibratingCache | Callable[[], Any]


@dataclass(frozen=True)
class ChatPrompt:
    """One conversation to answer: its kind (what it exercises) and its ``(role, content)`` turns, the last a user's."""

    kind: str
    turns: tuple[tuple[Role, str], ...]

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat-template messages (``[{"role": ..., "content": ...}]``)."""
        return [{"role": role, "content": content} for role, content in self.turns]

    def plain_text(self) -> str:
        """The turns as plain text (``User: ...`` lines, then ``Assistant:``), for a tokenizer without a template."""
        lines = [f"{role.capitalize()}: {content}" for role, content in self.turns]
        return "\n".join([*lines, "Assistant:"])


_PASSAGE = (
    "The town library in Ostervik opened a repair corner last spring. On the first Saturday of each month, "
    "volunteers with soldering irons, sewing machines and bicycle tools fix what residents bring in, free of "
    "charge, while the owners watch and learn. In its first year the corner mended 412 items, from toasters to "
    "winter coats, and the library says that visits on those Saturdays tripled. Next year it wants to add a "
    "shelf of spare parts and a monthly class on simple electronics."
)

CHAT_PROMPTS: tuple[ChatPrompt, ...] = (
    ChatPrompt("factual", (("user", "Why is the sky blue during the day but red at sunset?"),)),
    ChatPrompt(
        "code",
        (
            (
                "user",
                "Write a Python function that returns the second largest distinct number in a list, "
                "or None when there is none.",
            ),
        ),
    ),
    ChatPrompt(
        "arithmetic",
        (
            (
                "user",
                "A train leaves at 9:40 and the trip takes 2 hours and 35 minutes. "
                "When does it arrive? Show the steps.",
            ),
        ),
    ),
    ChatPrompt(
        "table",
        (
            (
                "user",
                "Here is a CSV file:\n\ncity,population,area_km2\nLyon,522000,47.9\nGraz,291000,127.6\n"
                "Turku,201000,245.7\n\nWhich city has the highest population density, and what is it?",
            ),
        ),
    ),
    ChatPrompt("non-english", (("user", "Quelle est la différence entre un lac et un étang ? Réponds en français."),)),
    ChatPrompt("summary", (("user", f"Summarise this passage in two sentences:\n\n{_PASSAGE}"),)),
    ChatPrompt(
        "multi-turn",
        (
            ("user", "I want to grow vegetables on a small balcony."),
            ("assistant", "That is a good idea! How many hours of direct sun does the balcony get each day?"),
            ("user", "About five hours in the afternoon. Which vegetables should I start with?"),
        ),
    ),
    ChatPrompt(
        "list",
        (("user", "List five tips for writing clear error messages in software, one short line each."),),
    ),
)
"""The built-in prompts of :func:`generation_check`, one per kind."""


# ---------------------------------------------------------------------------- results
@dataclass
class PromptOutcome:
    """The two answers to one prompt: greedy token ids after the prompt, and where they first differ."""

    kind: str
    reference: list[int]
    quantized: list[int]
    reference_text: str = ""
    quantized_text: str = ""

    @property
    def same(self) -> bool:
        return self.reference == self.quantized

    @property
    def first_difference(self) -> int | None:
        """1-based position of the first generated token that differs; ``None`` when the answers are the same."""
        return first_difference(self.reference, self.quantized)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "same": self.same, "first_difference": self.first_difference}


@dataclass
class GenerationCheck:
    """What :func:`generation_check` found; ``to_dict`` gives strict JSON data.

    ``mean_first_difference`` averages the first differing position over the answers that
    differ; it is ``None`` when every answer is the same (there is no difference to place).
    """

    new_tokens: int
    prompts: list[PromptOutcome]
    chat_template: bool
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.prompts)

    @property
    def same(self) -> int:
        """How many answers are token for token those of the unquantized cache."""
        return sum(outcome.same for outcome in self.prompts)

    @property
    def same_share(self) -> float:
        return self.same / self.total if self.total else 1.0

    @property
    def mean_first_difference(self) -> float | None:
        return _mean_first_difference(self.prompts)

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """Per prompt kind: ``prompts``, ``same``, ``same_share``, ``mean_first_difference`` (kinds in prompt order)."""
        kinds: dict[str, list[PromptOutcome]] = {}
        for outcome in self.prompts:
            kinds.setdefault(outcome.kind, []).append(outcome)
        return {
            kind: {
                "prompts": len(outcomes),
                "same": sum(outcome.same for outcome in outcomes),
                "same_share": sum(outcome.same for outcome in outcomes) / len(outcomes),
                "mean_first_difference": _mean_first_difference(outcomes),
            }
            for kind, outcomes in kinds.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "chat_template": self.chat_template,
            "prompts_total": self.total,
            "same": self.same,
            "same_share": self.same_share,
            "mean_first_difference": self.mean_first_difference,
            "by_kind": self.by_kind(),
            "prompts": [outcome.to_dict() for outcome in self.prompts],
            "notes": list(self.notes),
        }


def _mean_first_difference(outcomes: Sequence[PromptOutcome]) -> float | None:
    positions = [outcome.first_difference for outcome in outcomes if outcome.first_difference is not None]
    return sum(positions) / len(positions) if positions else None


def first_difference(reference: Sequence[int], quantized: Sequence[int]) -> int | None:
    """1-based position of the first token where two answers differ (one ending first counts), or ``None``."""
    for position, (a, b) in enumerate(zip(reference, quantized, strict=False), start=1):
        if a != b:
            return position
    if len(reference) != len(quantized):
        return min(len(reference), len(quantized)) + 1
    return None


# ---------------------------------------------------------------------------- running it
def prompt_ids(tokenizer: Any, prompt: ChatPrompt, *, chat_template: bool | None = None) -> torch.Tensor:
    """The ``(1, n)`` token ids of ``prompt`` as the model reads it before answering.

    Through the tokenizer's chat template with the generation prompt added when it has one
    (``chat_template=None``: when it has one), otherwise :meth:`ChatPrompt.plain_text` with the
    tokenizer's usual special tokens.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_template:
        text = tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        encoded = tokenizer(prompt.plain_text(), return_tensors="pt")
    ids: torch.Tensor = encoded["input_ids"]
    return ids.to(torch.int64)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _cache_factory(source: CacheSource) -> Callable[[], Any]:
    """A function that makes a new, empty cache for one answer."""
    if isinstance(source, (KVQuantizer, QuantizedCalibratingCache)):
        cache = as_cache(source)
        if not cache.is_frozen:
            raise CalibrationError(
                "the generation check needs a frozen quantizer (a calibrating cache would calibrate, not "
                "quantize): calibrate it and freeze() it, or load a saved, frozen state"
            )
        return cache.empty_copy
    if callable(source):
        return source
    raise TypeError(
        f"expected a KVQuantizer, a QuantizedCalibratingCache or a cache factory, got {type(source).__name__}"
    )


def _pad_token_id(model: nn.Module, tokenizer: Any) -> int | None:
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return None


def _greedy(model: nn.Module, ids: torch.Tensor, cache: Any, new_tokens: int, pad_token_id: int | None) -> list[int]:
    settings: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False, "num_beams": 1}
    if pad_token_id is not None:
        settings["pad_token_id"] = pad_token_id
    output = model.generate(  # type: ignore[operator]
        ids, attention_mask=torch.ones_like(ids), use_cache=True, **{CACHE_KEYWORD: cache}, **settings
    )
    answer: list[int] = output[0, ids.shape[1] :].tolist()
    return answer


def generation_check(
    model: nn.Module,
    tokenizer: Any,
    cache: CacheSource,
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    prompts: Sequence[ChatPrompt] = CHAT_PROMPTS,
    reference: Callable[[], Any] | None = None,
    progress: bool = True,
) -> GenerationCheck:
    """Answer ``prompts`` greedily with an unquantized and a quantized cache and compare the answers.

    Args:
        model: a Transformers causal LM (run in inference mode on its own device).
        tokenizer: its tokenizer; its chat template renders the prompts (without one, plain
            ``User:``/``Assistant:`` text is used and ``notes`` says so).
        cache: a frozen :class:`KVQuantizer`, or a cache of one (its storage is used; each
            answer gets an empty copy), or a function returning a new cache per answer.
        new_tokens: tokens decoded per answer (fewer when the model ends its answer).
        prompts: the conversations (default :data:`CHAT_PROMPTS`).
        reference: a function returning the unquantized cache per answer (default: a
            ``DynamicCache`` for the model's config).
        progress: show a progress bar on stderr.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one ChatPrompt")
    make_quantized = _cache_factory(cache)
    config = getattr(model, "config", None)
    make_reference = reference if reference is not None else (lambda: DynamicCache(config=config))
    template = has_chat_template(tokenizer)
    notes = [] if template else ["the tokenizer has no chat template: the prompts were plain User:/Assistant: text"]
    device = model_device(model)
    pad_token_id = _pad_token_id(model, tokenizer)
    limit = max_positions(model)
    outcomes: list[PromptOutcome] = []
    was_training = model.training
    model.eval()
    bar = progress_bar(len(prompts), "generation check", progress, unit="prompt", unit_scale=False)
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = prompt_ids(tokenizer, prompt, chat_template=template).to(device)
                if limit is not None and ids.shape[1] + new_tokens > limit:
                    notes.append(
                        f"the {prompt.kind} prompt was skipped: its {ids.shape[1]} tokens and {new_tokens} new ones "
                        f"exceed the model's {limit} positions"
                    )
                    bar.update(1)
                    continue
                expected = _greedy(model, ids, make_reference(), new_tokens, pad_token_id)
                answered = _greedy(model, ids, make_quantized(), new_tokens, pad_token_id)
                outcomes.append(
                    PromptOutcome(
                        kind=prompt.kind,
                        reference=expected,
                        quantized=answered,
                        reference_text=tokenizer.decode(expected, skip_special_tokens=True),
                        quantized_text=tokenizer.decode(answered, skip_special_tokens=True),
                    )
                )
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if not outcomes:
        raise DataError(
            f"every prompt with {new_tokens} new tokens is longer than the model's {limit} positions; "
            "decode fewer tokens (--generate N) or skip the check (--generate 0)"
        )
    return GenerationCheck(new_tokens=new_tokens, prompts=outcomes, chat_template=template, notes=notes)
