"""Quality per bit of every KV cache on the table: quantcache's schemes and presets against the peers.

One run, one set of token windows per (model, text, context), every contender on the same
windows in lockstep: ``DynamicCache`` (the reference), each quantcache scheme (the
msModelSlim seed INT8 per-channel, symmetric and asymmetric, plus every preset of
``KVQuantConfig.preset`` when the installed quantcache has presets), calibrated on
WikiText-2 ``valid.txt`` (``--calibration builtin`` for the built-in corpus, or both), and the
peers of ``benchmarks/peers.py`` (Transformers' ``QuantizedCache`` with quanto and HQQ,
FP8, TurboQuant, KIVI). Evaluated on WikiText-2 ``test.txt`` and on each text of
``benchmarks/texts/`` (Python source, legal prose, a software manual).

Protocol (quantcache.analysis.evaluation's): each window runs as generation uses a cache: a prefill of
``--prefill`` tokens, then chunks of ``--chunk`` tokens, each continuing the cache; every
position predicts the next token. Per contender: perplexity against the reference's
(ΔPPL), mean KL divergence of its next-token distribution from the reference's, top-1
agreement, and effective bits per element at the window length (codes, scales, zero
points, norms and full-precision tokens, from each contender's settings; see peers.py).
The reference run is computed once per chunk and shared by all contenders; the metrics
are the library's formulas. With ``--library-check`` (default: the first window of the
first text) each quantcache scheme is also run through ``quantcache.analysis.evaluation.evaluate``
and the two results are compared, to prove the loop here is the library's protocol.
Transformers' quantized layers (quanto, HQQ, FP8) hand the prefill forward its own
unquantized states, so their prefill predictions are exact; ``--exclude-prefill`` scores
only the chunks after the prefill, where every contender reads quantized history.

Examples::

    python benchmarks/quality.py --markdown --plot quality.png       # SmolLM2, 6x1024, all texts
    python benchmarks/quality.py --models gemma3-270m --eval-samples 2 --markdown
    python benchmarks/quality.py --contexts 1024 4096 --eval-samples 4 --calibration wikitext2 builtin
    nice -n 10 python benchmarks/quality.py --eval-samples 2 --contexts 512 --peers quanto-int4 hqq-int4

Install the peers first with ``bash benchmarks/install_peers.sh``; missing ones are listed
and skipped. Never calibrate on test text: calibration reads ``valid.txt`` (or the built-in
corpus's calibration split), evaluation ``test.txt`` and the files in benchmarks/texts/.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peers import DEFAULT_PEERS, PEER_SPECS, build_peers
from schemes import DEFAULT_WIKITEXT, calibrated, calibration_windows, effective_bits, model_dtype, schemes
from torch import nn
from transformers import DynamicCache

from quantcache.analysis.evaluation import evaluate
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.models.data import DataError, TextSource, token_windows
from quantcache.models.loading import load_model

TEXTS_DIR = Path(__file__).resolve().parent / "texts"

TEXT_END_MARKERS = {
    # The manual ships whole (its licence asks for that); its GFDL appendix is legal text, not manual prose.
    "manual_gnu_readline": "\x1f\nFile: rluserman.info,  Node: GNU Free Documentation License",
}
"""Per text stem: evaluate only the text before this marker."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """Running sums over predicted tokens, the same formulas as ``quantcache.analysis.evaluation``.

    Per chunk: ``log_softmax`` of float32 logits, KL(reference || contender) summed over the
    vocabulary, both negative log-likelihoods of the true next token, and whether the two
    argmax tokens agree; sums are float32 on the device, accumulated as Python floats.
    """

    def __init__(self) -> None:
        self.nll_reference = 0.0
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.count = 0

    def add(self, reference: Reference, logits: torch.Tensor, targets: torch.Tensor) -> None:
        log_q = torch.log_softmax(logits.float(), dim=-1)
        kl = F.kl_div(log_q, reference.log_probs, reduction="none", log_target=True).sum(dim=-1)
        self.kl += float(kl.sum(dtype=torch.float32))
        self.nll -= float(log_q.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float32))
        self.nll_reference += reference.nll_sum
        self.agree += int((log_q.argmax(dim=-1) == reference.argmax).sum())
        self.count += int(targets.numel())

    def merge(self, other: Metrics) -> None:
        self.nll_reference += other.nll_reference
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.count += other.count

    @property
    def ppl_reference(self) -> float:
        return math.exp(self.nll_reference / self.count)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if math.isfinite(self.nll) else math.nan

    @property
    def ppl_change(self) -> float:
        return self.ppl / self.ppl_reference - 1.0

    @property
    def kl_mean(self) -> float:
        return self.kl / self.count

    @property
    def top1(self) -> float:
        return self.agree / self.count


@dataclass
class Reference:
    """The reference run's log-probabilities, argmax and NLL for one chunk."""

    log_probs: torch.Tensor
    argmax: torch.Tensor
    nll_sum: float

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> Reference:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        nll = -float(log_p.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float32))
        return cls(log_p, log_p.argmax(dim=-1), nll)


