"""Figures a tracked run logs: the self-regulation curve (paper Figure 6) and sample grids.

Figures are built on ``matplotlib.figure.Figure`` directly (no ``pyplot``), so they never
touch a global backend or leak open figures in a long training process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["SampleCollector", "kappa_curve_figure", "sample_grid_figure"]


def kappa_curve_figure(
    kappa_trace: Mapping[int, float],
    num_train_timesteps: int | None = None,
    title: str = "",
) -> Figure:
    """Mean κ_φ per sampling timestep, drawn like the paper's Figure 6.

    The horizontal axis is the diffusion step t (0 .. T, left to right), the vertical axis
    κ_φ in [0, 1]. With Eq. 8's placement (``μ_θ = κ·μ_x + (1−κ)·μ_eps``), κ above 0.5 means
    the sampler leans on the x0 prediction, below 0.5 on the ε prediction.

    Args:
        kappa_trace: {timestep t: mean κ over the images and samples of a run}.
        num_train_timesteps: T, for the axis range (default: the largest t + 1).
        title: figure title (run, epoch).

    Returns:
        A matplotlib ``Figure`` (log it with ``MlflowClient.log_figure``).

    Example::

        fig = kappa_curve_figure({249: 0.4, 124: 0.5, 0: 0.7}, num_train_timesteps=250)
    """
    if not kappa_trace:
        raise ValueError("kappa_curve_figure: kappa_trace is empty; run the evaluator on at least one image first")
    t = np.array(sorted(kappa_trace), dtype=np.int64)
    k = np.array([float(kappa_trace[int(s)]) for s in t])
    horizon = int(num_train_timesteps or (t.max() + 1))
    fig = Figure(figsize=(6.0, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=1)
    ax.plot(t, k, color="tab:blue", marker="o" if len(t) <= 60 else None, markersize=3, linewidth=1.5)
    ax.set_xlim(0, horizon)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("diffusion step t")
    ax.set_ylabel(r"mean $\kappa_\phi$")  # mathtext: a subscript, not "κ_φ" with an underscore
    ax.text(0.99, 0.97, "x0 mode favoured", transform=ax.transAxes, ha="right", va="top", fontsize=8, color="0.4")
    ax.text(0.99, 0.03, "ε mode favoured", transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.4")
    ax.set_title(title or r"self-regulation parameter $\kappa_\phi$ per step", fontsize=10)
    return fig


def _image_panel(img: np.ndarray) -> np.ndarray:
    """First channel, scaled by its 1st-99th percentiles to [0, 1] (CT windows and z-scores alike)."""
    x = img[0].astype(np.float64)
    lo, hi = np.percentile(x, [1, 99])
    return np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)


def sample_grid_figure(
    image: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    mean: np.ndarray | torch.Tensor,
    entropy: np.ndarray | torch.Tensor,
    num_samples: int = 4,
    title: str = "",
) -> Figure:
    """One row per image: the image, every annotation, samples, the sample mean, the entropy map.

    Args:
        image: (K, C, H, W) condition images (the first channel is shown: CT, or FLAIR).
        label: (K, A, H, W) all annotations, {0, 1} (or class labels).
        pred: (K, N, H, W) sampled masks, {0, 1} (or class labels).
        mean: (K, H, W) per-pixel sample mean (the foreground frequency for binary tasks).
        entropy: (K, H, W) per-pixel entropy of the samples in bits.
        num_samples: how many of the N samples to show.
        title: figure title (run, epoch).

    The first row names the columns; an annotation a reader left empty is titled
    ``annotation <j> (empty)`` in every row. The mean and entropy columns have a colour bar
    under the last row: the fraction of samples marking a pixel (0 to 1; class label for
    multi-class tasks) and the entropy in bits (0 to log2 of the number of classes: 1 bit is
    an even split between two classes). Every row shares those fixed scales.

    Returns:
        A matplotlib ``Figure``.

    Example::

        fig = sample_grid_figure(img, masks, pred, pred.float().mean(1), ent, num_samples=4)
    """
    image, label, pred, mean, entropy = (
        torch.as_tensor(v).detach().cpu().float().numpy() for v in (image, label, pred, mean, entropy)
    )
    k = image.shape[0]
    if not (label.shape[0] == pred.shape[0] == mean.shape[0] == entropy.shape[0] == k) or image.ndim != 4:
        raise ValueError(
            "sample_grid_figure: expected image (K,C,H,W), label (K,A,H,W), pred (K,N,H,W), mean and entropy "
            f"(K,H,W) with one K; got {image.shape}, {label.shape}, {pred.shape}, {mean.shape}, {entropy.shape}"
        )
    a, s = label.shape[1], min(int(num_samples), pred.shape[1])
    classes = max(2.0, float(max(label.max(initial=1), pred.max(initial=1))) + 1)
    cols = 1 + a + s + 2
    fig = Figure(figsize=(1.5 * cols, 1.6 * k + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(k, cols, squeeze=False)
    mask_kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if classes <= 2 else {"cmap": "tab10", "vmin": 0, "vmax": 9}
    for r in range(k):
        panels = [("image", _image_panel(image[r]), {"cmap": "gray", "vmin": 0, "vmax": 1})]
        for j in range(a):
            empty = " (empty)" if not label[r, j].any() else ""
            panels.append((f"annotation {j + 1}{empty}", label[r, j], mask_kw))
        panels += [(f"sample {j + 1}", pred[r, j], mask_kw) for j in range(s)]
        panels.append(("mean", mean[r], {"cmap": "gray", "vmin": 0, "vmax": 1} if classes <= 2 else {"cmap": "viridis"}))
        panels.append(("entropy (bits)", entropy[r], {"cmap": "magma", "vmin": 0, "vmax": float(np.log2(classes))}))
        for c, (name, data, kw) in enumerate(panels):
            ax = axes[r, c]
            shown = ax.imshow(data, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or name.endswith(" (empty)"):  # column names once; "(empty)" on every row it applies to
                ax.set_title(name, fontsize=8)
            if r == k - 1 and c >= cols - 2:  # one bar per column: the scale is fixed, so every row shares it
                what = "fraction of samples" if classes <= 2 else "mean class"
                bar = fig.colorbar(shown, ax=axes[:, c], location="bottom", shrink=0.9, aspect=12)
                bar.set_label(what if c == cols - 2 else "bits", fontsize=7)
                bar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


class SampleCollector:
    """Keep the first ``max_items`` images of an evaluator run for a sample grid.

    Args:
        max_items: rows of the grid.

    Example::

        c = SampleCollector(4); c.reset(); c.add(engine.state.output); fig = c.figure()
    """

    KEYS = ("image", "label", "pred", "mean", "entropy")

    def __init__(self, max_items: int = 4) -> None:
        if max_items < 1:
            raise ValueError(f"SampleCollector: max_items must be >= 1, got {max_items}")
        self.max_items = int(max_items)
        self.reset()

    def reset(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.KEYS}
        self.count = 0

    def add(self, output: Mapping[str, Any]) -> None:
        """Add a batch of the evaluator's output dict (image, label, pred, mean, entropy; batch first)."""
        if self.count >= self.max_items or not all(k in output for k in self.KEYS):
            return
        take = min(self.max_items - self.count, int(torch.as_tensor(output["image"]).shape[0]))
        for k in self.KEYS:
            self.parts[k].append(torch.as_tensor(output[k])[:take].detach().cpu())
        self.count += take

    def figure(self, num_samples: int = 4, title: str = "") -> Figure | None:
        if self.count == 0:
            return None
        cat = {k: torch.cat(v) for k, v in self.parts.items()}
        return sample_grid_figure(**cat, num_samples=num_samples, title=title)
