"""Write one inference case as DICOM objects that go back into a PACS (highdicom).

Files, written beside the 3D Slicer files of :mod:`monai_hsrdiff.export.slicer` when the
source is a DICOM series (``--dicom-out``, bundle key ``dicom_out``):

============================  ==========================================================
``consensus.seg.dcm``         BINARY Segmentation, one segment: mean >= 0.5 (majority vote)
``samples.seg.dcm``           BINARY Segmentation, one segment per sample (``sample 01`` ..)
``mean_probability.seg.dcm``  FRACTIONAL Segmentation of type PROBABILITY (8 bits: 0..255)
``entropy.pm.dcm``            Parametric Map, float32 entropy of the mean in bits (UCUM ``bit``)
============================  ==========================================================

Each one is a new series (new Series and SOP Instance UIDs) of the source's study, in its
Frame of Reference, with the patient/study modules copied from the source (highdicom does
that; nothing else about the patient is added). Frame ``f`` references the source instance
of slice ``k`` (slice order along the normal, the order of the NIfTI/.seg.nrrd k axis).
Only the slices of the processed region are encoded, and the SEGs omit a segment's frames
with nothing in them (a SEG with nothing at all keeps the region's frames: it needs one).
Frames are in slice order as highdicom sorts them (descending along the slice normal).

Segments are coded with SNOMED CT from the DICOM content groups: category CID 7150, type
CID 7151 (:data:`TASK_CODES`); the algorithm (HSRDiff, this package's version, family
Artificial Intelligence, the checkpoint's SHA-256 and the sampler settings) goes into every
segment's Algorithm Identification and, for all four files, the Contributing Equipment.

Example::

    instances = read_source_instances(source)            # before sampling: refuses bad headers
    write_dicom_case(folder, prediction, source, instances, summary)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monai_hsrdiff.errors import InferenceInputError
from monai_hsrdiff.inference.source import SourceVolume
from monai_hsrdiff.inference.volume import VolumePrediction

__all__ = [
    "DICOM_FILES",
    "TASK_CODES",
    "SegmentCodes",
    "algorithm_parameters",
    "read_source_instances",
    "refuse_nifti_inputs",
    "write_dicom_case",
]

DICOM_FILES = ("consensus.seg.dcm", "samples.seg.dcm", "mean_probability.seg.dcm", "entropy.pm.dcm")
MANUFACTURER = "monai-hsrdiff"
ALGORITHM_NAME = "HSRDiff"
# first Series Number of the four new series (the source's own numbers are usually small)
SERIES_NUMBER_BASE = 9001
# the source must carry these for a SEG / PM to reference it (PS3.3 C.12.1, C.7.4.1, C.7.3.1)
_REQUIRED_TAGS = (
    ("SOPClassUID", "(0008,0016)"),
    ("SOPInstanceUID", "(0008,0018)"),
    ("StudyInstanceUID", "(0020,000D)"),
    ("FrameOfReferenceUID", "(0020,0052)"),
)
# Type 2 attributes of the Patient and General Study modules (present, possibly empty) that
# highdicom copies from the source; a source without them gets them empty ("unknown"): no value is invented
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


@dataclass(frozen=True)
class SegmentCodes:
    """SNOMED CT codes of a task's segment: category (CID 7150), type (CID 7151), anatomic region.

    Attributes:
        category, type, region: ``(code value, meaning)`` in scheme SCT.
        label: the segment label and description text, e.g. ``"lung nodule"``.
    """

    category: tuple[str, str]
    type: tuple[str, str]
    region: tuple[str, str]
    label: str

    def concepts(self):
        """The three codes as highdicom ``CodedConcept`` objects (category, type, region)."""
        from highdicom.sr import CodedConcept

        return tuple(CodedConcept(value, "SCT", meaning) for value, meaning in (self.category, self.type, self.region))


# codes as pydicom's DICOM code dictionaries hold them (pydicom.sr.codedict: codes.cid7150,
# codes.cid7151, codes.SCT); tests/test_dicom_out.py checks each against those dictionaries
TASK_CODES: dict[str, SegmentCodes] = {
    "lidc": SegmentCodes(
        category=("49755003", "Morphologically Abnormal Structure"),
        type=("27925004", "Nodule"),
        region=("39607008", "Lung"),
        label="lung nodule",
    ),
    "ms_lesion": SegmentCodes(
        category=("49755003", "Morphologically Abnormal Structure"),
        type=("52988006", "Lesion"),
        region=("68523003", "Cerebral White Matter"),
        label="white-matter lesion",
    ),
}


# ----------------------------------------------------------------------------- the source

_WHY_DICOM = (
    "a DICOM Segmentation or Parametric Map must reference the source images by their SOP Instance UIDs, Study and "
    "Frame of Reference, which NIfTI files do not carry"
)


def refuse_nifti_inputs(inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse ``--input`` NIfTI files for ``--dicom-out`` (a folder is checked once read, by
    :func:`read_source_instances`).

    Raises:
        InferenceInputError: one of ``inputs`` is a ``.nii``/``.nii.gz`` file; says why.
    """
    from monai_hsrdiff.inference.source import is_nifti

    nifti = [str(p) for p in inputs if is_nifti(p)]
    if nifti:
        raise InferenceInputError(
            f"--dicom-out needs a DICOM series as --input, not NIfTI ({', '.join(nifti)}): {_WHY_DICOM}. "
            "Run without --dicom-out, or pass the DICOM series folder"
        )



