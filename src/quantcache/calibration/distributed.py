"""Calibration across processes: each rank sees a share of the batches, the ranges are all-reduced.

A per-channel range is a min and a max, and the min/max of a union is the min/max of the
parts' mins/maxes. So calibrating ``N`` processes on disjoint shares of the windows and
all-reducing the statistics with ``MIN``/``MAX`` gives exactly (bit for bit) the state one
process gets on all windows, provided every forward pass sees the same batches:
:func:`shard_batches` deals out whole batches, never re-batches windows.

The reduction goes through the cache's public state (``state_dict`` min/max tensors and
``load_state_dict``), before :meth:`~quantcache.cache.cache.QuantizedCalibratingCache.freeze`.
Statistics live on each layer's own device (a model split with ``device_map="auto"`` or
accelerate offload hooks keeps them there); only the reduction buffer visits the
backend's device (CPU for gloo, the rank's GPU for NCCL) and the results go back where
they came from. Typical use, under ``torchrun`` or ``accelerate launch``::

    from quantcache.calibration.distributed import calibrate_distributed
    cache = calibrate_distributed(model, windows, output="runs/big/kv_scales.safetensors")

Without an initialised process group (or with ``WORLD_SIZE`` unset) everything here is a
no-op around single-process calibration.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from quantcache.cache.cache import QuantizedCalibratingCache
from quantcache.cache.kv_quantizer import KVQuantizer
from quantcache.cache.stream import StreamName
from quantcache.calibration.calibrate import calibrate
from quantcache.calibration.length_check import ContextLengthWarning
from quantcache.errors import QuantStateError
from quantcache.ops.observers import QueryAwareCenterObserver
from quantcache.scheme.args import Rounding
from quantcache.scheme.config import KVQuantConfig

__all__ = [
    "all_reduce_statistics",
    "calibrate_distributed",
    "ensure_process_group",
    "is_main_process",
    "launcher_process_group",
    "left_a_process_group",
    "shard_batches",
]

_STREAMS: tuple[StreamName, StreamName] = ("key", "value")


def _active(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_main_process() -> bool:
    """Rank 0 of the default group, or the only process: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def ensure_process_group(backend: str | None = None) -> bool:
    """Initialise the default process group from the launcher's environment when there is one.

    ``torchrun`` and ``accelerate launch`` set ``WORLD_SIZE``, ``RANK`` and the rendezvous
    address; this joins that group (``nccl`` when CUDA is available, else ``gloo``, unless
    ``backend`` says otherwise). Returns whether more than one process takes part.
    """
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=chosen)
    return _active()


@contextmanager
def launcher_process_group(backend: str | None = None) -> Iterator[bool]:
    """Join the launcher's group for the ``with`` block, then leave it together with every rank.

    Yields what :func:`ensure_process_group` returns. On the way out, when this call created
    the group, every rank meets at a barrier (so rank 0 has finished writing before any rank
    exits) and the group is destroyed. A rank that exits while it still holds a group its
    peers are using can abort in the backend's teardown; this avoids it. When an exception
    leaves the block, the barrier is skipped (the launcher stops the other ranks) but the
    group is still destroyed.
    """
    created = dist.is_available() and not dist.is_initialized()
    active = ensure_process_group(backend)
    created = created and dist.is_initialized()
    global _left_group
    try:
        yield active
    except BaseException:
        if created:
            dist.destroy_process_group()
            _left_group = True
        raise
    if created:
        if active:
            dist.barrier()
        dist.destroy_process_group()
        _left_group = True


_left_group = False


def left_a_process_group() -> bool:
    """Whether :func:`launcher_process_group` created and destroyed a group in this process.

    Such a process should end with ``os._exit`` once its output is flushed (the command
    line's entry point does): libtorch's teardown of the backend's threads at interpreter
    exit can abort ("terminate called without an active exception", SIGABRT) after all
    the work is done and written, which a launcher reports as a failed rank.
    """
    return _left_group


