"""MONAI cumulative metrics over sample sets: GED, HM-IoU, MDM, fused IoU and ECE per image.

Each metric takes a batch of sample sets ``y_pred`` (B, N, *spatial) and annotation sets ``y``
(B, A, *spatial), stores one value per image, and ``aggregate()`` reduces the stored values
over the data set (mean by default) with :func:`monai.metrics.utils.do_metric_reduction`.
``num_samples=n`` scores the first n of the N samples, so one set of 32 samples gives both
the N=16 and the N=32 columns of the paper's tables (HSRDiff, AAAI 2025, Table 1), and 100
samples give the GED over 100 samples of the newest peers as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from .calibration import _check_bins, _check_region, expected_calibration_error
from .functional import (
    entropy_map,
    fused_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    maximum_dice_matching,
)

__all__ = [
    "ECEMetric",
    "FusedIoUMetric",
    "GEDMetric",
    "HMIoUMetric",
    "MDMMetric",
    "MeanEntropyMetric",
    "SampleSetMetric",
]


class SampleSetMetric(CumulativeIterationMetric):
    """Base class: applies a set-vs-set function to every image of a batch and accumulates the values.

    Args:
        num_classes: None or 2 for binary masks; M > 2 for integer label maps 0..M-1.
        num_samples: score only the first ``num_samples`` samples of each set (None: all N).
        reduction: reduction mode of :func:`monai.metrics.utils.do_metric_reduction`, e.g.
            ``"mean"`` (default), ``"sum"``, ``"none"``. NaN values (none arise here) are ignored.
        get_not_nans: ``aggregate`` also returns the count of non-NaN values.

    Example (Ignite, as the evaluator wires it)::

        from monai.handlers import IgniteMetricHandler
        handler = IgniteMetricHandler(
            metric_fn=GEDMetric(num_samples=16),
            output_transform=lambda out: (out["samples"], out["annotations"]),
        )
        handler.attach(evaluator, "ged_16")  # evaluator.state.metrics["ged_16"] after a run
    """

    #: the functional ``f(samples (N, *spatial), annotations (A, *spatial), num_classes) -> float``
    metric_func: Callable[..., float]

    def __init__(
        self,
        num_classes: int | None = None,
        num_samples: int | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        bad_n = isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        if num_samples is not None and bad_n:
            raise ValueError(f"{type(self).__name__}: num_samples must be a positive int or None, got {num_samples!r}.")
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _score(self, samples: torch.Tensor, annotations: torch.Tensor) -> float:
        return self.metric_func(samples, annotations, num_classes=self.num_classes)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Score a batch.

        Args:
            y_pred: samples (B, N, *spatial), binary or label maps.
            y: annotations (B, A, *spatial), same B and spatial shape.

        Returns:
            (B, 1) float32 tensor of per-image values, on ``y_pred``'s device.
        """
        name = type(self).__name__
        if y is None:
            raise ValueError(f"{name}: the annotations y (B, A, *spatial) are required.")
        if y_pred.ndim < 4 or y.ndim < 4:
            raise ValueError(
                f"{name}: expected y_pred (B, N, *spatial) and y (B, A, *spatial) with at least two spatial "
                f"dims; got y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)}."
            )
        if y_pred.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: batch sizes differ: y_pred {tuple(y_pred.shape)}, y {tuple(y.shape)}.")
        if self.num_samples is not None:
            if self.num_samples > y_pred.shape[1]:
                raise ValueError(
                    f"{name}: num_samples={self.num_samples} but y_pred holds only N={y_pred.shape[1]} samples "
                    f"(shape {tuple(y_pred.shape)}); draw more samples or lower num_samples."
                )
            y_pred = y_pred[:, : self.num_samples]
        values = [self._score(p, t) for p, t in zip(y_pred, y)]
        return torch.tensor(values, dtype=torch.float32, device=y_pred.device).reshape(-1, 1)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the stored per-image values; ``reduction`` overrides the constructor's mode."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: nothing to aggregate, call the metric on a batch first.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class GEDMetric(SampleSetMetric):
    """Generalised energy distance D² per image (lower is better); see
    :func:`~monai_hsrdiff.metrics.functional.generalized_energy_distance`."""

    metric_func = staticmethod(generalized_energy_distance)


class HMIoUMetric(SampleSetMetric):
    """Hungarian-matched IoU per image (higher is better); see
    :func:`~monai_hsrdiff.metrics.functional.hungarian_matched_iou`."""

    metric_func = staticmethod(hungarian_matched_iou)


class MDMMetric(SampleSetMetric):
    """Maximum Dice matching per image (higher is better); see
    :func:`~monai_hsrdiff.metrics.functional.maximum_dice_matching`."""

    metric_func = staticmethod(maximum_dice_matching)


class FusedIoUMetric(SampleSetMetric):
    """IoU of the fused (mean) prediction against the majority vote, per image; see
    :func:`~monai_hsrdiff.metrics.functional.fused_iou`.

    Args:
        tie_is_foreground: decide half-half votes as foreground (default False: background).
        num_classes, num_samples, reduction, get_not_nans: as :class:`SampleSetMetric`.
    """

    metric_func = staticmethod(fused_iou)

    def __init__(
        self,
        num_classes: int | None = None,
        num_samples: int | None = None,
        tie_is_foreground: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes, num_samples=num_samples, reduction=reduction, get_not_nans=get_not_nans
        )
        self.tie_is_foreground = tie_is_foreground

    def _score(self, samples: torch.Tensor, annotations: torch.Tensor) -> float:
        return fused_iou(samples, annotations, num_classes=self.num_classes, tie_is_foreground=self.tie_is_foreground)


class MeanEntropyMetric(SampleSetMetric):
    """Mean over pixels of the per-pixel entropy of the sample mean, in bits, per image; see
    :func:`~monai_hsrdiff.metrics.functional.entropy_map`.

    The scalar summary of the uncertainty map, so validation can track how much the model
    hedges; the annotations are accepted for the common interface and not used.
    """

    def _score(self, samples: torch.Tensor, annotations: torch.Tensor) -> float:
        return float(entropy_map(samples, num_classes=self.num_classes).mean())


class ECEMetric(SampleSetMetric):
    """Expected calibration error of the sample mean against the reader mean, per image (lower is
    better); see :func:`~monai_hsrdiff.metrics.functional.expected_calibration_error`.

    Args:
        n_bins: equal-width bins of the per-pixel sample mean over [0, 1]. Default 10.
        region: ``"all"`` pixels (default) or ``"foreground"``: only the pixels that at least one
            sample or one annotation marks.
        num_classes, num_samples, reduction, get_not_nans: as :class:`SampleSetMetric`.

    Example::

        metric = ECEMetric(num_samples=32)
        metric(y_pred=samples, y=annotations)  # (B, N, H, W), (B, A, H, W) masks -> (B, 1) values
        ece = metric.aggregate()  # mean over images
    """

    def __init__(
        self,
        num_classes: int | None = None,
        num_samples: int | None = None,
        n_bins: int = 10,
        region: str = "all",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes, num_samples=num_samples, reduction=reduction, get_not_nans=get_not_nans
        )
        # the functional's checks, at construction: a bundle's typo stops before any sampling
        try:
            self.n_bins, self.region = _check_bins(n_bins), _check_region(region)
        except ValueError as e:
            raise ValueError(f"ECEMetric: {e}") from None

    def _score(self, samples: torch.Tensor, annotations: torch.Tensor) -> float:
        return expected_calibration_error(
            samples, annotations, num_classes=self.num_classes, n_bins=self.n_bins, region=self.region
        )
