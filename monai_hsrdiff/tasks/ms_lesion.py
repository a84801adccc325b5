"""ISBI-2015 MS-Lesion: 4 MRI channels (FLAIR, MPRAGE, PD, T2), z-scored over the brain, resized slices.

The one copy of MS-Lesion's conventions: ``preprocessing.ms_lesion`` (the items) and
inference both import :data:`MODALITIES` and :func:`zscore_brain` from here.

Example::

    z, brain, stats = zscore_brain(vols, ["flair.nii", "mprage.nii", "pd.nii", "t2.nii"])
    get_task("ms_lesion").slice_preprocessing(128).as_json()
    # {'task': 'ms_lesion', 'image_size': 128, 'background': 0.0, 'item_spacing_mm': None, 'hu_window': None}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from monai_hsrdiff.errors import HSRDiffInputError, InferenceInputError
from monai_hsrdiff.inference.source import SourceVolume, is_nifti
from monai_hsrdiff.inference.volume import SlicePreprocessing, resize_plane
from monai_hsrdiff.tasks.base import Task, register_task

__all__ = [
    "MODALITIES",
    "MS_LESION",
    "MSLesionInputError",
    "MSLesionSlicePreprocessing",
    "MSLesionTask",
    "RATERS",
    "zscore_brain",
    "zscore_volume",
]

MODALITIES = ("flair", "mprage", "pd", "t2")  # channel order of the items
RATERS = ("mask1", "mask2")


class MSLesionInputError(HSRDiffInputError):
    """The ISBI-2015 input is incomplete or inconsistent (names the file and the problem)."""


def zscore_brain(vols: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Z-score each channel over brain voxels (any channel > 0), background set to 0.

    nnU-Net's "nonzero" scheme, for skull-stripped images whose background is exactly 0.

    Args:
        vols: (C, *spatial) raw intensities.
        names: one name per channel (a file name) for the error messages.

    Returns:
        (z-scored float32 volumes, boolean brain mask (*spatial), {name: [mean, std]}).

    Raises:
        MSLesionInputError: no voxel > 0 at all, or a channel constant over the brain.
    """
    brain = (vols > 0).any(axis=0)
    if not brain.any():
        raise MSLesionInputError(
            f"no voxel > 0 in any of {', '.join(map(str, names))}; expected skull-stripped images (background 0)"
        )
    out = np.zeros(vols.shape, dtype=np.float32)
    stats = {}
    for c, name in enumerate(names):
        v = vols[c][brain]
        mean, std = float(v.mean()), float(v.std())
        if std <= 0:
            raise MSLesionInputError(f"{name}: constant over the brain (std 0), cannot z-score")
        out[c] = np.where(brain, (vols[c] - mean) / std, 0.0)
        stats[name] = [mean, std]
    return out, brain, stats


def zscore_volume(data: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """:func:`zscore_brain` for an inference input: (C, *spatial) -> (C, *spatial) float32.

    Args:
        data: (C, *spatial) raw MRI intensities (skull-stripped: background exactly 0).
        names: one name per channel for the messages (the input files); default "--input channel c".

    Raises:
        InferenceInputError: no voxel > 0, or a channel constant over the brain.
    """
    if names is None or len(names) != data.shape[0]:
        names = [f"--input channel {c}" for c in range(data.shape[0])]
    try:
        return zscore_brain(data, [str(n) for n in names])[0]
    except MSLesionInputError as e:
        raise InferenceInputError(str(e)) from e


@dataclass(frozen=True)
class MSLesionSlicePreprocessing(SlicePreprocessing):
    """The volume z-scored over the brain; each whole slice resized to ``image_size`` (bilinear, anti-aliased)."""

    def normalize_volume(self, data: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        return zscore_volume(data, names)

    def plane_to_input(
        self, plane: np.ndarray, spacing_rc: tuple[float, float] | None = None, box: tuple[int, int, int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return resize_plane(plane, self.image_size)  # the whole slice: spacing and box do not matter


class MSLesionTask(Task):
    """MS-Lesion MRI: the 4 NIfTI modalities (files in the order FLAIR, MPRAGE, PD, T2, or their folder)."""

    name = "ms_lesion"
    modality = "MR"
    channels = MODALITIES
    item_spacing = None
    hu_window = None
    background = 0.0
    num_annotations = len(RATERS)
    # tokens of the modalities' file names in an input folder (*_t1w.nii is the MPRAGE)
    file_patterns = MappingProxyType({"flair": r"flair", "mprage": r"mprage|t1w?", "pd": r"pd|pdw", "t2": r"t2w?"})
    prepare_command = "python -m preprocessing.ms_lesion --root /path/to/ISBI2015 --out {out}"
    preprocessing_class = MSLesionSlicePreprocessing

    def _read_paths(
        self, paths: list[str], series_uid: str | None, modality: str | None, allow_modality_mismatch: bool
    ) -> SourceVolume:
        if len(paths) == 1 and not Path(paths[0]).is_dir() and not is_nifti(paths[0]):
            raise InferenceInputError(
                f"--input {paths[0]}: MS-Lesion needs the 4 NIfTI volumes {', '.join(m.upper() for m in MODALITIES)} "
                "(4 files in that order, or a folder holding them)"
            )
        return super()._read_paths(paths, series_uid, modality, allow_modality_mismatch)

    def source_from_item(self, image: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
        """Channels shifted to be > 0 inside the brain and 0 outside: z-scoring at inference removes the shift."""
        image = np.asarray(image)
        brain = (image != 0).any(axis=0)
        return np.where(brain, image - image[:, brain].min() + 1.0, 0.0)

    def slice_preprocessing(
        self, image_size: int, item_spacing: float | None | Literal["default"] = "default"
    ) -> SlicePreprocessing:
        """Whole slices resized to ``image_size``: the items have no fixed spacing, so ``item_spacing`` is not used."""
        return super().slice_preprocessing(image_size, None)


MS_LESION = register_task(MSLesionTask())
