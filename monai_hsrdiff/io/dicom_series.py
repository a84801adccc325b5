"""One validated DICOM image series: its voxel grid (ITK convention) and per-slice HU decoding.

Geometry follows ITK/SimpleITK (what ``sitk.ImageSeriesReader`` returns for the same files):

- voxel index ``(i, j, k)``: ``i`` along a row (column number), ``j`` down the rows (row
  number), ``k`` the slice, slices sorted by position along the slice normal
  ``n = row_cosine × column_cosine`` (ascending);
- ``spacing = (PixelSpacing[1], PixelSpacing[0], slice spacing)`` — DICOM lists the row
  spacing (between rows) first; the slice spacing is the gap between slice positions, or for
  a one-file series ``|SpacingBetweenSlices|`` (1 mm without it), as GDCM reads one file;
- ``direction``: 9 numbers, row-major 3×3 matrix whose columns are the row cosine, the
  column cosine and the normal (``ImageOrientationPatient`` = row cosine + column cosine);
- ``origin``: ``ImagePositionPatient`` of slice ``k = 0``; all points in LPS millimetres.

Example::

    series = read_dicom_series("/data/LIDC-IDRI", uid)   # monai_hsrdiff.io.dicom_index
    hu = series.read_slice_hu(40)            # (rows, cols) float32, Hounsfield units
    series.geometry.index_to_physical()      # 4x4, (i, j, k, 1) -> (x, y, z, 1) LPS mm
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from monai_hsrdiff.errors import DicomSeriesError

if TYPE_CHECKING:
    from monai_hsrdiff.io.dicom_index import DicomFileHeader

__all__ = ["DicomSeries", "SeriesGeometry", "check_header_values", "sop_class_name", "validated_series"]


@dataclass(frozen=True)
class SeriesGeometry:
    """Voxel grid of a series, ITK convention (see the module docstring).

    Attributes:
        size: (I, J, K) = (columns, rows, slices).
        origin: LPS position (mm) of voxel (0, 0, 0).
        spacing: (column spacing, row spacing, slice spacing) in mm.
        direction: 9 numbers, row-major 3×3, columns = row cosine, column cosine, normal.
        positions: (K, 3) ImagePositionPatient of every slice, in index order.
    """

    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    positions: np.ndarray = field(repr=False)

    def index_to_physical(self) -> np.ndarray:
        """4×4 matrix mapping a continuous index (i, j, k, 1) to an LPS point (x, y, z, 1) in mm."""
        from monai_hsrdiff.data.items import index_to_physical_matrix

        return index_to_physical_matrix(self.origin, self.spacing, self.direction)

    def as_meta(self) -> dict:
        """JSON-ready ``size``/``origin``/``spacing``/``direction`` (the item ``meta`` fields)."""
        return {
            "size": [int(s) for s in self.size],
            "origin": [float(v) for v in self.origin],
            "spacing": [float(v) for v in self.spacing],
            "direction": [float(v) for v in self.direction],
        }


def sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else "no SOPClassUID"
    return f"{name} ({uid})" if uid and name != uid else (uid or name)


class DicomSeries:
    """One validated image series: sorted files, geometry, and per-slice HU decoding.

    Args:
        series_uid: SeriesInstanceUID.
        headers: the files' headers, sorted by position along the slice normal.
        geometry: the voxel grid.
        dropped: files left out because another slice had the same position, with the reason.
    """

    def __init__(
        self,
        series_uid: str,
        headers: Sequence[DicomFileHeader],
        geometry: SeriesGeometry,
        dropped: Sequence[tuple[Path, str]] = (),
    ) -> None:
        self.series_uid = series_uid
        self.headers = list(headers)
        self.geometry = geometry
        self.dropped = list(dropped)
        self.study_uid = self.headers[0].study_uid
        self.folder = self.headers[0].path.parent

    def __len__(self) -> int:
        return len(self.headers)

    def slice_index_of(self, position_along_normal: float, tol: float | None = None) -> int | None:
        """Index ``k`` of the slice at ``position_along_normal`` (mm, ±``tol``), or ``None``.

        ``tol`` defaults to a quarter of the slice spacing.
        """
        normal = np.asarray(self.geometry.direction).reshape(3, 3)[:, 2]
        s = self.geometry.positions @ normal
        tol = 0.25 * self.geometry.spacing[2] if tol is None else tol
        k = int(np.abs(s - position_along_normal).argmin())
        return k if abs(s[k] - position_along_normal) <= tol else None

    def read_slice_hu(self, k: int) -> np.ndarray:
        """Decode slice ``k`` and return it in Hounsfield units, (rows, cols) float32.

        HU = stored value × RescaleSlope + RescaleIntercept (pydicom's modality LUT).

        Raises:
            DicomSeriesError: the file cannot be decoded (truncated or corrupt); names the file.
        """
        import pydicom
        from pydicom.pixels import apply_rescale

        if not 0 <= k < len(self.headers):
            raise IndexError(f"slice index k={k} outside 0..{len(self.headers) - 1} of series {self.series_uid}")
        h = self.headers[k]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns before failing on truncated data
                ds = pydicom.dcmread(h.path)
                arr = ds.pixel_array
        except Exception as e:  # pydicom raises many types for damaged files
            raise DicomSeriesError(
                f"{h.path}: cannot decode the pixel data of slice k={k} of series {self.series_uid} "
                f"(truncated or corrupt file?): {type(e).__name__}: {e}. Re-download this file."
            ) from e
        if arr.shape != (h.rows, h.columns):
            raise DicomSeriesError(f"{h.path}: pixel data has shape {arr.shape}, header says {(h.rows, h.columns)}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as inf below
            hu = np.asarray(apply_rescale(arr, ds), dtype=np.float32)
        bad = ~np.isfinite(hu)
        if bad.any():
            # the header's slope/intercept were checked by DicomIndex.series: here the pixel data
            # itself (Float Pixel Data may hold NaN) or the product overflows float32
            stored = next((n for n in ("FloatPixelData", "DoubleFloatPixelData") if n in ds), "PixelData")
            raise DicomSeriesError(
                f"{h.path}: {int(bad.sum())} of {bad.size} pixel values of slice k={k} are NaN or infinite after the "
                f"modality rescale ({stored}, RescaleSlope {ds.get('RescaleSlope', 1)}, RescaleIntercept "
                f"{ds.get('RescaleIntercept', 0)}); a model cannot segment them: re-export the series"
            )
        return hu

    def read_volume_hu(self) -> np.ndarray:
        """All slices in HU, (K, rows, cols) float32 — NumPy order of ``sitk.GetArrayFromImage``."""
        return np.stack([self.read_slice_hu(k) for k in range(len(self))])


def check_header_values(series_uid: str, h: DicomFileHeader) -> None:
    """Refuse header values no voxel grid or HU can be made of (0/negative/NaN spacing, NaN
    position, degenerate orientation, NaN/inf rescale), naming the file and the tag."""

    def bad(tag: str, value, why: str) -> DicomSeriesError:
        return DicomSeriesError(
            f"series {series_uid}: {h.path}: {tag} is {value}, {why}; the header is damaged: re-export the series"
        )

    ps = np.asarray(h.pixel_spacing, dtype=np.float64)
    if not (np.all(np.isfinite(ps)) and np.all(ps > 0)):
        raise bad("PixelSpacing (0028,0030)", list(h.pixel_spacing), "but both values must be finite and > 0 mm")
    if not np.all(np.isfinite(h.position)):
        raise bad("ImagePositionPatient (0020,0032)", list(h.position), "but all 3 values must be finite")
    row_cos, col_cos = np.asarray(h.orientation[:3]), np.asarray(h.orientation[3:])
    if not (
        np.all(np.isfinite(h.orientation))
        and abs(np.linalg.norm(row_cos) - 1) < 0.01
        and abs(np.linalg.norm(col_cos) - 1) < 0.01
        and abs(float(row_cos @ col_cos)) < 0.01
    ):
        raise bad("ImageOrientationPatient (0020,0037)", list(h.orientation),
                  "but it must hold two orthogonal unit vectors (row and column direction cosines)")  # fmt: skip
    for tag, value in (("RescaleSlope (0028,1053)", h.rescale_slope), ("RescaleIntercept (0028,1052)", h.rescale_intercept)):
        if value is not None and not np.isfinite(value):
            raise bad(tag, value, "so every Hounsfield unit would be NaN or infinite")


def validated_series(
    series_uid: str, files: list[DicomFileHeader], rel_tol: float, abs_tol: float
) -> DicomSeries:
    first = files[0]
    for h in files[1:]:
        for name, a, b in (
            ("ImageOrientationPatient", h.orientation, first.orientation),
            ("PixelSpacing", h.pixel_spacing, first.pixel_spacing),
        ):
            if not np.allclose(a, b, atol=1e-4):
                raise DicomSeriesError(
                    f"series {series_uid}: {name} differs between {first.path} ({list(b)}) and {h.path} ({list(a)})"
                )
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise DicomSeriesError(
                f"series {series_uid}: image size differs between {first.path} ({first.rows}x{first.columns}) "
                f"and {h.path} ({h.rows}x{h.columns})"
            )
    row_cos = np.asarray(first.orientation[:3])
    col_cos = np.asarray(first.orientation[3:])
    normal = np.cross(row_cos, col_cos)
    # same order as ITK/GDCM and pylidc: ascending position along the normal; ties by InstanceNumber
    files = sorted(
        files, key=lambda h: (float(np.dot(h.position, normal)), h.instance_number or 0, str(h.path))
    )
    s = np.array([float(np.dot(h.position, normal)) for h in files])
    # slices at the same position: keep the lowest InstanceNumber, as pylidc does
    kept, dropped = [files[0]], []
    for h, prev, cur in zip(files[1:], s[:-1], s[1:]):
        if abs(cur - prev) <= abs_tol:
            dropped.append((h.path, f"same position as {kept[-1].path}"))
        else:
            kept.append(h)
    if dropped:
        warnings.warn(f"series {series_uid}: {len(dropped)} slice(s) duplicate another slice's position and were left out")
    files = kept
    s = np.array([float(np.dot(h.position, normal)) for h in files])
    gaps = np.diff(s)
    if gaps.size:
        step = float(np.median(gaps))
        off = np.nonzero(np.abs(gaps - step) > rel_tol * step + abs_tol)[0]
        if off.size:
            ratios = gaps[off] / step
            where = ", ".join(f"{s[i]:.3f} -> {s[i + 1]:.3f} mm (gap {gaps[i]:.3f})" for i in off[:5])
            more = f" and {off.size - 5} more" if off.size > 5 else ""
            if np.all((np.abs(ratios - np.round(ratios)) < 0.05) & (np.round(ratios) >= 2)):
                n = int(np.sum(np.round(ratios) - 1))
                raise DicomSeriesError(
                    f"series {series_uid} in {files[0].path.parent}: {n} missing slice(s) — slice spacing is "
                    f"{step:.3f} mm but positions along the slice normal jump at {where}{more}; "
                    f"re-download the series"
                )
            raise DicomSeriesError(
                f"series {series_uid} in {files[0].path.parent}: inconsistent slice spacing — median "
                f"{step:.3f} mm but positions along the slice normal step at {where}{more}; a volume "
                f"with one spacing cannot represent this series"
            )
    else:
        # one file: no gap to measure. GDCM (so SimpleITK's ImageSeriesReader and 3D Slicer) takes
        # |SpacingBetweenSlices| and 1 mm without it (SliceThickness is not used); ITK refuses 0/NaN
        sbs = files[0].spacing_between_slices
        if sbs is not None and not (np.isfinite(sbs) and sbs != 0):
            raise DicomSeriesError(
                f"series {series_uid}: {files[0].path}: SpacingBetweenSlices (0018,0088) is {sbs}, but the one slice of "
                "this series needs a finite non-zero slice spacing; the header is damaged: re-export the series"
            )
        step = 1.0 if sbs is None else abs(float(sbs))
    positions = np.array([h.position for h in files], dtype=np.float64)
    direction = np.stack([row_cos, col_cos, normal], axis=1)
    geometry = SeriesGeometry(
        size=(int(first.columns), int(first.rows), len(files)),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        spacing=(float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), step),
        direction=tuple(float(v) for v in direction.ravel()),
        positions=positions,
    )
    return DicomSeries(series_uid, files, geometry, dropped)
