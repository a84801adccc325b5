"""Sample-set metrics of stochastic segmentation (GED, HM-IoU, MDM, fused IoU, entropy, ECE) and their
MONAI cumulative wrappers. Conventions: ``docs/metrics.md``."""

from .calibration import ECE_REGIONS, expected_calibration_error
from .cumulative import ECEMetric, FusedIoUMetric, GEDMetric, HMIoUMetric, MDMMetric, MeanEntropyMetric, SampleSetMetric
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
    "ECE_REGIONS",
    "ECEMetric",
    "FusedIoUMetric",
    "GEDMetric",
    "GEDTerms",
    "HMIoUMetric",
    "MDMMetric",
    "MeanEntropyMetric",
    "SampleSetMetric",
    "entropy_map",
    "expected_calibration_error",
    "fused_iou",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "maximum_dice_matching",
    "pairwise_dice",
    "pairwise_iou",
    "sample_set_metrics",
]
