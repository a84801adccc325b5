"""The bundles through the user's entry point: ``python -m monai.bundle run training`` and
``run evaluating`` for both tasks on tiny demo data, and the declared ``network_data_format``.

``python -m monai.bundle verify_net_in_out`` cannot check these bundles: it feeds ONE tensor
(``inputs#image``) as the network's first argument and reads ``outputs#pred`` as a tensor,
while HSRDiff's forward takes (noisy label, timesteps, condition image) and returns an
``HSRDiffOutput`` (eps, x0, kappa), and the bundle's end product (N boolean samples per image)
comes from the sampling pipeline, not from one forward pass. ``test_network_data_format``
is the equivalent check: it builds ``network_def`` from the bundle config and feeds every
declared input at its declared shape, dtype and value range, then checks every declared output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, TINY_NET, bundle_files
from monai.bundle import ConfigParser

from monai_hsrdiff.diffusion import HSRDiffPipeline, get_sampler
from monai_hsrdiff.engines import samples_to_masks

TASKS = ("lidc", "ms_lesion")

# The metric ranges: GED with d = 1 - IoU is in [0, 2]; HM-IoU, MDM and fused IoU are IoUs in [0, 1].
RANGES = {"ged": (0.0, 2.0), "hm_iou": (0.0, 1.0), "mdm": (0.0, 1.0), "fused_iou": (0.0, 1.0), "entropy": (0.0, 1.0),
          "ece": (0.0, 1.0), "ece_fg": (0.0, 1.0)}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _in_range(x: torch.Tensor, value_range: list) -> bool:
    return not value_range or bool((x.float() >= value_range[0]).all() and (x.float() <= value_range[1]).all())


@pytest.mark.parametrize("task", TASKS)
def test_network_data_format(task: str) -> None:
    """Every input of metadata.json's network_data_format, at its declared shape/dtype/range, gives
    every declared output at its declared shape/dtype/range (the bundle's own config builds the net).

    The width is overridden to 8/8/16/16 channels (the format does not depend on it) so the
    128x128 forward pass takes a second on a CPU instead of half a minute for the 100M-parameter preset.
    """
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / task / "train.json"))
    parser.read_meta(str(REPO / "bundles" / task / "metadata.json"))
    parser["network_def#channels"] = [8, 8, 16, 16]
    parser["network_def#norm_num_groups"] = 8
    parser["network_def#num_head_channels"] = 8
    fmt = parser["_meta_#network_data_format"]
    inputs, outputs = fmt["inputs"], fmt["outputs"]

    # the metadata describes this config: channels, image size, T
    assert inputs["image"]["num_channels"] == parser["in_channels"]
    assert inputs["noisy_label"]["num_channels"] == parser["out_channels"]
    assert inputs["image"]["spatial_shape"] == [parser["image_size"]] * 2
    assert inputs["timesteps"]["value_range"] == [0, parser["num_train_timesteps"] - 1]
    assert set(fmt["presets"]) == {"hsrdiff", "hsrdiff_light"} and parser["preset"] in fmt["presets"]

    net = parser.get_parsed_content("network_def").eval()
    gen = torch.Generator().manual_seed(0)
    spec = inputs["image"]
    lo, hi = spec["value_range"] or (-3.0, 3.0)
    image = lo + (hi - lo) * torch.rand(2, spec["num_channels"], *spec["spatial_shape"], generator=gen)
    image = image.to(_dtype(spec["dtype"]))
    spec = inputs["noisy_label"]
    noisy = torch.randn(2, spec["num_channels"], *spec["spatial_shape"], generator=gen).to(_dtype(spec["dtype"]))
    spec = inputs["timesteps"]
    timesteps = torch.tensor(spec["value_range"], dtype=_dtype(spec["dtype"]))  # both ends of the range
    with torch.inference_mode():
        out = net(noisy, timesteps, condition=image)
        for name in ("eps", "x0", "kappa"):
            spec, value = outputs[name], getattr(out, name)
            shape = (2, spec["num_channels"], *spec["spatial_shape"]) if spec["num_channels"] else (2,)
            assert tuple(value.shape) == shape, name
            assert value.dtype == _dtype(spec["dtype"]), name
            assert torch.isfinite(value).all(), name
        assert _in_range(out.kappa, outputs["kappa"]["value_range"])
        # x0's declared [-1, 1] is the label scale the sampler clips x_theta to; the raw head is
        # an unbounded regression, so its range is not asserted here.

        # the bundle's product: N boolean samples per image, from the pipeline the evaluator uses
        sampler = get_sampler("ddim", parser.get_parsed_content("diffusion"))
        samples = HSRDiffPipeline(net, sampler)(
            image[:1], num_samples=3, num_inference_steps=1, generator=torch.Generator().manual_seed(0)
        ).samples
    masks = samples_to_masks(samples)
    spec = outputs["samples"]
    assert tuple(masks.shape) == (1, 3, *spec["spatial_shape"]) and spec["num_channels"] == 1
    assert masks.dtype == _dtype(spec["dtype"])
    assert _in_range(masks, spec["value_range"])


def _check_metrics(path: Path, expected: set[str]) -> dict:
    metrics = json.loads(path.read_text())
    assert set(metrics) == expected
    for name, value in metrics.items():
        lo, hi = RANGES[name.split("_", 1)[1].rstrip("0123456789")]  # val_ged16, test_ged16 -> ged
        assert math.isfinite(value) and lo <= value <= hi, (name, value)
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_train_then_evaluate(task: str, run_bundle, bundle_env, demo_data: Path, tmp_path: Path) -> None:
    """Train from a foreign working directory, evaluate from the repository root: both use
    ``$HSRDIFF_RUN_ROOT/<task>_demo``; checkpoints and metrics.json land there, metrics in range."""
    run_dir = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / f"{task}_demo"
    elsewhere = tmp_path / "some" / "other" / "cwd"
    elsewhere.mkdir(parents=True)
    res = run_bundle(
        ["run", "training", "--config_file", bundle_files(task, "train", "demo"), *TINY],
        cwd=elsewhere,
    )
    assert res.returncode == 0, res.output[-3000:]
    assert f"run directory: {run_dir}" in res.stdout
    assert "SYNTHETIC" in res.stdout
    ckpts = run_dir / "checkpoints"
    # batch 8, one epoch: ceil(n / 8) iterations, then the epoch-end resume checkpoint
    n_train = len(json.loads((demo_data / f"demo_{task}" / "datalist.json").read_text())["training"])
    its = math.ceil(n_train / 8)
    assert sorted(p.name for p in ckpts.iterdir()) == ["model.pt", f"resume_checkpoint_{its}.pt"]
    state = torch.load(ckpts / f"resume_checkpoint_{its}.pt", map_location="cpu", weights_only=True)
    assert {"network", "ema", "optimizer", "lr_scheduler", "trainer"} <= set(state)
    assert (state["trainer"]["iteration"], state["trainer"]["epoch_length"], state["trainer"]["max_epochs"]) == (its, its, 1)
    # AdamW took one step per iteration (its step counter is saved with the optimizer)
    assert all(int(s["step"]) == its for s in state["optimizer"]["state"].values())
    assert not list(elsewhere.iterdir()), "nothing may be written to the working directory"
    # the training log carries every loss term (StatsHandler: their epoch means, one line per epoch), all finite
    logged = [line for line in res.output.splitlines() if "Epoch[1] Metrics -- train_" in line]
    assert logged and all(k in logged[-1] for k in ("train_loss:", "train_loss_eps:", "train_loss_x0:", "train_loss_u:", "train_kappa:"))
    assert "nan" not in logged[-1] and "inf" not in logged[-1]
    assert not [line for line in res.output.splitlines() if "Iter: " in line]  # no per-iteration lines under the progress bar

    res = run_bundle(
        [
            "run", "evaluating",
            "--config_file", bundle_files(task, "train", "evaluate", "demo"),
            *TINY_NET,
            "--eval_num_samples", "32", "--eval_sampler", "ddim",
            "--eval_sampling_steps", "2", "--eval_max_items", "2",
        ],
        cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.output[-3000:]
    names = {f"val_{m}{n}" for m in ("ged", "hm_iou", "mdm") for n in (16, 32)} | {"val_fused_iou16", "val_entropy16"}
    names |= {"val_ece32", "val_ece_fg32"}
    names |= {"test_" + n.removeprefix("val_") for n in names}  # eval_split test; val_* kept as deprecated aliases
    metrics = _check_metrics(run_dir / "eval" / "metrics.json", names)
    for name in names - {n for n in names if n.startswith("val_")}:
        assert metrics[name] == metrics["val_" + name.removeprefix("test_")], name
    assert f"metrics written to {run_dir / 'eval' / 'metrics.json'}" in res.stdout
    for name, value in metrics.items():
        assert f"{name} = {value:.4f}" in res.stdout
