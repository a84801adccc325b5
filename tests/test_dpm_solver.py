"""DPM-Solver++(2M) and its SDE variant (``DPMSolverSampler``) against closed forms.

References are computed independently of the sampler from the schedule's ᾱ table (itself
checked against ``numpy.linspace`` β in tests/test_diffusion.py; MONAI builds β in float32): the update in its "DDIM form" x' = α' D̃ + σ' (e^{-ηh} ε̂ + sqrt(1 - e^{-2ηh}) z) (algebraically
equal to Lu et al.'s, written differently from the implementation), and on a Gaussian toy
x0 ~ N(μ0, s0²) the exact denoiser E[x0 | x_t] and the exact probability-flow ODE solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_hsrdiff.config_check import check_command
from monai_hsrdiff.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DiffusionSchedule,
    DPMSolverSampler,
    HSRDiffPipeline,
    SelfRegulatedDiffusion,
    get_sampler,
)
from monai_hsrdiff.engines import check_run_values
from monai_hsrdiff.errors import BundleError
from monai_hsrdiff.networks import HSRDiff

T = 250
ACP = DiffusionSchedule(T).alphas_cumprod.double().numpy()
MU0, S0 = 0.3, 0.5  # the Gaussian toy's data distribution N(μ0, s0²)


@dataclass
class Out:
    eps: torch.Tensor | None
    x0: torch.Tensor | None
    kappa: torch.Tensor | None


@pytest.fixture(scope="module")
def process() -> SelfRegulatedDiffusion:
    return SelfRegulatedDiffusion(DiffusionSchedule(T))


def _alpha_sigma(t: int) -> tuple[float, float]:
    a = 1.0 if t < 0 else float(ACP[t])
    return math.sqrt(a), math.sqrt(1.0 - a)


def exact_denoiser(x: torch.Tensor, t: int) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(μ0, s0²): μ0 + α s0² / (α² s0² + σ²) · (x_t - α μ0)."""
    a, s = _alpha_sigma(t)
    return MU0 + a * S0**2 / (a**2 * S0**2 + s**2) * (x - a * MU0)


def exact_ode(x_T: torch.Tensor, t: int) -> torch.Tensor:
    """The probability-flow ODE from x_T at T-1 to t for the toy: x_t - α_t μ0 scales with sqrt(α² s0² + σ²)."""
    a, s = _alpha_sigma(t)
    a_T, s_T = _alpha_sigma(T - 1)
    return a * MU0 + math.sqrt(a**2 * S0**2 + s**2) / math.sqrt(a_T**2 * S0**2 + s_T**2) * (x_T - a_T * MU0)


def toy_output(x: torch.Tensor, t: int, kappa: float = 0.3) -> Out:
    """Both heads exact for the toy (x_θ = E[x0|x_t], ε_θ = E[ε|x_t]), mixed by κ: the fused x̂0 is E[x0|x_t]."""
    a, s = _alpha_sigma(t)
    d = exact_denoiser(x, t)
    return Out((x - a * d) / s, d, torch.full((x.shape[0],), kappa, dtype=x.dtype))


def _solve(sampler, x: torch.Tensor, model, until: int | None = None, generator=None) -> torch.Tensor:
    """Step ``sampler`` from x at its first timestep; stop before the step at ``until`` (None: to the end)."""
    sampler.set_timesteps()
    for t in sampler.timesteps.tolist():
        if t == until:
            break
        x = sampler.step(model(x, t), t, x, generator=generator).prev_sample
    return x


# ---- the update ---------------------------------------------------------------------------


