"""Diffusion process, samplers and sampling pipeline of HSRDiff (see docs/diffusion.md)."""

from __future__ import annotations

from monai_hsrdiff.diffusion.pipeline import HSRDiffPipeline, SamplingOutput, auto_batch_size
from monai_hsrdiff.diffusion.process import DiffusionLossOutput, PMean, SelfRegulatedDiffusion, resolve_kappa
from monai_hsrdiff.diffusion.samplers import SAMPLERS, DDIMSampler, DDPMSampler, DPMSolverSampler, SamplerStepOutput, get_sampler
from monai_hsrdiff.diffusion.schedule import DiffusionSchedule, default_beta_range

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionLossOutput",
    "DPMSolverSampler",
    "DiffusionSchedule",
    "HSRDiffPipeline",
    "PMean",
    "SamplerStepOutput",
    "SamplingOutput",
    "SelfRegulatedDiffusion",
    "SAMPLERS",
    "auto_batch_size",
    "default_beta_range",
    "get_sampler",
    "resolve_kappa",
]
