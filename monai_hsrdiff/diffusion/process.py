"""The self-regulated diffusion process of HSRDiff: forward noising, posterior, κ-mixed mean, loss.

Symbols (paper → code): ᾱ_t (the paper writes α_t) → ``alphas_cumprod``; ε_θ → ``out.eps``;
x_θ → ``out.x0``; κ_φ → ``out.kappa``; μ̃_t → ``q_posterior_mean_variance``; μ_{ε_θ} →
:meth:`SelfRegulatedDiffusion.mu_from_eps`; μ_{x_θ} → :meth:`SelfRegulatedDiffusion.mu_from_x0`;
μ_θ → :meth:`SelfRegulatedDiffusion.p_mean`.

κ placement: μ_θ = κ·μ_x + (1-κ)·μ_eps, the paper's Eq. 8 (κ weights the x0 mode). The paper's
Algorithm 2 and Eq. 13 print κ on the ε-mode term instead; this implementation uses Eq. 8 in
training (the unification loss) and in both samplers, so κ → 1 always means "trust x_θ".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn as nn

from monai_hsrdiff.diffusion.schedule import DiffusionSchedule

__all__ = ["DiffusionLossOutput", "ModelOutput", "PMean", "SelfRegulatedDiffusion", "UNIFICATION_WEIGHTINGS", "resolve_kappa"]

#: Per-item weightings of the unification loss L_u (see :class:`SelfRegulatedDiffusion`).
UNIFICATION_WEIGHTINGS = ("paper", "eps", "x0", "normalized")


class ModelOutput(Protocol):
    """What the diffusion code reads from the network (``monai_hsrdiff.networks.HSRDiffOutput``)."""

    eps: torch.Tensor | None
    x0: torch.Tensor | None
    kappa: torch.Tensor | None


class PMean(NamedTuple):
    """Mean of p_θ(x_{t-1} | x_t) and the weight used to form it.

    Attributes:
        mean: (B, M, *spatial) μ_θ.
        kappa: (B,) κ used (the network's κ_φ, the fixed dual weight, 1 for x0-only, 0 for eps-only);
            for a per-pixel weight (``prediction="dynamic"``) its spatial mean per item, so that
            samplers and the pipeline's κ trace keep one value per item and step.
    """

    mean: torch.Tensor
    kappa: torch.Tensor


@dataclass
class DiffusionLossOutput:
    """Terms of the HSRDiff loss (paper Eq. 9 / Algorithm 1), each a scalar tensor.

    Attributes:
        loss: λ1·L_d + λ2·L_u, the quantity to back-propagate.
        loss_x0: ‖x0 - x_θ‖² (mean over pixels, then batch); ``None`` without an x0 head.
        loss_eps: ‖ε - ε_θ‖²; ``None`` without an eps head.
        loss_u: unification loss ‖μ̃ - μ_θ‖² (weighted as configured); ``None`` when disabled.
        kappa: mean κ over the batch (detached); ``None`` for models without a κ head.
        t: (B,) timesteps used.
    """

    loss: torch.Tensor
    loss_x0: torch.Tensor | None
    loss_eps: torch.Tensor | None
    loss_u: torch.Tensor | None
    kappa: torch.Tensor | None
    t: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Python floats of the present terms, for logging (absent terms are omitted)."""
        keys = ("loss", "loss_x0", "loss_eps", "loss_u", "kappa")
        return {k: float(getattr(self, k).detach()) for k in keys if getattr(self, k) is not None}


def resolve_kappa(out: ModelOutput, dual_weight: float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """κ for each item (or each pixel), from whichever heads the model has.

    ``srdiff`` (κ present): the network's κ_φ, (B,). ``dynamic`` (Benny & Wolf): the network's
    per-pixel weight, (B, 1, *spatial) with ``like`` of shape (B, M, *spatial). ``dual`` (eps and
    x0, no κ): ``dual_weight``. ``x0`` only: 1. ``eps`` only: 0. Returns a (B,) or
    (B, 1, *spatial) tensor on ``like``'s device and dtype.
    """
    if out.eps is None and out.x0 is None:
        raise ValueError("resolve_kappa: the model output has neither an eps nor an x0 prediction.")
    if out.kappa is not None:
        if out.eps is None or out.x0 is None:
            raise ValueError(
                "resolve_kappa: a κ output needs both the eps and the x0 heads (prediction='srdiff' or 'dynamic')."
            )
        per_pixel = (batch, 1, *like.shape[2:])
        if out.kappa.numel() != batch and tuple(out.kappa.shape) == per_pixel:
            return out.kappa.to(like.dtype)
        if out.kappa.numel() != batch:
            raise ValueError(
                f"resolve_kappa: κ must have shape ({batch},) (one per item) or {per_pixel} (one per pixel, shared "
                f"by the label channels), got {tuple(out.kappa.shape)}."
            )
        return out.kappa.to(like.dtype).reshape(-1)
    if out.eps is not None and out.x0 is not None:
        value = dual_weight
    else:
        value = 1.0 if out.x0 is not None else 0.0
    return torch.full((batch,), value, device=like.device, dtype=like.dtype)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # a (B,) weight over every channel and pixel; a per-pixel (B, 1, *spatial) one already broadcasts over M
    return v if v.ndim == x.ndim else v.reshape(-1, *([1] * (x.ndim - 1)))


def _per_item(kappa: torch.Tensor) -> torch.Tensor:
    # the (B,) summary of a per-pixel weight: its spatial mean (a (B,) κ is returned as it is)
    return kappa if kappa.ndim == 1 else kappa.flatten(1).mean(dim=1)


def _per_item_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(dim=1)


class SelfRegulatedDiffusion:
    """The whole HSRDiff diffusion process (paper Eq. 1-13, Algorithms 1-2) over a :class:`DiffusionSchedule`.

    Args:
        schedule: the noise schedule (default: T=250, linear β scaled to 4e-4..0.08).
        dual_weight: fixed κ of the ``dual`` ablation (eps and x0 heads, no κ head), in [0, 1].
        clip_x0: clamp the x0 estimate to [-1, 1] *during sampling*: x_θ inside μ_x (DDPM) and the
            fused x̂0 (DDIM). Never applied to the ε path of DDPM nor in the loss (clamping
            would zero the gradient of x_θ outside the range). Default off (the paper does not clip).
        lambda_d: λ1, weight of the differentiation loss L_d (Eq. 9).
        lambda_u: λ2, weight of the unification loss L_u (Eq. 9).
        unification: include L_u. ``None`` (default): only when the model outputs κ (``srdiff``,
            ``dynamic``); for ``dual``, ``eps`` and ``x0`` it is off unless set to ``True``.
        unification_weighting: ``"paper"`` uses ‖μ̃ - μ_θ‖² as printed (tiny at most t);
            ``"eps"`` divides each item's L_u by c_t² with c_t = β_t/(sqrt(1-ᾱ_t) sqrt(1-β_t)),
            the ε-space equivalent (for κ=0, μ̃ - μ_eps = c_t (ε - ε_θ)); ``"x0"`` divides by
            the x0 coefficient of μ̃ squared, so L_u = ‖x0 - x̂0‖² of the fused estimate;
            ``"normalized"`` divides by ‖μ_x - μ_eps‖² (detached), which makes every timestep
            weigh the same in κ's training whatever the scale of the two modes' disagreement.
            The optimal κ of one item at one t does not depend on the weighting (a common
            factor); the weighting decides which timesteps dominate κ's gradient.
        unification_detach: detach ε_θ and x_θ inside L_u, so that L_u trains only the κ path
            (as Benny & Wolf train their interpolation weight) and L_d alone trains the heads.
            ``None`` (default): on for a per-pixel κ (``prediction="dynamic"``, Benny & Wolf's
            own training), off for the (B,) κ_φ of ``srdiff`` (the paper's literal L_u).

    Example::

        process = SelfRegulatedDiffusion(DiffusionSchedule(250))
        terms = process.training_losses(model, x0, condition)   # x0 (B, M, H, W) in {-1, 1}
        terms.loss.backward()
    """

    def __init__(
        self,
        schedule: DiffusionSchedule | None = None,
        dual_weight: float = 0.5,
        clip_x0: bool = False,
        lambda_d: float = 1.0,
        lambda_u: float = 1.0,
        unification: bool | None = None,
        unification_weighting: Literal["paper", "eps", "x0", "normalized"] = "paper",
        unification_detach: bool | None = None,
    ) -> None:
        if not 0.0 <= float(dual_weight) <= 1.0:
            raise ValueError(f"SelfRegulatedDiffusion: dual_weight must lie in [0, 1], got {dual_weight!r}.")
        if unification_weighting not in UNIFICATION_WEIGHTINGS:
            raise ValueError(
                f"SelfRegulatedDiffusion: unification_weighting must be one of {', '.join(UNIFICATION_WEIGHTINGS)}, "
                f"got {unification_weighting!r}."
            )
        if lambda_d < 0 or lambda_u < 0:
            raise ValueError(
                f"SelfRegulatedDiffusion: lambda_d and lambda_u must be >= 0, got {lambda_d!r}, {lambda_u!r}."
            )
        self.schedule = schedule if schedule is not None else DiffusionSchedule()
        self.dual_weight = float(dual_weight)
        self.clip_x0 = bool(clip_x0)
        self.lambda_d = float(lambda_d)
        self.lambda_u = float(lambda_u)
        self.unification = unification
        self.unification_weighting = unification_weighting
        self.unification_detach = None if unification_detach is None else bool(unification_detach)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    # ---- q: the forward process -------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (paper Eq. 2): x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε.

        Args:
            x0: (B, M, *spatial) clean label in [-1, 1].
            t: (B,) long timesteps in {0..T-1}.
            noise: ε, same shape as ``x0``; standard normal when ``None``.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}.")
        s = self.schedule
        return s.extract("sqrt_alphas_cumprod", t, x0) * x0 + s.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(μ̃, β̃_t I) (DDPM Eq. 6-7; the correct form of the paper's μ̃_t in Eq. 9).

        μ̃ = sqrt(ᾱ_{t-1}) β_t/(1-ᾱ_t) · x0 + sqrt(1-β_t)(1-ᾱ_{t-1})/(1-ᾱ_t) · x_t.

        Returns:
            mean (B, M, *spatial), variance (B, 1, ..., 1), log-variance clipped at t=0 (B, 1, ..., 1).
        """
        if x0.shape != x_t.shape:
            raise ValueError(f"q_posterior_mean_variance: x0 {tuple(x0.shape)} and x_t {tuple(x_t.shape)} differ.")
        s = self.schedule
        mean = s.extract("posterior_mean_coef_x0", t, x_t) * x0 + s.extract("posterior_mean_coef_xt", t, x_t) * x_t
        return mean, s.extract("posterior_variance", t, x_t), s.extract("posterior_log_variance_clipped", t, x_t)

    # ---- the two prediction modes and their means ---------------------------------------------

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0(ε) = (x_t - sqrt(1-ᾱ_t) ε)/sqrt(ᾱ_t), inverting Eq. 2."""
        s = self.schedule
        return s.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - s.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε(x0) = (x_t - sqrt(ᾱ_t) x0)/sqrt(1-ᾱ_t), inverting Eq. 2."""
        s = self.schedule
        return (x_t - s.extract("sqrt_alphas_cumprod", t, x_t) * x0) / s.extract(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def mu_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """μ_eps = (x_t - β_t/sqrt(1-ᾱ_t) · ε_θ)/sqrt(1-β_t) (paper Eq. 13, first bracket; DDPM Eq. 11)."""
        s = self.schedule
        return s.extract("eps_mean_coef_xt", t, x_t) * x_t - s.extract("eps_mean_coef_eps", t, x_t) * eps

    def mu_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """μ_x = μ̃ with x0 → x_θ (paper Eq. 13, second bracket, with the correct x_t coefficient)."""
        s = self.schedule
        return s.extract("posterior_mean_coef_x0", t, x_t) * x0 + s.extract("posterior_mean_coef_xt", t, x_t) * x_t

    def p_mean(self, out: ModelOutput, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False) -> PMean:
        """μ_θ = κ·μ_x + (1-κ)·μ_eps (paper Eq. 8; κ weights the x0 mode), per pixel for a per-pixel κ.

        Args:
            out: network output with ``eps`` / ``x0`` (B, M, *spatial) and ``kappa`` (B,),
                (B, 1, *spatial) (``prediction="dynamic"``) or ``None``.
            x_t: (B, M, *spatial) noisy label.
            t: (B,) long timesteps.
            clip_x0: clamp x_θ to [-1, 1] before forming μ_x (sampling only; ε path untouched).
        """
        kappa = resolve_kappa(out, self.dual_weight, x_t.shape[0], x_t)
        self._check_heads(out, x_t)
        mu_eps = self.mu_from_eps(x_t, t, out.eps) if out.eps is not None else None
        mu_x = None
        if out.x0 is not None:
            x0 = out.x0.clamp(-1.0, 1.0) if clip_x0 else out.x0
            mu_x = self.mu_from_x0(x_t, t, x0)
        if mu_eps is None:
            return PMean(mu_x, _per_item(kappa))
        if mu_x is None:
            return PMean(mu_eps, _per_item(kappa))
        k = _bcast(kappa, x_t)
        return PMean(k * mu_x + (1.0 - k) * mu_eps, _per_item(kappa))

    def fused_x0(self, out: ModelOutput, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False) -> PMean:
        """x̂0 = κ·x_θ + (1-κ)·x0(ε_θ), the x0 estimate whose posterior mean is μ_θ (used by DDIM).

        Because μ̃ is linear in x0 and μ̃(x0(ε_θ), x_t) = μ_eps, μ̃(x̂0, x_t) = μ_θ of Eq. 8 exactly
        (pixel by pixel, so also for a per-pixel κ). ``clip_x0`` clamps the fused estimate.
        Returns ``PMean(mean=x̂0, kappa)`` with the (B,) κ summary of :class:`PMean`.
        """
        kappa = resolve_kappa(out, self.dual_weight, x_t.shape[0], x_t)
        self._check_heads(out, x_t)
        if out.eps is None:
            x0_hat = out.x0
        else:
            x0_eps = self.predict_x0_from_eps(x_t, t, out.eps)
            if out.x0 is None:
                x0_hat = x0_eps
            else:
                k = _bcast(kappa, x_t)
                x0_hat = k * out.x0 + (1.0 - k) * x0_eps
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        return PMean(x0_hat, _per_item(kappa))

    @staticmethod
    def _check_heads(out: ModelOutput, x_t: torch.Tensor) -> None:
        for name in ("eps", "x0"):
            v = getattr(out, name)
            if v is not None and v.shape != x_t.shape:
                raise ValueError(
                    f"SelfRegulatedDiffusion: model output {name} has shape {tuple(v.shape)}, expected the shape of "
                    f"x_t {tuple(x_t.shape)}; check the network's out_channels against the label channels M."
                )

    # ---- training ---------------------------------------------------------------------------

    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        condition: torch.Tensor | None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiffusionLossOutput:
        """HSRDiff loss of one batch (paper Eq. 9, Algorithm 1).

        L = λ1·L_d + λ2·L_u, L_d = ‖x0 - x_θ‖² + ‖ε - ε_θ‖² (terms for the heads present),
        L_u = ‖μ̃ - μ_θ‖² with μ_θ from :meth:`p_mean` (no clipping). Norms are means over
        channels and pixels, then over the batch.

        Args:
            model: network called as ``model(x_t, t, condition=condition)``, returning eps/x0/kappa.
            x0: (B, M, *spatial) label in [-1, 1] (binary {-1, +1}, multi-class one-hot scaled).
            condition: (B, C, *spatial) condition image, or ``None`` for an unconditional model.
            t: (B,) long timesteps; drawn uniformly from {0..T-1} when ``None``.
            noise: ε, shape of ``x0``; standard normal when ``None``.
            generator: random generator for ``t`` and ``noise``.
        """
        if x0.ndim < 3 or not x0.is_floating_point():
            raise ValueError(
                f"training_losses: x0 must be a float (B, M, *spatial) tensor, got {x0.dtype} of shape {tuple(x0.shape)}."
            )
        out_channels = getattr(model, "out_channels", None)
        if out_channels is not None and x0.shape[1] != out_channels:
            raise ValueError(
                f"training_losses: x0 has {x0.shape[1]} label channels but the model has out_channels={out_channels}; "
                "use M=1 for binary labels and M=number of classes for one-hot labels."
            )
        lo, hi = float(x0.min()), float(x0.max())
        if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
            raise ValueError(
                f"training_losses: x0 values must lie in [-1, 1] (labels scaled as 2·mask - 1), got [{lo:.4g}, {hi:.4g}]."
            )
        if condition is not None and condition.shape[0] != x0.shape[0]:
            raise ValueError(
                f"training_losses: condition batch {condition.shape[0]} differs from x0 batch {x0.shape[0]}."
            )
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=_gen_device(generator, x0))
        t = self.schedule.check_timesteps(t).to(x0.device)
        if t.shape != (b,):
            raise ValueError(f"training_losses: t must have shape ({b},), got {tuple(t.shape)}.")
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if noise.shape != x0.shape:
            raise ValueError(f"training_losses: noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}.")

        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, condition=condition)
        self._check_heads(out, x_t)

        zero = x0.new_zeros(())
        loss_x0 = _per_item_mse(x0, out.x0).mean() if out.x0 is not None else None
        loss_eps = _per_item_mse(noise, out.eps).mean() if out.eps is not None else None
        loss_d = (loss_x0 if loss_x0 is not None else zero) + (loss_eps if loss_eps is not None else zero)

        use_u = out.kappa is not None if self.unification is None else self.unification
        loss_u = None
        if use_u:
            u_out = out
            if self.unification_detach is None and out.kappa is not None and out.kappa.ndim > 1:
                # Benny & Wolf's dual output: the blended step's loss trains the weight only
                u_out = _Detached(out.eps.detach() if out.eps is not None else None,
                                  out.x0.detach() if out.x0 is not None else None, out.kappa)  # fmt: skip
            loss_u = self.unification_loss(u_out, x0, x_t, t)

        loss = self.lambda_d * loss_d + (self.lambda_u * loss_u if loss_u is not None else zero)
        kappa = out.kappa.detach().float().mean() if out.kappa is not None else None
        return DiffusionLossOutput(loss, loss_x0, loss_eps, loss_u, kappa, t)


    def unification_loss(self, out: ModelOutput, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_u = ‖μ̃ - μ_θ‖² (paper Eq. 9), weighted per item as ``unification_weighting`` says.

        Args:
            out: the network's output at (x_t, t); ``eps`` and ``x0`` are detached first when
                ``unification_detach`` is set.
            x0, x_t: (B, M, *spatial) clean and noisy labels. t: (B,) long timesteps.

        Returns:
            the scalar mean over the batch of the per-item weighted squared error.
        """
        if self.unification_detach:
            out = _Detached(
                out.eps.detach() if out.eps is not None else None,
                out.x0.detach() if out.x0 is not None else None,
                out.kappa,
            )
        mu_true, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        mu_theta = self.p_mean(out, x_t, t, clip_x0=False).mean
        per_item = _per_item_mse(mu_true, mu_theta)
        weighting = self.unification_weighting
        if weighting == "eps":
            per_item = per_item / self.schedule.extract("eps_mean_coef_eps", t, per_item).pow(2)
        elif weighting == "x0":
            per_item = per_item / self.schedule.extract("posterior_mean_coef_x0", t, per_item).pow(2)
        elif weighting == "normalized":
            if out.eps is None or out.x0 is None:
                raise ValueError("SelfRegulatedDiffusion: unification_weighting='normalized' needs both eps and x0 heads.")
            gap = _per_item_mse(self.mu_from_x0(x_t, t, out.x0), self.mu_from_eps(x_t, t, out.eps)).detach()
            per_item = per_item / gap.clamp_min(1e-12)
        return per_item.mean()


class _Detached(NamedTuple):
    eps: torch.Tensor | None
    x0: torch.Tensor | None
    kappa: torch.Tensor | None


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's device lets a CPU generator seed GPU sampling reproducibly.
    """
    noise = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, torch.empty(0, device=device)))
    return noise.to(device=device, dtype=dtype)