@pytest.mark.parametrize("sde,eta", [(False, 0.0), (True, 1.0), (True, 0.4)])
def test_update_matches_closed_form(process, sde, eta):
    """Three steps (249 -> 166 -> 82 -> clean): first order, second order (the D̃ extrapolation), the clean end."""
    sampler = DPMSolverSampler(process, sde=sde, eta=eta, num_inference_steps=3)
    sampler.set_timesteps()
    ts = sampler.timesteps.tolist()
    assert ts == [249, 166, 82]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=g)
    ds = torch.randn(3, 2, 1, 4, 4, dtype=torch.float64, generator=g).tanh()  # the model's x0 at each step
    zs = torch.randn(3, 2, 1, 4, 4, dtype=torch.float64, generator=g)
    lam = {t: math.log(_alpha_sigma(t)[0] / _alpha_sigma(t)[1]) for t in ts}
    ref, prev_d = x.clone(), None
    for i, t in enumerate(ts):
        step = sampler.step(Out(None, ds[i], None), t, x, noise=zs[i])
        t_next = ts[i + 1] if i + 1 < 3 else -1
        (a, s), (a2, s2) = _alpha_sigma(t), _alpha_sigma(t_next)
        if t_next < 0:
            ref = ds[i]  # σ' = 0: the solver returns its x0 estimate
        else:
            h = lam[t_next] - lam[t]
            d_tilde = ds[i] if prev_d is None else ds[i] + (ds[i] - prev_d) * h / (2 * (lam[t] - lam[ts[i - 1]]))
            eps_hat = (ref - a * d_tilde) / s
            ref = a2 * d_tilde + s2 * (math.exp(-eta * h) * eps_hat + math.sqrt(1 - math.exp(-2 * eta * h)) * zs[i])
        prev_d = ds[i]
        torch.testing.assert_close(step.prev_sample, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step.pred_original_sample, ds[i], rtol=0, atol=0)
        x = step.prev_sample
    assert sampler.name == ("dpmpp_2m_sde" if sde else "dpmpp_2m")


def test_first_ode_step_is_ddim_eta0(process):
    """Lu et al.: DPM-Solver++'s first-order step is DDIM (η=0) on the same x0 estimate."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=g)
    out = Out(torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=g), x.tanh(), torch.tensor([0.2, 0.9], dtype=torch.float64))
    dpm, ddim = DPMSolverSampler(process, num_inference_steps=10), DDIMSampler(process, eta=0.0, num_inference_steps=10)
    dpm.set_timesteps()
    ddim.set_timesteps()
    a, b = dpm.step(out, 249, x), ddim.step(out, 249, x)
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.kappa, out.kappa)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_oracle_reaches_x0_exactly(process, name):
    """A model that returns the true x0 (here through both heads and κ) ends exactly at x0 in S steps."""
    target = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]], dtype=torch.float64)

    def oracle(x, t):
        a, s = _alpha_sigma(t)
        return Out((x - a * target) / s, target, torch.tensor([0.6], dtype=torch.float64))

    sampler = get_sampler(name, process, eta=1.0, num_inference_steps=7)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = _solve(sampler, x, oracle, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, rtol=0, atol=1e-12)


def test_second_order_on_the_gaussian_toy(process):
    """With the exact denoiser the ODE solvers converge to the exact ODE solution at t=49: the error
    of DPM-Solver++(2M) falls as S^-2, DDIM's (first order) as S^-1 (S = 25, 50, 125 share t=49)."""
    x_T = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(61, 1, 1, 1)
    errors = {}
    for name in ("ddim", "dpmpp_2m"):
        errors[name] = []
        for s in (25, 50, 125):
            x = _solve(get_sampler(name, process, eta=0.0, num_inference_steps=s), x_T, toy_output, until=49)
            errors[name].append(float((x - exact_ode(x_T, 49)).abs().max()))
    orders = {n: [math.log(e[i] / e[i + 1]) / math.log(r) for i, r in ((0, 2.0), (1, 2.5))] for n, e in errors.items()}
    assert all(1.8 < o < 2.2 for o in orders["dpmpp_2m"]), (orders, errors)
    assert all(0.8 < o < 1.2 for o in orders["ddim"]), (orders, errors)
    assert errors["dpmpp_2m"][0] < errors["ddim"][0] / 5  # already far better at 25 steps


def test_sde_samples_the_toy_distribution(process):
    """SDE-DPM-Solver++(2M) (η=1) with the exact denoiser draws N(μ0, s0²): its noise term has the right scale."""
    g = torch.Generator().manual_seed(3)
    # 20000 items: under torch's 32768-element grain, so each op runs on one thread (fast on a busy machine)
    x_T = torch.randn(20000, 1, 1, 1, dtype=torch.float64, generator=g)
    x = _solve(get_sampler("dpmpp_2m_sde", process, eta=1.0, num_inference_steps=250), x_T, toy_output, generator=g)
    # standard errors 0.0035 (mean) and 0.0025 (std); the 250-step bias of the std is ~0.002
    assert abs(float(x.mean()) - MU0) < 0.012 and abs(float(x.std()) - S0) < 0.012, (float(x.mean()), float(x.std()))
    ode = _solve(get_sampler("dpmpp_2m", process, num_inference_steps=250), x_T, toy_output)
    assert float((x - ode).abs().mean()) > 0.1  # the SDE's endpoints are not the ODE's


