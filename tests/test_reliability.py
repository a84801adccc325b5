"""Reliability: numerical faults stop training cleanly, gradient clipping, determinism on CPU,
and a killed demo-data build leaves nothing that looks finished."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from conftest import DEMO_ITEMS, DEMO_SIZE, PYTHON, REPO, TINY, bundle_files

from monai_hsrdiff.data import load_item
from monai_hsrdiff.diffusion import DiffusionSchedule, SelfRegulatedDiffusion
from monai_hsrdiff.engines import HSRDiffTrainer, NonFiniteLossError
from monai_hsrdiff.networks import get_preset


def _net() -> torch.nn.Module:
    return get_preset(
        "hsrdiff_light", channels=[8, 16, 32], attention_levels=[False, False, True], norm_num_groups=8, num_res_blocks=1
    )


def _batches(n: int = 2, b: int = 4, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(n, b, 1, size, size, generator=g) > 0.5).float() * 2 - 1
    return [{"image": torch.rand(b, 1, size, size, generator=g) * 2 - 1, "label": label[i]} for i in range(n)]


def _trainer(net, **kwargs) -> HSRDiffTrainer:
    return HSRDiffTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_batches(),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
        diffusion=SelfRegulatedDiffusion(DiffusionSchedule(num_train_timesteps=50)),
        **kwargs,
    )


def test_gradient_clipping() -> None:
    """grad_clip_norm bounds the global gradient norm the optimizer sees; grad_norm logs it before clipping."""
    torch.manual_seed(0)
    net = _net()
    trainer = _trainer(net, grad_clip_norm=1e-3, epoch_length=1)
    trainer.run()
    out = trainer.state.output
    assert out["grad_norm"] > 1e-3  # the raw norm of this batch is far above the limit
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))
    assert clipped == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="grad_clip_norm must be > 0"):
        _trainer(_net(), grad_clip_norm=0.0)


def test_non_finite_gradient_stops_before_the_step(tmp_path: Path) -> None:
    """A NaN gradient (here from a hook on one weight: a fault injected into real backprop)
    stops the run before the optimizer steps: the weights stay those of the last good iteration."""
    torch.manual_seed(0)
    net = _net()
    trainer = _trainer(net, checkpoint_dir=str(tmp_path / "no_checkpoints"))
    before = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _arm(engine) -> None:
        if engine.state.iteration == 2:  # the 2nd iteration's backward produces a NaN gradient
            before.update({k: v.clone() for k, v in net.state_dict().items()})
            next(net.parameters()).register_hook(lambda g: g * float("nan"))

    with pytest.raises(NonFiniteLossError) as e:
        trainer.run()
    msg = str(e.value)
    assert "non-finite gradient at epoch 1, iteration 2" in msg and "grad_norm=nan" in msg and "loss=" in msg
    assert f"no checkpoint in {tmp_path / 'no_checkpoints'} yet" in msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.slow
def test_nan_loss_stops_the_bundle_run(run_bundle, bundle_env) -> None:
    """A learning rate of 1e30 blows the weights up after one AdamW step; the second iteration's
    loss is NaN: the run stops with the iteration, the loss terms and the last good checkpoint."""
    ckpts = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / "lidc_demo" / "checkpoints"
    res = run_bundle(
        ["run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY,
         "--learning_rate", "1e30", "--ckpt_every_n_iterations", "1"]
    )  # fmt: skip
    assert res.returncode != 0
    assert "Traceback" not in res.output, res.output[-4000:]
    msg = res.stderr[res.stderr.index("ERROR: ") :]
    assert "non-finite loss at epoch 1, iteration 2 (loss=nan" in msg
    assert all(f"{k}=" in msg for k in ("loss_x0", "loss_eps", "loss_u", "kappa"))
    assert f"the last good checkpoint is {ckpts / 'resume_checkpoint_1.pt'}" in msg
    assert "--resume True" in msg and "--grad_clip_norm" in msg
    # nothing was saved after the fault, and what was saved is finite
    assert sorted(p.name for p in ckpts.iterdir()) == ["resume_checkpoint_1.pt"]
    state = torch.load(ckpts / "resume_checkpoint_1.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in state["network"].values())


# Builds the bundle's trainer in a fresh process, trains 2 iterations from the seed, then samples
# from the trained weights with a seeded generator; prints the losses and digests of weights/samples.
_DETERMINISM = r"""
import hashlib, json, sys
import numpy as np, torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.utils import set_determinism
from monai_hsrdiff.diffusion import HSRDiffPipeline, get_sampler
from monai_hsrdiff.engines import samples_to_masks

