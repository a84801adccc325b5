"""A tiny real HSRDiff learns a fixed 16×16 toy set: its loss must fall clearly within seconds."""

from __future__ import annotations

import statistics

import torch

from monai_hsrdiff.diffusion import DiffusionSchedule, SelfRegulatedDiffusion
from monai_hsrdiff.networks import HSRDiff


def disks(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred disks of n radii; the condition image is a constant whose value encodes the radius."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r2 = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2
    radii = torch.linspace(2.5, 6.5, n)
    masks = (r2[None] <= radii[:, None, None] ** 2).float()
    condition = (radii / 4 - 1).reshape(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return condition, (2 * masks - 1)[:, None]


def test_tiny_srdiff_loss_falls_on_toy_disks():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        condition, x0 = disks()
        net = HSRDiff(
            spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
            norm_num_groups=4, num_head_channels=8, num_res_blocks=1, prediction="srdiff",
        )
        process = SelfRegulatedDiffusion(DiffusionSchedule(250))
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        history = []
        for _ in range(150):
            terms = process.training_losses(net, x0, condition, generator=generator)
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
            history.append(terms.as_dict())
    finally:
        torch.set_num_threads(threads)
    first = statistics.mean(h["loss"] for h in history[:20])
    last = statistics.mean(h["loss"] for h in history[-20:])
    assert last < 0.5 * first, (first, last)
    # both prediction paths learn, and κ stays a proper weight
    for key in ("loss_x0", "loss_eps"):
        assert statistics.mean(h[key] for h in history[-20:]) < statistics.mean(h[key] for h in history[:20])
    assert all(0.0 < h["kappa"] < 1.0 for h in history)
