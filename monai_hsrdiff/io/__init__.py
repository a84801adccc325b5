from .dicom import (
    DicomFileHeader,
    DicomIndex,
    DicomSeries,
    DicomSeriesError,
    SeriesGeometry,
    read_dicom_series,
)

__all__ = [
    "DicomFileHeader",
    "DicomIndex",
    "DicomSeries",
    "DicomSeriesError",
    "SeriesGeometry",
    "read_dicom_series",
]
