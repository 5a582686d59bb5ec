"""Same answer? Greedy answers to the built-in chat prompts with each preset's cache against an unquantized one.

Perplexity and KL average over tokens a model was given; a user sees the tokens the model writes.
For each preset this calibrates exactly as ``quantcache calibrate --preset NAME`` does by default
(8 windows of 512 tokens of the built-in corpus's calibration split, seed 0), then runs
:func:`quantcache.analysis.generation_check.generation_check`: the 8 chat prompts of several kinds
(:data:`~quantcache.analysis.generation_check.CHAT_PROMPTS`) through the model's chat template,
``--new-tokens`` greedy tokens each, with a ``DynamicCache`` and with a new cache of the preset.
Prints, per preset, how many answers are token for token the reference's and the mean position of
the first differing token (over the answers that differ).

Run::

    python benchmarks/answers.py                                  # SmolLM2, every preset, 32 tokens
    python benchmarks/answers.py --presets seed c8 int4 --new-tokens 48 --json answers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from quantcache import KVQuantConfig, calibrate, load_model
from quantcache.analysis.generation_check import generation_check
from quantcache.models.data import TextSource, token_windows
from quantcache.scheme.presets import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="quantcache model name, Hub id, directory or .gguf")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--new-tokens", type=int, default=32, help="answer tokens per prompt (default 32, as evaluate)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    documents = TextSource("builtin", split="calibration").load()
    windows = token_windows(tokenizer, documents, num_samples=8, seq_len=512, seed=0)
    results: dict[str, Any] = {}
    print(f"| preset | same answer ({args.new_tokens} tokens) | first difference at token (mean) |")
    print("|---|---|---|")
    for name in args.presets:
        started = time.perf_counter()
        quantizer = calibrate(model, windows, quant_config=KVQuantConfig.preset(name), progress=False)
        check = generation_check(model, tokenizer, quantizer, new_tokens=args.new_tokens, progress=False)
        results[name] = {**check.to_dict(), "seconds": time.perf_counter() - started}
        first = check.mean_first_difference
        shown = "—" if first is None else f"{first:.1f}"
        print(f"| `{name}` | {check.same}/{check.total} | {shown} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
