"""Reading scans and their geometry: DICOM series by SeriesInstanceUID, and the slice conventions."""

from .dicom_index import DicomFileHeader, DicomIndex, read_dicom_series
from .dicom_series import DicomSeries, SeriesGeometry
from .geometry import LPS_FROM_RAS, SliceAxes, slice_axes
from monai_hsrdiff.errors import DicomSeriesError

__all__ = [
    "DicomFileHeader",
    "DicomIndex",
    "DicomSeries",
    "DicomSeriesError",
    "LPS_FROM_RAS",
    "SeriesGeometry",
    "SliceAxes",
    "read_dicom_series",
    "slice_axes",
]
