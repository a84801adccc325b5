"""Volume-level inference: read a scan, run the 2D model slice by slice, map samples back to its grid.

Generic over tasks: what a task's model sees (its channels, spacing, HU window, slice
preprocessing) is defined in ``monai_hsrdiff.tasks``, which builds on this package.
"""

from __future__ import annotations

from .cohort import CohortCase, case_state, cases_under_root, read_case_list, run_cohort
from .inferer import CaseReader, VolumeInferer, load_weights, run_bundle_inference, run_case, run_inference
from .source import InferenceInputError, SliceAxes, SourceVolume, find_modalities, read_dicom_source, read_nifti_source
from .volume import Region, SlicePreprocessing, VolumePrediction, predict_volume, resample_plane, resize_plane

__all__ = [
    "CaseReader",
    "CohortCase",
    "InferenceInputError",
    "Region",
    "SliceAxes",
    "SlicePreprocessing",
    "SourceVolume",
    "VolumeInferer",
    "VolumePrediction",
    "case_state",
    "cases_under_root",
    "find_modalities",
    "load_weights",
    "predict_volume",
    "read_case_list",
    "read_dicom_source",
    "read_nifti_source",
    "resample_plane",
    "resize_plane",
    "run_bundle_inference",
    "run_case",
    "run_cohort",
    "run_inference",
]
