"""Cross-check: our DPMSolverSampler against diffusers' DPMSolverMultistepScheduler.

diffusers is not a dependency of this project (docs/diffusion.md says why), so install it
outside the environment and point this script at it::

    .venv/bin/pip install --target /tmp/diffusers_ref diffusers==0.42.1
    .venv/bin/python benchmarks/dpm_solver_vs_diffusers.py --diffusers-path /tmp/diffusers_ref

Both solvers get the same x0-model outputs (a fixed smooth function of x and t), the same noise
and the T=250 schedule's β; it prints the largest difference of the trajectories' ends for
dpmpp_2m / dpmpp_2m_sde (η=1) at 5, 10 and 25 steps (float32: expect ~1e-6) and exits 1 above
``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_hsrdiff.diffusion import DiffusionSchedule, SelfRegulatedDiffusion, get_sampler  # noqa: E402

T = 250


def x0_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A data prediction that depends on x and t (the solvers, not the model, are compared)."""
    return torch.tanh(1.5 * x - t / T)


def compare(scheduler_cls, name: str, algorithm: str, steps: int, process: SelfRegulatedDiffusion) -> float:
    ref = scheduler_cls(
        num_train_timesteps=T, trained_betas=process.schedule.betas.double().numpy(), prediction_type="sample",
        algorithm_type=algorithm, solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero",
    )  # fmt: skip
    ref.set_timesteps(steps)
    ours = get_sampler(name, process, eta=1.0, num_inference_steps=steps)
    ours.set_timesteps()
    if ref.timesteps.tolist() != ours.timesteps.tolist():
        raise SystemExit(f"{name} S={steps}: timesteps differ: {ref.timesteps.tolist()} vs {ours.timesteps.tolist()}")
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(4, 1, 8, 8, generator=g)
    noises = torch.randn(steps, 4, 1, 8, 8, generator=g)
    x_ours = x_ref.clone()
    for i, t in enumerate(ours.timesteps.tolist()):
        x_ref = ref.step(x0_model(x_ref, t), t, x_ref, variance_noise=noises[i]).prev_sample
        out = SimpleNamespace(eps=None, x0=x0_model(x_ours, t), kappa=None)
        x_ours = ours.step(out, t, x_ours, noise=noises[i]).prev_sample
    return float((x_ref - x_ours).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--diffusers-path", default=None, help="folder holding the diffusers package (pip --target)")
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args(argv)
    if args.diffusers_path:
        sys.path.append(args.diffusers_path)  # after the environment's torch and numpy
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError as e:
        raise SystemExit(f"diffusers not importable ({e}); see this script's docstring") from e
    process = SelfRegulatedDiffusion(DiffusionSchedule(T))
    worst = 0.0
    for name, algorithm in (("dpmpp_2m", "dpmsolver++"), ("dpmpp_2m_sde", "sde-dpmsolver++")):
        for steps in (5, 10, 25):
            diff = compare(DPMSolverMultistepScheduler, name, algorithm, steps, process)
            worst = max(worst, diff)
            print(f"{name:13s} S={steps:3d}  max |ours - diffusers| = {diff:.2e}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