# ---- the multistep contract ---------------------------------------------------------------


def test_steps_in_order_only(process):
    sampler = DPMSolverSampler(process, num_inference_steps=5)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(Out(None, x, None), 249, x)
    sampler.set_timesteps()
    assert sampler.timesteps.tolist() == [249, 199, 149, 99, 49]
    with pytest.raises(ValueError, match="in order"):
        sampler.step(Out(None, x, None), 199, x)  # the trajectory starts at 249
    sampler.step(Out(None, x, None), 249, x)
    with pytest.raises(ValueError, match="in order"):
        sampler.step(Out(None, x, None), 149, x)  # 199 skipped
    with pytest.raises(ValueError, match="same batch"):
        sampler.step(Out(None, x[:1], None), 199, x[:1])
    with pytest.raises(ValueError, match="not one of"):
        sampler.step(Out(None, x, None), 198, x)
    sampler.step(Out(None, x, None), 249, x)  # the first timestep starts a new trajectory
    sampler.step(Out(None, x, None), 199, x)
    for bad in (-0.1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="eta must be a number in"):
            DPMSolverSampler(process, sde=True, eta=bad)
    with pytest.raises(ValueError, match=r"DPMSolverSampler: num_inference_steps must be an integer in \[1, 250\]"):
        DPMSolverSampler(process, num_inference_steps=0)


def test_get_sampler_names_and_settings(process):
    assert {"dpmpp_2m", "dpmpp_2m_sde"} <= set(SAMPLERS)
    ode = get_sampler("dpmpp_2m", process, eta=1.0, num_inference_steps=10)  # the ODE ignores the bundles' η
    assert isinstance(ode, DPMSolverSampler) and not ode.sde and ode.eta == 0.0
    assert ode.settings == {"sampler": "dpmpp_2m", "num_inference_steps": 10, "eta": None}
    sde = get_sampler("dpmpp_2m_sde", process, eta=0.5, num_inference_steps=10)
    assert sde.settings == {"sampler": "dpmpp_2m_sde", "num_inference_steps": 10, "eta": 0.5}
    sde.set_timesteps()
    assert sde.timesteps.tolist() == [249 - 25 * k for k in range(10)]  # DDIM's trailing grid
    # the start-up check of the bundles builds the sampler: the names pass, a bad η is named
    check_run_values(num_train_timesteps=T, val_sampler="dpmpp_2m_sde", val_sampling_steps=10, val_sampler_eta=1.0,
                     eval_sampler="dpmpp_2m", eval_sampling_steps=5, eval_sampler_eta=7.0)  # fmt: skip
    with pytest.raises(BundleError, match=r"val_sampler_eta = 1.5: DPMSolverSampler: eta must be a number in \[0, 1\]"):
        check_run_values(num_train_timesteps=T, val_sampler="dpmpp_2m_sde", val_sampling_steps=10, val_sampler_eta=1.5)
    with pytest.raises(BundleError, match="sampling_steps = 0: DPMSolverSampler: num_inference_steps"):
        check_run_values(num_train_timesteps=T, sampler="dpmpp_2m", sampling_steps=0)


# ---- in the pipeline ----------------------------------------------------------------------


