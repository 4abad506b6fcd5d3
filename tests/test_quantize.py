"""The one int8 quantiser, against its definition: round(x / (max|x| / 127)), halves to even, in float32."""

from __future__ import annotations

import torch

from metaembed.quantize import quantize_int8, round_trip_int8


def definition(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = x.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(x / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def test_codes_and_scales_are_the_definitions_on_random_vectors_ties_and_zeros():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, 96, generator=gen) * torch.rand(500, 7, 1, generator=gen) * 10
    ties = torch.arange(-127, 128, dtype=torch.float32) + 0.5  # every value a tie once scaled (max 127.5 -> scale)
    ties[-1] = 127.0  # keep max|x| = 127 so scale = 1 and x / scale is exactly the tie
    x = torch.cat([x.reshape(-1, 96), torch.zeros(1, 96)])
    for batch in (x, ties[None], -ties[None]):
        codes, scale = quantize_int8(batch)
        want_codes, want_scale = definition(batch.float())
        assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    codes, _ = quantize_int8(ties[None])
    assert codes[0, :4].tolist() == [-126, -126, -124, -124]  # -126.5 -> -126, -125.5 -> -126: halves to even


def test_the_round_trip_stays_within_half_a_step_of_each_value():
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(1))
    _, scale = quantize_int8(x)
    assert ((round_trip_int8(x) - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
