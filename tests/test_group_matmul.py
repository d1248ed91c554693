"""`group_matmul`: one matrix product per KV group with several threads, the batched call with one; both equal
torch.matmul."""

import pytest
import torch

from llm_heatmap.probes.group_matmul import group_matmul


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_group_matmul_equals_the_batched_product(threads, batch):
    """Group by group (several threads) or batched (one), into `out` (a view of a larger buffer, as the capture's
    scores) or a new tensor, with a transposed right side (q k^T): the same as torch.matmul."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(batch, 3, 7, 16, generator=generator)
    b = torch.randn(batch, 3, 11, 16, generator=generator).transpose(-1, -2)
    expected = torch.matmul(a, b)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        buffer = torch.full((batch * 3 * 7 * 11 + 5,), float("nan"))
        into = buffer[:batch * 3 * 7 * 11].view(batch, 3, 7, 11)
        returned = group_matmul(a, b, out=into)
        made = group_matmul(a, b)
    finally:
        torch.set_num_threads(saved)
    assert returned.data_ptr() == into.data_ptr()
    torch.testing.assert_close(into, expected)
    torch.testing.assert_close(made, expected)
    assert buffer[-5:].isnan().all()
