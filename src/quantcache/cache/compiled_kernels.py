"""Compiled kernels: a packed cache's per-token work run as code ``torch.compile`` generates, the model left eager.

A decode step of a packed cache quantizes the tokens that reach their codes (``mse`` range
search, rounds of query-aware rounding, packing) and, reading codes, computes attention over
the stored rows: hundreds of small tensor operations per layer, each a few microseconds of
dispatch in eager PyTorch, and a kernel launch each on a GPU. With
``quantizer.new_cache(storage="packed", compiled=True)`` those two calls run through
``torch.compile`` (inductor: C++ with OpenMP on a CPU, Triton on a GPU) while the model and the
rest of the cache stay eager. Compiling a whole model takes minutes to tens of minutes; these graphs compile
in under a minute (about 40 s for ``int4``'s on 2 CPU cores, with no inductor cache yet), and every layer of
one scheme shares them, since their guards are on shapes and settings, not on which layer calls.

What runs compiled: encoding up to :data:`COMPILED_TOKENS` new tokens with no hook listening
(decode steps, short chunks; a prompt's prefill stays eager, where query-aware rounding takes
its keys one coordinate at a time), and attention from codes (``read_codes=True``), whose products
with the codes the kernel computes from the stored bytes (:mod:`quantcache.ops.code_attention`); the
history's length becomes a dynamic size after its first change, so a growing context does not compile
again.

Each scheme (the key and value streams' settings and where keys are stored relative to RoPE)
gets kernels with a code object of its own, so a quantizer mixing schemes does not spend one
scheme's recompile budget on another's graphs. Before each call, the layer's
derived tensors are made on the device (:meth:`LayerQuantizer.ready_on`): a graph whose first
call made one would be guarded on its absence and compile again on the next.

Dynamo checks a compiled graph's guards before every call, and a decode step calls these kernels twice per
layer with the model's weights streamed through the caches in between: on a CPU, checking the few hundred guards
Dynamo places on a quantizer's object tree, cold, took about 200 µs per call, 10-15% of a SmolLM2 step at 2048
tokens. The kernels keep the guards that tell one call's inputs from another's and leave out those that re-check
quantcache's own code and scheme (:func:`kernel_guards`). Reaching those guards through ``torch.compile``'s
wrapper and Dynamo's frame evaluation costs too: a compiled call of two operations took 115-125 µs cold on a CPU
against 25-30 µs eager. Each kernel is therefore a :class:`GuardedKernel`, which checks the guards of the graphs
Dynamo made for it itself and runs the code Dynamo made for the first whose guards pass (that call: 55-65 µs cold;
``int8``'s kernels at 2048 tokens, paired cold calls: 14 µs less per attention call, 8 µs per encoding call, about
1 % of a SmolLM2 step); where none pass, the call goes through ``torch.compile``, which compiles.

Results are eager's up to float rounding (a generated kernel may sum in another order): a
key element sitting on a rounding boundary may take the neighbouring code.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from quantcache.cache.layer import LayerQuantizer

if TYPE_CHECKING:
    from quantcache.cache.attention import CodeReader

__all__ = [
    "ATTEND_OPTIONS",
    "BACKEND",
    "COMPILED_TOKENS",
    "KERNEL_OPTIONS",
    "LEFT_OUT_GUARDS",
    "GuardedKernel",
    "attend",
    "compiled_copy",
    "encode_rows",
    "guarded_kernel",
    "kernel_guards",
    "kernels_made",
    "reset",
]

COMPILED_TOKENS = 64
"""New tokens per encoding call up to which the compiled kernel runs: decode steps, tokens leaving a residual window
in blocks, and short chunks; longer calls (prefills) run eagerly."""
BACKEND: str | Callable[..., Any] = "inductor"
"""The ``torch.compile`` backend kernels are made with (read when a scheme's kernels are first made)."""
KERNEL_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}
"""Inductor settings for every kernel: the code that allocates a graph's buffers and calls its loops and library
functions is generated as C++ rather than Python. A decode step's graphs are many small loops (encoding one token:
a few µs each), so calling them cost more than running them: 40-60 µs less per encoding call on a CPU."""
ATTEND_OPTIONS: dict[str, Any] = {**KERNEL_OPTIONS, "realize_reads_threshold": 1}
"""Inductor settings for the attention kernel: :data:`KERNEL_OPTIONS`, and every value read more than once is
computed once and stored, not recomputed inside each loop that reads it (the value rows' weights, a division and a
scale lookup per row, would otherwise be redone for every query and block of channels the mix sums: 4-16% of the
kernel's time on a CPU, SmolLM2 at 2048-8192 tokens). Settings this version of inductor lacks are left out."""


LEFT_OUT_GUARDS = frozenset(
    {
        "ID_MATCH",
        "CLOSURE_MATCH",
        "DICT_NOT_CONTAINS",
        "NOT_PRESENT_IN_GENERIC_DICT",
        "DIMENSION_DYNAMIC_MARKING_GUARD",
    }
)
"""Kinds of Dynamo guard the kernels leave out, with every guard on a module-level name other than a tensor's: the
identity of an object (the enum members a scheme's settings are, functions, classes, modules), a function's closure,
that an object has no attribute of its own shadowing a method of its class, and that no tensor has had a dimension
marked dynamic since (``torch._dynamo.mark_dynamic``: five per tensor, 75 of the attention kernel's 160 checks, each
an attribute lookup that fails; a graph whose sizes the tensor guards accept computes the same whatever a mark says:
about 15-20 µs less per cold call)."""


