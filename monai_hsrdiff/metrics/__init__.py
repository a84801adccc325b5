"""Sample-set metrics of stochastic segmentation (GED, HM-IoU, MDM, fused IoU, entropy) and their
MONAI cumulative wrappers. Conventions: ``docs/metrics.md``."""

from .cumulative import FusedIoUMetric, GEDMetric, HMIoUMetric, MDMMetric, MeanEntropyMetric, SampleSetMetric
from .functional import (
    GEDTerms,
    entropy_map,
    fused_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    maximum_dice_matching,
    pairwise_dice,
    pairwise_iou,
    sample_set_metrics,
)

__all__ = [
    "FusedIoUMetric",
    "GEDMetric",
    "GEDTerms",
    "HMIoUMetric",
    "MDMMetric",
    "MeanEntropyMetric",
    "SampleSetMetric",
    "entropy_map",
    "fused_iou",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "maximum_dice_matching",
    "pairwise_dice",
    "pairwise_iou",
    "sample_set_metrics",
]
