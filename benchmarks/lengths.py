"""Do saved scales hold at serving lengths? Quality of states against the unquantized cache at several contexts.

A static key range calibrated after RoPE holds for the angles the calibration positions reached;
this measures what that means for states saved by ``quantcache calibrate`` (or imported), at each
``--contexts`` length, on each ``--texts`` file: ΔPPL, KL and top-1 agreement of
:func:`quantcache.analysis.evaluation.evaluate` (a prefill of 256 tokens, then chunks: 32 tokens up
to 1024, 256 beyond, which keeps 4096-token windows affordable on a CPU), the largest per-layer
share of clipped key elements, and seconds. Windows: ``--samples`` random starts per text and
length (``torch.randint`` seeded 0), the same for every state. ``--as ENGINE`` evaluates with a
serving engine's arithmetic (``quantizer.new_cache(engine=...)``, as ``quantcache evaluate --as``).

Run::

    quantcache calibrate --preset seed -o runs/seed && quantcache calibrate --preset c8 -o runs/c8
    python benchmarks/lengths.py --scales runs/seed runs/c8 --contexts 1024 4096 \\
        --texts wikitext2=../shared/data/wikitext-2/test.txt python=benchmarks/texts/python_stdlib.txt
    python benchmarks/lengths.py --scales runs/c8 --as vllm --contexts 4096 --texts wikitext2=...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from quantcache import KVQuantizer, load_model
from quantcache.analysis.evaluation import evaluate


def _windows(ids: torch.Tensor, length: int, samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - length, (samples,), generator=generator)
    return torch.stack([ids[start : start + length] for start in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", type=Path, required=True, help="state files or calibrate's directories")
    parser.add_argument("--model", default="smollm2-135m", help="quantcache model name, Hub id, directory or .gguf")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--texts", nargs="+", required=True, metavar="NAME=PATH", help="UTF-8 text files")
    parser.add_argument("--samples", type=int, default=2, help="windows per text and length (default 2)")
    parser.add_argument("--as", dest="engine", default=None, help="evaluate with ascend, vllm or modelopt numerics")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    texts = dict(item.split("=", 1) for item in args.texts)
    results: list[dict[str, Any]] = []
    print("| state | text | tokens | ΔPPL | KL | top-1 | keys clipped (worst layer) |")
    print("|---|---|---|---|---|---|---|")
    for text_name, path in texts.items():
        ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        for length in args.contexts:
            windows = _windows(ids, length, args.samples)
            for scales in args.scales:
                state = scales / "kv_scales.safetensors" if scales.is_dir() else scales
                quantizer = KVQuantizer.load(state, model)
                cache = quantizer.new_cache(engine=args.engine)
                started = time.perf_counter()
                chunk = 32 if length <= 1024 else 256
                result = evaluate(model, cache, windows, prefill=256, chunk=chunk, progress=False)
                row = {
                    "state": str(scales),
                    "text": text_name,
                    "tokens": length,
                    "engine": args.engine,
                    "ppl_relative_change": result.ppl_relative_change,
                    "kl_mean": result.kl_mean,
                    "top1_agreement": result.top1_agreement,
                    "key_clip_fraction": max(layer.key_clip_fraction for layer in result.layers),
                    "seconds": time.perf_counter() - started,
                }
                results.append(row)
                print(
                    f"| {scales} | {text_name} | {length} | {100 * row['ppl_relative_change']:+.2f} % | "
                    f"{row['kl_mean']:.1e} | {100 * row['top1_agreement']:.1f} % | "
                    f"{100 * row['key_clip_fraction']:.3f} % |",
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