def kernel_guards(entries: Sequence[Any]) -> list[bool]:
    """Which of the guards Dynamo made for a kernel's graph it keeps (``torch.compile``'s ``guard_filter_fn``).

    Kept: every tensor's dtype, device, shape and strides (a tensor found through a module-level name too), the
    relations between the sizes a graph is symbolic in, the value of every plain attribute a graph read (a flag, an
    int, whether a tensor is ``None``), types, and the global state (grad mode, default dtype, function modes). Left
    out (:data:`LEFT_OUT_GUARDS`) is what only changes when quantcache's code or a scheme does: kernels are made per
    scheme (its settings' enum members are equal for every quantizer that reaches them) and read quantcache's
    functions, classes and module settings as they were when they compiled; :func:`reset` makes them again.
    ``entries`` are Dynamo's ``GuardFilterEntry`` records (``guard_type``, ``is_global``).
    """
    return [
        entry.guard_type == "TENSOR_MATCH" or not (entry.is_global or entry.guard_type in LEFT_OUT_GUARDS)
        for entry in entries
    ]


def compiled_copy(function: Callable[..., Any], tag: str, **options: Any) -> Callable[..., Any]:
    """``torch.compile(function, **options)`` of a copy of ``function`` with a code object of its own (``tag`` in its
    name).

    Dynamo keeps its graphs, the sizes it has seen change and its recompile count per code object:
    callers that share one function would share them, each one's changing sizes made dynamic in the
    other's graphs and every graph counted against one limit.
    """
    return torch.compile(_own_copy(function, tag), **options)


def _own_copy(function: Callable[..., Any], tag: str) -> types.FunctionType:
    """A copy of ``function`` with a code object of its own, ``tag`` in its name."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{tag}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


def _encode_rows(
    quantizer: LayerQuantizer, keys: torch.Tensor, values: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`LayerQuantizer.encode`, in a function of this module's that each scheme's kernel copies."""
    return quantizer.encode(keys, values, start)


def _attend(reader: CodeReader, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    return reader.attend(query, mask, scaling)


_CACHE_ENTRIES: Callable[[types.CodeType], list[Any]] | None
_EVAL_FRAME_CALLBACK: Callable[[], Any] | None
try:  # private names of Dynamo's: a torch without them calls every kernel through torch.compile
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, get_eval_frame_callback

    _CACHE_ENTRIES, _EVAL_FRAME_CALLBACK = _debug_get_cache_entry_list, get_eval_frame_callback
except ImportError:  # pragma: no cover - every torch quantcache is tested with has both
    _CACHE_ENTRIES = _EVAL_FRAME_CALLBACK = None


def _cache_entries() -> Callable[[types.CodeType], list[Any]] | None:
    """Dynamo's ``_debug_get_cache_entry_list`` (a code object's compiled graphs, each with the ``code`` Dynamo made
    and its ``guard_manager``, in the order Dynamo tries them), or ``None`` where this torch lacks it or the callback
    :func:`_eval_frame_callback` reads."""
    return None if _EVAL_FRAME_CALLBACK is None else _CACHE_ENTRIES


def _eval_frame_callback() -> Any:
    """The callback Dynamo evaluates Python frames with now: ``None`` outside any ``torch.compile``d call (only
    called where :func:`_cache_entries` found Dynamo's names)."""
    assert _EVAL_FRAME_CALLBACK is not None
    return _EVAL_FRAME_CALLBACK()


def _runs_graphs_directly() -> bool:
    """Whether a :class:`GuardedKernel` may run a graph itself: ``torch.compiler.set_stance`` at its default (no
    forced backend), the only stance under which Dynamo runs the graph whose guards pass, and no Dynamo callback
    evaluating frames (inside a ``torch.compile``d function's eager stretches, Dynamo would take the graph's code
    for a new frame to compile)."""
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)
    return (
        stance is not None and stance.stance == "default" and stance.backend is None and _eval_frame_callback() is None
    )


