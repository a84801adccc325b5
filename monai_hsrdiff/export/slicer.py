"""Write one inference case for 3D Slicer, in exactly the source scan's voxel grid.

Files (all with the source's size, origin, spacing and direction; zeros outside the region):

=========================  ============================================================
``mean_probability.nii.gz``  float32, fraction of the N samples marking each voxel, [0, 1]
``entropy.nii.gz``           float32, entropy of that mean in BITS, [0, 1]: 0 where all
                             samples agree, 1 where they split evenly
``samples.seg.nrrd``         Slicer segmentation, one segment per sample (``sample_01`` ..),
                             coloured; overlapping segments go to separate layers
``consensus.seg.nrrd``       Slicer segmentation, one segment: mean >= 0.5 (majority vote)
``summary.json``             inputs, checkpoint, N, sampler, steps, region, timings, geometry
=========================  ============================================================

The case is built in a hidden temporary folder beside ``out`` and renamed to ``out`` when
complete, so ``out`` either does not exist, holds the previous complete case
(``overwrite=False`` refuses to touch it), or holds the new complete case. ``summary.json``
carries the stamp (``"hsrdiff_output"``) by which ``overwrite=True`` recognises the case as this
command's own; a folder holding anything else is refused, never deleted (:func:`check_output_folder`).

Example::

    write_case("runs/lidc/inference/case1", prediction, source, summary={"checkpoint": "..."})
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_hsrdiff.utils import (
    OutputFolderError,
    building_dir,
    remove_interrupted_writes,
    OutputLayout,
    STAMP_KEY,
    check_replaceable,
    guard_output_path,
    list_entries,
    replace_dir,
    unexpected_entries,
    unwritable_reason,
)
from monai_hsrdiff.inference.source import InferenceInputError, SourceVolume
from monai_hsrdiff.inference.volume import VolumePrediction

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

CASE_FILES = ("mean_probability.nii.gz", "entropy.nii.gz", "samples.seg.nrrd", "consensus.seg.nrrd", "summary.json")
# what --overwrite may replace: a folder stamped by summary.json, or (cases of earlier releases,
# unstamped) a folder holding nothing but these file names
CASE_LAYOUT = OutputLayout("monai_hsrdiff.infer", CASE_FILES, stamp_file="summary.json", what="inference case")
CONSENSUS_COLOR = (1.0, 0.85, 0.0)
#: gzip level of the ``.seg.nrrd`` files: zlib's default, as SimpleITK writes the NIfTIs. slicerio's
#: default 9 took 44 s instead of 1.4 s for 16 noisy 512x512x4 masks, for a 6 % smaller file.
SEG_COMPRESSION_LEVEL = 6


def sample_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinguishable RGB colours in [0, 1] (matplotlib's tab20, then cycled)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [tuple(float(v) for v in cmap(i % 20)[:3]) for i in range(n)]  # type: ignore[misc]


def write_volume(path: str | os.PathLike, array: np.ndarray, source: SourceVolume) -> Path:
    """Write an (I, J, K) array with ``source``'s geometry (SimpleITK; format from the suffix)."""
    import SimpleITK as sitk

    if tuple(array.shape) != source.shape:
        raise ValueError(f"write_volume: array shape {array.shape} differs from the source grid {source.shape}")
    g = source.itk_geometry()
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetOrigin(g["origin"])
    img.SetSpacing(g["spacing"])
    img.SetDirection(g["direction"])
    sitk.WriteImage(img, str(path), useCompression=True)
    return Path(path)


def write_segmentation(
    path: str | os.PathLike,
    masks: Sequence[np.ndarray],
    names: Sequence[str],
    colors: Sequence[tuple[float, float, float]],
    source: SourceVolume,
) -> Path:
    """Write a Slicer ``.seg.nrrd`` with one segment per (I, J, K) bool mask (slicerio's writer)."""
    import slicerio

    seg = slicerio.create_segmentation(source.shape, source.index_to_physical)
    for m, name, color in zip(masks, names, colors):
        slicerio.add_segment(seg, m, {"id": name, "name": name, "color": list(color)})
    slicerio.write_segmentation(str(path), seg, compression_level=SEG_COMPRESSION_LEVEL)
    return Path(path)


