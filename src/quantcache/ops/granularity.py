"""Granularity: which elements share a scale, in one place.

Key/value states are ``(batch, kv_heads, seq, head_dim)``. A granularity says over
which dimensions statistics are reduced, what shape the parameters have and how they
broadcast back against the states:

============  =======  =================================  ==============================
scope         dynamic  parameter shape                    one parameter per
============  =======  =================================  ==============================
per_tensor    no       ``()``                             layer and stream
per_head      no       ``(kv_heads,)``                    kv head
per_channel   no       ``(kv_heads, head_dim)``           kv head and channel (the seed)
group         no       ``(kv_heads, head_dim // g)``      kv head and group of g channels
per_token     yes      ``(batch, kv_heads, seq, 1)``      token and kv head
group         yes      ``(batch, kv_heads, seq, d // g)`` token, kv head and channel group
============  =======  =================================  ==============================

The math works on the *grouped view* of the states: ``(batch, kv_heads, seq,
head_dim // g, g)`` for ``group`` and the states themselves otherwise, so a group is
just one more axis to reduce over.

A dynamic group size need not divide ``head_dim``: the last group is shorter (the
only group, when ``g`` exceeds ``head_dim``). The grouped view pads it with zeros,
which leave a symmetric range unchanged and sit inside every range that takes in zero
(``zero_point_format: int8``); an ``int16`` asymmetric range of that group is widened
to zero by them. The codes of the padding are never stored. Calibrated (static)
groups must divide ``head_dim``: padding would enter their statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantcache.scheme.args import QuantArgs, QuantScope

__all__ = ["Granularity"]

# Reduction dimensions of the grouped view, for static (calibrated) parameters.
_STATIC_DIMS: dict[QuantScope, tuple[int, ...]] = {
    QuantScope.PER_TENSOR: (0, 1, 2, 3),
    QuantScope.PER_HEAD: (0, 2, 3),
    QuantScope.PER_CHANNEL: (0, 2),
    QuantScope.GROUP: (0, 2, 4),
}


@dataclass(frozen=True)
class Granularity:
    """Parameter shape, reductions and broadcasting for one scope (see the module docstring)."""

    scope: QuantScope = QuantScope.PER_CHANNEL
    dynamic: bool = False
    group_size: int | None = None

    @classmethod
    def of(cls, args: QuantArgs) -> Granularity:
        return cls(args.scope, args.dynamic, args.group_size)

    # ------------------------------------------------------------------ shapes
    def param_shape(self, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of static parameters for a layer of ``kv_heads`` heads of ``head_dim`` channels."""
        if self.dynamic:
            raise ValueError("dynamic parameters have no fixed shape: they follow the states")
        if self.scope is QuantScope.PER_TENSOR:
            return ()
        if self.scope is QuantScope.PER_HEAD:
            return (kv_heads,)
        if self.scope is QuantScope.GROUP:
            return (kv_heads, head_dim // self._group(head_dim))
        return (kv_heads, head_dim)

    @property
    def one_step_per_row(self) -> bool:
        """Whether every element of a ``(head_dim,)`` row shares one scale (per token, head or tensor)."""
        return self.scope not in (QuantScope.PER_CHANNEL, QuantScope.GROUP)

    def _group(self, head_dim: int) -> int:
        size = self.group_size
        if size is None or (head_dim % size and not self.dynamic):
            raise ValueError(f"group_size {size} does not divide head_dim {head_dim}")
        return size

    def groups(self, head_dim: int) -> int:
        """Groups per kv head: ``ceil(head_dim / g)`` (1 outside the ``group`` scope)."""
        return -(-head_dim // self._group(head_dim)) if self.scope is QuantScope.GROUP else 1

    def grouped(self, states: torch.Tensor) -> torch.Tensor:
        """The view the math works on: ``(b, h, s, ceil(d / g), g)`` for groups, the states otherwise."""
        if self.scope is not QuantScope.GROUP:
            return states
        head_dim = states.shape[-1]
        size, groups = self._group(head_dim), self.groups(head_dim)
        if groups * size != head_dim:  # a shorter last group, padded with zeros (see the module docstring)
            states = torch.nn.functional.pad(states, (0, groups * size - head_dim))
        return states.reshape(*states.shape[:-1], groups, size)

    def ungrouped(self, grouped: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Inverse of :meth:`grouped`: back to ``(b, h, s, head_dim)``, without the padding."""
        if self.scope is not QuantScope.GROUP:
            return grouped
        flat = grouped.flatten(-2)
        return flat if flat.shape[-1] == head_dim else flat[..., :head_dim]

    # ------------------------------------------------------------------ reductions
    def reduce(self, states: torch.Tensor, op: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``op`` (``torch.amin``, ``torch.amax`` ...) over the elements that share a parameter.

        ``states`` is ``(batch, kv_heads, seq, head_dim)``; the result has the static
        parameter shape, or the dynamic one with kept dimensions for broadcasting.
        """
        view = self.grouped(states)
        if self.dynamic:
            return op(view, dim=-1, keepdim=True)
        return op(view, dim=_STATIC_DIMS[self.scope])

    def broadcast(self, param: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
        """``param`` reshaped to broadcast against the grouped view ``grouped`` (no copy)."""
        if self.dynamic or self.scope is QuantScope.PER_TENSOR:
            return param
        if self.scope is QuantScope.PER_HEAD:
            return param.view(-1, 1, 1)
        if self.scope is QuantScope.GROUP:
            return param.unsqueeze(-2).unsqueeze(-1)  # (h, 1, G, 1)
        return param.unsqueeze(-2)  # (h, 1, d)

    def params_per_token(self, kv_heads: int, head_dim: int) -> int:
        """Parameters a dynamic scheme stores per token (per kv-head group of each token); 0 if static."""
        if not self.dynamic:
            return 0
        return kv_heads * self.groups(head_dim)