class GuardedKernel:
    """A ``torch.compile``d function called straight into the code Dynamo made for the first of its graphs whose
    guards pass.

    Calling ``torch.compile``'s wrapper runs Python of its own and Dynamo's frame evaluation before checking the
    guards; cold (a decode step streams the model's weights through the CPU's caches between two kernel calls)
    that was 90-100 µs of a do-nothing compiled call's 115-125 µs. This checks the same guards, each graph's
    ``guard_manager`` over the call's arguments by name, in Dynamo's order, and calls that graph's code (Dynamo's
    bytecode, which reads the graph's inputs from the arguments and calls the compiled graph): what Dynamo would
    run. Where no graph's guards pass (a first call, a new shape), where ``torch.compiler.set_stance`` is not at its
    default (``force_eager`` ...), inside a ``torch.compile``d function, or where this torch lacks the means, the
    call goes through ``compiled``, which compiles, recompiles or runs eagerly as Dynamo decides.

    ``function`` is what ``compiled`` compiles (its code object holds the graphs); its arguments are positional.
    """

    def __init__(self, function: types.FunctionType, compiled: Callable[..., Any]) -> None:
        self.function, self.compiled = function, compiled
        code = function.__code__
        self.names = code.co_varnames[: code.co_argcount]
        self._entries = _cache_entries()
        self._made: dict[types.CodeType, Callable[..., Any]] = {}  # Dynamo's code per graph, as a function

    def __call__(self, *args: Any) -> Any:
        graph = self._passing_graph(args) if self._entries is not None and _runs_graphs_directly() else None
        return self.compiled(*args) if graph is None else graph(*args)

    def _passing_graph(self, args: tuple[Any, ...]) -> Callable[..., Any] | None:
        """The code of the first graph whose guards pass for ``args``, as a function; ``None`` if none does."""
        assert self._entries is not None
        frame_locals = dict(zip(self.names, args, strict=True))
        try:
            for entry in self._entries(self.function.__code__):
                if entry.guard_manager.check(frame_locals):
                    return self._graph_code(entry.code)
        except (AttributeError, TypeError):  # a torch whose cache entries differ: Dynamo calls from now on
            self._entries = None
        return None

    def graphs(self) -> int:
        """How many graphs Dynamo holds for this kernel."""
        return 0 if self._entries is None else len(self._entries(self.function.__code__))

    def _graph_code(self, code: types.CodeType) -> Callable[..., Any]:
        made = self._made.get(code)
        if made is None:
            function = self.function
            made = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__)
            self._made[code] = made
        return made


def guarded_kernel(function: Callable[..., Any], tag: str, **options: Any) -> GuardedKernel:
    """:func:`compiled_copy` of ``function`` (positional arguments only), called through :class:`GuardedKernel`."""
    copy = _own_copy(function, tag)
    return GuardedKernel(copy, torch.compile(copy, **options))


class _Kernels(NamedTuple):
    encode_rows: GuardedKernel
    attend: GuardedKernel


_KERNELS: dict[Hashable, _Kernels] = {}
_MAKING = threading.Lock()


def _scheme(quantizer: LayerQuantizer) -> Hashable:
    """What a layer's kernels depend on besides shapes: both streams' settings and where keys meet RoPE."""
    return (quantizer.key.args, quantizer.value.args, quantizer.key_rope is not None, quantizer.rope_center)


def _kernels_for(quantizer: LayerQuantizer) -> _Kernels:
    scheme = _scheme(quantizer)
    found = _KERNELS.get(scheme)
    if found is None:
        with _MAKING:
            found = _KERNELS.get(scheme)
            if found is None:
                tag = f"scheme{len(_KERNELS)}"
                encode = guarded_kernel(_encode_rows, tag, backend=BACKEND, **_compile_options(KERNEL_OPTIONS))
                attend = guarded_kernel(_attend, tag, backend=BACKEND, **_compile_options(ATTEND_OPTIONS))
                found = _KERNELS[scheme] = _Kernels(encode, attend)
    return found


def _compile_options(settings: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keywords for a kernel: :func:`_inductor_options`' and :func:`kernel_guards` as its guard
    filter (where this torch takes one)."""
    options = dict(_inductor_options(settings).get("options", {}))
    if hasattr(torch.compiler, "skip_guard_on_globals_unsafe"):  # came with guard_filter_fn
        options["guard_filter_fn"] = kernel_guards
    return {"options": options} if options else {}


def _inductor_options(settings: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keywords passing those of ``settings`` this inductor knows, when :data:`BACKEND` is it."""
    if BACKEND != "inductor":
        return {}
    import torch._inductor.config as inductor_config

    known = {name: value for name, value in settings.items() if hasattr(inductor_config, name)}
    return {"options": known} if known else {}


def kernels_made() -> int:
    """How many schemes have compiled kernels in this process."""
    return len(_KERNELS)


def reset() -> None:
    """Forget every scheme's kernels: the next call makes and compiles them again (with the :data:`BACKEND` then
    set). ``torch.compiler.reset()`` drops the graphs, not these functions."""
    with _MAKING:
        _KERNELS.clear()


def encode_rows(
    quantizer: LayerQuantizer, keys: torch.Tensor, values: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled: :meth:`LayerQuantizer.encode`'s packed ``(batch, kv_heads, tokens, row_bytes)`` key and value rows of
    states at positions ``start..`` (no sink tokens among them)."""
    quantizer.ready_on(keys.device)
    rows: tuple[torch.Tensor, torch.Tensor] = _kernels_for(quantizer).encode_rows(quantizer, keys, values, start)
    return rows


def attend(reader: CodeReader, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Compiled: :meth:`CodeReader.attend` (``(batch, heads, n, head_dim)`` queries -> ``(batch, n, heads,
    head_dim)`` outputs)."""
    reader.quantizer.ready_on(query.device)
    output: torch.Tensor = _kernels_for(reader.quantizer).attend(reader, query, mask, scaling)
    return output
