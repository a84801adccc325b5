"""Test helper: write a small synthetic ISBI-2015 longitudinal layout with oblique geometry.

``write_isbi_layout(root)`` writes, for each patient and time point, the four
``*_pp.nii`` modalities (a brain-like ellipsoid > 0 on a background of exactly 0) and
two rater masks (ball lesions; rater 2 draws them dilated and misses the last one), with
a non-trivial origin, anisotropic spacing and a rotated direction, and with the axial
(S) axis on a chosen ARRAY axis. It returns what the test needs to know independently
of the code under test: the affines and the lesion slices along the axial array axis.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

MODALITY_MEANS = {"flair": 300.0, "mprage": 600.0, "pd": 900.0, "t2": 450.0}


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_affine(axial_axis: int, spacing=(0.9, 1.1, 2.0), origin=(-31.5, 17.25, -8.0), signs=(-1, 1, 1)) -> np.ndarray:
    """RAS affine whose ``axial_axis`` array axis runs (about 20° off) along +S.

    The other two array axes take x (R) then y (A), with ``signs`` flipping columns, so the
    display orientation needs flips; spacing is given per array axis.
    """
    perm = np.zeros((3, 3))
    in_plane = [a for a in range(3) if a != axial_axis]
    perm[0, in_plane[0]] = signs[0]
    perm[1, in_plane[1]] = signs[1]
    perm[2, axial_axis] = signs[2]
    direction = _rot(0, 17.0) @ _rot(1, -9.0) @ _rot(2, 12.0) @ perm
    a = np.eye(4)
    a[:3, :3] = direction @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def write_isbi_layout(
    root: str | Path,
    patients: dict[str, int] | None = None,
    time_points: tuple[str, ...] = ("01", "02"),
    shape: tuple[int, int, int] = (24, 24, 12),
    seed: int = 0,
) -> dict[str, dict]:
    """Write ``root/training/trainingXX/{preprocessed,masks}/...`` and return per time point info.

    Args:
        root: output folder.
        patients: ``{patient: axial array axis}``; default training01 on axis 2,
            training02 on axis 0, training03 on axis 1 (the shape is permuted so the axial axis has ``shape[2]``).
        time_points: time point labels.
        shape: (in-plane, in-plane, axial) voxel counts.

    Returns:
        ``{"trainingXX_YY": {"patient", "affine" (RAS), "axial_axis", "lesion_slices" (set of
        indices along the axial axis), "files": {name: Path}}}``.
    """
    patients = patients or {"training01": 2, "training02": 0, "training03": 1}
    rng = np.random.default_rng(seed)
    info = {}
    for p_idx, (patient, axial) in enumerate(patients.items()):
        arr_shape = [shape[0], shape[1]]
        arr_shape.insert(axial, shape[2])
        arr_shape = tuple(arr_shape)
        spacing = [0.9, 1.1]
        spacing.insert(axial, 2.0)
        for t_idx, tp in enumerate(time_points):
            name = f"{patient}_{tp}"
            # alternate the in-plane signs so both row and column flips of the display orientation occur
            signs = (-1, 1, 1) if p_idx % 2 == 0 else (1, -1, 1)
            affine = oblique_affine(axial, spacing=spacing, origin=(-31.5 + p_idx, 17.25 - t_idx, -8.0), signs=signs)
            grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in arr_shape], indexing="ij"))
            centre = (np.array(arr_shape) - 1) / 2
            radii = np.array(arr_shape) * 0.38
            brain = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
            # lesions: balls well inside the brain, positions drawn per time point
            centres = [centre + rng.uniform(-0.2, 0.2, 3) * np.array(arr_shape) for _ in range(3)]
            m1 = np.zeros(arr_shape, bool)
            m2 = np.zeros(arr_shape, bool)
            for n, c in enumerate(centres):
                d = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
                m1 |= d <= 1.2
                if n < 2:  # rater 2: dilated borders, misses the last lesion
                    m2 |= d <= 1.8
            m1 &= brain
            m2 &= brain
            files = {}
            pp = Path(root) / "training" / patient / "preprocessed"
            mk = Path(root) / "training" / patient / "masks"
            for c_idx, (mod, mean) in enumerate(MODALITY_MEANS.items()):
                vol = mean + 40.0 * rng.standard_normal(arr_shape) + 10.0 * grid[c_idx % 3]
                vol += (250.0 if mod != "mprage" else -150.0) * m1  # lesions bright, dark on T1
                vol = np.where(brain, np.maximum(vol, 1.0), 0.0).astype(np.float32)
                files[mod] = pp / f"{name}_{mod}_pp.nii"
                _save(vol, affine, files[mod])
            for rater, m in (("mask1", m1), ("mask2", m2)):
                files[rater] = mk / f"{name}_{rater}.nii"
                _save(m.astype(np.uint8), affine, files[rater])
            other = tuple(a for a in range(3) if a != axial)
            lesion_slices = set(np.flatnonzero((m1 | m2).any(axis=other)).tolist())
            brain_slices = set(np.flatnonzero(brain.any(axis=other)).tolist())
            info[name] = {
                "patient": patient,
                "affine": affine,
                "axial_axis": axial,
                "lesion_slices": lesion_slices,
                "brain_slices": brain_slices,
                "files": files,
            }
    return info
