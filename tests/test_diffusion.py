"""Closed-form tests of the HSRDiff diffusion process, samplers and sampling pipeline.

Reference values are computed independently: β from ``numpy.linspace`` in float64, ᾱ as a
float64 product, the posterior from Bayes' rule on two Gaussians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

from monai_hsrdiff.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionSchedule,
    HSRDiffPipeline,
    SelfRegulatedDiffusion,
    auto_batch_size,
    default_beta_range,
    get_sampler,
)
from monai_hsrdiff.networks import HSRDiff

T = 250
REF_BETAS = np.linspace(4e-4, 0.08, T)  # 1000/T · (1e-4, 0.02)
REF_ACP = np.cumprod(1.0 - REF_BETAS)


def ref_acp(t: int) -> float:
    """ᾱ_t with ᾱ_{-1} = 1 (0-based t)."""
    return 1.0 if t < 0 else float(np.prod(1.0 - REF_BETAS[: t + 1]))


def tiny_net(prediction: str = "srdiff", out_channels: int = 1, condition: str = "hierarchical") -> HSRDiff:
    torch.manual_seed(0)
    return HSRDiff(
        spatial_dims=2,
        in_channels=1,
        out_channels=out_channels,
        channels=(8, 16),
        attention_levels=(False, False),
        norm_num_groups=4,
        num_head_channels=8,
        num_res_blocks=1,
        prediction=prediction,
        condition=condition,
    )


@dataclass
class Out:
    eps: torch.Tensor | None
    x0: torch.Tensor | None
    kappa: torch.Tensor | None


class Oracle(nn.Module):
    """Returns the true ε and x0 of ``training_losses`` (given explicitly), and a fixed κ."""

    out_channels = 1

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor, kappa: float = 0.7) -> None:
        super().__init__()
        self.x0, self.noise, self.kappa = x0, noise, kappa

    def forward(self, x, timesteps, condition=None, condition_features=None):
        return Out(self.noise.clone(), self.x0.clone(), torch.full((x.shape[0],), self.kappa, dtype=x.dtype))


@pytest.fixture(scope="module")
def process() -> SelfRegulatedDiffusion:
    return SelfRegulatedDiffusion(DiffusionSchedule(T))


# ---- schedule ------------------------------------------------------------------------------


def test_schedule_beta_range_and_alpha_bar(process):
    s = process.schedule
    assert default_beta_range(1000) == pytest.approx((1e-4, 0.02))
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    np.testing.assert_allclose(s.betas.numpy(), REF_BETAS, rtol=1e-6)  # MONAI's β are float32-rounded
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), REF_ACP, rtol=1e-5)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    # ᾱ_T close to pure noise with the scaled range (it would be ≈0.08 with MONAI's 1e-4..0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(ref_acp(T - 1), rel=1e-5)
    assert s.alphas_cumprod[-1].item() < 1e-4
    unscaled = DiffusionSchedule(T, beta_start=1e-4, beta_end=0.02)
    assert 0.05 < unscaled.alphas_cumprod[-1].item() < 0.1


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DiffusionSchedule(1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiffusionSchedule(10)  # 1000/10 · 0.02 = 2 > 1
    with pytest.raises(ValueError, match="linear schedules"):
        DiffusionSchedule(T, schedule="cosine", beta_start=0.1)


def test_extract_casts_to_input_dtype_and_checks_range(process):
    x32 = torch.zeros(2, 1, 4, 4)
    v = process.schedule.extract("betas", torch.tensor([0, T - 1]), x32)
    assert v.dtype == torch.float32 and v.shape == (2, 1, 1, 1)
    assert v[1].item() == pytest.approx(0.08, rel=1e-6)
    for bad in (torch.tensor([T]), torch.tensor([-1])):
        with pytest.raises(ValueError, match=r"\{0\.\.249\}"):
            process.schedule.extract("betas", bad, x32)


# ---- forward process and posterior ---------------------------------------------------------


def test_q_sample_moments(process):
    x0 = torch.tensor([-1.0, 1.0, 0.5, -0.25], dtype=torch.float64).reshape(1, 1, 2, 2)
    n, t = 40000, 60
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    xt = process.q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), t), noise)
    a = ref_acp(t)
    mean, var = xt.mean(0), xt.var(0)
    tol = 4 * np.sqrt((1 - a) / n)  # 4 standard errors of the mean
    np.testing.assert_allclose(mean.numpy(), np.sqrt(a) * x0[0].numpy(), atol=tol)
    np.testing.assert_allclose(var.numpy(), np.full((1, 2, 2), 1 - a), rtol=0.03)


@pytest.mark.parametrize("t", [1, 2, 17, 120, 249])
def test_posterior_matches_bayes_rule(process, t):
    # p(x_{t-1}|x0) = N(sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1}),  p(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t)
    beta, a_prev = float(REF_BETAS[t]), ref_acp(t - 1)
    prior_mean_coef, prior_var = np.sqrt(a_prev), 1.0 - a_prev
    var = 1.0 / (1.0 / prior_var + (1.0 - beta) / beta)
    x0_coef = var * prior_mean_coef / prior_var
    xt_coef = var * np.sqrt(1.0 - beta) / beta
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    mean, variance, log_variance = process.q_posterior_mean_variance(x0, xt, torch.full((3,), t))
    torch.testing.assert_close(mean, x0_coef * x0 + xt_coef * xt, rtol=1e-5, atol=1e-7)
    assert variance.flatten()[0].item() == pytest.approx(var, rel=1e-5)
    assert log_variance.flatten()[0].item() == pytest.approx(np.log(var), rel=1e-5)


def test_posterior_at_t0_is_x0(process):
    x0 = torch.tensor([[[[-1.0, 1.0]]]], dtype=torch.float64)
    xt = torch.tensor([[[[0.3, -2.0]]]], dtype=torch.float64)
    mean, variance, log_variance = process.q_posterior_mean_variance(x0, xt, torch.tensor([0]))
    torch.testing.assert_close(mean, x0)
    assert variance.item() == 0.0
    # clipped: β̃_0 replaced by β̃_1
    beta1, a0 = float(REF_BETAS[1]), ref_acp(0)
    assert log_variance.item() == pytest.approx(np.log(beta1 * (1 - a0) / (1 - ref_acp(1))), rel=1e-5)


@pytest.mark.parametrize("t", [0, 5, 100, 249])
def test_modes_with_true_values_give_posterior_mean(process, t):
    g = torch.Generator().manual_seed(10 + t)
    x0 = torch.randint(0, 2, (2, 1, 4, 4), generator=g).double() * 2 - 1
    eps = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    tt = torch.full((2,), t)
    xt = process.q_sample(x0, tt, eps)
    mu_true = process.q_posterior_mean_variance(x0, xt, tt)[0]
    torch.testing.assert_close(process.mu_from_eps(xt, tt, eps), mu_true, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.mu_from_x0(xt, tt, x0), mu_true, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.predict_x0_from_eps(xt, tt, eps), x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(process.predict_eps_from_x0(xt, tt, x0), eps, rtol=1e-7, atol=1e-7)
    # μ_eps from its printed formula (paper Eq. 13), with independent coefficients
    beta, a = float(REF_BETAS[t]), ref_acp(t)
    mu_eps_ref = (xt - beta / np.sqrt(1 - a) * eps) / np.sqrt(1 - beta)
    torch.testing.assert_close(process.mu_from_eps(xt, tt, eps), mu_eps_ref, rtol=1e-5, atol=1e-6)


def test_kappa_mixing_reduces_to_each_mode(process):
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) * 3  # beyond [-1, 1] on purpose
    tt = torch.tensor([40, 200])
    mu_eps, mu_x = process.mu_from_eps(xt, tt, eps), process.mu_from_x0(xt, tt, x0)
    assert (mu_eps - mu_x).abs().max() > 1e-2  # the two modes differ, so the checks below can fail

    def kap(*v):
        return torch.tensor(v, dtype=torch.float64)

    torch.testing.assert_close(process.p_mean(Out(eps, x0, kap(1, 1)), xt, tt).mean, mu_x)
    torch.testing.assert_close(process.p_mean(Out(eps, x0, kap(0, 0)), xt, tt).mean, mu_eps)
    mixed = process.p_mean(Out(eps, x0, kap(0.25, 0.9)), xt, tt)
    k = kap(0.25, 0.9).reshape(2, 1, 1, 1)
    torch.testing.assert_close(mixed.mean, k * mu_x + (1 - k) * mu_eps)  # Eq. 8: κ on μ_x
    # ablations: dual → fixed weight, eps-only → κ=0, x0-only → κ=1
    dual = SelfRegulatedDiffusion(process.schedule, dual_weight=0.3).p_mean(Out(eps, x0, None), xt, tt)
    torch.testing.assert_close(dual.mean, 0.3 * mu_x + 0.7 * mu_eps)
    assert dual.kappa.tolist() == [0.3, 0.3]
    eps_only = process.p_mean(Out(eps, None, None), xt, tt)
    torch.testing.assert_close(eps_only.mean, mu_eps)
    assert eps_only.kappa.tolist() == [0.0, 0.0]
    torch.testing.assert_close(process.p_mean(Out(None, x0, None), xt, tt).mean, mu_x)
    # clipping applies to x_θ inside μ_x only
    clipped = process.p_mean(Out(eps, x0, kap(0.5, 0.5)), xt, tt, clip_x0=True).mean
    torch.testing.assert_close(clipped, 0.5 * process.mu_from_x0(xt, tt, x0.clamp(-1, 1)) + 0.5 * mu_eps)


def test_per_pixel_kappa_mixes_pixel_by_pixel(process):
    """A (B, 1, *spatial) κ (prediction="dynamic") mixes each pixel with its own weight, in μ_θ and in x̂0."""
    g = torch.Generator().manual_seed(12)
    xt = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)  # M = 2: the weight is shared by the channels
    eps = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    tt = torch.tensor([30, 220])
    kappa = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    mu_eps, mu_x = process.mu_from_eps(xt, tt, eps), process.mu_from_x0(xt, tt, x0)
    x0_eps = process.predict_x0_from_eps(xt, tt, eps)
    mixed = process.p_mean(Out(eps, x0, kappa), xt, tt)
    fused = process.fused_x0(Out(eps, x0, kappa), xt, tt)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                k = float(kappa[b, 0, i, j])
                want = k * mu_x[b, :, i, j] + (1 - k) * mu_eps[b, :, i, j]
                torch.testing.assert_close(mixed.mean[b, :, i, j], want, rtol=1e-12, atol=1e-12)
                want = k * x0[b, :, i, j] + (1 - k) * x0_eps[b, :, i, j]
                torch.testing.assert_close(fused.mean[b, :, i, j], want, rtol=1e-12, atol=1e-12)
    # the returned κ is the per-item spatial mean (one value per item and step, as for srdiff)
    torch.testing.assert_close(mixed.kappa, kappa.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(fused.kappa, kappa.mean(dim=(1, 2, 3)))
    # the posterior of the fused x̂0 is μ_θ, pixel by pixel
    torch.testing.assert_close(process.mu_from_x0(xt, tt, fused.mean), mixed.mean, rtol=1e-10, atol=1e-10)
    # a map constant over the pixels is the (B,) κ of the same value
    flat = torch.tensor([0.2, 0.8], dtype=torch.float64)
    const = flat.reshape(2, 1, 1, 1).expand(2, 1, 4, 4)
    torch.testing.assert_close(process.p_mean(Out(eps, x0, const), xt, tt).mean, process.p_mean(Out(eps, x0, flat), xt, tt).mean)
    # a (B, 1) or (B, 1, 1, 1) κ is still one per item, as before
    torch.testing.assert_close(process.p_mean(Out(eps, x0, flat.reshape(2, 1, 1, 1)), xt, tt).mean,
                               process.p_mean(Out(eps, x0, flat), xt, tt).mean)  # fmt: skip
    for bad in (torch.rand(2, 2, 4, 4), torch.rand(2, 1, 2, 2), torch.rand(3)):
        with pytest.raises(ValueError, match="resolve_kappa: κ must have shape"):
            process.p_mean(Out(eps, x0, bad.double()), xt, tt)


# ---- loss ----------------------------------------------------------------------------------


def test_oracle_model_has_zero_loss(process):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 2, (4, 1, 8, 8), generator=g).double() * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    terms = process.training_losses(Oracle(x0, noise), x0, None, t=torch.tensor([0, 3, 100, 249]), noise=noise)
    for name in ("loss", "loss_x0", "loss_eps", "loss_u"):
        assert abs(getattr(terms, name).item()) < 1e-20, name
    assert terms.kappa.item() == pytest.approx(0.7)


def test_loss_terms_by_hand(process):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 2, (2, 1, 4, 4), generator=g).double() * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    zeros = torch.zeros_like(x0)
    t = [7, 180]
    kappa = 0.4
    terms = process.training_losses(Oracle(zeros, zeros, kappa), x0, None, t=torch.tensor(t), noise=noise)
    assert terms.loss_x0.item() == pytest.approx(1.0)  # labels are ±1, x_θ = 0
    assert terms.loss_eps.item() == pytest.approx(noise.pow(2).mean().item())
    # μ̃ - μ_θ with ε_θ = x_θ = 0: μ_x = c_xt x_t, μ_eps = x_t/sqrt(1-β)
    per_item, per_item_eps = [], []
    for i, ti in enumerate(t):
        beta, a, a_prev = float(REF_BETAS[ti]), ref_acp(ti), ref_acp(ti - 1)
        xt = np.sqrt(a) * x0[i].numpy() + np.sqrt(1 - a) * noise[i].numpy()
        c_x0 = np.sqrt(a_prev) * beta / (1 - a)
        c_xt = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        mu_true = c_x0 * x0[i].numpy() + c_xt * xt
        mu_theta = kappa * c_xt * xt + (1 - kappa) * xt / np.sqrt(1 - beta)
        per_item.append(np.mean((mu_true - mu_theta) ** 2))
        per_item_eps.append(per_item[-1] / (beta / (np.sqrt(1 - a) * np.sqrt(1 - beta))) ** 2)
    assert terms.loss_u.item() == pytest.approx(np.mean(per_item), rel=1e-5)
    assert terms.loss.item() == pytest.approx(1.0 + noise.pow(2).mean().item() + np.mean(per_item), rel=1e-6)
    eps_space = SelfRegulatedDiffusion(process.schedule, unification_weighting="eps", lambda_u=2.0, lambda_d=0.5)
    terms_eps = eps_space.training_losses(Oracle(zeros, zeros, kappa), x0, None, t=torch.tensor(t), noise=noise)
    assert terms_eps.loss_u.item() == pytest.approx(np.mean(per_item_eps), rel=1e-5)
    assert terms_eps.loss.item() == pytest.approx(
        0.5 * (1.0 + noise.pow(2).mean().item()) + 2.0 * np.mean(per_item_eps), rel=1e-6
    )


def test_unification_weightings_by_hand(process):
    """x0: L_u = ‖x0 - x̂0‖² of the fused estimate; normalized: ‖κa + (1-κ)b‖²/‖a - b‖²."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randint(0, 2, (2, 1, 4, 4), generator=g).double() * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps_hat = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    x_hat = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 200])
    kappa = 0.3
    xt = process.q_sample(x0, t, noise)
    fused = kappa * x_hat + (1 - kappa) * process.predict_x0_from_eps(xt, t, eps_hat)
    x0_space = SelfRegulatedDiffusion(process.schedule, unification_weighting="x0")
    terms = x0_space.training_losses(Oracle(x_hat, eps_hat, kappa), x0, None, t=t, noise=noise)
    assert terms.loss_u.item() == pytest.approx((x0 - fused).pow(2).mean().item(), rel=1e-6)
    normalized = SelfRegulatedDiffusion(process.schedule, unification_weighting="normalized")
    terms = normalized.training_losses(Oracle(x_hat, eps_hat, kappa), x0, None, t=t, noise=noise)
    a = x_hat - x0  # in x0 space; the common μ̃ coefficient cancels in the ratio
    b = process.predict_x0_from_eps(xt, t, eps_hat) - x0
    ratio = (kappa * a + (1 - kappa) * b).pow(2).flatten(1).mean(1) / (a - b).pow(2).flatten(1).mean(1)
    assert terms.loss_u.item() == pytest.approx(ratio.mean().item(), rel=1e-6)


