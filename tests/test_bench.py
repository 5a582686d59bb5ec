"""``quantcache bench`` and :mod:`quantcache.analysis.speed` on the tiny random Llama (no downloads).

No figure here is a timing assertion: the tests check what the benchmark reports and how
the numbers relate (medians of the runs it lists, ratios to the DynamicCache of the same
run, KV bytes equal to what a cache filled the same way really holds), the interleaved
order, and the command's table, JSON and errors.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import torch
from conftest import HEAD_DIM, KV_HEADS, VOCAB
from test_cli import char_tokenizer
from transformers import PreTrainedModel

from quantcache import cli
from quantcache.analysis.speed import (
    TABLE_COLUMNS,
    Contender,
    SpeedResult,
    SpeedRow,
    bench_speed,
    calibrate_presets,
    compiled_twins,
    decode_step_seconds,
    default_contenders,
    dynamic_contender,
    fill,
    format_speed_table,
    kv_bytes,
    prefill_states,
    quantized_contender,
    runs,
)
from quantcache.analysis.speed.results import busy_machine_warning, spread
from quantcache.cache import attention, compiled_kernels
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cli import _steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT, STEPS, REPEATS = 40, 2, 2
SMALL = ["--contexts", str(CONTEXT), "--steps", str(STEPS), "--repeats", str(REPEATS), "--samples", "2"]
SMALL += ["--seq-len", "32", "--device", "cpu"]
ROW_KEYS = {
    "context",
    "batch",
    "cache",
    "kind",
    "decode_ms",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "kv_bytes",
    "kv_parts",
    "peak_bytes",
    "decode_ms_vs_dynamic",
    "decode_spread",
    "prefill_tokens_per_s_vs_dynamic",
    "kv_bytes_vs_dynamic",
    "decode_seconds_runs",
    "prefill_seconds_runs",
    "error",
}


@pytest.fixture(scope="module")
def quantizers(llama: PreTrainedModel) -> dict[str, KVQuantizer]:
    """``seed`` (static INT8 per channel) and ``int4`` (dynamic, sinks, residual window), calibrated on 2 x 32 ids."""
    windows = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    return calibrate_presets(llama, windows, ["seed", "int4"])


@pytest.fixture(scope="module")
def result(llama: PreTrainedModel, quantizers: dict[str, KVQuantizer]) -> SpeedResult:
    torch.set_num_threads(1)
    contenders = default_contenders(llama, quantizers, "packed")
    return bench_speed(llama, contenders, contexts=[CONTEXT], batches=[1, 2], steps=STEPS, repeats=REPEATS)


def held_after_bench(model: PreTrainedModel, cache: Any, batch: int) -> Any:
    """``cache`` filled and decoded as the benchmark does (one untimed step, then the timed ones)."""
    fill(cache, prefill_states(model, CONTEXT), batch)
    decode_step_seconds(model, cache, batch, 1)
    decode_step_seconds(model, cache, batch, STEPS)
    return cache


def dense_bytes(model: PreTrainedModel, tokens: int, batch: int) -> int:
    """Keys and values of every layer, float32, for ``tokens`` x ``batch``."""
    return 2 * model.config.num_hidden_layers * batch * KV_HEADS * tokens * HEAD_DIM * 4


# ---------------------------------------------------------------------------- the measuring function
def test_rows_are_medians_of_their_runs_with_ratios_to_dynamic_of_the_same_run(result: SpeedResult) -> None:
    names = ["DynamicCache", "StaticCache", "seed packed", "int4 packed"]
    assert [(row.context, row.batch, row.cache) for row in result.rows] == [
        (CONTEXT, batch, name) for batch in (1, 2) for name in names
    ]
    assert (result.steps, result.repeats) == (STEPS, REPEATS)
    for batch in (1, 2):
        rows = {row.cache: row for row in result.rows if row.batch == batch}
        base = rows["DynamicCache"]
        for row in rows.values():
            assert row.error is None
            assert len(row.decode_seconds_runs) == len(row.prefill_seconds_runs) == REPEATS
            decode = statistics.median(row.decode_seconds_runs)
            assert row.decode_ms == decode * 1e3 and row.decode_tokens_per_s == batch / decode
            runs = row.decode_seconds_runs
            assert row.decode_spread == pytest.approx((max(runs) - min(runs)) / decode, rel=1e-12)
            assert row.prefill_tokens_per_s == batch * CONTEXT / statistics.median(row.prefill_seconds_runs)
            assert row.decode_ms_vs_dynamic == pytest.approx(row.decode_ms / base.decode_ms, rel=1e-12)
            ratio = row.prefill_tokens_per_s / base.prefill_tokens_per_s
            assert row.prefill_tokens_per_s_vs_dynamic == pytest.approx(ratio, rel=1e-12)
            assert row.kv_bytes_vs_dynamic == pytest.approx(row.kv_bytes / base.kv_bytes, rel=1e-12)
        assert base.decode_ms_vs_dynamic == base.prefill_tokens_per_s_vs_dynamic == base.kv_bytes_vs_dynamic == 1.0
        # int4 keeps its newest 24 tokens and the first in full precision: at 43 tokens only seed is smaller
        assert rows["seed packed"].kv_bytes < base.kv_bytes


def test_kv_bytes_are_what_each_cache_really_holds(
    llama: PreTrainedModel, quantizers: dict[str, KVQuantizer], result: SpeedResult
) -> None:
    from transformers import DynamicCache, StaticCache

    tokens = CONTEXT + 1 + STEPS  # the fill, the untimed step, the timed steps
    for batch in (1, 2):
        rows = {row.cache: row for row in result.rows if row.batch == batch}
        dynamic = held_after_bench(llama, DynamicCache(config=llama.config), batch)
        held = sum(t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values))
        assert rows["DynamicCache"].kv_bytes == held == dense_bytes(llama, tokens, batch)
        static = held_after_bench(llama, StaticCache(config=llama.config, max_cache_len=tokens), batch)
        assert rows["StaticCache"].kv_bytes == kv_bytes(static)[0] == dense_bytes(llama, tokens, batch)
        for name, quantizer in quantizers.items():
            cache = held_after_bench(llama, quantizer.new_cache(storage="packed"), batch)
            report = cache.memory_report()
            row = rows[f"{name} packed"]
            assert row.kv_bytes == sum(layer["total"] for layer in report)
            assert row.kv_parts is not None and sum(row.kv_parts.values()) == row.kv_bytes
            assert row.kv_parts["codes"] == sum(layer["codes"] for layer in report) > 0
            assert rows["DynamicCache"].kv_parts is None


def test_result_is_strict_json_and_the_table_has_every_row(result: SpeedResult) -> None:
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(data) == {"rows", "steps", "repeats", "peak_kind", "settings"}
    assert data["peak_kind"] in ("rss_high_water", None)  # CPU: the resident high-water mark where Linux has it
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert isinstance(row["kv_bytes"], int) and isinstance(row["decode_ms"], float)
        assert isinstance(row["prefill_tokens_per_s"], float) and row["error"] is None
        assert (row["peak_bytes"] is None) == (data["peak_kind"] is None)
        if row["peak_bytes"] is not None:
            assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] >= row["kv_bytes"]
    lines = format_speed_table(result).splitlines()
    assert lines[0].split() == " ".join(TABLE_COLUMNS).split()
    assert lines[1 + len(result.rows)].startswith(f"medians of {REPEATS}")
    warning = busy_machine_warning(result)  # tiny steps of a millisecond spread widely on a shared machine
    assert lines[2 + len(result.rows) :] == ([] if warning is None else [warning])


def _timed_rows(runs: dict[str, list[float]], *, context: int = 2048) -> list[SpeedRow]:
    """Rows of one context with these decode runs (seconds), as :func:`bench_speed` fills them."""
    rows = []
    for name, seconds in runs.items():
        row = SpeedRow(context=context, batch=1, cache=name, kind="dynamic" if name == "DynamicCache" else "quantized")
        row.decode_seconds_runs, row.decode_spread = seconds, spread(seconds)
        row.decode_ms = statistics.median(seconds) * 1e3
        rows.append(row)
    return rows


def test_the_spread_of_repetitions_is_their_range_over_their_median() -> None:
    assert spread([0.080, 0.100, 0.084]) == pytest.approx(0.020 / 0.084, rel=1e-12)  # over the median, not the mean
    assert spread([0.1]) == 0.0
    assert spread([]) is None
    assert spread([0.0, 0.0]) is None


def test_the_table_shows_each_spread_and_warns_where_dynamic_cache_spread_widely() -> None:
    quiet = _timed_rows({"DynamicCache": [0.074, 0.075, 0.080], "int8 codes kernels": [0.082, 0.090, 0.083]})
    busy = _timed_rows(
        {"DynamicCache": [0.1086, 0.0912, 0.0742, 0.0922, 0.0942], "int4 codes kernels": [0.095, 0.094]},
        context=8192,
    )
    result = SpeedResult(rows=[*quiet, *busy], steps=8, repeats=5, peak_kind=None)
    lines = format_speed_table(result).splitlines()
    after = len(TABLE_COLUMNS) - 1 - TABLE_COLUMNS.index("spread")  # single-word cells right of it ("n/a" here)
    spreads = [line.split()[-1 - after] for line in lines[1:5]]
    assert spreads == ["8%", "10%", "37%", "1%"]
    assert lines[-1] == (
        "warning: DynamicCache's decode repetitions spread by more than 10% (8192 x 1: 37%): this machine's speed "
        "changed during the run, so decode ratios there that differ by less than that may be noise; measure on a "
        "quiet machine, or with more --repeats"
    )
    assert busy_machine_warning(SpeedResult(rows=quiet, steps=8, repeats=3, peak_kind=None)) is None
    assert busy_machine_warning(result, limit=0.5) is None
    compiled_twin = _timed_rows({"DynamicCache": [0.100, 0.101, 0.102], "DynamicCache compiled": [0.05, 0.09]})
    compiled_twin[1].kind = "dynamic"  # a --compile twin: the ratios divide by the eager one, whose spread is 2 %
    assert busy_machine_warning(SpeedResult(rows=compiled_twin, steps=8, repeats=2, peak_kind=None)) is None
    just_over = SpeedResult(
        rows=_timed_rows({"DynamicCache": [0.100, 0.112, 0.106]}), steps=8, repeats=3, peak_kind=None
    )
    assert "(2048 x 1: 11%)" in (busy_machine_warning(just_over) or "")  # 10 % is the default limit
    assert "spread: the slowest decode repetition minus the fastest, over their median" in lines[-2]


def test_every_repetition_runs_every_contender_in_a_rotated_order(llama: PreTrainedModel) -> None:
    base = default_contenders(llama, {}, "packed")
    calls: list[tuple[str, int]] = []

    def recording(contender: Contender) -> Contender:
        def make(max_tokens: int) -> Any:
            calls.append((contender.name, max_tokens))
            return contender.make(max_tokens)

        return Contender(contender.name, contender.kind, make)

    bench_speed(llama, [recording(c) for c in base], contexts=[8], batches=[1], steps=1, repeats=3)
    decode_order = [name for name, max_tokens in calls if max_tokens == 8 + 1 + 1]  # not warm-up, not prefill
    assert decode_order == ["DynamicCache", "StaticCache", "StaticCache", "DynamicCache", "DynamicCache", "StaticCache"]
    prefill_order = [name for name, max_tokens in calls if max_tokens == 8]
    assert prefill_order == decode_order


@pytest.mark.slow  # tracing the tiny model for three caches: about half a minute
def test_compiled_twins_run_through_torch_compile_and_hold_what_eager_holds(
    llama: PreTrainedModel, quantizers: dict[str, KVQuantizer]
) -> None:
    """``--compile``: each cache measured twice, eagerly and through ``torch.compile`` of the model (``aot_eager``
    here: the functionalized graph inductor would compile, without its code generation); the compiled runs hold
    the same bytes but the room a packed cache reserves ahead, and the model is traced."""
    contenders = compiled_twins(default_contenders(llama, {"seed": quantizers["seed"]}, "packed"))
    assert [(c.name, c.compiled) for c in contenders] == [
        ("DynamicCache", False),
        ("StaticCache", False),
        ("seed packed", False),
        ("DynamicCache compiled", True),
        ("StaticCache compiled", True),
        ("seed packed compiled", True),
    ]
    torch.compiler.reset()
    try:
        result = bench_speed(
            llama, contenders, contexts=[24], batches=[1], steps=1, repeats=1, compile_backend="aot_eager"
        )
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch.compiler.reset()
    rows = {row.cache: row for row in result.rows}
    assert frames >= 1  # the compiled contenders went through Dynamo
    for name in ("DynamicCache", "StaticCache", "seed packed"):
        assert rows[f"{name} compiled"].error is None
    for name in ("DynamicCache", "StaticCache"):
        assert rows[f"{name} compiled"].kv_bytes == rows[name].kv_bytes
    # compiled steps concatenate, as DynamicCache does: the same codes and parameters, no room reserved ahead
    eager_parts, compiled_parts = rows["seed packed"].kv_parts, rows["seed packed compiled"].kv_parts
    assert eager_parts is not None and compiled_parts is not None
    assert eager_parts["reserved"] > 0 and compiled_parts["reserved"] == 0
    assert {**compiled_parts, "reserved": eager_parts["reserved"]} == eager_parts
    assert rows["seed packed compiled"].kv_bytes == rows["seed packed"].kv_bytes - eager_parts["reserved"]


def test_code_reading_twins_run_with_the_quantcache_attention_and_the_others_without(
    llama: PreTrainedModel, quantizers: dict[str, KVQuantizer]
) -> None:
    """``read_codes`` adds "NAME codes" after each packed contender; each runs with the attention it reads with
    (seen by the attention function called), and the model is left with its own attention afterwards."""
    contenders = default_contenders(llama, quantizers, "packed", static=False, read_codes=True)
    assert [(c.name, c.reads_codes) for c in contenders] == [
        ("DynamicCache", False),
        ("seed packed", False),
        ("seed codes", True),
        ("int4 packed", False),
        ("int4 codes", True),
    ]
    readers: dict[str, int] = {}
    original = attention.code_attention

    def counting(module: Any, query: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
        kind = "codes" if hasattr(key, "quantcache_reader") else "states"
        readers[kind] = readers.get(kind, 0) + 1
        return original(module, query, key, *args, **kwargs)

    before = llama.config._attn_implementation
    try:
        with patch.object(attention, "code_attention", counting):  # bench_speed registers the counting one
            result = bench_speed(llama, contenders, contexts=[CONTEXT], batches=[1], steps=1, repeats=1)
    finally:
        attention.register_code_attention()
    assert llama.config._attn_implementation == before == "sdpa"
    assert [row.cache for row in result.rows] == [c.name for c in contenders]
    assert all(row.error is None for row in result.rows)
    assert readers.get("states", 0) == 0 and readers["codes"] > 0  # the others never went through it
    with pytest.raises(ValueError, match="packed storage only"):
        default_contenders(llama, quantizers, "fake", read_codes=True)


def _counting_backend(
    monkeypatch: pytest.MonkeyPatch, compile_graph: Callable[[torch.fx.GraphModule, Any], Any]
) -> tuple[Callable[[torch.fx.GraphModule, Any], Any], list[int], list[int]]:
    """A backend compiling each graph with ``compile_graph`` and counting them, the list it counts in, and how many
    it compiled during each call of the timed runs (``runs._measure``, patched to count)."""
    graphs: list[int] = []

    def counting(graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(1)
        return compile_graph(graph, example_inputs)

    timed: list[int] = []
    measure = runs._measure

    def counted_measure(*args: Any, **kwargs: Any) -> Any:
        before = len(graphs)
        rows = measure(*args, **kwargs)
        timed.append(len(graphs) - before)
        return rows

    monkeypatch.setattr(runs, "_measure", counted_measure)
    return counting, graphs, timed


def test_kernel_twins_follow_each_packed_contender_and_their_warm_up_compiles_every_graph(
    llama: PreTrainedModel, quantizers: dict[str, KVQuantizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compiled_kernels`` adds "... kernels" after each packed contender (and each one reading codes), whose
    caches compile their per-token work; the warm-up compiles every graph of those kernels (the timed runs
    compile none, the untimed first step of each run included), and the rows hold what the eager twins hold."""
    contenders = default_contenders(llama, quantizers, "packed", static=False, read_codes=True, compiled_kernels=True)
    assert [(c.name, c.reads_codes, c.compiled_kernels) for c in contenders] == [
        ("DynamicCache", False, False),
        ("seed packed", False, False),
        ("seed packed kernels", False, True),
        ("seed codes", True, False),
        ("seed codes kernels", True, True),
        ("int4 packed", False, False),
        ("int4 packed kernels", False, True),
        ("int4 codes", True, False),
        ("int4 codes kernels", True, True),
    ]
    assert all(c.compiles == c.compiled_kernels for c in contenders)
    counting, graphs, timed = _counting_backend(monkeypatch, lambda graph, example_inputs: graph.forward)
    monkeypatch.setattr(compiled_kernels, "BACKEND", counting)
    compiled_kernels.reset()
    torch.compiler.reset()
    try:
        result = bench_speed(llama, contenders, contexts=[160, 200], batches=[1], steps=2, repeats=2)
    finally:
        compiled_kernels.reset()
        torch.compiler.reset()
    rows = {(row.cache, row.context): row for row in result.rows}
    assert all(row.error is None for row in result.rows)
    assert len(graphs) >= 6 and timed == [0, 0]
    for name in ("seed packed", "seed codes", "int4 packed", "int4 codes"):
        assert rows[f"{name} kernels", 200].kv_bytes == rows[name, 200].kv_bytes
    with pytest.raises(ValueError, match="compiled kernels encode and read packed codes"):
        default_contenders(llama, quantizers, "fake", compiled_kernels=True)


