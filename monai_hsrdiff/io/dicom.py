"""DICOM series by SeriesInstanceUID, with their geometry: :mod:`~monai_hsrdiff.io.dicom_index` (finding
series by their headers) and :mod:`~monai_hsrdiff.io.dicom_series` (one validated series, ITK
geometry, HU decoding). This module keeps their names importable from here.

Example::

    from monai_hsrdiff.io.dicom import DicomIndex

    series = DicomIndex.build("/data/LIDC-IDRI").series(uid)
    hu = series.read_slice_hu(40)            # (rows, cols) float32, Hounsfield units
"""

from __future__ import annotations

from monai_hsrdiff.errors import DicomSeriesError
from monai_hsrdiff.io.dicom_index import DicomFileHeader, DicomIndex, read_dicom_series
from monai_hsrdiff.io.dicom_series import DicomSeries, SeriesGeometry

__all__ = ["DicomFileHeader", "DicomIndex", "DicomSeries", "DicomSeriesError", "SeriesGeometry", "read_dicom_series"]