class _Linear(nn.Module):
    """ε_θ, x_θ and κ from three scalar parameters, to see which ones L_u's gradient reaches."""

    out_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.x = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
        self.k = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def forward(self, x, timesteps, condition=None, condition_features=None):
        return Out(self.e * x, self.x * x, torch.sigmoid(self.k).expand(x.shape[0]))


@pytest.mark.parametrize("weighting", ["paper", "eps", "x0", "normalized"])
def test_unification_detach_trains_only_kappa(process, weighting):
    x0 = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t = torch.tensor([10, 240])
    for detach in (False, True):
        proc = SelfRegulatedDiffusion(process.schedule, unification_weighting=weighting, unification_detach=detach)
        net = _Linear()
        out = net(proc.q_sample(x0, t, noise), t)
        loss_u = proc.unification_loss(out, x0, proc.q_sample(x0, t, noise), t)
        loss_u.backward()
        assert net.k.grad is not None and abs(net.k.grad.item()) > 0, (weighting, detach)
        reaches_heads = net.e.grad is not None and abs(net.e.grad.item()) > 0
        assert reaches_heads == (not detach), (weighting, detach)


def test_unification_loss_reaches_the_kappa_head(process):
    """L_u is the only loss of C_1, C_2 and Phi: every κ-head parameter gets a gradient from it."""
    net = tiny_net("srdiff")
    x0 = torch.randint(0, 2, (4, 1, 16, 16), generator=torch.Generator().manual_seed(9)).float() * 2 - 1
    c = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(10))
    for weighting in ("paper", "normalized"):
        net.zero_grad()
        proc = SelfRegulatedDiffusion(process.schedule, unification_weighting=weighting, unification_detach=True)
        terms = proc.training_losses(net, x0, c, t=torch.tensor([5, 60, 150, 240]), generator=torch.Generator().manual_seed(1))
        terms.loss.backward()
        grads = [p.grad for p in net.kappa_head.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), weighting
        net.zero_grad()
        terms = proc.training_losses(net, x0, c, t=torch.tensor([5, 60, 150, 240]), generator=torch.Generator().manual_seed(1))
        (terms.loss - proc.lambda_u * terms.loss_u).backward()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.kappa_head.parameters()), weighting


