"""Long-context retrieval with a quantized KV cache: find a passkey hidden in filler text.

Perplexity and KL average over every token; a cache can score well on them and still lose
the one fact a long prompt is about. This check hides a random five-digit passkey at
``--positions`` evenly spaced depths of a ~``--context``-token prompt of repetitive filler
(SmolLM2 handles up to 8192 tokens), asks for it at the end, decodes greedily, and counts a
trial correct when the first number in the answer is the passkey. Every contender runs the
same prompts: the unquantized ``DynamicCache`` (the reference: what the model can do at
all), quantcache's schemes (calibrated on WikiText-2 ``valid.txt`` or the built-in corpus)
and the peers of ``peers.py``. Besides accuracy it reports how often a contender's answer is
token for token the reference's.

The prompt is prefilled in one forward call (``--prefill-chunk N`` splits it, so that
quantization error also reaches the prompt's own processing through the cache), then each
answer token is one decode step, as ``generate`` does.

Examples::

    python benchmarks/needle.py --markdown                               # SmolLM2, 4000 tokens, 10 depths
    nice -n 10 python benchmarks/needle.py --context 1024 --positions 2 --peers quanto-int4
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peers import DEFAULT_PEERS, PEER_SPECS
from quality import DTYPES, Contender, command_line, peer_contenders, quantcache_contenders
from schemes import DEFAULT_WIKITEXT
from torch import nn
from transformers import DynamicCache

from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.models.loading import load_model

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about it afterwards.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer: Any, context: int, depth: float, key: int) -> torch.Tensor:
    """``(1, ~context)`` token ids: BOS, intro, filler with the needle at ``depth`` (0 to 1), question."""
    head = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _ids(tokenizer, INTRO)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    unit = _ids(tokenizer, FILLER)
    room = max(context - len(head) - len(needle) - len(question), 0)
    filler = (unit * (room // len(unit) + 1))[:room]
    # Insert at a boundary between filler repetitions, so the needle never splits a word.
    split = min(round(depth * len(filler) / len(unit)) * len(unit), len(filler))
    return torch.tensor([head + filler[:split] + needle + filler[split:] + question], dtype=torch.int64)


@torch.inference_mode()
def answer(
    model: nn.Module, cache: Any, prompt: torch.Tensor, max_new_tokens: int, prefill_chunk: int, eos: int | None
) -> list[int]:
    """Greedy continuation of ``prompt`` through ``cache``: prefill (in chunks if asked), then one token per step."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    length = int(prompt.shape[1])
    step = prefill_chunk if prefill_chunk > 0 else length
    logits = None
    for start in range(0, length, step):
        end = min(start + step, length)
        position_ids = torch.arange(start, end, device=device).unsqueeze(0)
        logits = model(
            prompt[:, start:end], position_ids=position_ids, use_cache=True, logits_to_keep=1,
            **{CACHE_KEYWORD: cache},
        ).logits
    assert logits is not None
    generated: list[int] = []
    token = logits[:, -1:].argmax(-1)
    for index in range(max_new_tokens):
        generated.append(int(token))
        if eos is not None and int(token) == eos:
            break
        position_ids = torch.tensor([[length + index]], device=device)
        logits = model(token, position_ids=position_ids, use_cache=True, **{CACHE_KEYWORD: cache}).logits
        token = logits[:, -1:].argmax(-1)
    return generated


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="quantcache model name, Hub id, directory or .gguf")
    parser.add_argument("--context", type=int, default=4000, help="prompt length in tokens (default 4000)")
    parser.add_argument("--positions", type=int, default=10, help="needle depths, evenly spaced (default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens decoded (default 8)")
    parser.add_argument("--prefill-chunk", type=int, default=0, help="prefill the prompt in chunks of this many "
                        "tokens (default 0: one forward call)")
    parser.add_argument("--calibration", nargs="+", choices=["wikitext2", "builtin"], default=["wikitext2"],
                        help="calibration text(s) for quantcache's schemes (default wikitext2)")
    parser.add_argument("--calib-samples", type=int, default=8, help="calibration windows (default 8)")
    parser.add_argument("--calib-len", type=int, default=512, help="calibration window length (default 512)")
    parser.add_argument("--schemes", nargs="+", default=None, help="quantcache scheme keys (default: all)")
    parser.add_argument("--peers", nargs="*", default=list(DEFAULT_PEERS), help="peer keys (default: "
                        f"{' '.join(DEFAULT_PEERS)}; known: {' '.join(spec.key for spec in PEER_SPECS)})")
    parser.add_argument("--seed", type=int, default=0, help="passkey and calibration-window seed (default 0)")
    parser.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT, help="WikiText-2 folder")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--bits-dtype", choices=list(DTYPES), default="bfloat16", help="dtype at which "
                        "full-precision tokens count in the effective bits (default bfloat16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"# {message}", file=sys.stderr, flush=True)

    log(command_line())
    dtype = DTYPES[args.dtype]
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype, progress=False)
    reference = Contender("dynamic", "DynamicCache (unquantized)", "reference",
                          lambda: DynamicCache(config=model.config), lambda length, d: float(d.itemsize * 8), "")
    contenders = [
        reference,
        *quantcache_contenders(
            model, tokenizer, calibration=args.calibration, samples=args.calib_samples, seq_len=args.calib_len,
            seed=args.seed, wikitext=args.wikitext, scheme_keys=args.schemes, log=log,
        ),
        *peer_contenders(model, args.peers, log),
    ]
    rng = random.Random(args.seed)
    trials = [((index + 0.5) / args.positions, rng.randrange(10000, 100000)) for index in range(args.positions)]
    eos = tokenizer.eos_token_id
    results: dict[str, dict[str, Any]] = {c.key: {"correct": 0, "same": 0, "seconds": 0.0, "error": None}
                                          for c in contenders}
    length = 0
    for depth, key in trials:
        prompt = build_prompt(tokenizer, args.context, depth, key)
        length = int(prompt.shape[1])
        reference_tokens: list[int] | None = None
        for contender in contenders:
            result = results[contender.key]
            if result["error"] is not None:
                continue
            began = time.perf_counter()
            try:
                tokens = answer(model, contender.new_cache(), prompt, args.max_new_tokens, args.prefill_chunk, eos)
            except Exception as error:  # report and go on with the other contenders
                result["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
                continue
            result["seconds"] += time.perf_counter() - began
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            found = re.search(r"\d+", text)
            correct = found is not None and found.group() == str(key)
            result["correct"] += int(correct)
            if contender is reference:
                reference_tokens = tokens
            result["same"] += int(tokens == reference_tokens)
            log(f"depth {depth:.2f} key {key} {contender.name}: {text!r} {'ok' if correct else 'WRONG'}")

    bits_dtype = DTYPES[args.bits_dtype]
    header = ("contender", f"eff. bits ({args.bits_dtype} KV)", "passkey accuracy", "same answer as reference",
              "s / trial")
    print(f"Made by `{command_line()}`")
    print(f"needle depths: {args.positions}, prompts of {length} tokens, greedy, {args.max_new_tokens} answer tokens, "
          f"model dtype {args.dtype}, torch {torch.__version__}\n")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for contender in contenders:
        result = results[contender.key]
        bits = contender.bits(length, bits_dtype)
        if result["error"]:
            cells = (contender.name, f"{bits:.2f}", "failed", result["error"][:80], "")
        else:
            n = args.positions
            cells = (contender.name, f"{bits:.2f}", f"{result['correct']}/{n} ({100 * result['correct'] / n:.0f} %)",
                     f"{result['same']}/{n}", f"{result['seconds'] / n:.1f}")
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