def test_a_contender_out_of_memory_is_reported_not_fatal(llama: PreTrainedModel) -> None:
    def exhausted(max_tokens: int) -> Any:
        if max_tokens > 16 + 2:  # the warm-up passes; the real sizes do not
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        from transformers import DynamicCache

        return DynamicCache(config=llama.config)

    contenders = [*default_contenders(llama, {}, "packed", static=False), Contender("huge", "static", exhausted)]
    result = bench_speed(llama, contenders, contexts=[24], batches=[1], steps=1, repeats=2)
    dynamic, huge = result.rows
    assert dynamic.error is None and dynamic.decode_ms is not None
    assert huge.error is not None and huge.error.startswith("out of memory")
    assert huge.decode_ms is huge.kv_bytes is huge.decode_ms_vs_dynamic is None and huge.decode_seconds_runs == []
    assert "failed" in format_speed_table(result).splitlines()[2]


def test_a_compiled_contender_that_fails_to_compile_is_reported_not_fatal(llama: PreTrainedModel) -> None:
    """A backend error (inductor's internal failures, say) fails the compiled rows; the eager ones are measured."""

    def failing_backend(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("meta for aten.set_.source_Storage failed")

    contenders = compiled_twins(default_contenders(llama, {}, "packed", static=False))
    torch.compiler.reset()
    try:
        result = bench_speed(
            llama, contenders, contexts=[24], batches=[1], steps=1, repeats=1, compile_backend=failing_backend
        )
    finally:
        torch.compiler.reset()
    eager, compiled = result.rows
    assert eager.error is None and eager.decode_ms is not None
    assert compiled.error is not None and compiled.error.startswith("compile failed: BackendCompilerFailed")
    assert "aten.set_.source_Storage" in compiled.error and compiled.decode_seconds_runs == []


@pytest.mark.slow  # a dozen graphs of the tiny model through aot_eager: about half a minute
def test_the_warm_up_compiles_every_graph_the_timed_runs_need(
    llama: PreTrainedModel, quantizers: dict[str, KVQuantizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compilation inside the timed runs would be timed (minutes for a real model): the warm-up makes the
    prompt and cache lengths dynamic, runs a prompt past MAX_QUERIES_FROM_CODES (the attention from codes
    decodes the rows and runs sdpa there), and meets both layouts of a packed cache's rows (a fresh fill's
    views of reserved room, the concatenated rows of compiled steps)."""
    counting, compiles, timed = _counting_backend(monkeypatch, torch._dynamo.backends.debugging.aot_eager)
    contenders = compiled_twins(
        [dynamic_contender(llama), quantized_contender("seed codes", quantizers["seed"], "packed", read_codes=True)]
    )
    torch.compiler.reset()
    try:
        result = bench_speed(
            llama, contenders, contexts=[160, 200], batches=[1], steps=2, repeats=2, compile_backend=counting
        )
    finally:
        torch.compiler.reset()
    assert all(row.error is None for row in result.rows)
    assert len(compiles) >= 4 and timed == [0, 0]


def test_a_compiled_contender_past_the_recompile_limit_is_reported_not_timed_eagerly(
    llama: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past Dynamo's recompile limit a frame would silently run eagerly, and its figures would pass for compiled
    ones: with room for one graph (a prefill and a decode step need two), the compiled row fails and says why."""
    monkeypatch.setattr(runs, "GRAPHS_PER_COMPILED_CONTENDER", 1)
    contenders = compiled_twins(default_contenders(llama, {}, "packed", static=False))
    torch.compiler.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            result = bench_speed(
                llama, contenders, contexts=[24], batches=[1], steps=1, repeats=1, compile_backend="eager"
            )
            assert torch._dynamo.config.recompile_limit == 1  # restored after the run
    finally:
        torch.compiler.reset()
    eager, compiled = result.rows
    assert eager.error is None and eager.decode_ms is not None
    assert compiled.error is not None and compiled.error.startswith("compile failed: FailOnRecompileLimitHit")
    assert compiled.decode_seconds_runs == []
    assert not torch._dynamo.config.fail_on_recompile_limit_hit


def test_other_errors_propagate(llama: PreTrainedModel) -> None:
    def broken(max_tokens: int) -> Any:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        bench_speed(llama, [Contender("broken", "quantized", broken)], contexts=[4], batches=[1])


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"contexts": [1]}, "at least 2 tokens"),
        ({"batches": [0]}, "at least 1 row"),
        ({"contexts": []}, "at least one context"),
        ({"steps": 0}, "at least 1"),
    ],
)
def test_impossible_sizes_are_refused(llama: PreTrainedModel, sizes: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"contexts": [8], "batches": [1], **sizes}
    with pytest.raises(ValueError, match=message):
        bench_speed(llama, default_contenders(llama, {}, "packed"), **arguments)