def read_source_instances(source: SourceVolume) -> list:
    """The source's DICOM headers (no pixel data), one per slice ``k`` in index order.

    Call it before sampling: every problem that would stop the DICOM output is found here.

    Args:
        source: a scan read by ``read_dicom_source`` (``info`` names its folder and series).

    Returns:
        K pydicom ``Dataset`` headers; entry ``k`` is the file at slice ``k`` of ``source``.

    Raises:
        InferenceInputError: ``source`` is not a DICOM series (NIfTI); a file of the series
            lacks SOPClassUID, SOPInstanceUID, StudyInstanceUID or FrameOfReferenceUID; two
            files share a SOPInstanceUID; the files disagree on the Study or the Frame of
            Reference (mixed series); a slice of ``source`` has no file. Each message names
            the file and the tag.
    """
    import pydicom

    if source.info.get("format") != "DICOM":
        raise InferenceInputError(
            f"--dicom-out needs a DICOM series as --input, but {', '.join(source.files)} "
            f"{'is' if len(source.files) == 1 else 'are'} {source.info.get('format', 'not DICOM')}: {_WHY_DICOM}. "
            "Run without --dicom-out (the NIfTI and .seg.nrrd files are written as usual), or pass the DICOM series "
            "the volumes were converted from"
        )
    folder, series_uid = Path(source.info["folder"]), str(source.info["series_uid"])
    inverse = np.linalg.inv(source.index_to_physical)
    by_slice: dict[int, tuple[int, Path, Any]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (TCIA's XML, licences): the series reader skipped it too
            continue
        if str(ds.get("SeriesInstanceUID", "")).strip() != series_uid or "ImagePositionPatient" not in ds:
            continue
        ijk = inverse @ np.append(np.asarray(ds.ImagePositionPatient, dtype=np.float64), 1.0)
        k = int(round(ijk[2]))
        if not (0 <= k < source.shape[2]) or abs(ijk[2] - k) > 0.25 or np.abs(ijk[:2]).max() > 0.25:
            continue  # not a slice of the grid read (cannot happen for the series read_dicom_source checked)
        # two files at one position: the reader kept the lowest InstanceNumber; so does this
        rank = int(ds.get("InstanceNumber", 0) or 0)
        if k not in by_slice or rank < by_slice[k][0]:
            by_slice[k] = (rank, path, ds)
    missing = [k for k in range(source.shape[2]) if k not in by_slice]
    if missing:
        raise InferenceInputError(
            f"--dicom-out: {folder}: no file of series {series_uid} at slice(s) k={missing[:5]} of the volume read; "
            "was the folder changed during the run?"
        )
    instances = [by_slice[k][2] for k in range(source.shape[2])]
    paths = [by_slice[k][1] for k in range(source.shape[2])]
    for ds, path in zip(instances, paths):
        for name, tag in _REQUIRED_TAGS:
            if not str(ds.get(name, "") or "").strip():
                raise InferenceInputError(
                    f"--dicom-out: {path}: {name} {tag} is missing or empty, but a DICOM Segmentation must reference "
                    f"every source image by it; the series is not exported as DICOM. Fix the header (re-export the "
                    "series from the PACS) or run without --dicom-out"
                )
    seen: dict[str, Path] = {}
    for ds, path in zip(instances, paths):
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            raise InferenceInputError(
                f"--dicom-out: {path} and {seen[uid]} have the same SOPInstanceUID (0008,0018) {uid}; each image "
                "needs its own for a Segmentation to reference it: re-export the series"
            )
        seen[uid] = path
        for name in _TYPE2_COPIED:
            if name not in ds:
                setattr(ds, name, "")
    for name, tag in (("StudyInstanceUID", "(0020,000D)"), ("FrameOfReferenceUID", "(0020,0052)")):
        first = str(instances[0].get(name))
        other = next(((ds, p) for ds, p in zip(instances, paths) if str(ds.get(name)) != first), None)
        if other is not None:
            raise InferenceInputError(
                f"--dicom-out: series {series_uid} mixes {name} {tag} values: {paths[0]} has {first}, "
                f"{other[1]} has {other[0].get(name)}; one Segmentation can only lie in one study and frame of "
                "reference: separate the series"
            )
    return instances


# ----------------------------------------------------------------------------- the algorithm


def _sha256(path: str | os.PathLike | None) -> str:
    if path is None or not Path(path).is_file():
        return "none"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def algorithm_parameters(summary: dict[str, Any]) -> dict[str, str]:
    """The sampler settings and the checkpoint's SHA-256 as the DICOM Algorithm Parameters.

    Args:
        summary: the case's ``summary.json`` fields (``checkpoint``, ``sampler``, ``num_samples``, ...).
    """
    params = {"checkpoint_sha256": _sha256(summary.get("checkpoint"))}
    for key in ("sampler", "num_inference_steps", "eta", "precision", "seed", "num_samples"):
        if summary.get(key) is not None:
            params[key] = str(summary[key])
    return params


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("monai-hsrdiff")
    except PackageNotFoundError:  # a source checkout that was not pip-installed
        return "unknown"


def _lo(text: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash."""
    return text.replace("\\", "/")[:64]


# ----------------------------------------------------------------------------- writing


def _frames(volume: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(I, J, K) or (N, I, J, K) -> (frames, rows, cols[, N]): slices lo..hi, DICOM pixel order."""
    if volume.ndim == 3:
        return np.ascontiguousarray(np.transpose(volume[:, :, lo : hi + 1], (2, 1, 0)))
    return np.ascontiguousarray(np.transpose(volume[:, :, :, lo : hi + 1], (3, 2, 1, 0)))


def _save(ds, path: Path) -> None:
    """Write ``ds`` under a hidden temporary name, then rename (a killed write leaves no ``path``)."""
    tmp = path.with_name(f".{path.name}.partial")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def write_dicom_case(
    folder: str | os.PathLike,
    prediction: VolumePrediction,
    source: SourceVolume,
    instances: Sequence[Any],
    summary: dict[str, Any],
    colors: Sequence[tuple[float, float, float]] | None = None,
    consensus_color: tuple[float, float, float] = (1.0, 0.85, 0.0),
) -> dict[str, dict[str, str]]:
    """Write :data:`DICOM_FILES` into ``folder``; return each file's Series and SOP Instance UID.

    Args:
        folder: an existing folder (the case's temporary folder).
        prediction: (N, I, J, K) bool samples in ``source``'s grid, and the region.
        source: the DICOM scan the samples were drawn for.
        instances: :func:`read_source_instances` of ``source`` (K headers in slice order).
        summary: the case's summary fields (``task``, ``checkpoint``, sampler settings).
        colors: one RGB colour in [0, 1] per sample (the Slicer files' colours); grey without.
        consensus_color: the consensus segment's colour.

    Raises:
        InferenceInputError: the task has no segment codes (:data:`TASK_CODES`), or
            ``instances`` are not one per slice of ``source``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    folder = Path(folder)
    task = str(summary.get("task", ""))
    if task not in TASK_CODES:
        raise InferenceInputError(
            f"--dicom-out: no SNOMED CT segment codes for task {task!r} (known: {', '.join(TASK_CODES)}); "
            "add them to monai_hsrdiff.export.dicom_out.TASK_CODES"
        )
    if len(instances) != source.shape[2]:
        raise InferenceInputError(f"--dicom-out: {len(instances)} source headers for {source.shape[2]} slices")
    samples = prediction.samples
    n = int(samples.shape[0])
    lo, hi = prediction.region.lo[2], prediction.region.hi[2]  # DICOM_AXES: the model slices along k
    refs = list(instances[lo : hi + 1])
    category, seg_type, region = TASK_CODES[task].concepts()
    label = TASK_CODES[task].label
    version = _version()
    params = algorithm_parameters(summary)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=version, parameters=params
    )
    described = ", ".join(f"{k} {v}" for k, v in params.items())
    equipment = [
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=version,
            contribution_description=f"{ALGORITHM_NAME} {version} (Artificial Intelligence): {described}"[:1024],
        )
    ]
    common = {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": ALGORITHM_NAME,
        "software_versions": version,
        "device_serial_number": params["checkpoint_sha256"][:16],  # the model is the device: its weights' hash
        "contributing_equipment": equipment,
    }

    def segment(number: int, name: str, rgb, kind: str = "AUTOMATIC"):
        color = hd.color.CIELabColor.from_rgb(*[int(round(255 * c)) for c in rgb]) if rgb is not None else None
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label=_lo(name), segmented_property_category=category,
            segmented_property_type=seg_type, algorithm_type=kind, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=_lo(f"{label} {name}"), anatomic_regions=[region], display_color=color,
        )  # fmt: skip

    mean = prediction.mean_probability
    written: dict[str, dict[str, str]] = {}

    def seg_file(name: str, index: int, pixels: np.ndarray, segments, seg_kind: str, description: str) -> None:
        series_uid, sop_uid = hd.UID(), hd.UID()
        extra = {"fractional_type": "PROBABILITY", "max_fractional_value": 255} if seg_kind == "FRACTIONAL" else {}
        seg = hd.seg.Segmentation(
            source_images=refs, pixel_array=pixels, segmentation_type=seg_kind, segment_descriptions=segments,
            series_instance_uid=series_uid, series_number=SERIES_NUMBER_BASE + index, sop_instance_uid=sop_uid,
            instance_number=1, content_description=_lo(description), content_label=_lo(name.split(".")[0].upper()),
            omit_empty_frames=True, **common, **extra,
        )  # fmt: skip
        seg.SeriesDescription = _lo(f"{ALGORITHM_NAME} {description}")
        _save(seg, folder / name)
        written[name] = {"series_instance_uid": str(series_uid), "sop_instance_uid": str(sop_uid)}

    seg_file("consensus.seg.dcm", 0, _frames(mean >= 0.5, lo, hi), [segment(1, "consensus", consensus_color)],
             "BINARY", f"{label}: consensus of {n} samples")  # fmt: skip
    rgb = list(colors) if colors is not None else [None] * n
    seg_file("samples.seg.dcm", 1, _frames(samples, lo, hi),
             [segment(i + 1, f"sample {i + 1:02d}", rgb[i]) for i in range(n)], "BINARY", f"{label}: {n} samples")  # fmt: skip
    seg_file("mean_probability.seg.dcm", 2, _frames(mean.astype(np.float32), lo, hi),
             [segment(1, "mean probability", None)], "FRACTIONAL", f"{label}: probability, mean of {n} samples")  # fmt: skip

    # entropy: float pixels, identity real-world value mapping into bits (UCUM "bit")
    entropy = _frames(prediction.entropy.astype(np.float32), lo, hi)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ENTROPY", lut_explanation=_lo(f"entropy of the mean of {n} {ALGORITHM_NAME} samples, bits"),
        unit=hd.sr.CodedConcept("bit", "UCUM", "bit"), value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
    )  # fmt: skip
    series_uid, sop_uid = hd.UID(), hd.UID()
    pm = hd.pm.ParametricMap(
        source_images=refs, pixel_array=entropy, series_instance_uid=series_uid, series_number=SERIES_NUMBER_BASE + 3,
        sop_instance_uid=sop_uid, instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_description=_lo(f"{label}: entropy (bits) of {n} samples"), content_label="ENTROPY", **common,
    )  # fmt: skip
    pm.SeriesDescription = _lo(f"{ALGORITHM_NAME} entropy (bits), {n} samples")
    # Type 2 attributes highdicom leaves out of a PM: present, empty where the source does not know them
    pm.ContentCreatorName = ""
    pm.Laterality = refs[0].get("Laterality", "")
    _save(pm, folder / "entropy.pm.dcm")
    written["entropy.pm.dcm"] = {"series_instance_uid": str(series_uid), "sop_instance_uid": str(sop_uid)}
    return written
