"""Fixed orthogonal rotations of head_dim, to spread outlier channels before quantization.

A key or value vector ``x`` of one head is stored as ``R x`` and read back as
``R^T (R x)``: with ``R`` orthogonal the round trip is exact, and the quantization
error has the same norm in both spaces. What changes is the distribution the
quantizer sees: a rotation mixes every channel into every coordinate, so the few
outlier channels of keys no longer set the range of a whole token.

``R`` is a randomized Hadamard matrix (``H diag(signs) / sqrt(d)``, the signs drawn
from ``seed``) when ``head_dim`` is a power of two, else a seeded random orthogonal
matrix (QR of a Gaussian). The seed is part of the config, so a saved state rebuilds
exactly the same ``R``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quantcache.ops.products import few_rows_matmul

__all__ = ["rotate", "rotation_matrix", "unrotate"]


@lru_cache(maxsize=32)
def _matrix(head_dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if head_dim & (head_dim - 1) == 0:
        hadamard = torch.ones(1, 1, dtype=torch.float64)
        while hadamard.shape[0] < head_dim:
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
        signs = torch.randint(0, 2, (head_dim,), generator=generator, dtype=torch.float64) * 2 - 1
        matrix = hadamard * signs / math.sqrt(head_dim)
    else:
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        matrix = q * torch.sign(torch.diagonal(r))
    return matrix.to(torch.float32)


def rotation_matrix(head_dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthogonal ``(head_dim, head_dim)`` float32 matrix ``R`` for ``seed``."""
    return _matrix(head_dim, seed).to(device)


def rotate(states: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``(..., head_dim)`` states -> ``R x`` for every vector, in float32."""
    return few_rows_matmul(states.float(), matrix.T)


def unrotate(rotated: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``R^T y``, in float32."""
    return few_rows_matmul(rotated.float(), matrix)