files, overrides, seeds = json.loads(sys.argv[1])
out = {}
for seed in seeds:
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({**overrides, "seed": seed})
    set_determinism(seed)  # what the bundle's initialize does
    trainer = parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run()
    net = parser.get_parsed_content("network")
    weights = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()
    image = torch.as_tensor(parser.get_parsed_content("validate#dataset")[0]["image"])[None]
    sampler = get_sampler("ddim", parser.get_parsed_content("diffusion"))
    samples = HSRDiffPipeline(net, sampler)(image, num_samples=4, num_inference_steps=3,
                                            generator=torch.Generator().manual_seed(seed)).samples
    masks = samples_to_masks(samples)
    out[str(seed)] = {"losses": [repr(x) for x in losses], "weights": weights,
                      "samples": hashlib.sha256(samples.numpy().tobytes()).hexdigest(),
                      "foreground": float(masks.float().mean())}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_determinism_across_processes(bundle_env) -> None:
    """Same seed, two processes: bit-identical losses of the first iterations, weights and
    samples on CPU. Another seed gives other numbers (so the comparison can fail)."""
    files = json.loads(bundle_files("lidc", "train", "demo").replace("'", '"'))
    overrides = {
        "image_size": DEMO_SIZE, "preset": "hsrdiff_light", "network_def#channels": [8, 16, 32],
        "network_def#attention_levels": [False, False, True], "network_def#norm_num_groups": 8,
        "network_def#num_res_blocks": 1, "num_train_timesteps": 50, "tracking_enabled": False,
        "batch_size": 8, "num_workers": 0, "val_interval": 100, "train#trainer#epoch_length": 2,
        "num_epochs": 1,
    }  # fmt: skip
    results = []
    for seeds in ([0], [0, 1]):
        proc = subprocess.run(
            [PYTHON, "-c", _DETERMINISM, json.dumps([files, overrides, seeds])],
            cwd=REPO, env=bundle_env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    a, b = results[0]["0"], results[1]["0"]
    assert len(a["losses"]) == 2 and all(math.isfinite(float(x)) for x in a["losses"])
    assert a == b  # bit for bit: losses as repr, sha256 of the weights and of the samples
    other = results[1]["1"]
    assert other["losses"] != a["losses"] and other["weights"] != a["weights"] and other["samples"] != a["samples"]


@pytest.mark.slow
def test_killed_demo_build_leaves_nothing_finished(demo_data: Path, tmp_path: Path) -> None:
    """SIGKILL while ``python -m preprocessing.demo`` writes items: no output folder appears; a
    re-run removes the killed build's hidden folder and builds the same data set as an
    uninterrupted run (the session's demo data)."""
    out = tmp_path / "demo_lidc"
    cmd = [PYTHON, "-m", "preprocessing.demo", "--task", "lidc", "--out", str(out)]
    cmd += ["--size", str(DEMO_SIZE), "--num-items", str(DEMO_ITEMS)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while not any(tmp_path.glob(".demo_lidc.*.tmp/items/*/*.npz")):
        assert proc.poll() is None, "the build finished before it could be killed"
        assert time.monotonic() < end
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not out.exists()  # the partial build sits under a temporary name only
    (leftover,) = tmp_path.glob(".demo_lidc.*.tmp")
    rerun = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=180)
    assert f"removing {leftover}: left by an interrupted write of demo_lidc" in rerun.stdout + rerun.stderr
    assert not list(tmp_path.glob(".demo_lidc.*"))  # nothing hidden left behind
    ref = demo_data / "demo_lidc"
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".npz":
            x, y = load_item(out / rel), load_item(ref / rel)
            assert all(x[k].tobytes() == y[k].tobytes() for k in ("image", "masks")), rel
    splits = [json.loads((d / "datalist.json").read_text()) for d in (out, ref)]
    assert all(splits[0][k] == splits[1][k] for k in ("training", "validation", "test"))
