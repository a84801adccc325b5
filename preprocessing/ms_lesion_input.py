"""The ISBI-2015 MS-Lesion input of ``preprocessing.ms_lesion``: each time point's six NIfTI files, found and checked.

Layout (the challenge's training data, as unpacked)::

    ROOT/training/trainingXX/preprocessed/trainingXX_YY_{flair,mprage,pd,t2}_pp.nii
    ROOT/training/trainingXX/masks/trainingXX_YY_mask{1,2}.nii

Errors are :class:`~monai_hsrdiff.tasks.ms_lesion.MSLesionInputError` naming the file, the
patient and the time point.

Example::

    patients = find_time_points("/data/ISBI2015")    # {"training01": [TimePoint(...), ...], ...}
    check_headers(patients["training01"][0])          # same 3D shape and affine, headers only
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_hsrdiff.tasks.ms_lesion import MODALITIES, RATERS, MSLesionInputError

__all__ = ["TimePoint", "check_headers", "find_time_points", "load_nifti", "read_volume", "time_point_errors", "volume_shape"]

_IMAGE_RE = re.compile(r"^(training\d+)_(\d+)_(flair|mprage|pd|t2)_pp\.nii(\.gz)?$")
_MASK_RE = re.compile(r"^(training\d+)_(\d+)_(mask[12])\.nii(\.gz)?$")


@dataclass
class TimePoint:
    """The six files of one patient's time point."""

    patient: str
    time_point: str
    images: dict[str, Path] = field(default_factory=dict)  # modality -> file
    masks: dict[str, Path] = field(default_factory=dict)  # rater -> file

    @property
    def name(self) -> str:
        return f"{self.patient}_{self.time_point}"


def _training_dir(root: Path) -> Path:
    if not root.is_dir():
        raise MSLesionInputError(f"--root {root} is not a folder; point it at the ISBI-2015 folder holding training/")
    return root / "training" if (root / "training").is_dir() else root


def find_time_points(root: str | os.PathLike) -> dict[str, list[TimePoint]]:
    """Discover ``{patient: [TimePoint, ...]}`` under ``root``; every file must be present.

    Raises:
        MSLesionInputError: no ``trainingXX`` folder, or a time point lacks a modality or
            a mask (the message gives the expected file path).
    """
    root = Path(root)
    tdir = _training_dir(root)
    patient_dirs = sorted(p for p in tdir.iterdir() if p.is_dir() and re.fullmatch(r"training\d+", p.name))
    if not patient_dirs:
        raise MSLesionInputError(
            f"no trainingXX folders under {tdir}; expected the ISBI-2015 layout "
            "ROOT/training/trainingXX/preprocessed/trainingXX_YY_flair_pp.nii and .../masks/trainingXX_YY_mask1.nii"
        )
    out: dict[str, list[TimePoint]] = {}
    for pdir in patient_dirs:
        patient = pdir.name
        tps: dict[str, TimePoint] = {}
        for sub, regex, slot in (("preprocessed", _IMAGE_RE, "images"), ("masks", _MASK_RE, "masks")):
            folder = pdir / sub
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                m = regex.match(f.name)
                if m is None or m.group(1) != patient:
                    continue
                tp = tps.setdefault(m.group(2), TimePoint(patient, m.group(2)))
                getattr(tp, slot)[m.group(3)] = f
        if not tps:
            raise MSLesionInputError(
                f"patient {patient}: no time points found in {pdir / 'preprocessed'} or {pdir / 'masks'} "
                f"(expected files like {patient}_01_flair_pp.nii and {patient}_01_mask1.nii)"
            )
        for key in sorted(tps):
            tp = tps[key]
            for mod in MODALITIES:
                if mod not in tp.images:
                    expected = pdir / "preprocessed" / f"{tp.name}_{mod}_pp.nii"
                    raise MSLesionInputError(f"patient {patient}, time point {tp.time_point}: missing {mod.upper()} image {expected}")
            for rater in RATERS:
                if rater not in tp.masks:
                    expected = pdir / "masks" / f"{tp.name}_{rater}.nii"
                    raise MSLesionInputError(f"patient {patient}, time point {tp.time_point}: missing rater mask {expected}")
        out[patient] = [tps[k] for k in sorted(tps)]
    return out


@contextlib.contextmanager
def time_point_errors(tp: TimePoint) -> Iterator[None]:
    """Prefix every :class:`MSLesionInputError` raised inside with the patient and time point."""
    prefix = f"patient {tp.patient}, time point {tp.time_point}: "
    try:
        yield
    except MSLesionInputError as e:
        if str(e).startswith(prefix):
            raise
        raise MSLesionInputError(prefix + str(e)) from e


def volume_shape(shape: Sequence[int], path: str | os.PathLike) -> tuple[int, int, int]:
    """The 3D shape of a NIfTI whose array shape is ``shape``: trailing singleton axes dropped.

    Converters often write a 3D volume as (X, Y, Z, 1) (one time point, NIfTI dim 4 = 1);
    that is the same volume. A real 4D series (X, Y, Z, k > 1) or a 2D image is refused.

    Example::

        volume_shape((24, 24, 12, 1), "t2.nii")  # (24, 24, 12)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        kind = f"a {len(shape)}D series of {int(np.prod(shape[3:]))} volumes" if len(shape) > 3 else f"a {len(shape)}D image"
        raise MSLesionInputError(f"{path}: expected a 3D volume, got {kind} (shape {shape}); pass one 3D volume per file")
    return shape[:3]


def load_nifti(path: Path) -> tuple[Any, tuple[int, int, int]]:
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise MSLesionInputError(f"cannot read {path}: {e}") from e
    return img, volume_shape(img.shape, path)


def check_headers(tp: TimePoint, atol: float = 1e-3) -> None:
    """All six files of a time point must be 3D with the same shape and affine (headers only).

    A file of shape (X, Y, Z, 1) counts as the 3D volume (X, Y, Z) (:func:`volume_shape`).
    Errors name the file, the patient and the time point.
    """
    with time_point_errors(tp):
        _check_headers(tp, atol)


def _check_headers(tp: TimePoint, atol: float) -> None:
    files = [tp.images[m] for m in MODALITIES] + [tp.masks[r] for r in RATERS]
    ref_file = files[0]
    ref, ref_shape = load_nifti(ref_file)
    for f in files[1:]:
        img, shape = load_nifti(f)
        if shape != ref_shape:
            raise MSLesionInputError(f"shape mismatch: {f} has shape {shape} but {ref_file} has {ref_shape}")
        if not np.allclose(img.affine, ref.affine, atol=atol):
            raise MSLesionInputError(
                f"affine mismatch: {f} and {ref_file} are not on the same voxel grid\n"
                f"{f.name}:\n{np.array2string(img.affine, precision=4)}\n{ref_file.name}:\n{np.array2string(ref.affine, precision=4)}"
            )


def read_volume(path: Path) -> np.ndarray:
    img, shape = load_nifti(path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as e:  # a cut .nii.gz passes the header check and fails here (EOFError, zlib.error, ...)
        raise MSLesionInputError(f"cannot read the voxels of {path} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    bad = ~np.isfinite(data)
    if bad.any():
        raise MSLesionInputError(f"{path}: {int(bad.sum())} NaN/inf voxels (of {data.size}); fix or re-export the volume")
    return data
