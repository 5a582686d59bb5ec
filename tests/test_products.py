"""``few_rows_matmul``: ``@`` eagerly; in a compiled graph, a sum of products for a few rows, ``@`` beyond."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcache.ops.products import FUSED_ROWS, few_rows_matmul

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def traced(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``few_rows_matmul`` traced by Dynamo into one graph (run eagerly), fresh for every shape."""
    torch.compiler.reset()
    return torch.compile(few_rows_matmul, backend="eager", fullgraph=True, dynamic=False)(rows, matrix)  # type: ignore[no-any-return]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 3), min_size=0, max_size=2),
    st.integers(1, 9),
    st.integers(1, 70),
    st.integers(1, 70),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_a_few_rows_are_multiplied_as_matmul_does(
    batch: list[int], m: int, k: int, n: int, batched_matrix: bool, seed: int
) -> None:
    """Eager: ``@`` itself. Traced: the sum of products, ``@``'s value up to the order of additions (float64), with
    ``@``'s broadcasting of a ``(k, n)`` or batched matrix, transposed views included."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(*batch, m, k, generator=generator, dtype=torch.float64)
    shape = (*batch, n, k) if batched_matrix else (n, k)
    matrix = torch.randn(*shape, generator=generator, dtype=torch.float64).transpose(-1, -2)
    expected = rows @ matrix
    assert torch.equal(few_rows_matmul(rows, matrix), expected)
    assert torch.allclose(traced(rows, matrix), expected, rtol=1e-12, atol=1e-12)


def test_past_the_fused_rows_a_graph_keeps_the_library_product() -> None:
    """A graph computes up to ``FUSED_ROWS`` rows itself, in another order of additions (float32 differs from
    ``@`` in the last bits somewhere); one more row, and it is ``@``'s own result, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(64, 64, generator=generator)
    few, many = (torch.randn(1, rows, 64, generator=generator) for rows in (FUSED_ROWS, FUSED_ROWS + 1))
    assert not torch.equal(traced(few, matrix), few @ matrix)
    assert torch.allclose(traced(few, matrix), few @ matrix, rtol=1e-5, atol=1e-5)
    assert torch.equal(traced(many, matrix), many @ matrix)