# ---------------------------------------------------------------------------- the command
@pytest.fixture
def use_model(monkeypatch: pytest.MonkeyPatch, llama: PreTrainedModel) -> list[argparse.Namespace]:
    """The command loads the tiny Llama and a character tokenizer; returns the args it was loaded with."""
    calls: list[argparse.Namespace] = []
    tokenizer = char_tokenizer()

    def load(args: argparse.Namespace) -> tuple[Any, Any]:
        calls.append(args)
        return llama, tokenizer

    monkeypatch.setattr(_steps, "load_model_and_tokenizer", load)
    return calls


def run_bench(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["bench", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_prints_the_table_and_writes_json(
    tmp_path: Path, use_model: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    arguments = [*SMALL, "--presets", "seed", "int4", "--batches", "1", "2", "--json", str(out), "-q"]
    code, stdout, stderr = run_bench(arguments, capsys)
    assert code == 0, stderr
    assert stderr == ""  # -q: no progress, no notes
    lines = stdout.splitlines()
    assert lines[0].split() == " ".join(TABLE_COLUMNS).split()
    names = ["DynamicCache", "StaticCache", "seed packed", "int4 packed"]
    assert [line.split()[:2] for line in lines[1:9]] == [[str(CONTEXT), str(b)] for b in (1, 2) for _ in names]
    data = json.loads(out.read_text())
    assert [row["cache"] for row in data["rows"]] == names * 2 and set(data["rows"][0]) == ROW_KEYS
    settings = data["settings"]
    assert settings["presets"] == ["seed", "int4"] and settings["storage"] == "packed"
    assert settings["device"] == "cpu" and settings["dtype"] == "float32" and settings["batches"] == [1, 2]
    assert settings["calibration"] == {"source": "built-in corpus, calibration split", "samples": 2, "seq_len": 32}
    for row in data["rows"]:
        base = next(r for r in data["rows"] if r["kind"] == "dynamic" and r["batch"] == row["batch"])
        assert row["decode_ms_vs_dynamic"] == pytest.approx(row["decode_ms"] / base["decode_ms"], rel=1e-12)
        assert row["kv_bytes_vs_dynamic"] == pytest.approx(row["kv_bytes"] / base["kv_bytes"], rel=1e-12)
    assert use_model[0].device == "cpu"
    # the same output again is refused without --force (exit 3), replaced with it
    code, _, stderr = run_bench(arguments, capsys)
    assert code == cli.EXIT_INPUT and "--force" in stderr and len(use_model) == 1
    assert run_bench([*arguments, "--force"], capsys)[0] == 0


def test_json_to_stdout_sends_the_table_and_progress_to_stderr(
    use_model: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, stderr = run_bench(
        [*SMALL, "--presets", "seed", "--no-static", "--storage", "fake", "--json", "-"], capsys
    )
    assert code == 0, stderr
    data = json.loads(stdout)  # nothing else on stdout
    assert [row["cache"] for row in data["rows"]] == ["DynamicCache", "seed fake"]
    assert data["rows"][1]["kv_parts"]["codes"] == 0  # fake storage keeps dequantized states
    assert "calibrating seed" in stderr and "bench: 100%" in stderr
    assert "decode ms/token" in stderr


def test_scales_benches_a_saved_state(
    tmp_path: Path,
    use_model: list[argparse.Namespace],
    llama: PreTrainedModel,
    quantizers: dict[str, KVQuantizer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = quantizers["int4"].save(tmp_path / "kv_scales.safetensors")
    code, stdout, stderr = run_bench([*SMALL, "--scales", str(tmp_path), "--no-static", "--json", "-", "-q"], capsys)
    assert code == 0, stderr
    data = json.loads(stdout)
    assert [row["cache"] for row in data["rows"]] == ["DynamicCache", f"{tmp_path} packed"]
    assert data["settings"]["scales"] == str(path) and "presets" not in data["settings"]
    cache = held_after_bench(llama, quantizers["int4"].new_cache(storage="packed"), 1)
    assert data["rows"][1]["kv_bytes"] == sum(layer["total"] for layer in cache.memory_report())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--contexts", "1"], "--contexts 1: a context needs at least 2 tokens"),
        (["--batches", "0"], "--batches 0: a batch needs at least 1 row"),
        (["--presets", "seed", "int5"], "--presets int5: unknown preset; choose from seed"),
        (["--scales", "missing-dir"], "missing-dir"),
        (["--read-codes", "--storage", "fake"], "--read-codes with --storage fake: attention reads codes from packed"),
        (["--compiled-kernels", "--storage", "fake"], "--compiled-kernels with --storage fake: the compiled kernels"),
    ],
)
def test_bad_input_exits_3_before_the_model_loads(
    arguments: list[str], message: str, use_model: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = run_bench(arguments, capsys)
    assert code == cli.EXIT_INPUT == 3
    assert stderr.startswith("quantcache: error: ") and message in stderr and "Traceback" not in stderr
    assert not use_model


def test_a_context_beyond_the_models_positions_exits_3(
    use_model: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = run_bench(["--contexts", "300", "--presets", "seed", "--samples", "1", "--seq-len", "16"], capsys)
    assert code == cli.EXIT_INPUT and "256 positions" in stderr and "--contexts 300" in stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_device_exits_3(use_model: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_bench(["--device", "cuda"], capsys)
    assert code == cli.EXIT_INPUT and "CUDA is not available" in stderr and "--device cpu" in stderr
    assert not use_model


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--presets", "seed", "--scales", "x"], "not allowed with"),
        (["--storage", "bits"], "--storage"),
        (["--steps", "0"], "--steps"),
        (["--contexts", "many"], "--contexts"),
    ],
)
def test_usage_errors_exit_2(
    arguments: list[str], message: str, use_model: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = run_bench(arguments, capsys)
    assert code == cli.EXIT_USAGE and message in stderr and not use_model


def test_help_has_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples" in text and "quantcache bench --contexts 2048 8192 --batches 1 8" in text
    assert "exit codes" in text and "bench" in cli.COMMANDS


def test_bench_takes_the_options_every_command_shares() -> None:
    parser = cli.build_parser(["bench"])
    bench: argparse.ArgumentParser = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["bench"]
    options = {option for action in bench._actions for option in action.option_strings}
    wanted = {"--presets", "--scales", "--storage", "--contexts", "--batches", "--steps", "--repeats", "--json"}
    assert wanted | {"--force", "--device", "--dtype", "--model", "-q"} <= options
