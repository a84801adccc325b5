"""The noise schedule: β_t, ᾱ_t and every closed-form coefficient of the process, in float64.

β comes from MONAI's :class:`monai.networks.schedulers.DDPMScheduler` (its registry of
schedule functions); everything derived from it is computed here in float64 and cast to the
device and dtype of the tensor it multiplies, at the point of use. MONAI's scheduler keeps
``betas``/``alphas_cumprod`` as plain tensor attributes (not buffers), so ``.to(device)``
does not move them; this class therefore keeps its own tables.

Timestep convention: 0-based index t ∈ {0..T-1} (MONAI's convention). Code t=0 is the
paper's t=1; ᾱ_prev(0) = 1 (no noise before the first step).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler

__all__ = ["DiffusionSchedule", "default_beta_range"]

# MONAI's (and DDPM's) linear range is tuned for T=1000 steps.
_REFERENCE_STEPS = 1000
_REFERENCE_BETA_START = 1e-4
_REFERENCE_BETA_END = 2e-2


def default_beta_range(num_train_timesteps: int) -> tuple[float, float]:
    """(β_start, β_end) of the linear schedule scaled to ``num_train_timesteps`` steps.

    DDPM's range 1e-4..0.02 is meant for T=1000; with T=250 it leaves ᾱ_T ≈ 0.08, far from
    pure noise. Like openai/guided-diffusion (``get_named_beta_schedule``), both ends are
    multiplied by 1000/T, e.g. 4e-4..0.08 for T=250 (then ᾱ_T ≈ 3.3e-5).
    """
    scale = _REFERENCE_STEPS / num_train_timesteps
    return scale * _REFERENCE_BETA_START, scale * _REFERENCE_BETA_END


class DiffusionSchedule:
    """Float64 tables of a discrete Gaussian diffusion (Ho et al. 2020; HSRDiff Eq. 1-2, 9-13).

    Args:
        num_train_timesteps: T, the number of diffusion steps (the paper uses 250).
        schedule: name of a MONAI noise schedule (``"linear_beta"``, ``"scaled_linear_beta"``,
            ``"sigmoid_beta"``, ``"cosine"``).
        beta_start: first β of the (scaled) linear schedules; ``None`` uses
            :func:`default_beta_range` (1000/T · 1e-4).
        beta_end: last β of the (scaled) linear schedules; ``None`` uses 1000/T · 0.02.
        schedule_args: further keyword arguments of the MONAI schedule function.

    Tables (float64, shape (T,), CPU; use :meth:`extract` to read them at t for a batch):

    - ``betas`` β_t, ``alphas`` 1-β_t, ``alphas_cumprod`` ᾱ_t, ``alphas_cumprod_prev`` ᾱ_{t-1}
      (ᾱ_prev(0) = 1).
    - q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1-ᾱ_t) I): ``sqrt_alphas_cumprod``,
      ``sqrt_one_minus_alphas_cumprod``; its inversions ``sqrt_recip_alphas_cumprod`` and
      ``sqrt_recipm1_alphas_cumprod`` (x_0 = sqrt(1/ᾱ_t) x_t - sqrt(1/ᾱ_t - 1) ε).
    - q(x_{t-1} | x_t, x_0) = N(μ̃, β̃_t I): ``posterior_mean_coef_x0`` =
      sqrt(ᾱ_{t-1}) β_t/(1-ᾱ_t), ``posterior_mean_coef_xt`` = sqrt(1-β_t)(1-ᾱ_{t-1})/(1-ᾱ_t),
      ``posterior_variance`` β̃_t = β_t (1-ᾱ_{t-1})/(1-ᾱ_t) (0 at t=0),
      ``posterior_log_variance_clipped`` (log β̃ with β̃_0 replaced by β̃_1, finite).
    - μ_eps (DDPM Eq. 11): ``eps_mean_coef_xt`` = 1/sqrt(1-β_t), ``eps_mean_coef_eps`` =
      β_t/(sqrt(1-ᾱ_t) sqrt(1-β_t)).

    Example::

        schedule = DiffusionSchedule(num_train_timesteps=250)
        coef = schedule.extract(schedule.sqrt_alphas_cumprod, t, x0)  # (B, 1, 1, 1)
    """

    def __init__(
        self,
        num_train_timesteps: int = 250,
        schedule: str = "linear_beta",
        beta_start: float | None = None,
        beta_end: float | None = None,
        **schedule_args: Any,
    ) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(
                f"DiffusionSchedule: num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}."
            )
        if schedule in ("linear_beta", "scaled_linear_beta"):
            default_start, default_end = default_beta_range(num_train_timesteps)
            schedule_args["beta_start"] = default_start if beta_start is None else float(beta_start)
            schedule_args["beta_end"] = default_end if beta_end is None else float(beta_end)
        elif beta_start is not None or beta_end is not None:
            raise ValueError(
                f"DiffusionSchedule: beta_start/beta_end only apply to the linear schedules, "
                f"got schedule={schedule!r}; pass that schedule's own arguments instead."
            )
        self.num_train_timesteps = num_train_timesteps
        self.schedule = schedule
        self.schedule_args = dict(schedule_args)

        monai_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, **schedule_args)
        betas = monai_scheduler.betas.detach().to(torch.float64).cpu()
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"DiffusionSchedule: every β must lie in (0, 1); schedule={schedule!r} with {schedule_args} "
                f"gives β in [{betas.min().item():.3g}, {betas.max().item():.3g}]. Use more steps or a smaller beta_end."
            )

        # β, α, ᾱ
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

        # q(x_t | x_0) and its inversion
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0): DDPM Eq. 6-7 (the paper's Eq. 9 misprints the x_t coefficient)
        one_minus_acp = 1.0 - self.alphas_cumprod
        self.posterior_mean_coef_x0 = self.alphas_cumprod_prev.sqrt() * betas / one_minus_acp
        self.posterior_mean_coef_xt = self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / one_minus_acp
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_acp
        # β̃_0 = 0: replace it by β̃_1 so the log stays finite (guided-diffusion's convention)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )

        # μ_eps = (x_t - β_t/sqrt(1-ᾱ_t) ε_θ)/sqrt(1-β_t): DDPM Eq. 11, HSRDiff Eq. 13
        self.eps_mean_coef_xt = 1.0 / self.alphas.sqrt()
        self.eps_mean_coef_eps = betas / (self.sqrt_one_minus_alphas_cumprod * self.alphas.sqrt())

        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_train_timesteps={self.num_train_timesteps}, schedule={self.schedule!r}, "
            f"{', '.join(f'{k}={v!r}' for k, v in self.schedule_args.items())})"
        )

    def check_timesteps(self, t: torch.Tensor | int, name: str = "t") -> torch.Tensor:
        """Return ``t`` as a long tensor after checking it indexes {0..T-1}; raise ``ValueError`` otherwise."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{type(self).__name__}: {name} must hold integer timestep indices, got dtype {t.dtype}.")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"{type(self).__name__}: {name} must lie in {{0..{self.num_train_timesteps - 1}}} (0-based, "
                f"T={self.num_train_timesteps}), got values in [{int(t.min())}, {int(t.max())}]."
            )
        return t

    def table(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The float64 table ``name`` cast to ``device``/``dtype`` (cached per device and dtype)."""
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def extract(self, name_or_table: str | torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """Read a table at timesteps ``t`` and shape it to broadcast against ``x``.

        Args:
            name_or_table: attribute name (e.g. ``"betas"``) or a (T,) float64 table.
            t: (B,) or scalar long timestep indices in {0..T-1}.
            x: (B, C, *spatial) tensor whose device and dtype the result takes.

        Returns:
            (B, 1, ..., 1) tensor (or (1, 1, ..., 1) for a scalar ``t``) on ``x``'s device, in ``x``'s dtype.
        """
        if isinstance(name_or_table, str):
            table = self.table(name_or_table, x.device, x.dtype)
        else:
            table = name_or_table.to(device=x.device, dtype=x.dtype)
        t = self.check_timesteps(t).to(x.device).reshape(-1)
        return table[t].reshape(-1, *([1] * (x.ndim - 1)))