def check_output_folder(
    out: str | os.PathLike, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Refuse an ``out`` the case may not be written to; return the folder to write (a link's target).

    ``out`` must not be, contain or lie inside one of ``inputs``, nor be or contain the working
    directory, the repository or a file system root (:func:`~monai_hsrdiff.utils.guard_output_path`).
    A non-empty ``out`` needs ``overwrite``, and even then may hold only an earlier case of this
    command (:data:`CASE_LAYOUT`: its ``summary.json`` stamp, or only the case file names, as an
    earlier release wrote them); anything else is refused by name and never deleted.

    Raises:
        InferenceInputError: ``out`` is a file, cannot be created or written, overlaps an input or
            a protected folder, or holds files that ``overwrite`` may not replace.
    """
    given = Path(out)
    try:
        out = guard_output_path(given, inputs)
    except OutputFolderError as e:
        raise InferenceInputError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise InferenceInputError(f"--out {given} is a file; pass a folder path for the case")
    reason = unwritable_reason(out)
    if reason:
        raise InferenceInputError(f"cannot write --out {given}: {reason}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        foreign = unexpected_entries(out, CASE_LAYOUT)
        if not overwrite and foreign:
            raise InferenceInputError(
                f"--out {given} already holds files that are not an inference case ({list_entries(foreign)}); "
                "choose another --out (--overwrite replaces only an earlier case)"
            )
        if not overwrite:
            held = sorted(p.name for p in out.iterdir())
            raise InferenceInputError(
                f"--out {given} already holds results ({list_entries(held)}); "
                "pass --overwrite to replace them or choose another --out"
            )
        try:
            check_replaceable(out, CASE_LAYOUT)
        except OutputFolderError as e:
            raise InferenceInputError(str(e)) from None
    return out


def write_case(
    out: str | os.PathLike,
    prediction: VolumePrediction,
    source: SourceVolume,
    summary: dict[str, Any] | None = None,
    overwrite: bool = False,
    dicom_instances: Sequence[Any] | None = None,
) -> Path:
    """Write the five case files into ``out`` atomically (temporary folder, then rename).

    With ``dicom_instances`` (the source's headers, :func:`~monai_hsrdiff.export.dicom_out.read_source_instances`)
    the four DICOM files of :mod:`monai_hsrdiff.export.dicom_out` are written too.

    Args:
        out: the case folder.
        prediction: (N, I, J, K) samples in ``source``'s grid.
        source: the scan (its geometry is copied to every file).
        summary: extra JSON-ready fields for ``summary.json`` (inputs, checkpoint, sampler, ...).
        overwrite: replace a folder that already holds files.
        dicom_instances: K source headers in slice order: also write the DICOM SEGs and Parametric Map.

    Returns:
        ``out``.

    Raises:
        InferenceInputError: ``out`` holds results and ``overwrite`` is False.
    """
    import time

    out = check_output_folder(out, overwrite)
    t0 = time.perf_counter()
    samples = prediction.samples
    n = samples.shape[0]
    if samples.shape[1:] != source.shape:
        raise ValueError(f"write_case: samples grid {samples.shape[1:]} differs from the source grid {source.shape}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with building_dir(out, "partial") as tmp:
        mean = prediction.mean_probability
        write_volume(tmp / "mean_probability.nii.gz", mean, source)
        write_volume(tmp / "entropy.nii.gz", prediction.entropy, source)
        names = [f"sample_{i + 1:02d}" for i in range(n)]
        write_segmentation(tmp / "samples.seg.nrrd", list(samples), names, sample_colors(n), source)
        write_segmentation(tmp / "consensus.seg.nrrd", [mean >= 0.5], ["consensus"], [CONSENSUS_COLOR], source)
        doc = dict(summary or {})
        files = list(CASE_FILES)
        t_dicom = None
        if dicom_instances is not None:
            from monai_hsrdiff.export.dicom_out import DICOM_FILES, write_dicom_case

            t1 = time.perf_counter()
            doc["dicom"] = write_dicom_case(tmp, prediction, source, dicom_instances, {**doc, "num_samples": int(n)},
                                            sample_colors(n), CONSENSUS_COLOR)  # fmt: skip
            t_dicom = time.perf_counter() - t1
            files += list(DICOM_FILES)
        doc.update(
            {
                "num_samples": int(n),
                "segments": {"samples.seg.nrrd": names, "consensus.seg.nrrd": ["consensus"]},
                "units": {"mean_probability": "fraction of samples, [0, 1]", "entropy": "bits, [0, 1]"},
                "region": prediction.region.as_json(),
                "source": {**source.info, "geometry": source.itk_geometry(), "channels": list(source.channel_names)},
                "files": files,
                STAMP_KEY: CASE_LAYOUT.stamp(files),  # marks the folder as ours: --overwrite may replace it
            }
        )
        timings = dict(doc.get("timings", {}), **prediction.timings)
        if t_dicom is not None:
            timings["dicom_write_s"] = t_dicom
        timings["write_s"] = time.perf_counter() - t0
        doc["timings"] = {k: round(float(v), 3) for k, v in timings.items()}
        (tmp / "summary.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        # --overwrite: the old case is dropped (unless it gained foreign entries meanwhile); else only an empty folder
        replace_dir(tmp, out, replace=overwrite, check=lambda p: unexpected_entries(p, CASE_LAYOUT))
    return out


class SlicerCaseWriter:
    """The writer of ``inference.json``: one case folder for 3D Slicer (:func:`write_case`).

    Args:
        output_dir: the case folder (``--out``).
        overwrite: replace an earlier case of this command there (only that; see :func:`check_output_folder`).
        dicom_out: also write the DICOM SEGs and Parametric Map (:mod:`monai_hsrdiff.export.dicom_out`);
            the source must be a DICOM series (:meth:`check_source` refuses others before sampling).

    Example::

        writer = SlicerCaseWriter("runs/lidc/inference/case1")
        writer.prepare(inputs=["/data/case1/"])      # refuses a bad folder before any work
        writer(prediction, source, summary={"seed": 0})
    """

    #: what a case folder of this writer holds (the cohort reads it: inference does not import export)
    layout = CASE_LAYOUT

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, dicom_out: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.dicom_out = bool(dicom_out)
        self._instances: list[Any] | None = None

    def prepare(self, inputs: Sequence[str | os.PathLike] = (), log=None) -> Path:
        """Check the folder (:func:`check_output_folder`; a link is written through, so ``output_dir``
        becomes its target) and remove what a killed earlier write left beside it."""
        self.output_dir = check_output_folder(self.output_dir, self.overwrite, inputs)
        # a killed earlier write leaves the case under .<name>.*.partial and a replaced one under .old
        remove_interrupted_writes(self.output_dir, ("partial", "old"), log or (lambda _m: None))
        return self.output_dir

    def check_source(self, source: SourceVolume) -> None:
        """With ``dicom_out``: read and check the source's DICOM headers now, before sampling
        (:func:`~monai_hsrdiff.export.dicom_out.read_source_instances`)."""
        if self.dicom_out:
            from monai_hsrdiff.export.dicom_out import read_source_instances

            self._instances = read_source_instances(source)

    def __call__(self, prediction: VolumePrediction, source: SourceVolume, summary: dict[str, Any] | None = None) -> Path:
        """Write the case (:func:`write_case`); return the folder."""
        if self.dicom_out and self._instances is None:
            self.check_source(source)
        return write_case(self.output_dir, prediction, source, summary, self.overwrite, self._instances)