def shard_batches(
    data: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[torch.Tensor]:
    """This rank's batches: ``data`` cut as :func:`~quantcache.calibration.calibrate` cuts it, dealt round-robin.

    ``data`` is one ``(num_samples, seq_len)`` tensor (split into ``batch_size`` rows) or
    an iterable of batches (each kept whole). Rank ``r`` of ``w`` gets batches
    ``r, r + w, ...``; a rank may get none when there are fewer batches than ranks.
    """
    active = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if active else 0
    if world_size is None:
        world_size = dist.get_world_size() if active else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    if isinstance(data, torch.Tensor):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        # Anything but a non-empty 2-D tensor stays whole, so calibrate() reports what is wrong with it.
        well_formed = data.dim() == 2 and data.shape[0] > 0
        batches: Sequence[torch.Tensor] = list(torch.split(data, batch_size)) if well_formed else [data]
    else:
        batches = list(data)
    return list(batches[rank::world_size])


def _reduction_device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_statistics(
    cache: KVQuantizer | QuantizedCalibratingCache, *, group: dist.ProcessGroup | None = None
) -> KVQuantizer | QuantizedCalibratingCache:
    """Replace every rank's statistics with those of all ranks together (in place; returns ``cache``).

    Min/max statistics are reduced with MIN/MAX (bit for bit what one process would have
    collected); a centred dynamic stream's ``center_sum`` and ``center_count`` (and a
    query-aware one's key and query sums) with SUM (the same means, up to the order of
    float32 additions), as is the query moment of query-aware rounding.

    Call it on every rank, after each rank calibrated its share and before ``freeze()``.
    A layer one rank never observed counts as ``+inf``/``-inf`` there, so any rank's
    observation wins; a layer no rank observed stays unobserved (``freeze()`` then names it).
    A no-op without an initialised multi-process group.
    """
    if cache.is_frozen:
        raise QuantStateError(
            "all_reduce_statistics works on statistics and must run before freeze(); call cache.unfreeze() "
            "first (the statistics are kept) and freeze again afterwards"
        )
    if not _active(group):
        return cache
    quantizer = cache.quantizer if isinstance(cache, QuantizedCalibratingCache) else cache
    for index in quantizer.quantized_layers:
        for stream_name in _STREAMS:
            args = quantizer.stream_args(index, stream_name)
            if not args.dynamic and (args.method.value != "minmax" or args.scope.value != "per_channel"):
                raise QuantStateError(
                    f"distributed calibration merges per-channel min/max statistics; the {stream_name} scheme "
                    f"({args.method.value}, {args.scope.value}) needs a single process (or the seed scheme)"
                )
    state = cache.state_dict()
    layers = cache.quantized_layers
    device = _reduction_device(group)
    # All ranks must agree on the buffer shape, including ranks that saw nothing: one MAX
    # reduction of (shape, -shape) gives the largest and the smallest shape any rank observed.
    observed = next((tuple(t.shape) for t in state.values()), None)
    unseen = 2**62  # a rank without statistics must not lower the smallest shape
    local = [*observed, *(-v for v in observed)] if observed else [0, 0, -unseen, -unseen]
    shapes = torch.tensor(local, dtype=torch.int64, device=device)
    dist.all_reduce(shapes, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = shapes[:2].tolist(), [-v for v in shapes[2:].tolist()]
    _all_reduce_calibration_length(quantizer, device, group)
    if largest == [0, 0]:
        return cache  # no rank observed anything; freeze() will say so
    if largest != smallest:
        raise QuantStateError(
            f"ranks hold statistics of different shapes (kv_heads, head_dim) between {tuple(smallest)} and "
            f"{tuple(largest)}: the ranks calibrate different models"
        )
    heads, channels = (int(v) for v in largest)
    lows = torch.full((len(layers), 2, heads, channels), float("inf"), dtype=torch.float32, device=device)
    highs = torch.full_like(lows, float("-inf"))
    summed = QueryAwareCenterObserver.fields  # every summed field; a centred stream uses the first two
    sums = torch.zeros((len(layers), 2, len(summed), heads, channels), dtype=torch.float32, device=device)
    moments = torch.zeros((len(layers), heads, channels, channels), dtype=torch.float32, device=device)  # keys'
    homes: dict[tuple[int, int], torch.device] = {}
    for row, index in enumerate(layers):
        for column, stream in enumerate(_STREAMS):
            low = state.get(f"layers.{index}.{stream}.min")
            high = state.get(f"layers.{index}.{stream}.max")
            if low is not None and high is not None:
                lows[row, column] = low.to(device)
                highs[row, column] = high.to(device)
                homes[(index, column)] = low.device
            for slot, field in enumerate(summed):
                tensor = state.get(f"layers.{index}.{stream}.{field}")
                if tensor is not None:
                    sums[row, column, slot] = tensor.to(device)
                    homes[(index, column)] = tensor.device
            moment = state.get(f"layers.{index}.{stream}.query_moment_sum")
            if moment is not None:
                moments[row] = moment.to(device)
    dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if any(quantizer.stream_args(index, "key").rounding is Rounding.QUERY_AWARE for index in layers):
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=group)
    fallback = next(iter(homes.values()), torch.device("cpu"))
    merged: dict[str, torch.Tensor] = {}
    for row, index in enumerate(layers):
        layer: dict[str, torch.Tensor] = {}
        for column, stream in enumerate(_STREAMS):
            home = homes.get((index, column), fallback)
            fields = quantizer.statistic_fields(index, stream)
            if not fields:
                continue
            if quantizer.stream_args(index, stream).dynamic:  # centred: its mean's sum and count
                if not bool((sums[row, column, 1] > 0).all()):
                    break  # no rank observed this layer
                for field in fields:
                    reduced = moments[row] if field == "query_moment_sum" else sums[row, column, summed.index(field)]
                    layer[f"layers.{index}.{stream}.{field}"] = reduced.to(home)
                continue
            if not bool(torch.isfinite(lows[row, column]).all()):
                break  # no rank observed this layer
            layer[f"layers.{index}.{stream}.min"] = lows[row, column].to(home)
            layer[f"layers.{index}.{stream}.max"] = highs[row, column].to(home)
        else:
            merged.update(layer)
    cache.load_state_dict(merged, strict=False)
    return cache


def _all_reduce_calibration_length(
    quantizer: KVQuantizer, device: torch.device, group: dist.ProcessGroup | None
) -> None:
    """Record the calibration length of all ranks together: every rank's windows, the longest window's tokens."""
    known = quantizer.calibration_length
    windows = torch.tensor([known.windows if known else 0], dtype=torch.int64, device=device)
    tokens = torch.tensor([known.tokens_per_window if known else 0], dtype=torch.int64, device=device)
    dist.all_reduce(windows, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(tokens, op=dist.ReduceOp.MAX, group=group)
    if int(windows) > 0 and int(tokens) > 0:
        quantizer._count_calibration(int(tokens), int(windows) - (known.windows if known else 0))


def calibrate_distributed(
    model: nn.Module,
    data: torch.Tensor | Iterable[torch.Tensor],
    *,
    quant_config: KVQuantConfig | None = None,
    batch_size: int = 1,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
    context: int | None = None,
) -> KVQuantizer:
    """Calibrate this rank's share of ``data``, all-reduce, freeze; rank 0 writes ``output``.

    Every rank passes the same ``data``; :func:`shard_batches` picks its batches. All ranks
    return the same frozen quantizer. ``output`` is written by rank 0 only, and every rank
    waits for it, so a script may read the file right after this returns. ``context`` is
    :func:`~quantcache.calibration.calibrate.calibrate`'s (rank 0 alone warns).
    """
    rank = dist.get_rank(group) if _active(group) else 0
    world = dist.get_world_size(group) if _active(group) else 1
    mine = shard_batches(data, batch_size=batch_size, rank=rank, world_size=world)
    if mine:
        with warnings.catch_warnings():
            if rank != 0:  # one warning for the run, not one per process
                warnings.simplefilter("ignore", ContextLengthWarning)
            cache = calibrate(
                model, mine, quant_config=quant_config, freeze=False, progress=progress and rank == 0, context=context
            )
    else:
        cache = KVQuantizer(model, quant_config)
    all_reduce_statistics(cache, group=group)
    cache.freeze()
    if output is not None:
        if rank == 0:
            cache.save(Path(output))
        if _active(group):
            dist.barrier(group=group)
    return cache
