"""Volume-level inference: read a scan, run the 2D model slice by slice, map samples back to its grid."""

from __future__ import annotations

from .source import InferenceInputError, SliceAxes, SourceVolume, find_modalities, read_dicom_source, read_nifti_source
from .volume import (
    Region,
    SlicePreprocessing,
    VolumePrediction,
    lidc_preprocessing,
    ms_lesion_preprocessing,
    predict_volume,
    zscore_brain,
)

__all__ = [
    "InferenceInputError",
    "Region",
    "SliceAxes",
    "SlicePreprocessing",
    "SourceVolume",
    "VolumePrediction",
    "find_modalities",
    "lidc_preprocessing",
    "ms_lesion_preprocessing",
    "predict_volume",
    "read_dicom_source",
    "read_nifti_source",
    "zscore_brain",
]
