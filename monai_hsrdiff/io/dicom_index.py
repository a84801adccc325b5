"""Find DICOM image series under a folder by SeriesInstanceUID, reading only their headers.

The LIDC-IDRI download from TCIA nests each series several folders deep under names that
have changed between TCIA releases, so series are found by their SeriesInstanceUID, not by
path. :class:`DicomIndex` reads the header of every file under a root once (no pixel data,
only the few tags below); :meth:`DicomIndex.series` validates one series and returns a
:class:`~monai_hsrdiff.io.dicom_series.DicomSeries`.

Example::

    index = DicomIndex.build("/data/LIDC-IDRI")
    index.series_uids                                   # sorted SeriesInstanceUIDs
    series = index.series("1.3.6.1.4.1.14519.5.2.1.6279.6001.303494235102183795724852353824")
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from monai_hsrdiff.errors import DicomSeriesError
from monai_hsrdiff.io.dicom_series import DicomSeries, check_header_values, sop_class_name, validated_series

__all__ = ["DicomFileHeader", "DicomIndex", "read_dicom_series"]

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


def index_entry(path: Path) -> tuple[DicomFileHeader | None, str | None]:
    """What :meth:`DicomIndex.build` keeps of one file: ``(header, None)``; ``(None, None)`` for a file
    that is no image (not DICOM, or a DICOMDIR, the index of a CD/DVD export); ``(None, error)`` for a
    DICOM file whose header does not parse (reported when its folder's series is requested)."""
    if path.name.upper() == _DICOMDIR_NAME or not _looks_like_dicom(path):
        return None, None
    try:
        return _read_header(path), None
    except Exception as e:  # any parse failure makes the file unreadable, reported on use
        return None, f"{type(e).__name__}: {e}"


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
    def build(cls, root: str | os.PathLike, progress: bool = False, map_files: Callable = map) -> DicomIndex:
        """Index every file under ``root`` (recursively) by reading only its header.

        Args:
            root: the folder to index.
            progress: show a progress bar.
            map_files: ``map_files(fn, paths)`` returns ``fn(path)`` for every path, in order: the builtin
                ``map`` (default), or a process pool's ordered map (``preprocessing.parallel.ordered_map``)
                to read the headers on several cores; the index is the same either way.

        Raises:
            DicomSeriesError: ``root`` is not a folder.
        """
        root = Path(root)
        if not root.is_dir():
            raise DicomSeriesError(f"DICOM root {str(root)!r} is not a folder; pass the folder of the download")
        paths = sorted(Path(d) / f for d, _, files in os.walk(root) for f in files if not f.startswith("."))
        entries = map_files(index_entry, paths)
        if progress:
            from tqdm import tqdm

            entries = tqdm(entries, total=len(paths), desc=f"indexing DICOM headers under {root}", unit="file")
        headers, unreadable = [], {}
        for p, (h, error) in zip(paths, entries):
            if error is not None:
                unreadable[p] = error
            elif h is not None:
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
                    f"(SOP class {sop_class_name(h.sop_class_uid)}; missing {', '.join(missing)}); "
                    f"pass the SeriesInstanceUID of a CT image series"
                )
            check_header_values(series_uid, h)
        return validated_series(series_uid, files, rel_tol, abs_tol)


def read_dicom_series(root: str | os.PathLike, series_uid: str) -> DicomSeries:
    """Index ``root`` and return the validated series ``series_uid`` (see :meth:`DicomIndex.series`)."""
    return DicomIndex.build(root).series(series_uid)
