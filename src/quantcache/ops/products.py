"""Matrix products of a few rows, written so that a compiled graph computes them in its own loops.

A decode step's per-token work multiplies a handful of rows (one token's key and value, a step's
queries) by small matrices: ``(head_dim, head_dim)`` rotations, the full-precision sink and window
rows. Eagerly a library matrix product is the fastest way. Inside a
graph ``torch.compile`` makes, each such product stays a call into that library between the
generated loops: a few microseconds of call, allocation and (on a CPU) thread hand-over each, for
a few thousand multiply-adds. Written as a sum of elementwise products, inductor fuses the product
into the loops that produce its operands and consume its result.
"""

from __future__ import annotations

import torch

__all__ = ["FUSED_ROWS", "few_rows_matmul"]

FUSED_ROWS = 256
"""Rows of the left operand (all leading dimensions together) up to which a compiled graph computes a product in
its own loops; a longer one (a prompt's states, in a graph of a whole model's step) stays a library product."""


def few_rows_matmul(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``rows @ matrix``: ``(..., m, k)`` by ``(..., k, n)`` (or ``(k, n)``), broadcast as ``@`` broadcasts.

    Eager code, and compiled code with more than :data:`FUSED_ROWS` rows, calls ``@``; compiled code with
    fewer sums the products over ``k`` instead, which is the same value up to the order of the additions.
    """
    if torch.compiler.is_compiling() and rows.numel() <= FUSED_ROWS * rows.shape[-1]:
        return (rows.unsqueeze(-1) * matrix.unsqueeze(-3)).sum(-2)
    return rows @ matrix
