"""Read the scan inference runs on: a DICOM CT series folder or NIfTI volume(s), with its geometry.

Every reader returns a :class:`SourceVolume`: the raw intensities in voxel-index order
``(C, I, J, K)`` (the order of nibabel arrays and of SimpleITK indices ``(i, j, k)``), the
4×4 ``index_to_physical`` matrix in LPS millimetres (ITK/DICOM convention), and the
:class:`SliceAxes` telling which array axis the 2D model slices along and how a slice is
shown (rows/columns and their flips) — the same orientation the training items were cut in:

- DICOM (LIDC): slices along ``k``, rows and columns as stored (``monai_hsrdiff.io.dicom``
  geometry, what ``preprocessing.lidc`` cuts its items from);
- NIfTI (MS-Lesion, or a CT volume): the array axis closest to S, rows towards Posterior,
  columns towards Left, found from the affine by :func:`monai_hsrdiff.io.geometry.slice_axes`.

Example::

    src = read_dicom_source("/data/LIDC-IDRI-0001/1.3.6.../")          # CT, 1 channel, HU
    src = read_nifti_source(["flair.nii", "mprage.nii", "pd.nii", "t2.nii"], channel_names=("flair", "mprage", "pd", "t2"))
    src.data.shape       # (C, I, J, K) float32
    src.itk_geometry()   # size, origin, spacing, direction as SimpleITK writes them
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_hsrdiff.errors import InferenceInputError
from monai_hsrdiff.io.geometry import DICOM_AXES, LPS_FROM_RAS, SliceAxes, slice_axes

__all__ = [
    "NIFTI_SUFFIXES",
    "InferenceInputError",
    "SliceAxes",
    "SourceVolume",
    "find_modalities",
    "is_nifti",
    "read_dicom_source",
    "read_nifti_source",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class SourceVolume:
    """A scan and its geometry.

    Attributes:
        data: (C, I, J, K) float32 raw intensities (CT: Hounsfield units; MRI: scanner units).
        index_to_physical: 4×4 float64, voxel index (i, j, k, 1) -> LPS point (x, y, z, 1) mm.
        axes: how the model slices it.
        channel_names: one name per channel.
        files: the files read (one per channel for NIfTI; the series folder for DICOM).
        info: JSON-ready description (series UID, file names, synthetic flag) for the summary.
    """

    data: np.ndarray
    index_to_physical: np.ndarray
    axes: SliceAxes
    channel_names: tuple[str, ...]
    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.index_to_physical[:3, :3], axis=0)

    def itk_geometry(self) -> dict[str, list[float]]:
        """``size``, ``origin``, ``spacing``, ``direction`` (9 row-major numbers) as SimpleITK uses them."""
        spacing = self.spacing
        return {
            "size": [int(s) for s in self.shape],
            "origin": [float(v) for v in self.index_to_physical[:3, 3]],
            "spacing": [float(v) for v in spacing],
            "direction": [float(v) for v in (self.index_to_physical[:3, :3] / spacing).ravel()],
        }


# ----------------------------------------------------------------------------- DICOM


def read_dicom_source(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    modality: str | None = None,
    allow_modality_mismatch: bool = False,
    channel_names: Sequence[str] = ("CT",),
) -> SourceVolume:
    """Read the CT series under ``folder`` (searched recursively) in Hounsfield units.

    Args:
        folder: a folder holding one DICOM series (or several: then ``series_uid`` picks one).
        series_uid: SeriesInstanceUID to read; required when the folder holds several series.
        modality: the DICOM ``Modality`` the model was trained on (e.g. ``"CT"``, from the
            bundle's ``metadata.json``); ``None`` does not check it.
        allow_modality_mismatch: read a series of another modality anyway (with a warning).
        channel_names: the name of the one channel (the task's).

    Raises:
        InferenceInputError: not a folder; no DICOM file in it; several series and no
            ``series_uid`` (the message lists each UID with its file count and folder); a
            ``Modality`` other than ``modality`` (names the file, the tag and both values).
        DicomSeriesError: the series is not an image with geometry, has missing slices,
            damaged header values (spacing, orientation, rescale) or NaN/inf pixels.

    Example::

        src = read_dicom_source("/data/case1/", modality="CT")   # an MR series is refused
    """
    from monai_hsrdiff.io.dicom_index import DicomIndex

    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceInputError(
            f"--input {str(folder)!r} is not a folder; for a CT pass the folder holding the DICOM series"
            + (" (a NIfTI file is read only for MS-Lesion or with an explicit .nii/.nii.gz path)" if folder.exists() else "")
        )
    index = DicomIndex.build(folder)
    uids = index.series_uids
    if not uids:
        bad = f" ({len(index.unreadable)} DICOM-like file(s) could not be parsed, e.g. {next(iter(index.unreadable))})" if index.unreadable else ""
        raise InferenceInputError(
            f"--input {folder}: no DICOM file found in this folder or below{bad}; pass the folder of a CT series"
        )
    if series_uid is None:
        if len(uids) > 1:
            listing = "\n".join(
                f"  {u}  ({len(index.by_series[u])} files in {index.by_series[u][0].path.parent})" for u in uids
            )
            raise InferenceInputError(
                f"--input {folder} holds {len(uids)} DICOM series; choose one with --series-uid UID:\n{listing}"
            )
        series_uid = uids[0]
    elif series_uid not in index:
        raise InferenceInputError(
            f"--series-uid {series_uid} is not under {folder}; the series there are: {', '.join(uids)}"
        )
    if modality is not None:
        _check_modality(index.by_series[series_uid], modality, allow_modality_mismatch)
    series = index.series(series_uid)
    hu = series.read_volume_hu()  # (K, rows, cols) = SimpleITK array order
    g = series.geometry
    return SourceVolume(
        data=np.ascontiguousarray(hu.transpose(2, 1, 0))[None].astype(np.float32),
        index_to_physical=g.index_to_physical(),
        axes=DICOM_AXES,
        channel_names=tuple(channel_names),
        files=[str(series.folder)],
        info={"format": "DICOM", "series_uid": series_uid, "study_uid": series.study_uid, "folder": str(series.folder),
              "num_files": len(series), "modality": series.headers[0].modality},  # fmt: skip
    )


def _check_modality(headers: Sequence, expected: str, allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) a series whose Modality (0008,0060) is not ``expected``."""
    wrong = next((h for h in sorted(headers, key=lambda h: str(h.path)) if h.modality.upper() != expected.upper()), None)
    if wrong is None:
        return
    found = repr(wrong.modality) if wrong.modality else "missing"
    msg = (
        f"--input: {wrong.path}: Modality (0008,0060) is {found}, but this model was trained on {expected!r} "
        f"images (the bundle's metadata.json)"
    )
    if not allow:
        raise InferenceInputError(
            f"{msg}; its predictions on other images are meaningless. To run it anyway pass "
            "--allow-modality-mismatch (bundle key allow_modality_mismatch true)"
        )
    warnings.warn(f"{msg}; running anyway (allow_modality_mismatch)", stacklevel=3)


# ----------------------------------------------------------------------------- NIfTI

def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def find_modalities(
    folder: str | os.PathLike, modalities: Sequence[str], name_patterns: Mapping[str, str] | None = None
) -> list[Path]:
    """Find one NIfTI file per modality in ``folder`` by a name token (``*_flair_*``, ``*_t2.nii``, ...).

    A token is delimited by ``_ - .`` or the name's ends. ``name_patterns`` gives a modality's
    token as a regular expression (the task's, e.g. ``{"mprage": "mprage|t1w?"}``); a modality
    without one is matched by its own name.

    Raises:
        InferenceInputError: a modality has no file or several files (names them all).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    found, problems = [], []
    for mod in modalities:
        token = (name_patterns or {}).get(mod, re.escape(mod))
        pat = re.compile(rf"(^|[_\-.])({token})([_\-.]|$)", re.IGNORECASE)
        hits = [p for p in files if pat.search(p.name.split(".nii")[0] + ".")]
        if len(hits) == 1:
            found.append(hits[0])
        elif not hits:
            problems.append(f"missing {mod.upper()}: no file named like *_{mod}*.nii[.gz]")
        else:
            problems.append(f"{mod.upper()} is ambiguous: {', '.join(p.name for p in hits)}")
    if problems:
        raise InferenceInputError(
            f"--input {folder}: " + "; ".join(problems) + f". NIfTI files there: {[p.name for p in files] or 'none'}. "
            f"Pass the {len(modalities)} volumes explicitly in the order {', '.join(m.upper() for m in modalities)}."
        )
    return found


def _voxels_readable(img) -> bool:
    try:
        img.get_fdata(dtype=np.float32)
    except Exception:  # noqa: BLE001 - any failure means this file is the bad one
        return False
    return True


def _load_nifti(path: Path):
    import nibabel as nib

    if path.is_dir():
        raise InferenceInputError(f"--input: {path} is a folder, where a NIfTI file is expected")
    if not path.is_file():
        raise InferenceInputError(f"--input: NIfTI file {path} does not exist")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InferenceInputError(f"--input: cannot read {path} as NIfTI: {type(e).__name__}: {e}") from e
    if len(img.shape) > 3 and all(n == 1 for n in img.shape[3:]):
        # (X, Y, Z, 1): one volume stored as a 4D series of one time point, as many converters write it;
        # squeeze_image reads the voxels, so a cut file fails here
        try:
            img = nib.funcs.squeeze_image(img)
        except Exception as e:  # noqa: BLE001 - gzip/zlib/nibabel raise several types for cut files
            raise InferenceInputError(f"--input: cannot read the voxels of {path} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if len(img.shape) != 3:
        what = "a 2D image" if len(img.shape) < 3 else f"a {len(img.shape)}D image (several volumes?)"
        raise InferenceInputError(
            f"--input: {path} is {what} of shape {tuple(img.shape)}, but a 3D volume is expected; "
            "pass one 3D volume per modality"
        )
    return img


def read_nifti_source(
    paths: Sequence[str | os.PathLike],
    channel_names: Sequence[str] = ("image",),
    atol: float = 1e-3,
    name_patterns: Mapping[str, str] | None = None,
) -> SourceVolume:
    """Read one 3D NIfTI volume per channel; all must share one voxel grid.

    Args:
        paths: one file per channel, in channel order; or ONE folder, searched with
            :func:`find_modalities` for ``channel_names``.
        channel_names: channel (modality) names, e.g. ``get_task("ms_lesion").channels``.
        atol: tolerance on the affines (mm).
        name_patterns: file-name tokens per channel for a folder (:func:`find_modalities`).

    Raises:
        InferenceInputError: wrong number of files, a missing modality, a file that is not a
            3D volume, NaN/inf voxels, or volumes on different grids (shape or affine).
    """

    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        paths = find_modalities(paths[0], channel_names, name_patterns)
    if len(paths) != len(channel_names):
        raise InferenceInputError(
            f"--input: {len(paths)} file(s) given ({', '.join(p.name for p in paths)}) but the model needs "
            f"{len(channel_names)}: {', '.join(c.upper() for c in channel_names)} (in this order), or one folder holding them"
        )
    imgs = [_load_nifti(p) for p in paths]
    ref, ref_path = imgs[0], paths[0]
    for img, p in zip(imgs[1:], paths[1:]):
        if img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=atol):
            raise InferenceInputError(
                f"--input: {p.name} and {ref_path.name} are not on the same voxel grid (shape {tuple(img.shape)} vs "
                f"{tuple(ref.shape)}; affine\n{np.array2string(img.affine, precision=4)}\nvs\n"
                f"{np.array2string(ref.affine, precision=4)}); resample all modalities onto one grid first"
            )
    try:
        data = np.stack([np.asarray(img.get_fdata(dtype=np.float32)) for img in imgs])
    except Exception as e:  # a cut .nii.gz has a readable header: the error comes with the voxels
        bad_file = next((p for img, p in zip(imgs, paths) if not _voxels_readable(img)), paths[0])
        raise InferenceInputError(
            f"--input: cannot read the voxels of {bad_file} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    bad = ~np.isfinite(data)
    if bad.any():
        c = int(np.argwhere(bad)[0, 0])
        raise InferenceInputError(f"--input: {paths[c]} has {int(bad[c].sum())} NaN/inf voxels; fix or re-export it")
    affine_lps = LPS_FROM_RAS @ np.asarray(ref.affine, dtype=np.float64)
    synthetic = any("SYNTHETIC" in str(img.header.get("descrip", b"")) for img in imgs)
    return SourceVolume(
        data=data,
        index_to_physical=affine_lps,
        axes=SliceAxes(*slice_axes(affine_lps)),
        channel_names=tuple(channel_names),
        files=[str(p) for p in paths],
        info={"format": "NIfTI", "files": {c: str(p) for c, p in zip(channel_names, paths)}, "synthetic": synthetic},
    )