def test_unification_default_on_only_for_srdiff(process):
    x0 = torch.ones(2, 1, 16, 16)
    c = torch.zeros(2, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert process.training_losses(tiny_net("srdiff"), x0, c, generator=g).loss_u is not None
    assert process.training_losses(tiny_net("dynamic"), x0, c, generator=g).loss_u is not None
    for mode in ("dual", "eps", "x0"):
        terms = process.training_losses(tiny_net(mode), x0, c, generator=g)
        assert terms.loss_u is None and terms.kappa is None, mode
        assert (terms.loss_eps is None) == (mode == "x0") and (terms.loss_x0 is None) == (mode == "eps")
    forced = SelfRegulatedDiffusion(process.schedule, unification=True)
    assert forced.training_losses(tiny_net("dual"), x0, c, generator=g).loss_u is not None


class PixelOracle(nn.Module):
    """Fixed ε_θ, x_θ and a per-pixel κ (prediction="dynamic"), each from a parameter, to follow L_u's gradient."""

    out_channels = 1

    def __init__(self, eps: torch.Tensor, x0: torch.Tensor, kappa: torch.Tensor) -> None:
        super().__init__()
        self.eps, self.x0 = nn.Parameter(eps.clone()), nn.Parameter(x0.clone())
        self.logit = nn.Parameter(torch.logit(kappa))

    def forward(self, x, timesteps, condition=None, condition_features=None):
        return Out(self.eps * 1.0, self.x0 * 1.0, torch.sigmoid(self.logit))


def test_dynamic_loss_by_hand_and_weight_trained_alone(process):
    """prediction="dynamic": L_d + L_u on by default, L_u = ‖μ̃ - μ_θ‖² with the per-pixel blend, detached predictions."""
    g = torch.Generator().manual_seed(13)
    x0 = torch.randint(0, 2, (2, 1, 4, 4), generator=g).double() * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps_hat = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    x_hat = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    kappa = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1
    t = [12, 190]
    net = PixelOracle(eps_hat, x_hat, kappa)
    terms = process.training_losses(net, x0, None, t=torch.tensor(t), noise=noise)
    per_item = []
    for i, ti in enumerate(t):
        beta, a, a_prev = float(REF_BETAS[ti]), ref_acp(ti), ref_acp(ti - 1)
        xt = np.sqrt(a) * x0[i].numpy() + np.sqrt(1 - a) * noise[i].numpy()
        c_x0, c_xt = np.sqrt(a_prev) * beta / (1 - a), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        mu_true = c_x0 * x0[i].numpy() + c_xt * xt
        mu_x = c_x0 * x_hat[i].numpy() + c_xt * xt
        mu_eps = (xt - beta / np.sqrt(1 - a) * eps_hat[i].numpy()) / np.sqrt(1 - beta)
        k = kappa[i].numpy()
        per_item.append(np.mean((mu_true - (k * mu_x + (1 - k) * mu_eps)) ** 2))
    assert terms.loss_u.item() == pytest.approx(np.mean(per_item), rel=1e-6)
    loss_d = (x0 - x_hat).pow(2).mean().item() + (noise - eps_hat).pow(2).mean().item()
    assert terms.loss.item() == pytest.approx(loss_d + np.mean(per_item), rel=1e-6)
    assert terms.kappa.item() == pytest.approx(kappa.mean().item())
    # default: L_u trains the weight only (Benny & Wolf); the literal setting keeps it on the heads
    for detach, reaches_heads in ((None, False), (True, False), (False, True)):
        net = PixelOracle(eps_hat, x_hat, kappa)
        proc = SelfRegulatedDiffusion(process.schedule, unification_detach=detach)
        proc.training_losses(net, x0, None, t=torch.tensor(t), noise=noise).loss_u.backward()
        assert net.logit.grad.abs().min() > 0, detach  # every pixel's weight gets its own gradient
        for head in (net.eps, net.x0):
            assert (head.grad is not None and head.grad.abs().sum() > 0) == reaches_heads, detach
    # srdiff's (B,) κ keeps the paper's literal L_u by default (no detach)
    net = _Linear()
    process.training_losses(net, x0, None, t=torch.tensor(t), noise=noise).loss_u.backward()
    assert abs(net.e.grad.item()) > 0


def test_dynamic_network_loss_reaches_only_the_weight_channel(process):
    """In the real network L_u reaches the weight's output channel of the last layer, not the eps / x0 channels."""
    net = tiny_net("dynamic")
    x0 = torch.randint(0, 2, (3, 1, 16, 16), generator=torch.Generator().manual_seed(14)).float() * 2 - 1
    c = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(15))
    t = torch.tensor([4, 90, 230])
    for weighting in ("paper", "eps"):
        net.zero_grad()
        proc = SelfRegulatedDiffusion(process.schedule, unification_weighting=weighting)
        terms = proc.training_losses(net, x0, c, t=t, generator=torch.Generator().manual_seed(2))
        assert terms.loss_u is not None and terms.loss_eps is not None and terms.loss_x0 is not None
        terms.loss_u.backward()
        w = net.dual_head.conv.conv.weight.grad  # (2M + 1, C_1, 3, 3): rows eps, x0, weight logit
        assert w[:2].abs().sum() == 0 and w[2].abs().sum() > 0, weighting
        assert net.dual_decoder.resnets[0][0].conv2.conv.weight.grad.abs().sum() > 0  # through the shared decoder


