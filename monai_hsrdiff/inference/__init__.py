"""Volume-level inference: read a scan, run the 2D model slice by slice, map samples back to its grid.

Generic over tasks: what a task's model sees (its channels, spacing, HU window, slice
preprocessing) is defined in ``monai_hsrdiff.tasks``, which builds on this package.
"""

from __future__ import annotations

from .inferer import CaseReader, VolumeInferer, run_bundle_inference, run_case
from .source import InferenceInputError, SliceAxes, SourceVolume, find_modalities, read_dicom_source, read_nifti_source
from .volume import Region, SlicePreprocessing, VolumePrediction, predict_volume, resample_plane, resize_plane

__all__ = [
    "CaseReader",
    "InferenceInputError",
    "Region",
    "SliceAxes",
    "SlicePreprocessing",
    "SourceVolume",
    "VolumeInferer",
    "VolumePrediction",
    "find_modalities",
    "predict_volume",
    "read_dicom_source",
    "read_nifti_source",
    "resample_plane",
    "resize_plane",
    "run_bundle_inference",
    "run_case",
]
