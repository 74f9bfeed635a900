"""Spatial Composite's mix (lib_multilora/spatial.py): the formula on small tensors, its limits, its row trackers."""

from __future__ import annotations

import torch

from lib_multilora.inner import composite_mean
from lib_multilora.spatial import StackedCondRows, chunk_cond_rows, patch_cosines, spatial_mix

torch.manual_seed(0)


def outputs(
    n: int, rows: int = 2, size: int = 8
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, 4, size, size)
    sigma = torch.rand(rows) + 0.5
    base = torch.randn(rows, 4, size, size)
    return [base + 0.3 * torch.randn_like(base) for _ in range(n)], base, x, sigma


def test_a_huge_temperature_is_the_composite_mean() -> None:
    ds, base, x, sigma = outputs(3)
    mixed = spatial_mix(ds, base, x, sigma, torch.tensor([True, False]), patch=4, temperature=1e9)
    torch.testing.assert_close(mixed, composite_mean(ds), atol=1e-5, rtol=1e-5)


def test_a_lora_and_its_copy_mix_to_that_lora() -> None:
    ds, base, x, sigma = outputs(1)
    mixed = spatial_mix([ds[0], ds[0].clone()], base, x, sigma, torch.tensor([True, True]), patch=4, temperature=0.05)
    torch.testing.assert_close(mixed, ds[0], atol=1e-6, rtol=1e-6)


def test_the_lora_that_moves_a_patch_most_leads_there_and_uncond_rows_get_the_mean() -> None:
    x, sigma = torch.zeros(2, 4, 8, 8), torch.ones(2)
    base = torch.randn(2, 4, 8, 8)
    first, second = base.clone(), base.clone()
    first[:, :, :4, :4] += 3 * torch.randn(2, 4, 4, 4)  # moves the top-left patch only
    second[:, :, 4:, 4:] += 3 * torch.randn(2, 4, 4, 4)  # moves the bottom-right patch only
    mixed = spatial_mix([first, second], base, x, sigma, torch.tensor([True, False]), patch=4, temperature=0.05)
    torch.testing.assert_close(mixed[0, :, :4, :4], first[0, :, :4, :4], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(mixed[0, :, 4:, 4:], second[0, :, 4:, 4:], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(mixed[1], (first[1] + second[1]) / 2, atol=1e-6, rtol=1e-6)


def test_composite_weights_are_a_prior_and_patches_need_not_divide_the_latent() -> None:
    ds, base, x, sigma = outputs(2, size=10)
    even = spatial_mix(ds, base, x, sigma, torch.tensor([True, True]), patch=4, temperature=1e9, weights=[0.75, 0.25])
    torch.testing.assert_close(even, 0.75 * ds[0] + 0.25 * ds[1], atol=1e-5, rtol=1e-5)
    assert patch_cosines(ds[0], base, 4).shape == (2, 3, 3), "10 = 4 + 4 + a zero-padded 2"


def test_row_trackers() -> None:
    rows = StackedCondRows()
    assert rows(2) is None, "before the denoiser said how many cond rows"
    rows.start(3)  # an AND prompt: 3 cond rows, then the uncond
    assert rows(2).tolist() == [True, True] and rows(2).tolist() == [True, False], "in chunks, in order"
    rows.start(1)
    assert rows(2).tolist() == [True, False]
    assert chunk_cond_rows([1, 0], 4).tolist() == [False, False, True, True]
    assert chunk_cond_rows([1, 0], 3) is None
