"""Export inference results for viewers: 3D Slicer case folders in the source scan's grid."""

from __future__ import annotations

from .slicer import (
    CASE_FILES,
    CASE_LAYOUT,
    SlicerCaseWriter,
    check_output_folder,
    sample_colors,
    write_case,
    write_segmentation,
    write_volume,
)

__all__ = [
    "CASE_FILES",
    "CASE_LAYOUT",
    "SlicerCaseWriter",
    "check_output_folder",
    "sample_colors",
    "write_case",
    "write_segmentation",
    "write_volume",
]
