"""Slice geometry shared by preprocessing and inference: how a volume is cut into 2D slices.

Arrays are in voxel-index order ``(I, J, K)`` (nibabel arrays, SimpleITK indices); physical
points are LPS millimetres (ITK/DICOM). A NIfTI affine is RAS: ``LPS_FROM_RAS @ affine``
gives the LPS one. Slices are shown in DICOM display orientation: columns towards patient
Left (+x), rows towards Posterior (+y), the slice axis the array axis closest to S.

Example::

    axes = SliceAxes(*slice_axes(LPS_FROM_RAS @ nib.load("flair.nii").affine))
    planes = axes.to_plane(volume)          # (C, I, J, K) -> (C, slices, rows, cols)
    np.array_equal(axes.from_plane(planes), volume)   # True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DICOM_AXES", "LPS_FROM_RAS", "SliceAxes", "axial_axis", "slice_axes", "slice_item_to_index"]

# NIfTI (RAS) -> ITK/DICOM (LPS): x and y negated
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SliceAxes:
    """How the volume is cut into 2D model inputs.

    Attributes:
        slice_axis: array axis (0, 1, 2 of ``I, J, K``) the model slices along.
        row_axis: array axis that runs down the rows of a displayed slice.
        col_axis: array axis that runs along a row.
        flip_rows: rows run against the array axis (the first row is the last index).
        flip_cols: columns run against the array axis.
    """

    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool = False
    flip_cols: bool = False

    def to_plane(self, vol: np.ndarray) -> np.ndarray:
        """(..., I, J, K) -> (..., slices, rows, cols) in display orientation (a view)."""
        lead = vol.ndim - 3
        x = np.moveaxis(vol, [lead + self.slice_axis, lead + self.row_axis, lead + self.col_axis], [lead, lead + 1, lead + 2])
        if self.flip_rows:
            x = np.flip(x, axis=lead + 1)
        if self.flip_cols:
            x = np.flip(x, axis=lead + 2)
        return x

    def from_plane(self, planes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_plane`: (..., slices, rows, cols) -> (..., I, J, K)."""
        lead = planes.ndim - 3
        x = planes
        if self.flip_cols:
            x = np.flip(x, axis=lead + 2)
        if self.flip_rows:
            x = np.flip(x, axis=lead + 1)
        return np.moveaxis(x, [lead, lead + 1, lead + 2], [lead + self.slice_axis, lead + self.row_axis, lead + self.col_axis])

    def as_tuple(self) -> tuple[int, int, int, bool, bool]:
        """The tuple :func:`slice_item_to_index` takes."""
        return (self.slice_axis, self.row_axis, self.col_axis, self.flip_rows, self.flip_cols)


# a DICOM series read as (I, J, K) = (column, row, slice): slices along k, rows and columns as stored
DICOM_AXES = SliceAxes(slice_axis=2, row_axis=1, col_axis=0)


def axial_axis(affine: np.ndarray) -> int:
    """Array axis whose physical direction is closest to the S (z) axis of a 4×4 affine."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    cos_z = np.abs(cols[2]) / np.linalg.norm(cols, axis=0)
    return int(np.argmax(cos_z))


def slice_axes(affine_lps: np.ndarray) -> tuple[int, int, int, bool, bool]:
    """(slice axis, row axis, column axis, flip rows, flip columns) for DICOM display orientation.

    Columns run along the in-plane axis closest to LPS x and increase towards patient
    Left; rows run along the other one and increase towards Posterior (+y).
    """
    cols = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
    unit = cols / np.linalg.norm(cols, axis=0)
    k = axial_axis(affine_lps)
    a, b = [i for i in range(3) if i != k]
    col_axis, row_axis = (a, b) if abs(unit[0, a]) >= abs(unit[0, b]) else (b, a)
    return k, row_axis, col_axis, bool(unit[1, row_axis] < 0), bool(unit[0, col_axis] < 0)


def slice_item_to_index(
    shape: Sequence[int], axes: tuple[int, int, int, bool, bool], k: int, size: int
) -> np.ndarray:
    """4×4 map item pixel (row, col, 0, 1) -> continuous source index (i, j, k, 1).

    Resizing ``n`` source pixels to ``size`` with pixel centres aligned (align_corners=False)
    maps item coordinate ``r`` to ``u = (r + 0.5)·n/size − 0.5``; a flipped axis reads
    ``n − 1 − u``. The item's third coordinate steps to the next slice, so the matrix is
    invertible.
    """
    k_axis, row_axis, col_axis, flip_r, flip_c = axes
    m = np.zeros((4, 4))
    for item_dim, axis, flip in ((0, row_axis, flip_r), (1, col_axis, flip_c)):
        n = shape[axis]
        s = n / size
        off = 0.5 * s - 0.5
        m[axis, item_dim], m[axis, 3] = (-s, n - 1 - off) if flip else (s, off)
    m[k_axis, 2] = 1.0
    m[k_axis, 3] = k
    m[3, 3] = 1.0
    return m
