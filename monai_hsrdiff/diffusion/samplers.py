"""Reverse-process samplers: ancestral DDPM (the paper's Algorithm 2), strided DDIM and
DPM-Solver++(2M) with its SDE variant (the last two on the fused x0 estimate of the model).

Like diffusers' schedulers, a sampler holds the schedule and a ``step``; it never calls the
network (the loop lives in :mod:`monai_hsrdiff.diffusion.pipeline`). A sampler knows its own step
count (``num_inference_steps``: DDPM always T, the others any 1..T); call ``set_timesteps()``
first, then ``step(model_output, t, x_t)`` for each ``t`` in ``sampler.timesteps``, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from monai_hsrdiff.diffusion.process import ModelOutput, SelfRegulatedDiffusion, randn

__all__ = ["SAMPLERS", "DDIMSampler", "DDPMSampler", "DPMSolverSampler", "SamplerStepOutput", "get_sampler"]


@dataclass
class SamplerStepOutput:
    """Result of one reverse step.

    Attributes:
        prev_sample: (B, M, *spatial) x_{t_prev}, the input of the next step.
        pred_original_sample: (B, M, *spatial) the fused x0 estimate x̂0 at this step (DDIM,
            DPM-Solver++), or ``None`` (DDPM works on means).
        kappa: (B,) κ used at this step (for the paper's Figure 6 trace).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None
    kappa: torch.Tensor


class _Sampler:
    def __init__(self, process: SelfRegulatedDiffusion | None = None) -> None:
        self.process = process if process is not None else SelfRegulatedDiffusion()
        self.schedule = self.process.schedule
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.timesteps: torch.Tensor | None = None
        #: the sampler's own step count, what ``set_timesteps()`` without an argument uses
        self.num_inference_steps: int = self.num_train_timesteps

    def _require_timesteps(self) -> torch.Tensor:
        if self.timesteps is None:
            raise RuntimeError(
                f"{type(self).__name__}: the number of inference steps is not set; call "
                f"`set_timesteps(num_inference_steps)` before `step`."
            )
        return self.timesteps

    def _noise(
        self, sample: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        if noise is None:
            return randn(sample.shape, generator, sample.device, sample.dtype)
        if noise.shape != sample.shape:
            raise ValueError(
                f"{type(self).__name__}.step: noise shape {tuple(noise.shape)} must equal sample shape {tuple(sample.shape)}."
            )
        return noise.to(device=sample.device, dtype=sample.dtype)

    def _check_t(self, timestep: int | torch.Tensor) -> int:
        timesteps = self._require_timesteps()
        t = int(self.schedule.check_timesteps(torch.as_tensor(timestep).reshape(-1)[:1], "timestep")[0])
        if not bool((timesteps == t).any()):
            raise ValueError(
                f"{type(self).__name__}.step: timestep {t} is not one of the {len(timesteps)} timesteps set by "
                "`set_timesteps`; iterate over `sampler.timesteps`."
            )
        return t


class DDPMSampler(_Sampler):
    """Ancestral sampling of the paper's Algorithm 2: x_{t-1} = μ_θ + σ_t z, z = 0 at the last step.

    μ_θ = κ·μ_x + (1-κ)·μ_eps (Eq. 8, see :meth:`SelfRegulatedDiffusion.p_mean`).

    Args:
        process: the diffusion process (schedule, dual weight, clipping).
        variance: σ_t² choice. ``"posterior"`` (default): β̃_t = β_t(1-ᾱ_{t-1})/(1-ᾱ_t), the
            exact posterior variance, i.e. the lower bound of Ho et al. 2020, and the variance the
            paper's training target μ̃ belongs to. ``"beta"``: σ_t² = β_t (the upper bound).
        clip_x0: clamp x_θ to [-1, 1] inside μ_x; ``None`` uses ``process.clip_x0``.

    Its ``num_inference_steps`` is always T (ancestral sampling cannot skip steps).

    Example::

        sampler = DDPMSampler(process)
        sampler.set_timesteps()             # T-1, ..., 0
        for t in sampler.timesteps:
            x = sampler.step(model(x, t.repeat(b), condition_features=f), t, x, generator=g).prev_sample
    """

    name = "ddpm"

    def __init__(
        self,
        process: SelfRegulatedDiffusion | None = None,
        variance: Literal["posterior", "beta"] = "posterior",
        clip_x0: bool | None = None,
    ) -> None:
        super().__init__(process)
        if variance not in ("posterior", "beta"):
            raise ValueError(f"DDPMSampler: variance must be 'posterior' or 'beta', got {variance!r}.")
        self.variance = variance
        self.clip_x0 = self.process.clip_x0 if clip_x0 is None else bool(clip_x0)

    @property
    def settings(self) -> dict[str, str | int | float | None]:
        """What a user chose, for ``summary.json``: DDPM has no step count and no η to choose."""
        return {"sampler": self.name, "num_inference_steps": None, "eta": None}

    def set_timesteps(self, num_inference_steps: int | None = None, device: torch.device | str | None = None) -> None:
        """Use every training step T-1, ..., 0 (ancestral DDPM cannot skip steps; use :class:`DDIMSampler`).

        ``num_inference_steps`` may only be ``None`` or T.
        """
        if num_inference_steps is not None and num_inference_steps != self.num_train_timesteps:
            raise ValueError(
                f"DDPMSampler: ancestral sampling runs all T={self.num_train_timesteps} steps, got "
                f"num_inference_steps={num_inference_steps}; use DDIMSampler for fewer steps."
            )
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, device=device)

    def step(
        self,
        model_output: ModelOutput,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> SamplerStepOutput:
        """One ancestral step x_t → x_{t-1}.

        Args:
            model_output: network output at (x_t, t): eps/x0 (B, M, *spatial), kappa (B,) or ``None``.
            timestep: t, an entry of ``self.timesteps``.
            sample: (B, M, *spatial) x_t.
            generator: random generator for z.
            noise: explicit z (same shape as ``sample``) instead of drawing one.
        """
        t = self._check_t(timestep)
        t_batch = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
        # 1. μ_θ (Eq. 8)
        mean, kappa = self.process.p_mean(model_output, sample, t_batch, clip_x0=self.clip_x0)
        if t == 0:
            # 2. the last step returns the mean (z = 0)
            return SamplerStepOutput(mean, None, kappa)
        # 2. σ_t z
        table = "posterior_variance" if self.variance == "posterior" else "betas"
        sigma = self.schedule.extract(table, t_batch, sample).sqrt()
        return SamplerStepOutput(mean + sigma * self._noise(sample, noise, generator), None, kappa)


class _StridedSampler(_Sampler):
    """S of the T training steps, in DDIM's ``trailing`` or ``leading`` spacing (DDIM, DPM-Solver++)."""

    def __init__(
        self,
        process: SelfRegulatedDiffusion | None,
        num_inference_steps: int | None,
        timestep_spacing: Literal["trailing", "leading"],
        clip_x0: bool | None,
    ) -> None:
        super().__init__(process)
        if num_inference_steps is not None:
            self.num_inference_steps = self._check_steps(num_inference_steps)
        if timestep_spacing not in ("trailing", "leading"):
            raise ValueError(
                f"{type(self).__name__}: timestep_spacing must be 'trailing' or 'leading', got {timestep_spacing!r}."
            )
        self.timestep_spacing = timestep_spacing
        self.clip_x0 = self.process.clip_x0 if clip_x0 is None else bool(clip_x0)
        self._prev: dict[int, int] = {}

    def _check_steps(self, s: int) -> int:
        big_t = self.num_train_timesteps
        if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= big_t:
            raise ValueError(f"{type(self).__name__}: num_inference_steps must be an integer in [1, {big_t}], got {s!r}.")
        return s

    def set_timesteps(self, num_inference_steps: int | None = None, device: torch.device | str | None = None) -> None:
        """Choose S timesteps (descending): S = ``num_inference_steps`` for this run, or (``None``)
        the sampler's own ``self.num_inference_steps``, which this does not change."""
        big_t = self.num_train_timesteps
        s = self._check_steps(self.num_inference_steps if num_inference_steps is None else num_inference_steps)
        if self.timestep_spacing == "trailing":
            # round(T - k·T/S) - 1 for k = 0..S-1: T-1 first
            steps = [round(big_t - k * big_t / s) - 1 for k in range(s)]
        else:
            steps = [k * (big_t // s) for k in range(s)][::-1]
        self.timesteps = torch.tensor(steps, dtype=torch.long, device=device)
        self._prev = {steps[i]: (steps[i + 1] if i + 1 < s else -1) for i in range(s)}

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` in the sequence; -1 (ᾱ = 1, clean) after the last."""
        self._require_timesteps()
        return self._prev[int(timestep)]

    def _alpha_bar(self, t: int) -> float:
        """ᾱ_t as a Python float (float64); 1 at t = -1."""
        return float(self.schedule.alphas_cumprod[t]) if t >= 0 else 1.0


class DDIMSampler(_StridedSampler):
    """Strided DDIM sampling (Song et al. 2021) of the self-regulated model, any number of steps.

    The fused estimate x̂0 = κ·x_θ + (1-κ)·x0(ε_θ), x0(ε_θ) = (x_t - sqrt(1-ᾱ_t) ε_θ)/sqrt(ᾱ_t),
    replaces DDIM's x0 prediction and ε̂ = (x_t - sqrt(ᾱ_t) x̂0)/sqrt(1-ᾱ_t) its direction;
    since μ̃(x̂0, x_t) is the Eq. 8 mean, ``eta=1`` over all T steps reproduces
    :class:`DDPMSampler` with the posterior variance exactly.

    Args:
        process: the diffusion process (schedule, dual weight, clipping).
        eta: η of DDIM Eq. 16; 0 gives the deterministic sampler, 1 the DDPM-like one.
        num_inference_steps: S, the sampler's own step count in [1, T] (what ``set_timesteps()``
            uses); ``None`` (default): all T.
        timestep_spacing: ``"trailing"`` (default; starts at t=T-1, the step closest to pure
            noise) or ``"leading"`` (guided-diffusion's ``ddimN``: 0, T/S, 2T/S, ...).
        clip_x0: clamp the fused x̂0 to [-1, 1]; ``None`` uses ``process.clip_x0``.

    Example::

        sampler = DDIMSampler(process, eta=0.0, num_inference_steps=50)
        sampler.set_timesteps()             # 50 timesteps, T-1 first
        sampler.set_timesteps(10)           # 10 for this run; sampler.num_inference_steps stays 50
    """

    name = "ddim"

    def __init__(
        self,
        process: SelfRegulatedDiffusion | None = None,
        eta: float = 0.0,
        num_inference_steps: int | None = None,
        timestep_spacing: Literal["trailing", "leading"] = "trailing",
        clip_x0: bool | None = None,
    ) -> None:
        super().__init__(process, num_inference_steps, timestep_spacing, clip_x0)
        if eta < 0:
            raise ValueError(f"DDIMSampler: eta must be >= 0, got {eta!r}.")
        self.eta = float(eta)

    @property
    def settings(self) -> dict[str, str | int | float | None]:
        """What a user chose, for ``summary.json``: ``{"sampler": "ddim", "num_inference_steps": S, "eta": η}``."""
        return {"sampler": self.name, "num_inference_steps": self.num_inference_steps, "eta": self.eta}

    def step(
        self,
        model_output: ModelOutput,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> SamplerStepOutput:
        """One DDIM step x_t → x_{t_prev} (DDIM Eq. 12 with σ from Eq. 16).

        Symbols: ``a_t`` = ᾱ_t, ``a_prev`` = ᾱ_{t_prev} (1 after the last step), ``x0_hat`` = x̂0,
        ``eps_hat`` = ε̂. Arguments as in :meth:`DDPMSampler.step`.
        """
        t = self._check_t(timestep)
        t_prev = self._prev[t]
        b = sample.shape[0]
        t_batch = torch.full((b,), t, dtype=torch.long, device=sample.device)
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        # 1. fused x0 estimate and the ε it implies
        x0_hat, kappa = self.process.fused_x0(model_output, sample, t_batch, clip_x0=self.clip_x0)
        eps_hat = (sample - a_t**0.5 * x0_hat) / (1.0 - a_t) ** 0.5
        # 2. σ_t(η) = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1-ᾱ_t/ᾱ_prev)  (DDIM Eq. 16)
        sigma = self.eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        # 3. x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1-ᾱ_prev-σ²) ε̂ + σ z  (DDIM Eq. 12)
        direction = max(1.0 - a_prev - sigma**2, 0.0) ** 0.5
        prev = a_prev**0.5 * x0_hat + direction * eps_hat
        if sigma > 0:
            prev = prev + sigma * self._noise(sample, noise, generator)
        return SamplerStepOutput(prev, x0_hat, kappa)


class DPMSolverSampler(_StridedSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) and its SDE variant on the fused x̂0.

    The data-prediction multistep solver of the probability-flow ODE, with x̂0 = κ·x_θ +
    (1-κ)·x0(ε_θ) (the estimate DDIM uses) as the data prediction D_i at t_i. With
    α = sqrt(ᾱ), σ = sqrt(1-ᾱ), λ = log(α/σ), h_i = λ(t_{i+1}) - λ(t_i), r_i = h_{i-1}/h_i:

        D̃_i     = D_i + (D_i - D_{i-1}) / (2 r_i)           (D̃_i = D_i at the first and last step)
        x_{i+1} = (σ_{i+1}/σ_i) e^{-η h_i} x_i + α_{i+1} (1 - e^{-(1+η) h_i}) D̃_i
                  + σ_{i+1} sqrt(1 - e^{-2η h_i}) z

    ``sde=False`` is the ODE solver (η = 0: deterministic given x_T; its first-order step is DDIM
    η=0). ``sde=True`` adds the noise of SDE-DPM-Solver++(2M), which keeps sample diversity:
    η = 1 is Lu et al.'s SDE solver (diffusers' ``sde-dpmsolver++``), η in (0, 1) the partial
    noise of k-diffusion's ``dpmpp_2m_sde``. The last step lands on ᾱ = 1 (σ = 0) and returns
    its x̂0, as DDIM does. The update keeps the dtype of ``sample``; coefficients are float64.

    Because it is a multistep solver it remembers the previous step's D: call ``step`` for the
    timesteps of ``sampler.timesteps`` in order (the first one starts a new trajectory), on
    all B·N items at once as :class:`~monai_hsrdiff.diffusion.HSRDiffPipeline` does.

    Args:
        process: the diffusion process (schedule, dual weight, clipping).
        sde: add the SDE noise (name ``"dpmpp_2m_sde"``); ``False``: the ODE solver (``"dpmpp_2m"``).
        eta: η in [0, 1], the SDE's noise fraction (only with ``sde=True``; 0 gives the ODE solver).
        num_inference_steps: S in [1, T], the sampler's own step count; ``None``: all T.
        timestep_spacing: ``"trailing"`` (default) or ``"leading"``, as :class:`DDIMSampler`.
        clip_x0: clamp the fused x̂0 to [-1, 1]; ``None`` uses ``process.clip_x0``.

    Example::

        sampler = DPMSolverSampler(process, sde=True, num_inference_steps=10)
        sampler.set_timesteps()             # 249, 224, ..., 24
    """

    def __init__(
        self,
        process: SelfRegulatedDiffusion | None = None,
        sde: bool = False,
        eta: float = 1.0,
        num_inference_steps: int | None = None,
        timestep_spacing: Literal["trailing", "leading"] = "trailing",
        clip_x0: bool | None = None,
    ) -> None:
        super().__init__(process, num_inference_steps, timestep_spacing, clip_x0)
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"DPMSolverSampler: eta must be a number in [0, 1], got {eta!r}.")
        self.sde = bool(sde)
        self.eta = float(eta) if self.sde else 0.0
        self.name = "dpmpp_2m_sde" if self.sde else "dpmpp_2m"
        # the previous step's (timestep, D) of the trajectory being solved
        self._last: tuple[int, torch.Tensor] | None = None

    @property
    def settings(self) -> dict[str, str | int | float | None]:
        """What a user chose, for ``summary.json``: η only for the SDE variant (the ODE has none)."""
        return {"sampler": self.name, "num_inference_steps": self.num_inference_steps, "eta": self.eta if self.sde else None}

    def set_timesteps(self, num_inference_steps: int | None = None, device: torch.device | str | None = None) -> None:
        """As :meth:`DDIMSampler.set_timesteps`; also forgets the previous trajectory."""
        super().set_timesteps(num_inference_steps, device)
        self._last = None

    def _lambda(self, t: int) -> float:
        """λ(t) = log(α_t/σ_t) = log(ᾱ_t/(1-ᾱ_t))/2 for t >= 0 (the clean end, λ = +∞, is handled in ``step``)."""
        a = self._alpha_bar(t)
        return 0.5 * (math.log(a) - math.log1p(-a))

    def step(
        self,
        model_output: ModelOutput,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> SamplerStepOutput:
        """One solver step x_{t_i} → x_{t_{i+1}}; arguments as in :meth:`DDPMSampler.step`.

        ``noise`` / ``generator`` are used only by the SDE variant (η > 0) and not at the last step.
        """
        t = self._check_t(timestep)
        t_next = self._prev[t]
        first = t == int(self.timesteps[0])
        if not first and (self._last is None or self._prev[self._last[0]] != t or self._last[1].shape != sample.shape):
            raise ValueError(
                f"{type(self).__name__}.step: timestep {t} does not follow the previous step of this trajectory "
                f"(last: {None if self._last is None else self._last[0]}); a multistep solver must be stepped over "
                "`sampler.timesteps` in order, on the same batch, starting with the first."
            )
        t_batch = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
        d, kappa = self.process.fused_x0(model_output, sample, t_batch, clip_x0=self.clip_x0)
        before = None if first else self._last
        self._last = (t, d)
        if t_next < 0:
            # σ = 0 at the clean end: x_0 = D (h = ∞, every other term vanishes); the trajectory ends,
            # so its D is not kept alive
            self._last = None
            return SamplerStepOutput(d.clone(), d, kappa)
        a_t, a_next = self._alpha_bar(t), self._alpha_bar(t_next)
        h = self._lambda(t_next) - self._lambda(t)
        d_tilde = d
        if before is not None:
            # 2nd order (the midpoint form): r = h_{i-1}/h_i, t_{i-1} = the previous step's timestep
            r = (self._lambda(t) - self._lambda(before[0])) / h
            d_tilde = d + (d - before[1]) / (2.0 * r)
        eta = self.eta
        x_coef = ((1.0 - a_next) / (1.0 - a_t)) ** 0.5 * math.exp(-eta * h)
        d_coef = a_next**0.5 * -math.expm1(-(1.0 + eta) * h)
        prev = x_coef * sample + d_coef * d_tilde
        if eta > 0:
            z_coef = (1.0 - a_next) ** 0.5 * (-math.expm1(-2.0 * eta * h)) ** 0.5
            prev = prev + z_coef * self._noise(sample, noise, generator)
        return SamplerStepOutput(prev, d, kappa)


SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")


def get_sampler(
    name: str,
    process: SelfRegulatedDiffusion | None = None,
    eta: float = 0.0,
    num_inference_steps: int | None = None,
    **kwargs,
) -> DDPMSampler | DDIMSampler | DPMSolverSampler:
    """Build a sampler by name, for configs: ``"ddpm"`` (Algorithm 2, all T steps), ``"ddim"``
    (strided, η), ``"dpmpp_2m"`` (DPM-Solver++(2M), the ODE) or ``"dpmpp_2m_sde"`` (its SDE, η).

    The one place that knows which sampler takes which setting: bundles pass their
    ``*sampling_steps`` and ``*sampler_eta`` whatever the sampler; ``"ddpm"`` ignores both (it
    always runs all T steps) and ``"dpmpp_2m"`` ignores η (the ODE has no noise). Other keyword
    arguments go to the sampler's constructor.

    Example::

        get_sampler("ddim", process, eta=1.0, num_inference_steps=50).num_inference_steps  # 50
        get_sampler("ddpm", process, eta=1.0, num_inference_steps=50).num_inference_steps  # T
        get_sampler("dpmpp_2m_sde", process, eta=1.0, num_inference_steps=10).settings["eta"]  # 1.0
    """
    if name == "ddpm":
        return DDPMSampler(process, **kwargs)
    if name == "ddim":
        return DDIMSampler(process, eta=eta, num_inference_steps=num_inference_steps, **kwargs)
    if name in ("dpmpp_2m", "dpmpp_2m_sde"):
        sde = name == "dpmpp_2m_sde"
        return DPMSolverSampler(process, sde=sde, eta=eta if sde else 1.0, num_inference_steps=num_inference_steps, **kwargs)
    raise ValueError(f"get_sampler: unknown sampler {name!r}; expected one of {list(SAMPLERS)}")
