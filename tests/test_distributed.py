"""quantcache.calibration.distributed: calibration across processes, and models split across devices.

The central claim is exactness: two gloo processes, each calibrating its share of the
batches and all-reducing with MIN/MAX, must freeze to the very tensors one process gets on
all batches. The test launches this file as the worker under ``python -m
torch.distributed.run`` (what ``torchrun`` and ``accelerate launch`` run), once, for every
scenario; the in-process tests cover sharding, the single-process fallbacks and a model
whose layers accelerate offloads to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, build_model
from test_cli import char_tokenizer
from transformers import PreTrainedModel

from quantcache import KVQuantConfig, QuantizedCalibratingCache, QuantStateError
from quantcache.cache.model_facts import CACHE_KEYWORD
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.distributed import (
    all_reduce_statistics,
    calibrate_distributed,
    ensure_process_group,
    is_main_process,
    launcher_process_group,
    shard_batches,
)
from quantcache.state.file import read_state_file
from quantcache.state.schema import CalibrationLength

WINDOWS = 5
# name -> (number of windows, batch size, config): even, uneven and "one rank gets nothing"
SCENARIOS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "even": (4, 1, {}),
    "uneven": (5, 2, {"symmetric": False, "exclude": ["model.layers.0.self_attn"]}),
    "lonely": (1, 1, {}),
    # keys the static seed (MIN/MAX), values centred int4 (their mean's sum and count add up: SUM)
    "centred": (4, 1, {"value": {"dtype": "int4", "scope": "per_token", "dynamic": True, "center": True}}),
    # keys query-aware and rounding so (their key and query sums and query moments add up too: SUM), values centred
    "query-aware": (
        4,
        1,
        {
            "dtype": "int4",
            "scope": "per_token",
            "dynamic": True,
            "center": True,
            "pre_rope_keys": True,
            "key": {
                "dtype": "int4",
                "scope": "per_token",
                "dynamic": True,
                "center": True,
                "query_aware": True,
                "rounding": "query_aware",
            },
        },
    ),
}
EXACT = ("even", "uneven", "lonely")  # min/max reductions: bit for bit


def windows(count: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (count, 16), generator=torch.Generator().manual_seed(7))


@contextmanager
def one_thread() -> Iterator[None]:
    """Both sides compute with one thread, so per-window forward passes are the same arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ================================================================================ the worker