def tiny_net() -> HSRDiff:
    torch.manual_seed(0)
    return HSRDiff(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                   norm_num_groups=4, num_head_channels=8, num_res_blocks=1, prediction="srdiff")  # fmt: skip


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_pipeline_chunks_and_encodes_once(process, name):
    """Samples do not depend on max_batch_size (the solver steps all B·N items at once); E_c runs once per image."""
    net = tiny_net()
    calls: list[int] = []
    net.condition_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    c = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = HSRDiffPipeline(net, get_sampler(name, process, eta=1.0, num_inference_steps=4))
    runs = {}
    for size in (None, 1, 4):
        calls.clear()
        runs[size] = pipe(c, num_samples=3, max_batch_size=size, generator=torch.Generator().manual_seed(0))
        assert calls == ([1, 1] if size == 1 else [2]), (size, calls)  # each image once, in chunks of <= size
    ref = runs[None]
    assert ref.samples.shape == (2, 3, 1, 8, 8) and ref.timesteps.tolist() == [249, 187, 124, 61]
    assert ref.kappa.shape == (4, 2, 3)
    for size in (1, 4):
        torch.testing.assert_close(runs[size].samples, ref.samples, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runs[size].kappa, ref.kappa, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref.samples[:, 0], ref.samples[:, 1])  # the N samples of one image differ


def test_pipeline_sde_reproducible_and_not_the_ode(process):
    net = tiny_net()
    c = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(name, eta=1.0, seed=5):
        pipe = HSRDiffPipeline(net, get_sampler(name, process, eta=eta, num_inference_steps=4))
        return pipe(c, num_samples=3, generator=torch.Generator().manual_seed(seed)).samples

    sde = run("dpmpp_2m_sde")
    assert torch.equal(sde, run("dpmpp_2m_sde"))  # same generator, same samples
    assert (sde - run("dpmpp_2m_sde", seed=6)).abs().max() > 0.1
    ode = run("dpmpp_2m")
    assert (sde - ode).abs().max() > 0.1  # the same x_T (first draw), but the SDE adds noise at every step
    torch.testing.assert_close(run("dpmpp_2m_sde", eta=0.0), ode, rtol=0, atol=0)  # η=0: the ODE exactly


def test_benchmark_reads_the_solver_specs(process):
    """benchmarks/sampling.py --ged-variants: <sampler>:<steps>[:<eta>][:P], P = bf16 (autocast) or bf16true (bf16 weights)."""
    from benchmarks.sampling import _ged_variant

    name, smp, precision = _ged_variant("dpmpp_2m_sde:10:0.5:bf16", process)
    assert name == "DPM++2M SDE 10 eta=0.5 bf16" and precision == "bfloat16"
    assert smp.settings["eta"] == 0.5 and smp.num_inference_steps == 10
    name, smp, precision = _ged_variant("dpmpp_2m_sde:10:bf16true", process)
    assert name == "DPM++2M SDE 10 bf16-true" and precision == "bfloat16-true" and smp.settings["eta"] == 1.0
    name, smp, precision = _ged_variant("dpmpp_2m:5", process)
    assert name == "DPM++2M 5" and precision == "float32"
    assert smp.settings == {"sampler": "dpmpp_2m", "num_inference_steps": 5, "eta": None}
    with pytest.raises(SystemExit, match="cannot read 'dpmpp_2m:5:0.5'"):
        _ged_variant("dpmpp_2m:5:0.5", process)  # the ODE has no eta


@pytest.mark.parametrize("task", ["lidc", "ms_lesion"])
def test_bundles_build_the_solver(task):
    """The bundles' sampler keys reach get_sampler: val_sampler (train.json) and sampler (inference.json)."""
    bundle = Path(__file__).resolve().parents[1] / "bundles" / task
    files = [str(bundle / "train.json"), str(bundle / "demo.json")]
    assert check_command(task, ["run", "training", "--config_file", repr(files), "--val_sampler", "dpmpp_2m_sde"]) is not None
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"val_sampler": "dpmpp_2m_sde", "val_sampling_steps": 10})
    smp = parser.get_parsed_content("validate#sampler")
    assert isinstance(smp, DPMSolverSampler) and smp.settings == {"sampler": "dpmpp_2m_sde", "num_inference_steps": 10, "eta": 1.0}
    parser = ConfigParser()
    parser.read_config([str(bundle / "train.json"), str(bundle / "inference.json")])
    parser.update({"sampler": "dpmpp_2m", "sampling_steps": 8})
    smp = parser.get_parsed_content("pipeline#sampler")
    assert isinstance(smp, DPMSolverSampler) and smp.settings == {"sampler": "dpmpp_2m", "num_inference_steps": 8, "eta": None}
