from __future__ import annotations

import itertools

import pytest
import torch

from metaembed import Budget
from metaembed.index.kernels import maxsim_grouped
from metaembed.quantize import round_trip_int8
from metaembed.scoring import maxsim_reference

BOUNDS = (0, 1, 4, 8, 16, 64)


def split(candidates: torch.Tensor) -> list[torch.Tensor]:
    return [candidates[:, a:b].contiguous() for a, b in itertools.pairwise(BOUNDS)]


@pytest.mark.parametrize("budget", [*Budget.LADDER, Budget(3, 5), Budget(16, 20)], ids=str)
def test_grouped_equals_plain_maxsim(budget):
    gen = torch.Generator().manual_seed(7)
    q, c = torch.randn(3, 16, 32, generator=gen), torch.randn(200, 64, 32, generator=gen)
    expected = maxsim_reference(q, c, budget)
    torch.testing.assert_close(
        maxsim_grouped(q, split(c), budget, chunk_size=37).double(), expected, rtol=1e-5, atol=1e-5
    )


def test_int8_groups_score_the_quantised_query_against_the_dequantised_codes():
    gen = torch.Generator().manual_seed(8)
    q, c = torch.randn(2, 16, 16, generator=gen), torch.randn(50, 64, 16, generator=gen)
    scale = c.abs().amax(dim=-1) / 127
    codes = torch.round(c / scale[..., None]).to(torch.int8)
    dequantised = codes.double() * scale[..., None].double()
    groups, scales = split(codes), [scale[:, a:b] for a, b in itertools.pairwise(BOUNDS)]
    got = maxsim_grouped(q, groups, Budget(8, 16), scales)
    expected = maxsim_reference(round_trip_int8(q), dequantised, "8x16")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
