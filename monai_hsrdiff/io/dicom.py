"""Find DICOM image series under a folder by SeriesInstanceUID and read them with their geometry.

The LIDC-IDRI download from TCIA nests each series several folders deep under names that
have changed between TCIA releases, so series are found by their SeriesInstanceUID, not by
path. :class:`DicomIndex` reads the header of every file under a root once (no pixel data,
only the few tags below), and :meth:`DicomIndex.series` validates one series and returns a
:class:`DicomSeries` whose slices are decoded one at a time, on demand.

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

    index = DicomIndex.build("/data/LIDC-IDRI")
    series = index.series("1.3.6.1.4.1.14519.5.2.1.6279.6001.303494235102183795724852353824")
    hu = series.read_slice_hu(40)            # (rows, cols) float32, Hounsfield units
    series.geometry.index_to_physical()      # 4x4, (i, j, k, 1) -> (x, y, z, 1) LPS mm
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DicomFileHeader", "DicomIndex", "DicomSeries", "DicomSeriesError", "SeriesGeometry", "read_dicom_series"]

# the only tags the index reads from each file (pixel data is never touched while indexing)
_INDEX_TAGS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "Modality",
    "RescaleSlope",
    "RescaleIntercept",
    "SpacingBetweenSlices",
)
# PS3.10 names the directory file DICOMDIR; its SOP class is Media Storage Directory Storage
_DICOMDIR_NAME = "DICOMDIR"
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


class DicomSeriesError(ValueError):
    """A DICOM series is missing, duplicated, unreadable, not an image, or has an irregular slice stack."""


@dataclass(frozen=True)
class DicomFileHeader:
    """The indexed header fields of one DICOM file (``None`` where the tag is absent; NaN where a
    numeric tag holds text that is not a number)."""

    path: Path
    series_uid: str
    study_uid: str
    sop_class_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    modality: str = ""
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    spacing_between_slices: float | None = None

    def missing_geometry(self) -> list[str]:
        names = {"ImagePositionPatient": self.position, "ImageOrientationPatient": self.orientation,
                 "PixelSpacing": self.pixel_spacing, "Rows": self.rows, "Columns": self.columns}  # fmt: skip
        return [k for k in _GEOMETRY_TAGS if names[k] is None]


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


def _looks_like_dicom(path: Path) -> bool:
    """A ``.dcm`` name or the ``DICM`` magic after the 128-byte preamble (PS3.10)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _number(value) -> float | None:
    """A numeric tag's value as a float: ``None`` when absent, NaN when it is not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _read_header(path: Path) -> DicomFileHeader | None:
    """The indexed fields, or ``None`` for a DICOMDIR (a media directory, not an image)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_INDEX_TAGS))
    if str(getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY:
        return None
    uid = ds.get("SeriesInstanceUID")
    if not uid:
        raise ValueError("no SeriesInstanceUID (0020,000E)")
    inum = ds.get("InstanceNumber")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    return DicomFileHeader(
        path=path,
        series_uid=str(uid).strip(),
        study_uid=str(ds.get("StudyInstanceUID", "")).strip(),
        sop_class_uid=str(ds.get("SOPClassUID", "")).strip(),
        instance_number=None if inum in (None, "") else int(inum),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        rows=None if rows is None else int(rows),
        columns=None if cols is None else int(cols),
        modality=str(ds.get("Modality", "") or "").strip(),
        rescale_slope=_number(ds.get("RescaleSlope")),
        rescale_intercept=_number(ds.get("RescaleIntercept")),
        spacing_between_slices=_number(ds.get("SpacingBetweenSlices")),
    )


def _sop_class_name(uid: str) -> str:
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


class DicomIndex:
    """Headers of every DICOM file under ``root``, grouped by SeriesInstanceUID.

    Build it once per run with :meth:`build`; files that are not DICOM (no ``.dcm`` name and
    no ``DICM`` magic, e.g. TCIA's XML annotations and licence files) are ignored; DICOM files
    whose header cannot be parsed are remembered in :attr:`unreadable` and reported when a
    series in the same folder is requested.

    Args:
        root: the folder that was indexed.
        headers: one :class:`DicomFileHeader` per readable DICOM file.
        unreadable: path -> reason, for DICOM files whose header failed to parse.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        headers: Iterable[DicomFileHeader],
        unreadable: dict[Path, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.by_series: dict[str, list[DicomFileHeader]] = defaultdict(list)
        for h in headers:
            self.by_series[h.series_uid].append(h)
        self.unreadable = dict(unreadable or {})

    @classmethod
    def build(cls, root: str | os.PathLike, progress: bool = False) -> DicomIndex:
        """Index every file under ``root`` (recursively) by reading only its header.

        Raises:
            DicomSeriesError: ``root`` is not a folder.
        """
        root = Path(root)
        if not root.is_dir():
            raise DicomSeriesError(f"DICOM root {str(root)!r} is not a folder; pass the folder of the download")
        paths = sorted(Path(d) / f for d, _, files in os.walk(root) for f in files if not f.startswith("."))
        if progress:
            from tqdm import tqdm

            paths = tqdm(paths, desc=f"indexing DICOM headers under {root}", unit="file")
        headers, unreadable = [], {}
        for p in paths:
            # a DICOMDIR (the index of a CD/DVD export) is no image: skip it by name or SOP class
            if p.name.upper() == _DICOMDIR_NAME or not _looks_like_dicom(p):
                continue
            try:
                h = _read_header(p)
            except Exception as e:  # any parse failure makes the file unreadable, reported on use
                unreadable[p] = f"{type(e).__name__}: {e}"
                continue
            if h is not None:
                headers.append(h)
        return cls(root, headers, unreadable)

    @property
    def series_uids(self) -> list[str]:
        return sorted(self.by_series)

    def __contains__(self, series_uid: str) -> bool:
        return series_uid in self.by_series

    def series(self, series_uid: str, rel_tol: float = 0.01, abs_tol: float = 1e-3) -> DicomSeries:
        """Validate the series with this SeriesInstanceUID and return it (pixel data not yet read).

        Args:
            series_uid: SeriesInstanceUID to find.
            rel_tol: allowed deviation of a slice gap from the median gap, as a fraction of it.
            abs_tol: plus this many mm (rounding in ImagePositionPatient).

        Raises:
            DicomSeriesError: no such series under the root (names the UID and the root); the
                UID in two folders; an unreadable file in the series' folder; a file that is
                not an image with geometry; mixed orientation/size/pixel spacing; missing
                slices (a gap that is a multiple of the spacing) or inconsistent spacing;
                a header value no grid or HU can be made of (PixelSpacing 0/negative/NaN,
                NaN position, degenerate orientation, NaN/inf RescaleSlope/Intercept, a
                one-file series with SpacingBetweenSlices 0/NaN) — each message names the
                files or positions involved and the tag.
        """
        series_uid = str(series_uid).strip()
        files = self.by_series.get(series_uid)
        if not files:
            raise DicomSeriesError(
                f"no DICOM series with SeriesInstanceUID {series_uid} under {self.root} "
                f"(searched {sum(len(v) for v in self.by_series.values())} DICOM files in "
                f"{len(self.by_series)} series); check that --dicom-root points at the download "
                f"that contains this scan"
            )
        folders = sorted({h.path.parent for h in files})
        if len(folders) > 1:
            raise DicomSeriesError(
                f"SeriesInstanceUID {series_uid} occurs in {len(folders)} folders under {self.root}: "
                + ", ".join(str(f) for f in folders)
                + "; keep one copy of the series (a download was probably extracted twice)"
            )
        bad = sorted(p for p in self.unreadable if p.parent == folders[0])
        if bad:
            raise DicomSeriesError(
                f"series {series_uid} in {folders[0]}: cannot read DICOM file {bad[0]} "
                f"({self.unreadable[bad[0]]}); truncated or corrupt, re-download it"
                + (f" (and {len(bad) - 1} more unreadable files there)" if len(bad) > 1 else "")
            )
        for h in files:
            missing = h.missing_geometry()
            if missing:
                raise DicomSeriesError(
                    f"series {series_uid}: {h.path} is not an image with slice geometry "
                    f"(SOP class {_sop_class_name(h.sop_class_uid)}; missing {', '.join(missing)}); "
                    f"pass the SeriesInstanceUID of a CT image series"
                )
            _check_header_values(series_uid, h)
        return _validated_series(series_uid, files, rel_tol, abs_tol)


def _check_header_values(series_uid: str, h: DicomFileHeader) -> None:
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


def _validated_series(
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


def read_dicom_series(root: str | os.PathLike, series_uid: str) -> DicomSeries:
    """Index ``root`` and return the validated series ``series_uid`` (see :meth:`DicomIndex.series`)."""
    return DicomIndex.build(root).series(series_uid)