def chunk_bounds(length: int, prefill: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the forward calls: a prefill of ``min(prefill, length)``, then chunks."""
    first = min(prefill, length)
    return [(0, first)] + [(start, min(start + chunk, length)) for start in range(first, length, chunk)]


# ---------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    """A cache under test: a factory of empty caches and its size per element."""

    key: str
    name: str
    family: str  # "quantcache" or "peer"
    new_cache: Callable[[], Any]
    bits: Callable[[int, torch.dtype], float]
    formula: str
    quantcache_cache: Any = None  # the frozen QuantizedCalibratingCache, for the library check
    stores_dequantized: bool = False


@dataclass
class Outcome:
    """What one contender scored on one (model, text, context): per-window metrics, or why it failed."""

    windows: list[Metrics] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def total(self) -> Metrics:
        merged = Metrics()
        for metrics in self.windows:
            merged.merge(metrics)
        return merged


def lockstep(
    model: nn.Module, windows: torch.Tensor, contenders: list[Contender], prefill: int, chunk: int,
    score_prefill: bool = True,
) -> dict[str, Outcome]:
    """Run every window through the reference and every contender, chunk by chunk, side by side.

    For each chunk the reference forward runs once and its log-probabilities serve every
    contender. A contender that raises is marked failed and dropped for the remaining
    windows; the others go on. ``score_prefill=False`` leaves the prefill's predictions out
    of the metrics (the library counts them).
    """
    device = next(model.parameters()).device
    outcomes = {contender.key: Outcome() for contender in contenders}
    length = int(windows.shape[1])
    bounds = chunk_bounds(length, prefill, chunk)
    with torch.inference_mode():
        for row in windows:
            window = row.unsqueeze(0).to(device)
            live = [contender for contender in contenders if outcomes[contender.key].error is None]
            caches = {}
            for contender in live:
                caches[contender.key] = contender.new_cache()
                outcomes[contender.key].windows.append(Metrics())
            reference_cache = DynamicCache(config=model.config)
            for start, end in bounds:
                position_ids = torch.arange(start, end, device=device).unsqueeze(0)
                inputs = {"position_ids": position_ids, "use_cache": True}
                logits = model(window[:, start:end], **inputs, **{CACHE_KEYWORD: reference_cache}).logits
                stop = min(end, length - 1)  # the last token of the window predicts nothing
                targets = window[0, start + 1 : stop + 1]
                scored = stop > start and (score_prefill or start > 0)
                reference = Reference.from_logits(logits[0, : stop - start], targets) if scored else None
                del logits
                for contender in live:
                    outcome = outcomes[contender.key]
                    if outcome.error is not None:
                        continue
                    began = time.perf_counter()
                    try:
                        output = model(window[:, start:end], **inputs, **{CACHE_KEYWORD: caches[contender.key]})
                        if reference is not None:
                            outcome.windows[-1].add(reference, output.logits[0, : stop - start], targets)
                    except Exception as error:  # report and go on with the other contenders
                        outcome.error = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
                        outcome.windows.pop()
                        caches.pop(contender.key, None)
                    outcome.seconds += time.perf_counter() - began
            del caches, reference_cache
    return outcomes


def quantcache_contenders(
    model: nn.Module,
    tokenizer: Any,
    *,
    calibration: list[str],
    samples: int,
    seq_len: int,
    seed: int,
    wikitext: Path,
    scheme_keys: list[str] | None,
    log: Callable[[str], None],
) -> list[Contender]:
    """Every requested quantcache scheme, calibrated once per calibration source (``wikitext2``, ``builtin``)."""
    found = []
    for source in calibration:
        windows = calibration_windows(tokenizer, source, samples=samples, seq_len=seq_len, seed=seed, wikitext=wikitext)
        for scheme in schemes(scheme_keys):
            began = time.perf_counter()
            frozen = calibrated(model, scheme, windows)
            log(f"calibrated {scheme.key} on {source} ({windows.shape[0]}x{windows.shape[1]}) "
                f"in {time.perf_counter() - began:.0f} s")
            suffix = f" [cal. {source}]" if len(calibration) > 1 else ""

            def bits(length: int, dtype: torch.dtype, frozen: Any = frozen) -> float:
                return effective_bits(frozen, length, dtype)[0]

            found.append(
                Contender(
                    key=f"{scheme.key}@{source}",
                    name=scheme.name + suffix,
                    family="quantcache",
                    new_cache=frozen.empty_copy,
                    bits=bits,
                    formula=effective_bits(frozen, 1024, model_dtype(model))[1],
                    quantcache_cache=frozen,
                )
            )
    return found


def peer_contenders(model: nn.Module, keys: list[str], log: Callable[[str], None]) -> list[Contender]:
    peers, skipped = build_peers(model, keys)
    for key, reason in skipped.items():
        log(f"peer {key} skipped: {reason}")
    return [
        Contender(
            key=peer.key,
            name=peer.name,
            family="peer",
            new_cache=peer.new_cache,
            bits=peer.effective_bits,
            formula=peer.formula,
            stores_dequantized=peer.stores_dequantized,
        )
        for peer in peers
    ]


# ---------------------------------------------------------------------------- texts
def evaluation_texts(names: list[str] | None, wikitext: Path) -> dict[str, str]:
    """``{name: text}``: WikiText-2 test as ``wikitext2-test``, then every ``benchmarks/texts/*.txt`` by stem."""
    available: dict[str, Path] = {"wikitext2-test": wikitext / "test.txt"}
    for path in sorted(TEXTS_DIR.glob("*.txt")):
        available[path.stem] = path
    chosen = list(available) if names is None else names
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"unknown text(s) {', '.join(unknown)}; available: {', '.join(available)}")
    texts = {}
    for name in chosen:
        text = TextSource(kind="text_file", path=available[name]).load()[0]
        marker = TEXT_END_MARKERS.get(name)
        if marker is not None and marker in text:
            text = text[: text.index(marker)]
        texts[name] = text
    return texts


def windows_for(tokenizer: Any, text: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Up to ``samples`` windows of ``seq_len`` tokens of ``text`` (fewer when the text is too short)."""
    count = samples
    while count >= 1:
        try:
            return token_windows(tokenizer, [text], num_samples=count, seq_len=seq_len, seed=seed)
        except DataError:
            count -= 1
    raise DataError(f"the text is shorter than one window of {seq_len} tokens")


# ---------------------------------------------------------------------------- report
def command_line() -> str:
    return "python " + " ".join(shlex.quote(argument) for argument in sys.argv)


def _fmt_pct(value: float) -> str:
    return f"{value * 100:+.2f} %" if math.isfinite(value) else "nan"


def _fmt_sci(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else "nan"


def table(rows: list[dict[str, Any]], markdown: bool, bits_label: str, run_bits_label: str | None) -> str:
    header = ["model", "context", "text", "contender", bits_label]
    if run_bits_label:
        header.append(run_bits_label)
    header += ["PPL ref", "PPL", "ΔPPL", "mean KL", "top-1", "windows"]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
    for row in rows:
        if row.get("error"):
            cells = [row["model"], str(row["context"]), row["text"], row["contender"], f"{row['bits']:.2f}"]
            if run_bits_label:
                cells.append(f"{row['bits_run']:.2f}")
            cells += ["", "", "failed", row["error"][:80], "", ""]
        else:
            cells = [row["model"], str(row["context"]), row["text"], row["contender"], f"{row['bits']:.2f}"]
            if run_bits_label:
                cells.append(f"{row['bits_run']:.2f}")
            cells += [
                f"{row['ppl_reference']:.3f}",
                f"{row['ppl']:.3f}" if math.isfinite(row["ppl"]) else "nan",
                _fmt_pct(row["ppl_change"]),
                _fmt_sci(row["kl_mean"]),
                f"{row['top1'] * 100:.1f} %",
                str(row["windows"]),
            ]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, bits_label: str, title: str) -> None:
    """KL (log scale) against effective bits, one panel per (model, context), one marker per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(row["model"], row["context"]) for row in rows})
    texts = sorted({row["text"] for row in rows})
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    colors = plt.get_cmap("tab20").colors
    figure, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
    for axis, (model_name, context) in zip(axes[0], panels, strict=True):
        for c_index, contender in enumerate(contenders):
            for t_index, text in enumerate(texts):
                points = [
                    row for row in rows
                    if row["model"] == model_name and row["context"] == context and row["contender"] == contender
                    and row["text"] == text and not row.get("error") and math.isfinite(row["kl_mean"])
                    and row["kl_mean"] > 0 and math.isfinite(row["bits"])
                ]
                for row in points:
                    axis.scatter(
                        row["bits"], row["kl_mean"], marker=markers[t_index % len(markers)],
                        color=colors[c_index % len(colors)], s=45, alpha=0.85,
                        label=contender if t_index == 0 else None,
                    )
        axis.set_yscale("log")
        axis.set_xlabel(bits_label)
        axis.set_ylabel("mean KL vs unquantized cache (log)")
        axis.set_title(f"{model_name}, {context} tokens")
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for t_index, text in enumerate(texts):
        handles.append(plt.Line2D([], [], marker=markers[t_index % len(markers)], color="grey", linestyle=""))
        labels.append(f"text: {text}")
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


# ---------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], help="quantcache model names, Hub ids, "
                        "directories or .gguf files (default: smollm2-135m; gemma3-270m also exists)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024], help="evaluation window lengths in "
                        "tokens (default 1024; the issue also asks for 4096)")
    parser.add_argument("--eval-samples", type=int, default=6, help="windows per text and context (default 6; "
                        "fewer when a text is too short)")
    parser.add_argument("--texts", nargs="+", default=None, help="evaluation texts: wikitext2-test and the stems "
                        "of benchmarks/texts/*.txt (default: all)")
    parser.add_argument("--calibration", nargs="+", choices=["wikitext2", "builtin"], default=["wikitext2"],
                        help="calibration text(s): WikiText-2 valid.txt and/or the built-in corpus (default "
                        "wikitext2); each quantcache scheme is calibrated once per source")
    parser.add_argument("--calib-samples", type=int, default=8, help="calibration windows (default 8)")
    parser.add_argument("--calib-len", type=int, default=512, help="calibration window length (default 512)")
    parser.add_argument("--schemes", nargs="+", default=None, help="quantcache scheme keys (default: all: "
                        "seed-sym, seed-asym and preset-NAME for every preset the installed quantcache has; "
                        "config:PATH adds a YAML config, such as a suggest-bits mix)")
    parser.add_argument("--peers", nargs="*", default=list(DEFAULT_PEERS), help="peer keys (default: "
                        f"{' '.join(DEFAULT_PEERS)}; known: {' '.join(spec.key for spec in PEER_SPECS)}); "
                        "give no key for none")
    parser.add_argument("--prefill", type=int, default=256, help="prefill tokens per window (default 256)")
    parser.add_argument("--chunk", type=int, default=32, help="tokens per forward after the prefill (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="window selection seed (default 0)")
    parser.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT, help="folder with WikiText-2 "
                        "valid.txt and test.txt (default ../shared/data/wikitext-2 beside the project root)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--bits-dtype", choices=list(DTYPES), default="bfloat16", help="dtype at which "
                        "full-precision tokens and model-dtype scales are counted in the effective bits of the "
                        "table's first bits column and of the plot (default bfloat16, what deployments use); "
                        "a second column gives the bits at --dtype when it differs")
    parser.add_argument("--exclude-prefill", action="store_true", help="score only the predictions made after "
                        "the prefill. The peers built on Transformers' QuantizedLayer (quanto, HQQ) and FP8 return "
                        "the unquantized states on their first update, so their prefill predictions are exact; the "
                        "library protocol (the default) counts them. Disables --library-check")
    parser.add_argument("--library-check", choices=["none", "first", "all"], default="first", help="also run "
                        "quantcache.evaluate on the first window of the first text (first), on every "
                        "window of every text (all) or never (none), and compare")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", type=Path, default=None, help="write every result as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of KL against effective bits here")
    args = parser.parse_args()
    needs_wikitext = "wikitext2" in args.calibration or args.texts is None or "wikitext2-test" in args.texts
    if needs_wikitext and not (args.wikitext / "valid.txt").is_file():
        parser.error(f"WikiText-2 not found in {args.wikitext}; pass --wikitext DIR")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'quantcache[plot]'")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    bits_dtype = DTYPES[args.bits_dtype]

    def log(message: str) -> None:
        print(f"# {message}", file=sys.stderr, flush=True)

    log(command_line())
    texts = evaluation_texts(args.texts, args.wikitext)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    formulas: dict[str, str] = {}
    for model_name in args.models:
        model, tokenizer = load_model(model_name, device=args.device, dtype=dtype, progress=False)
        contenders = quantcache_contenders(
            model, tokenizer, calibration=args.calibration, samples=args.calib_samples, seq_len=args.calib_len,
            seed=args.seed, wikitext=args.wikitext, scheme_keys=args.schemes, log=log,
        ) + peer_contenders(model, args.peers, log)
        for contender in contenders:
            formulas[contender.name] = contender.formula
        for context in args.contexts:
            for text_index, (text_name, text) in enumerate(texts.items()):
                windows = windows_for(tokenizer, text, args.eval_samples, context, args.seed)
                began = time.perf_counter()
                outcomes = lockstep(model, windows, contenders, args.prefill, args.chunk, not args.exclude_prefill)
                log(f"{model_name} {context} {text_name}: {windows.shape[0]} windows, "
                    f"{time.perf_counter() - began:.0f} s")
                for contender in contenders:
                    outcome = outcomes[contender.key]
                    row: dict[str, Any] = {
                        "model": model_name, "context": context, "text": text_name, "contender": contender.name,
                        "key": contender.key, "family": contender.family,
                        "bits": contender.bits(context, bits_dtype), "bits_run": contender.bits(context, dtype),
                        "windows": len(outcome.windows), "seconds": outcome.seconds, "error": outcome.error,
                        "stores_dequantized": contender.stores_dequantized,
                    }
                    if outcome.windows:
                        total = outcome.total()
                        row.update(
                            ppl_reference=total.ppl_reference, ppl=total.ppl, ppl_change=total.ppl_change,
                            kl_mean=total.kl_mean, top1=total.top1, tokens=total.count,
                        )
                    elif outcome.error is None:
                        row["error"] = "no window evaluated"
                    rows.append(row)
                    status = outcome.error or (
                        f"ΔPPL {_fmt_pct(row['ppl_change'])}, KL {_fmt_sci(row['kl_mean'])}, "
                        f"top-1 {row['top1'] * 100:.1f} %, {row['bits']:.2f} bits"
                    )
                    log(f"  {contender.name}: {status} ({outcome.seconds:.0f} s)")
                    check_all = args.library_check == "all" and not args.exclude_prefill
                    check_first = args.library_check == "first" and text_index == 0 and not args.exclude_prefill
                    if contender.quantcache_cache is not None and outcome.windows and (check_all or check_first):
                        count = len(outcome.windows) if check_all else 1
                        checks.append(library_check(model, contender, windows[:count], outcome, args, model_name))
                        log(f"  library check {contender.key}: {checks[-1]['verdict']}")
        del model

    print(f"Made by `{command_line()}`")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model dtype {args.dtype}, "
          f"prefill {args.prefill}{' (not scored)' if args.exclude_prefill else ''}, chunks of {args.chunk}, "
          f"seed {args.seed}, calibration "
          f"{' + '.join(args.calibration)} ({args.calib_samples}x{args.calib_len}); ΔPPL, KL and top-1 against "
          "an unquantized DynamicCache on the same windows\n")
    bits_label = f"eff. bits ({args.bits_dtype} KV)"
    run_label = f"eff. bits ({args.dtype} KV, as run)" if args.dtype != args.bits_dtype else None
    print(table(rows, args.markdown, bits_label, run_label))
    print("\nEffective bits per element (L = window length, d = bits of the model dtype):")
    for name, formula in formulas.items():
        print(f"- {name}: {formula}")
    dequantized = sorted({row["contender"] for row in rows if row["stores_dequantized"]})
    if dequantized:
        print(f"- stored dequantized in the model dtype on this backend (no memory saved): {', '.join(dequantized)}")
    if checks:
        print("\nLibrary check (quantcache.analysis.evaluation.evaluate on the same windows):")
        for check in checks:
            print(f"- {check['model']} {check['contender']}: {check['verdict']}")
    if args.json is not None:
        document = {"command": command_line(), "settings": vars_json(args), "rows": rows, "formulas": formulas,
                    "library_checks": checks}
        args.json.write_text(json.dumps(finite(document), indent=2, default=str))
        print(f"\nJSON: {args.json}")
    if args.plot is not None:
        plot(rows, args.plot, bits_label, command_line())
        print(f"plot: {args.plot}")


def library_check(
    model: nn.Module, contender: Contender, windows: torch.Tensor, outcome: Outcome, args: argparse.Namespace,
    model_name: str,
) -> dict[str, Any]:
    """Run the library's ``evaluate`` on ``windows`` and compare it with this loop's first windows."""
    result = evaluate(model, contender.quantcache_cache, windows, prefill=args.prefill, chunk=args.chunk,
                      progress=False)
    mine = Metrics()
    for metrics in outcome.windows[: int(windows.shape[0])]:
        mine.merge(metrics)
    differences = {
        "ppl_reference": abs(result.ppl_reference / mine.ppl_reference - 1),
        "ppl": abs(result.ppl_quantized / mine.ppl - 1),
        "kl_mean": abs(result.kl_mean - mine.kl_mean) / max(result.kl_mean, 1e-12),
        "top1": abs(result.top1_agreement - mine.top1),
    }
    worst = max(differences.values())
    library_bits = getattr(result, "effective_bits", None)
    verdict = (f"{'agrees' if worst < 1e-3 else 'DIFFERS'} (largest relative difference {worst:.1e} over "
               f"{int(windows.shape[0])} window(s); library KL {result.kl_mean:.3e}, here {mine.kl_mean:.3e})")
    if library_bits is not None:
        verdict += f"; library effective_bits {library_bits}"
    return {"model": model_name, "contender": contender.key, "differences": differences, "verdict": verdict}


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


if __name__ == "__main__":
    main()
