"""LIDC-IDRI: CT slices in Hounsfield units, 0.5 mm in-plane, HU window [-1000, 400] -> [-1, 1].

The one copy of LIDC's constants: ``preprocessing.lidc`` (the real items),
``preprocessing.demo`` (the synthetic demo) and inference all import them from here.

Example::

    hu_to_unit(np.array([-2000.0, -300.0, 3000.0]))   # array([-1., 0., 1.], dtype=float32)
    get_task("lidc").slice_preprocessing(64).as_json()
    # {'task': 'lidc', 'image_size': 64, 'background': -1.0, 'item_spacing_mm': 0.5, 'hu_window': [-1000.0, 400.0]}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from monai_hsrdiff.errors import InferenceInputError
from monai_hsrdiff.inference.source import SourceVolume, is_nifti, read_dicom_source
from monai_hsrdiff.inference.volume import SlicePreprocessing, resample_plane
from monai_hsrdiff.tasks.base import Task, register_task

__all__ = ["AIR_HU", "LIDC", "LIDC_HU_WINDOW", "LIDC_ITEM_SPACING", "MAX_READERS", "LidcSlicePreprocessing", "LidcTask", "hu_to_unit"]

LIDC_HU_WINDOW = (-1000.0, 400.0)  # HU mapped to [-1, 1], clipped
LIDC_ITEM_SPACING = 0.5  # mm in-plane, as the Probabilistic U-Net's LIDC crops
AIR_HU = -1000.0  # outside the scan
MAX_READERS = 4  # LIDC-IDRI: up to 4 readers per nodule, one mask each (empty where a reader did not mark it)


def hu_to_unit(hu: np.ndarray, window: tuple[float, float] = LIDC_HU_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and map it linearly to [-1, 1] (float32, any shape)."""
    lo, hi = window
    return (np.clip((np.asarray(hu, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


@dataclass(frozen=True)
class LidcSlicePreprocessing(SlicePreprocessing):
    """HU resampled in-plane to ``item_spacing`` (linear, air outside the scan), then ``hu_window`` -> [-1, 1]."""

    def plane_to_input(
        self, plane: np.ndarray, spacing_rc: tuple[float, float], box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img, scale, offset = resample_plane(plane, spacing_rc, box, self.image_size, self.item_spacing, cval=AIR_HU)
        return hu_to_unit(img, self.hu_window), scale, offset


class LidcTask(Task):
    """LIDC-IDRI CT: a DICOM series folder (or one NIfTI CT volume in HU), 1 channel."""

    name = "lidc"
    modality = "CT"
    channels = ("CT",)
    item_spacing = LIDC_ITEM_SPACING
    hu_window = LIDC_HU_WINDOW
    background = -1.0
    num_annotations = MAX_READERS
    prepare_command = "python -m preprocessing.lidc --dicom-root /path/to/LIDC-IDRI --out {out}"
    preprocessing_class = LidcSlicePreprocessing

    def source_from_item(self, image: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
        """HU back from [-1, 1] with the item's window (default :data:`LIDC_HU_WINDOW`)."""
        lo, hi = meta.get("hu_window", self.hu_window)
        return lo + (np.asarray(image) + 1.0) * 0.5 * (hi - lo)

    def _read_paths(
        self, paths: list[str], series_uid: str | None, modality: str | None, allow_modality_mismatch: bool
    ) -> SourceVolume:
        if len(paths) == 1 and is_nifti(paths[0]):
            return super()._read_paths(paths, series_uid, modality, allow_modality_mismatch)
        if len(paths) != 1:
            raise InferenceInputError(f"--input: LIDC takes one DICOM series folder (or one NIfTI CT volume), got {len(paths)} paths")
        return read_dicom_source(paths[0], series_uid, modality, allow_modality_mismatch, channel_names=self.channels)


LIDC = register_task(LidcTask())