@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim_eta0", "ddim_eta1"])
def test_samplers_blend_per_pixel(process, sampler_name):
    """One sampler step with a per-pixel κ equals, at each pixel, the step with that pixel's κ for the whole item."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.tanh(torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64))
    z = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    values = torch.tensor([0.1, 0.6, 0.95], dtype=torch.float64)
    kappa = values[torch.randint(0, 3, (2, 1, 4, 4), generator=g)]
    if sampler_name == "ddpm":
        sampler = DDPMSampler(process)
    else:
        sampler = DDIMSampler(process, eta=0.0 if sampler_name == "ddim_eta0" else 1.0, num_inference_steps=5)
    sampler.set_timesteps()
    t = int(sampler.timesteps[1])
    step = sampler.step(Out(eps, x0, kappa), t, x, noise=z)
    assert step.kappa.shape == (2,)
    torch.testing.assert_close(step.kappa, kappa.mean(dim=(1, 2, 3)))
    for v in values:
        ref = sampler.step(Out(eps, x0, v.expand(2)), t, x, noise=z).prev_sample
        where = kappa == v
        assert where.any()
        torch.testing.assert_close(step.prev_sample[where], ref[where], rtol=1e-12, atol=1e-12)


def test_pipeline_with_the_dynamic_network(process):
    """HSRDiffPipeline runs prediction="dynamic" and records one κ (the spatial mean) per step and sample."""
    net = tiny_net("dynamic").eval()
    c = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(17))
    out = HSRDiffPipeline(net, DDIMSampler(process, num_inference_steps=3))(c, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (2, 2, 1, 16, 16) and torch.isfinite(out.samples).all()
    assert out.kappa.shape == (3, 2, 2) and ((out.kappa > 0) & (out.kappa < 1)).all()
    torch.testing.assert_close(out.kappa_trace, out.kappa.mean(dim=(1, 2)))
    # network chunks of one item: the per-pixel weights are concatenated along the batch like eps and x0
    one = HSRDiffPipeline(net, DDIMSampler(process, num_inference_steps=3), max_batch_size=1)
    chunked = one(c, num_samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked.samples, out.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.kappa, out.kappa, rtol=1e-5, atol=1e-6)


def test_training_losses_draws_reproducible_timesteps(process):
    net = tiny_net()
    x0 = -torch.ones(16, 1, 16, 16)
    c = torch.zeros(16, 1, 16, 16)
    a = process.training_losses(net, x0, c, generator=torch.Generator().manual_seed(7))
    b = process.training_losses(net, x0, c, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.t, b.t) and a.loss.item() == b.loss.item()
    assert a.t.min() >= 0 and a.t.max() < T and len(set(a.t.tolist())) > 8


def test_training_losses_bad_input(process):
    net = tiny_net()
    c = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="out_channels=1"):
        process.training_losses(net, torch.ones(2, 2, 16, 16), c)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        process.training_losses(net, torch.ones(2, 1, 16, 16) * 2, c)
    with pytest.raises(ValueError, match="t must lie"):
        process.training_losses(net, torch.ones(2, 1, 16, 16), c, t=torch.tensor([0, T]))
    with pytest.raises(ValueError, match="batch"):
        process.training_losses(net, torch.ones(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="dual_weight"):
        SelfRegulatedDiffusion(dual_weight=1.5)
    with pytest.raises(ValueError, match="unification_weighting must be one of paper, eps, x0, normalized"):
        SelfRegulatedDiffusion(unification_weighting="snr")


# ---- samplers ------------------------------------------------------------------------------


def test_timestep_spacing_and_call_order(process):
    ddim = DDIMSampler(process)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ddim.step(Out(torch.zeros(1, 1, 2, 2), None, None), 249, torch.zeros(1, 1, 2, 2))
    ddim.set_timesteps(5)
    assert ddim.timesteps.tolist() == [249, 199, 149, 99, 49]
    assert [ddim.previous_timestep(t) for t in (249, 49)] == [199, -1]
    with pytest.raises(ValueError, match="not one of"):
        ddim.step(Out(torch.zeros(1, 1, 2, 2), None, None), 248, torch.zeros(1, 1, 2, 2))
    leading = DDIMSampler(process, timestep_spacing="leading")
    leading.set_timesteps(5)
    assert leading.timesteps.tolist() == [200, 150, 100, 50, 0]
    ddim.set_timesteps()
    assert ddim.timesteps.tolist() == list(range(T - 1, -1, -1))
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="num_inference_steps"):
            ddim.set_timesteps(bad)
    ddpm = DDPMSampler(process)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ddpm.step(Out(torch.zeros(1, 1, 2, 2), None, None), 0, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="DDIMSampler"):
        ddpm.set_timesteps(50)


class SmoothDenoiser(nn.Module):
    """A small fixed network obeying the HSRDiff output contract (eps, x0, κ depend on x_t and t).

    Cheap in float64, so the 3 × 250-step sampler comparison below stays fast; the samplers are
    what is under test, not the network.
    """

    out_channels = 1

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.eps_conv = nn.Conv2d(2, 1, 3, padding=1).double()
        self.x0_conv = nn.Conv2d(2, 1, 3, padding=1).double()

    def forward(self, x, timesteps, condition=None, condition_features=None):
        h = torch.cat([x, condition_features[0]], 1)
        tt = (timesteps.double() / T).reshape(-1, 1, 1, 1)
        eps = self.eps_conv(h) * (1 + tt)
        x0 = torch.tanh(self.x0_conv(h) - tt)
        kappa = torch.sigmoid(x.mean(dim=(1, 2, 3)) + 4 * timesteps.double() / T - 2)
        return Out(eps, x0, kappa)


def _run(sampler, net, feats, x, noises):
    sampler.set_timesteps()
    for i, t in enumerate(sampler.timesteps.tolist()):
        out = net(x, torch.full((x.shape[0],), t), condition_features=feats)
        x = sampler.step(out, t, x, noise=noises[i]).prev_sample
    return x


def test_ddim_eta1_all_steps_equals_ddpm_posterior(process):
    net = SmoothDenoiser()
    g = torch.Generator().manual_seed(11)
    feats = [torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)]
    x_T = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)
    noises = torch.randn(T, 2, 1, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ddpm = _run(DDPMSampler(process, variance="posterior"), net, feats, x_T, noises)
        ddim = _run(DDIMSampler(process, eta=1.0), net, feats, x_T, noises)
        ddpm_beta = _run(DDPMSampler(process, variance="beta"), net, feats, x_T, noises)
    assert ddpm.abs().max() > 0.1
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)
    assert (ddpm_beta - ddpm).abs().max() > 1e-3  # the two variance choices do differ


def test_ddim_eta0_is_deterministic_given_x_T(process):
    net = tiny_net().eval()
    c = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sampler = DDIMSampler(process, eta=0.0)
    sampler.set_timesteps(10)
    results = []
    with torch.no_grad():
        feats = net.encode_condition(c)
        for seed in (2, 3):
            g, x = torch.Generator().manual_seed(seed), x_T
            for t in sampler.timesteps.tolist():
                x = sampler.step(net(x, torch.full((2,), t), condition_features=feats), t, x, generator=g).prev_sample
            results.append(x)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_perfect_x0_model_is_recovered(process, sampler_cls):
    # with x_θ ≡ x0 (x0-only model), both samplers end exactly at x0 (ᾱ_prev = 1 at the last step)
    target = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]], dtype=torch.float64)
    sampler = sampler_cls(process)
    sampler.set_timesteps(T if sampler_cls is DDPMSampler else 7)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in sampler.timesteps.tolist():
        x = sampler.step(Out(None, target, None), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
    torch.testing.assert_close(x, target, rtol=0, atol=1e-12)


def test_samplers_keep_input_dtype(process):
    sampler = DDIMSampler(process, eta=1.0)
    sampler.set_timesteps(4)
    x = torch.randn(1, 1, 2, 2)
    step = sampler.step(Out(torch.zeros_like(x), x, torch.tensor([0.5])), 249, x)
    assert step.prev_sample.dtype == torch.float32 and step.pred_original_sample.dtype == torch.float32


# ---- pipeline ------------------------------------------------------------------------------


def test_pipeline_encodes_each_image_once_and_shapes(process):
    net = tiny_net()
    calls: list[int] = []
    net.condition_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    c = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe = HSRDiffPipeline(net, DDIMSampler(process, eta=0.0))
    out = pipe(c, num_samples=4, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    assert calls == [3]  # once for the 3 images, not per step or per sample
    assert out.samples.shape == (3, 4, 1, 16, 16)
    assert out.kappa.shape == (5, 3, 4) and out.timesteps.tolist() == [249, 199, 149, 99, 49]
    torch.testing.assert_close(out.kappa_trace, out.kappa.mean(dim=(1, 2)))
    assert ((out.kappa > 0) & (out.kappa < 1)).all()
    assert net.training  # the pipeline restores the mode

    # chunked: each image still encoded once (in chunks of at most max_batch_size images)
    calls.clear()
    pipe(c, num_samples=4, num_inference_steps=5, max_batch_size=5, generator=torch.Generator().manual_seed(0))
    assert calls == [3]
    calls.clear()
    pipe(c, num_samples=4, num_inference_steps=5, max_batch_size=2, generator=torch.Generator().manual_seed(0))
    assert calls == [2, 1]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_pipeline_samples_do_not_depend_on_chunk_size(process, sampler):
    # the chunk size only splits the network calls; each step still draws ONE (B*N, ...) noise
    # tensor, so even the stochastic samplers give the same samples for every max_batch_size
    net = tiny_net()
    c = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    smp = DDPMSampler(SelfRegulatedDiffusion(DiffusionSchedule(6, beta_start=1e-3, beta_end=0.2))) if sampler == "ddpm" else DDIMSampler(process, eta=1.0)
    pipe = HSRDiffPipeline(net, smp)
    steps = None if sampler == "ddpm" else 5
    runs = {
        size: pipe(c, num_samples=4, num_inference_steps=steps, max_batch_size=size, generator=torch.Generator().manual_seed(0))
        for size in (None, 1, 5, "auto")
    }
    for size in (1, 5, "auto"):
        torch.testing.assert_close(runs[size].samples, runs[None].samples, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runs[size].kappa, runs[None].kappa, rtol=1e-5, atol=1e-6)
    other = pipe(c, num_samples=4, num_inference_steps=steps, max_batch_size=5, generator=torch.Generator().manual_seed(1))
    assert (other.samples - runs[None].samples).abs().max() > 0.1  # the noise does matter


def test_auto_batch_size_by_device_and_size():
    from monai_hsrdiff.diffusion.pipeline import CPU_PIXELS_PER_CALL

    cpu = torch.device("cpu")
    assert auto_batch_size(cpu, (128, 128), 16) == CPU_PIXELS_PER_CALL // (128 * 128)
    assert auto_batch_size(cpu, (64, 64), 16) == CPU_PIXELS_PER_CALL // (64 * 64)
    assert auto_batch_size(cpu, (16, 16), 12) == 12  # never more than there are items
    assert auto_batch_size(cpu, (512, 512), 16) == 1  # at least one
    assert auto_batch_size(cpu, (32, 64, 64), 4) == 1  # a 3D volume per call
    assert auto_batch_size(torch.device("cuda"), (128, 128), 16) == 16  # no CUDA needed: decided from the type


def test_pipeline_seed_reproduces_samples(process):
    net = tiny_net()
    c = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe = HSRDiffPipeline(net, DDIMSampler(process, eta=1.0))
    a = pipe(c, num_samples=3, num_inference_steps=4, generator=torch.Generator().manual_seed(5))
    b = pipe(c, num_samples=3, num_inference_steps=4, generator=torch.Generator().manual_seed(5))
    d = pipe(c, num_samples=3, num_inference_steps=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.samples, b.samples)
    assert not torch.allclose(a.samples, d.samples)
    assert not torch.allclose(a.samples[:, 0], a.samples[:, 1])  # the N samples of one image differ


def test_pipeline_multiclass_and_ablations(process):
    c = torch.randn(2, 1, 16, 16)
    x0 = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 16, 16)), 3).permute(0, 3, 1, 2).float() * 2 - 1
    net = tiny_net(out_channels=3)
    terms = process.training_losses(net, x0, c)
    assert terms.loss.ndim == 0 and terms.loss_u is not None
    out = HSRDiffPipeline(net, DDIMSampler(process))(c, num_samples=2, num_inference_steps=3)
    assert out.samples.shape == (2, 2, 3, 16, 16)
    eps_only = HSRDiffPipeline(tiny_net("eps", condition="none"), DDIMSampler(process))
    out = eps_only(c, num_samples=2, num_inference_steps=3)
    assert out.samples.shape == (2, 2, 1, 16, 16) and torch.equal(out.kappa_trace, torch.zeros(3))


def test_pipeline_bad_arguments(process):
    pipe = HSRDiffPipeline(tiny_net(), DDPMSampler(process))
    c = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="num_samples"):
        pipe(c, num_samples=0)
    for bad in (0, "big", True, 2.0):
        with pytest.raises(ValueError, match="max_batch_size"):
            pipe(c, max_batch_size=bad)
    with pytest.raises(ValueError, match="DDIMSampler"):
        pipe(c, num_inference_steps=10)


# ---- the sampler's own step count, and one sampling object ----------------------------------


def test_sampler_knows_its_step_count(process):
    """DDIM S=10 over T=250 (trailing): t_k = round(T - k·T/S) - 1 = 249 - 25k; DDPM: T-1, ..., 0."""
    ddim = DDIMSampler(process, eta=0.5, num_inference_steps=10)
    assert ddim.num_inference_steps == 10
    ddim.set_timesteps()
    assert ddim.timesteps.tolist() == [249 - 25 * k for k in range(10)]
    ddim.set_timesteps(5)  # a one-run override: the sampler's own count stays 10
    assert ddim.timesteps.tolist() == [249, 199, 149, 99, 49] and ddim.num_inference_steps == 10
    ddim.set_timesteps()
    assert len(ddim.timesteps) == 10
    assert DDIMSampler(process).num_inference_steps == T  # no count given: all T
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 250\], got 0"):
        DDIMSampler(process, num_inference_steps=0)
    # get_sampler: the one place where DDPM ignores the bundles' step count and eta
    ddpm = get_sampler("ddpm", process, eta=0.5, num_inference_steps=10)
    assert isinstance(ddpm, DDPMSampler) and ddpm.num_inference_steps == T
    ddpm.set_timesteps()
    assert ddpm.timesteps.tolist() == list(range(T - 1, -1, -1))
    ddim = get_sampler("ddim", process, eta=0.5, num_inference_steps=10)
    assert isinstance(ddim, DDIMSampler) and ddim.num_inference_steps == 10 and ddim.eta == 0.5
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        get_sampler("dpm", process)


def test_pipeline_settings_live_on_the_object(process):
    """Steps from the sampler and chunking from the pipeline give the samples of the per-call arguments."""
    torch.manual_seed(0)
    net = tiny_net()
    c = torch.randn(2, 1, 16, 16)
    ref = HSRDiffPipeline(net, DDIMSampler(process, eta=1.0))(
        c, num_samples=3, num_inference_steps=4, max_batch_size=2, generator=torch.Generator().manual_seed(7)
    )
    pipe = HSRDiffPipeline(net, DDIMSampler(process, eta=1.0, num_inference_steps=4), max_batch_size=2)
    assert pipe.max_batch_size == 2
    out = pipe(c, num_samples=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.samples, ref.samples) and out.timesteps.tolist() == ref.timesteps.tolist()
    assert len(out.timesteps) == 4
    assert pipe(c, num_samples=1, num_inference_steps=2).timesteps.tolist() == [249, 124]  # per-call override
    assert pipe.sampler.num_inference_steps == 4
    with pytest.raises(ValueError, match="max_batch_size"):
        HSRDiffPipeline(net, DDPMSampler(process), max_batch_size=0)


def test_evaluator_samples_with_the_pipeline(process):
    """HSRDiffEvaluator(pipeline=...) draws the pipeline's samples (steps from its sampler); the
    deprecated sampler=/num_inference_steps= path gives the same; a pipeline over another network is refused."""
    from monai_hsrdiff.engines import HSRDiffEvaluator

    net = tiny_net()
    torch.manual_seed(1)
    batch = {"image": torch.randn(2, 1, 16, 16), "masks": (torch.rand(2, 3, 16, 16) > 0.5).float()}

    def run(**kwargs) -> tuple[torch.Tensor, dict]:
        evaluator = HSRDiffEvaluator("cpu", [batch], net, num_samples=3, seed=4, **kwargs)
        evaluator.run()
        return evaluator.state.output["pred"], evaluator.state.kappa_trace

    pipe = HSRDiffPipeline(net, DDIMSampler(process, eta=1.0, num_inference_steps=4), max_batch_size=2)
    pred, kappa = run(pipeline=pipe)
    # per-item seeds: this loader has no item paths, so items are named by their position in the run
    from monai_hsrdiff.engines.evaluator import item_seed

    gens = [torch.Generator().manual_seed(item_seed(4, f"#{j}")) for j in range(2)]
    expected = HSRDiffPipeline(net, DDIMSampler(process, eta=1.0))(
        batch["image"], num_samples=3, num_inference_steps=4, generator=gens
    )
    assert torch.equal(pred, expected.samples[:, :, 0] > 0)
    assert sorted(kappa) == sorted(expected.timesteps.tolist())
    with pytest.warns(FutureWarning, match="deprecated"):
        old_pred, _ = run(sampler=DDIMSampler(process, eta=1.0), num_inference_steps=4)
    assert torch.equal(old_pred, pred)
    with pytest.raises(ValueError, match="pipeline.model is not the evaluator's network"):
        HSRDiffEvaluator("cpu", [batch], tiny_net(), pipeline=pipe)