def worker(out: Path) -> None:
    """Run by every rank under torch.distributed.run: each scenario, plus hand-made statistics and a shape clash."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    with launcher_process_group() as active:
        assert active
        scenarios(out, dist.get_rank())
    # The context left the group on every rank: nothing is left for the interpreter's exit to tear down.
    (out / f"left-rank{int(os.environ['RANK'])}.json").write_text(json.dumps(not dist.is_initialized()))


def scenarios(out: Path, rank: int) -> None:
    import torch.distributed as dist

    model = build_model("llama")
    report: dict[str, Any] = {"backend": dist.get_backend(), "world": dist.get_world_size()}
    for name, (count, batch_size, config) in SCENARIOS.items():
        report[f"{name}-batches"] = len(shard_batches(windows(count), batch_size=batch_size))
        cache = calibrate_distributed(
            model,
            windows(count),
            quant_config=KVQuantConfig(**config),
            batch_size=batch_size,
            output=out / f"{name}.safetensors",
            progress=False,
        )
        cache.save(out / f"{name}-rank{rank}.safetensors")
    # Hand-made: rank 0 observed only layer 0, rank 1 only layer 1; the union must have both.
    cache = QuantizedCalibratingCache(model)
    mine = torch.full((2, 16), float(rank + 1))
    cache.load_state_dict(
        {f"layers.{rank}.{s}.{f}": sign * mine for s in ("key", "value") for f, sign in (("min", -1), ("max", 1))},
        strict=False,
    )
    all_reduce_statistics(cache)
    cache.freeze().save(out / f"handmade-rank{rank}.safetensors")
    # Ranks that calibrate different model shapes must be told so, on every rank.
    other = build_model("llama", num_key_value_heads=4) if rank == 1 else model
    clash = calibrate(other, windows(1), freeze=False, progress=False).new_cache()
    try:
        all_reduce_statistics(clash)
    except QuantStateError as error:
        report["clash"] = str(error)
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        str(out),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


# ================================================================================ two processes
@pytest.mark.parametrize("scenario", EXACT)
def test_two_gloo_ranks_freeze_to_the_single_process_state_bit_for_bit(
    scenario: str, two_ranks: Path, llama: PreTrainedModel
) -> None:
    count, batch_size, config = SCENARIOS[scenario]
    with one_thread():
        single = calibrate(
            llama, windows(count), quant_config=KVQuantConfig(**config), batch_size=batch_size, progress=False
        ).new_cache()
    written = read_state_file(two_ranks / f"{scenario}.safetensors")
    assert written.mode == "frozen" and written.config == single.quant_config
    # every rank records the windows of all ranks, as one process does (4, 5 and 1 windows of 16 tokens)
    length = CalibrationLength(tokens_per_window=16, windows=count)
    assert written.calibration == single.quantizer.calibration_length == length
    for rank in (0, 1):
        assert read_state_file(two_ranks / f"{scenario}-rank{rank}.safetensors").calibration == length
    expected = single.state_dict()
    for source in (
        written.tensors,
        *(read_state_file(two_ranks / f"{scenario}-rank{r}.safetensors").tensors for r in (0, 1)),
    ):
        assert source.keys() == expected.keys()
        for key, tensor in expected.items():
            assert source[key].dtype == tensor.dtype and torch.equal(source[key], tensor), (scenario, key)


def test_two_ranks_centre_on_the_mean_of_all_their_tokens(two_ranks: Path, llama: PreTrainedModel) -> None:
    """Centred streams sum their means' sums and counts over the ranks: every rank freezes to the single-process
    center (float32 additions in another order), the seed keys of the same layers still bit for bit."""
    count, batch_size, config = SCENARIOS["centred"]
    with one_thread():
        single = calibrate(
            llama, windows(count), quant_config=KVQuantConfig(**config), batch_size=batch_size, progress=False
        ).new_cache()
    expected = single.state_dict()
    assert {key.rsplit(".", 1)[1] for key in expected if ".value." in key} == {"center_sum", "center_count", "center"}
    for rank in (0, 1):
        tensors = read_state_file(two_ranks / f"centred-rank{rank}.safetensors").tensors
        assert tensors.keys() == expected.keys()
        for key, tensor in expected.items():
            if ".key." in key or key.endswith("center_count"):
                assert torch.equal(tensors[key], tensor), key
            else:
                torch.testing.assert_close(tensors[key], tensor, rtol=1e-5, atol=1e-5)


def test_two_ranks_weigh_keys_by_the_queries_of_all_their_tokens(two_ranks: Path, llama: PreTrainedModel) -> None:
    """Query-aware keys sum their key and query statistics (and query moments) over the ranks: every rank freezes to
    the single-process channel scales and query model (float32 additions in another order)."""
    count, batch_size, config = SCENARIOS["query-aware"]
    with one_thread():
        single = calibrate(
            llama, windows(count), quant_config=KVQuantConfig(**config), batch_size=batch_size, progress=False
        ).new_cache()
    expected = single.state_dict()
    assert "layers.0.key.channel_scale" in expected and "layers.0.key.query_moment_sum" in expected
    for rank in (0, 1):
        tensors = read_state_file(two_ranks / f"query-aware-rank{rank}.safetensors").tensors
        assert tensors.keys() == expected.keys()
        for key, tensor in expected.items():
            if key.endswith("count"):
                assert torch.equal(tensors[key], tensor), key
            elif key.endswith("query_factor"):  # an eigenvector: compared as the matrix it models
                torch.testing.assert_close(tensors[key] @ tensors[key].mT, tensor @ tensor.mT, rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(tensors[key], tensor, rtol=1e-5, atol=1e-5)


def test_ranks_shared_the_batches_and_used_gloo(two_ranks: Path) -> None:
    reports = [json.loads((two_ranks / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["backend"] for r in reports] == ["gloo", "gloo"] and reports[0]["world"] == 2
    assert [r["even-batches"] for r in reports] == [2, 2]
    assert [r["uneven-batches"] for r in reports] == [2, 1]
    assert [r["lonely-batches"] for r in reports] == [1, 0]


def test_every_rank_left_the_launchers_group(two_ranks: Path) -> None:
    assert [json.loads((two_ranks / f"left-rank{r}.json").read_text()) for r in (0, 1)] == [True, True]


def test_statistics_one_rank_lacks_come_from_the_other(two_ranks: Path) -> None:
    for rank in (0, 1):
        state = read_state_file(two_ranks / f"handmade-rank{rank}.safetensors").tensors
        assert torch.equal(state["layers.0.key.max"], torch.full((2, 16), 1.0))
        assert torch.equal(state["layers.1.value.min"], torch.full((2, 16), -2.0))


def test_ranks_with_different_model_shapes_are_told_on_every_rank(two_ranks: Path) -> None:
    for rank in (0, 1):
        message = json.loads((two_ranks / f"report-rank{rank}.json").read_text())["clash"]
        assert "the ranks calibrate different models" in message


# ================================================================================ one process
def test_shard_batches_deals_whole_batches_round_robin() -> None:
    data = windows(5)
    batches = [shard_batches(data, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    assert [b.shape[0] for b in batches[0]] == [2, 1] and [b.shape[0] for b in batches[1]] == [2]
    assert torch.equal(batches[0][1], data[4:]) and torch.equal(batches[1][0], data[2:4])
    listed = [data[:1], data[1:3], data[3:]]
    assert shard_batches(listed, rank=1, world_size=2) == [listed[1]]
    assert len(shard_batches(data)) == 5  # no group: everything, one row per batch
    flat = data[0]
    assert shard_batches(flat, rank=0, world_size=2)[0] is flat  # left whole for calibrate().new_cache() to reject
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard_batches(data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        shard_batches(data, batch_size=0)


def test_without_a_process_group_everything_is_single_process(llama: PreTrainedModel, tmp_path: Path) -> None:
    assert not ensure_process_group() and is_main_process()
    with launcher_process_group() as active:
        assert not active
    assert not torch.distributed.is_initialized()
    cache = calibrate(llama, windows(3), freeze=False, progress=False).new_cache()
    before = cache.state_dict()
    assert all_reduce_statistics(cache) is cache
    assert all(torch.equal(before[k], v) for k, v in cache.state_dict().items())
    result = calibrate_distributed(llama, windows(3), output=tmp_path / "kv.safetensors", progress=False)
    reference = calibrate(llama, windows(3), progress=False).new_cache().state_dict()
    saved = read_state_file(tmp_path / "kv.safetensors").tensors
    assert all(torch.equal(saved[k], v) and torch.equal(result.state_dict()[k], v) for k, v in reference.items())


def test_all_reduce_refuses_a_frozen_cache(llama: PreTrainedModel) -> None:
    with pytest.raises(QuantStateError, match=r"before freeze\(\).*unfreeze\(\)"):
        all_reduce_statistics(calibrate(llama, windows(1), progress=False).new_cache())


# ================================================================================ split models
def test_a_model_with_layers_offloaded_to_disk_calibrates_to_the_same_state(
    llama: PreTrainedModel, tmp_path: Path
) -> None:
    accelerate = pytest.importorskip("accelerate")
    split = build_model("llama")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    split = accelerate.dispatch_model(
        split, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload")
    )
    assert split.model.layers[1].self_attn.k_proj.weight.device.type == "meta"  # streamed from disk per forward
    reference = calibrate(llama, windows(3), progress=False).new_cache()
    dispatched = calibrate(split, windows(3), progress=False).new_cache()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(dispatched.state_dict()[key], tensor), key
        assert dispatched.state_dict()[key].device == tensor.device
    saved = read_state_file(dispatched.save(tmp_path / "kv.safetensors"))
    assert {int(k.split(".")[1]) for k in saved.tensors} == {0, 1}  # the file gathers every layer
    ids = windows(1)
    with torch.no_grad():
        expected = llama(ids, **{CACHE_KEYWORD: reference.empty_copy()}).logits
        assert torch.equal(split(ids, **{CACHE_KEYWORD: dispatched.empty_copy()}).logits, expected)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="worker for test_distributed.py (run under torch.distributed.run)")
    parser.add_argument("--worker", type=Path, required=True)
    worker(parser.parse_args().worker)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as quantcache.cli.entry does after a process group: teardown of its threads can abort


def test_the_calibrate_command_under_torchrun_writes_the_single_process_state(
    tmp_path: Path, llama: PreTrainedModel
) -> None:
    """``quantcache calibrate`` unchanged under a launcher: two gloo ranks share the windows, rank 0 writes the set,
    and the state equals one process calibrating the same windows (batch size 1: the same batches either way)."""
    model_dir = tmp_path / "tiny-llama"
    llama.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(4000)))
    common = ["calibrate", "--model", str(model_dir), "--text-file", str(text), "--samples", "4", "--seq-len", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "rank-logs"  # each rank's own stdout/stderr, shown if the launcher fails
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launcher += ["--redirects", "3", "--log-dir", str(logs)]

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)

    two = run(*launcher, "-m", "quantcache", *common, "-q", "-o", str(tmp_path / "two"))
    one = run(sys.executable, "-m", "quantcache", *common, "-q", "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    rank_output = "".join(f"\n--- {p.relative_to(logs)}\n{p.read_text()[-1500:]}" for p in sorted(logs.rglob("*.log")))
    assert two.returncode == 0, two.stderr[-1500:] + rank_output
    single = read_state_file(tmp_path / "one" / "kv_scales.safetensors").tensors
    shared = read_state_file(tmp_path / "two" / "kv_scales.safetensors").tensors
    assert single.keys() == shared.keys() and all(torch.equal(single[k], shared[k]) for k in single)
    assert (tmp_path / "two" / "kv_scales.json").is_file() and (tmp_path / "two" / "kv_scales.md").is_file()


@pytest.mark.parametrize("left", [False, True])
def test_the_entry_point_skips_teardown_only_after_leaving_a_process_group(
    monkeypatch: pytest.MonkeyPatch, left: bool
) -> None:
    """A rank that left the launcher's group ends with os._exit (libtorch's thread teardown can abort at
    interpreter exit); any other run exits normally, with the same code either way."""
    import quantcache.calibration.distributed as distributed
    from quantcache import cli

    exits: list[tuple[str, int]] = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(distributed, "_left_group", left)
    monkeypatch.setattr(cli.os, "_exit", lambda code: exits.append(("os._exit", code)))
    monkeypatch.setattr(cli.sys, "exit", lambda code: exits.append(("sys.exit", code)))
    cli.entry()
    assert exits == ([("os._exit", 3), ("sys.exit", 3)] if left else [("sys.exit", 3)])
