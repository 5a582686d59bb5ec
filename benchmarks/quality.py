"""Quality of INT8 KV-cache quantization on real models and real English text.

Protocol (the one README's quality table reports): the model in float32, calibrated on
8 windows of 512 tokens from WikiText-2 ``valid.txt``, evaluated on 6 windows of 1024
tokens from ``test.txt`` the way a cache is used in generation (a prefill of 256 tokens,
then decoding in chunks of 32), quantized cache against the unquantized one. Run::

    python benchmarks/quality.py                         # SmolLM2-135M and Gemma 3 270M
    python benchmarks/quality.py --models smollm2-135m --markdown

WikiText-2 is read from ``../shared/data/wikitext-2`` beside the project root (or
``--wikitext DIR``); never calibrate on test text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from quantcache import KVQuantConfig
from quantcache.calibration import calibrate
from quantcache.data import TextSource, token_windows
from quantcache.evaluation import EvaluationResult, evaluate
from quantcache.models import load_model

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def run(
    model_name: str, symmetric: bool, wikitext: Path, args: argparse.Namespace
) -> tuple[EvaluationResult, float]:
    model, tokenizer = load_model(model_name, progress=False)
    calibration_text = TextSource(kind="text_file", path=wikitext / "valid.txt").load()
    evaluation_text = TextSource(kind="text_file", path=wikitext / "test.txt").load()
    calibration = token_windows(
        tokenizer, calibration_text, num_samples=args.calib_samples, seq_len=args.calib_len, seed=args.seed
    )
    evaluation = token_windows(
        tokenizer, evaluation_text, num_samples=args.eval_samples, seq_len=args.eval_len, seed=args.seed
    )
    start = time.perf_counter()
    cache = calibrate(model, calibration, quant_config=KVQuantConfig(symmetric=symmetric), progress=False)
    result = evaluate(model, cache, evaluation, prefill=args.prefill, chunk=args.chunk, progress=False)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=6)
    parser.add_argument("--eval-len", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not (args.wikitext / "valid.txt").is_file():
        parser.error(f"WikiText-2 not found in {args.wikitext}; pass --wikitext DIR")
    torch.manual_seed(0)

    rows = []
    for model_name in args.models:
        for symmetric in (True, False):
            result, seconds = run(model_name, symmetric, args.wikitext, args)
            rows.append((model_name, "symmetric" if symmetric else "asymmetric", result, seconds))
            print(
                f"# {model_name} {'sym' if symmetric else 'asym'}: PPL {result.ppl_reference:.3f} -> "
                f"{result.ppl_quantized:.3f} ({result.ppl_relative_change * 100:+.2f} %), KL {result.kl_mean:.2e}, "
                f"top-1 {result.top1_agreement * 100:.1f} %, {seconds:.0f} s",
                flush=True,
            )
    header = ("model", "INT8 per-channel", "PPL fp", "PPL INT8", "ΔPPL", "mean KL", "top-1 agreement")
    print()
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for model_name, scheme, result, _ in rows:
        cells = (
            model_name,
            scheme,
            f"{result.ppl_reference:.3f}",
            f"{result.ppl_quantized:.3f}",
            f"{result.ppl_relative_change * 100:+.2f} %",
            f"{result.kl_mean:.1e}",
            f"{result.top1_agreement * 100:.1f} %",
        )
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    print(
        f"\n{args.calib_samples}x{args.calib_len} calibration tokens (valid.txt), {args.eval_samples}x{args.eval_len} "
        f"evaluation tokens (test.txt), prefill {args.prefill}, chunks of {args.chunk}, float32, seed {args.seed}"
    )


if __name__ == "__main__":
    main()
