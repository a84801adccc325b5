"""Expected calibration error (ECE) of a sample set's per-pixel mean against its readers' per-pixel mean.

The calibration number the newest stochastic-segmentation peers report beside GED and HM-IoU
(issue 14; conventions and choices in ``docs/metrics.md``). Input conventions (masks, label maps,
``num_classes``) are those of :mod:`monai_hsrdiff.metrics.functional`; the binning is MONAI's
:func:`monai.metrics.calibration_binning`.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import calibration_binning

from .functional import MaskLike, _check_pair, _class_planes, _mean

__all__ = ["ECE_REGIONS", "expected_calibration_error"]

#: the pixels :func:`expected_calibration_error` counts: all of them, or those any sample or reader marks
ECE_REGIONS = ("all", "foreground")


def _check_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1 (equal-width bins of [0, 1]); got n_bins={n_bins!r}.")
    return int(n_bins)


def _check_region(region: str) -> str:
    if region not in ECE_REGIONS:
        raise ValueError(f"region must be one of {ECE_REGIONS} (which pixels ECE counts); got region={region!r}.")
    return region


def expected_calibration_error(
    samples: MaskLike,
    annotations: MaskLike,
    num_classes: int | None = None,
    n_bins: int = 10,
    region: str = "all",
) -> float:
    """Expected calibration error (ECE) of the per-pixel sample mean against the per-pixel reader mean.

    ``p(x)`` is the fraction of the N samples that mark pixel x, ``q(x)`` the fraction of the A
    annotations that do (the readers' frequency is the target: a calibrated model marks a pixel
    in 75 % of its samples where 3 of 4 readers do). The pixels are binned by ``p`` into
    ``n_bins`` equal-width bins by :func:`monai.metrics.calibration_binning` (bin 0 is
    ``[0, 1/n_bins]``, bin b ``(b/n_bins, (b+1)/n_bins]``), and

        ``ECE = Σ_b (n_b / n) · |mean_b p − mean_b q|``,

    the bin-count-weighted mean gap (Naeini et al. 2015; Guo et al. 2017), so the gaps of pixels
    in one bin can cancel. ``region="all"`` counts every pixel (``n`` = the image's pixel count);
    the many background pixels that every sample and reader leave empty (p = q = 0) add nothing
    to any bin's gap but do add to ``n``, so ``"foreground"`` counts only the pixels that at least
    one sample or one annotation marks. Per image, ``ECE_all = ECE_foreground · n_fg / n``. A
    region with no pixel (all samples and annotations empty) scores 0, as ``IoU(∅, ∅) = 1``.
    Label maps: the mean over the foreground classes 1..M-1 of the one-vs-rest ECE of the class
    frequencies (each class with its own region), a class absent from every mask scoring 0.

    Args:
        samples: model samples (N, *spatial), binary or label map.
        annotations: expert annotations (A, *spatial), same spatial shape.
        num_classes: None or 2 for binary masks; M > 2 for label maps.
        n_bins: number of equal-width bins of [0, 1]. Default 10.
        region: ``"all"`` (default) or ``"foreground"`` (see above).

    Returns:
        ECE in [0, 1] (lower is better).

    Example:
        >>> s = np.array([[[1, 1]], [[1, 0]]], dtype=bool)  # p = [1, 0.5]
        >>> y = np.array([[[1, 1]], [[1, 1]]], dtype=bool)  # q = [1, 1]
        >>> round(expected_calibration_error(s, y), 4)  # bins 9 and 4: (0 + |0.5 - 1|) / 2
        0.25
    """
    s, y, m = _check_pair(samples, annotations, num_classes)
    bins, region = _check_bins(n_bins), _check_region(region)
    # per-class counts of marking samples / readers, (K, P); p and q are k/N and j/A in float32
    # (correctly rounded divisions: k/N lands in its exact bin, tests/test_metrics_peers.py checks it)
    k = _class_planes(s, m, np.float32).sum(1)
    j = _class_planes(y, m, np.float32).sum(1)
    p, q = k / np.float32(s.shape[0]), j / np.float32(y.shape[0])
    values = []
    for pc, qc in zip(p, q):
        if region == "foreground":
            keep = (pc > 0) | (qc > 0)
            pc, qc = pc[keep], qc[keep]
        if pc.size == 0:
            values.append(0.0)
            continue
        mean_p, mean_q, counts = calibration_binning(
            torch.from_numpy(pc).reshape(1, 1, -1), torch.from_numpy(qc).reshape(1, 1, -1), num_bins=bins
        )
        gap = (mean_p - mean_q).abs().double().nan_to_num(0.0)  # empty bins hold NaN means
        values.append(float((gap * counts.double()).sum() / counts.double().sum()))
    return _mean(np.asarray(values))
