"""The 3D Slicer case writer: closed-form entropy, geometry read back by SimpleITK and slicerio, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

import monai_hsrdiff.export.slicer as slicer
from monai_hsrdiff.export import CASE_FILES, write_case
from monai_hsrdiff.inference import InferenceInputError, Region, SliceAxes, SourceVolume, VolumePrediction

SHAPE = (5, 4, 3)


def _source() -> SourceVolume:
    a, b = np.radians(25.0), np.radians(-10.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]
    )
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([0.7, 1.3, 2.5])
    m[:3, 3] = [12.5, -40.0, 7.25]
    return SourceVolume(np.zeros((1, *SHAPE), np.float32), m, SliceAxes(2, 1, 0), ("CT",), ["synthetic"])


def _prediction() -> VolumePrediction:
    """N=4 samples; voxel (x, 0, 0) is marked by x of them (x = 0..4)."""
    s = np.zeros((4, *SHAPE), dtype=bool)
    for x in range(5):
        s[:x, x, 0, 0] = True
    s[:, 2, 3, 2] = [True, False, True, False]  # another 50/50 voxel, overlapping segments
    return VolumePrediction(s, Region.whole(SHAPE), {"model_s": 0.0})


def test_mean_entropy_consensus_closed_form(tmp_path):
    out = write_case(tmp_path / "case", _prediction(), _source())
    mean = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mean_probability.nii.gz"))), (2, 1, 0))
    ent = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "entropy.nii.gz"))), (2, 1, 0))
    h34 = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))  # 0.8113 bits
    np.testing.assert_allclose(mean[:, 0, 0], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(ent[:, 0, 0], [0.0, h34, 1.0, h34, 0.0], atol=1e-6)  # agree: 0; split evenly: 1 bit
    assert ent[2, 3, 2] == pytest.approx(1.0)
    assert mean.dtype == np.float32 and ent.max() <= 1.0
    # everything else: all samples agree on background
    rest = np.ones(SHAPE, bool)
    rest[:, 0, 0] = False
    rest[2, 3, 2] = False
    assert not mean[rest].any() and not ent[rest].any()
    cons = slicerio.read_segmentation(str(out / "consensus.seg.nrrd"))
    assert slicerio.segment_names(cons) == ["consensus"]
    np.testing.assert_array_equal(np.nonzero(slicerio.segment_mask(cons, cons["segments"][0])[:, 0, 0])[0], [2, 3, 4])


def test_geometry_segments_and_summary(tmp_path):
    src, pred = _source(), _prediction()
    out = write_case(tmp_path / "case", pred, src, summary={"sampler": "ddim"})
    assert sorted(p.name for p in out.iterdir()) == sorted(CASE_FILES)
    g = src.itk_geometry()
    for name in ("mean_probability.nii.gz", "entropy.nii.gz", "consensus.seg.nrrd"):
        img = sitk.ReadImage(str(out / name))
        assert list(img.GetSize()) == list(SHAPE)
        np.testing.assert_allclose(img.GetOrigin(), [12.5, -40.0, 7.25], atol=1e-5)
        np.testing.assert_allclose(img.GetSpacing(), [0.7, 1.3, 2.5], atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), g["direction"], atol=1e-5)
    seg = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    np.testing.assert_allclose(seg["ijkToLPS"], src.index_to_physical, atol=1e-5)
    assert slicerio.segment_names(seg) == ["sample_01", "sample_02", "sample_03", "sample_04"]
    colors = [tuple(np.round(s["color"], 4)) for s in seg["segments"]]
    assert len(set(colors)) == 4
    for n, s in enumerate(seg["segments"]):  # overlapping samples come back voxel-exact
        np.testing.assert_array_equal(slicerio.segment_mask(seg, s), pred.samples[n])
    doc = json.loads((out / "summary.json").read_text())
    assert doc["sampler"] == "ddim" and doc["num_samples"] == 4
    assert doc["units"]["entropy"].startswith("bits") and doc["source"]["geometry"]["size"] == list(SHAPE)


def test_refuses_existing_results_and_stays_atomic(tmp_path, monkeypatch):
    out = tmp_path / "case"
    write_case(out, _prediction(), _source())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InferenceInputError, match="already holds results.*--overwrite"):
        write_case(out, _prediction(), _source())
    # a failure half-way through an overwrite leaves the previous complete case and no temporary folder
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[0])
        raise OSError("disk full")

    monkeypatch.setattr(slicer, "write_segmentation", failing)
    with pytest.raises(OSError, match="disk full"):
        write_case(out, _prediction(), _source(), overwrite=True)
    assert calls and {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OSError):
        write_case(tmp_path / "new", _prediction(), _source())
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    # an empty existing folder is not "results"; a file is not a folder
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    write_case(tmp_path / "empty", _prediction(), _source())
    assert (tmp_path / "empty" / "summary.json").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InferenceInputError, match="is a file"):
        write_case(tmp_path / "afile", _prediction(), _source())


def test_overwrite_keeps_a_case_that_gained_foreign_files_meanwhile(tmp_path, monkeypatch):
    """``--overwrite`` checked the case folder at the start; a file put there while the case was being
    written (here: during the segmentation write) is not ours, so the old case stays as it is."""
    out = tmp_path / "case"
    write_case(out, _prediction(), _source())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = slicer.write_segmentation

    def meanwhile(*args, **kwargs):
        (out / "reading_notes.txt").write_text("radiologist's notes")
        return real(*args, **kwargs)

    monkeypatch.setattr(slicer, "write_segmentation", meanwhile)
    with pytest.raises(FileExistsError, match="reading_notes.txt"):
        write_case(out, _prediction(), _source(), overwrite=True)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.pop("reading_notes.txt") == b"radiologist's notes" and after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_grid_mismatch_is_refused(tmp_path):
    bad = VolumePrediction(np.zeros((2, 5, 4, 2), bool), Region.whole((5, 4, 2)), {})
    with pytest.raises(ValueError, match="differs from the source grid"):
        write_case(tmp_path / "case", bad, _source())
    assert not (tmp_path / "case").exists()


def test_demo_case_ms_lesion(tmp_path, monkeypatch):
    """One SYNTHETIC demo case end to end: source volume from a demo item, real demo network, case folder."""
    import nibabel as nib
    import torch
    from monai.bundle import ConfigParser

    from monai_hsrdiff.data import load_item
    from monai_hsrdiff.export.demo_case import demo_case
    from monai_hsrdiff.inference import read_nifti_source
    from monai_hsrdiff.tasks.ms_lesion import zscore_volume as zscore_brain
    from preprocessing.demo import build_demo

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("HSRDIFF_RUN_ROOT", str(tmp_path / "runs"))
    build_demo("ms_lesion", tmp_path / "demo", num_items=6, size=32, log=lambda m: None)
    b = repo / "bundles" / "ms_lesion"
    parser = ConfigParser()
    tiny = tmp_path / "tiny.json"  # a tiny demo network at 32x32, for speed
    tiny.write_text(json.dumps({"image_size": 32, "network_def#channels": [8, 16, 32], "network_def#norm_num_groups": 4}))
    parser.read_config([str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json"), str(tiny)])
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    case = demo_case("ms_lesion", checkpoint=tmp_path / "model.pt", dataset_dir=tmp_path / "demo", num_samples=2, steps=2,
                     num_slices=2, configs=[tiny])  # fmt: skip
    assert case.parent == tmp_path / "runs" / "ms_lesion_demo" / "inference" and case.name.startswith("SYNTHETIC_")
    summary = json.loads((case / "summary.json").read_text())
    assert summary["synthetic"] is True and summary["num_samples"] == 2
    # the bundle's inference sampler, as a real case gets (was DDIM whatever the bundle said)
    inference_sampler = json.loads((b / "inference.json").read_text())["sampler"]
    assert (summary["sampler"], summary["num_inference_steps"]) == (inference_sampler, 2) == ("dpmpp_2m_sde", 2)
    files = sorted((case.parent / "sources" / case.name).glob("*.nii.gz"))
    assert [f.name.split("_")[-1] for f in files] == ["flair.nii.gz", "mprage.nii.gz", "pd.nii.gz", "t2.nii.gz"]
    assert all(f.name.startswith("SYNTHETIC_") and b"SYNTHETIC" in nib.load(f).header["descrip"].tobytes() for f in files)
    src = read_nifti_source(files, ("flair", "mprage", "pd", "t2"))
    item = load_item(sorted((tmp_path / "demo").rglob(f"{case.name[len('SYNTHETIC_'):]}.npz"))[0])
    # the source re-z-scored is the item's image again (slice k, columns along i)
    np.testing.assert_allclose(np.transpose(zscore_brain(src.data)[..., 1], (0, 2, 1)), item["image"], atol=1e-4)
    for name in ("mean_probability.nii.gz", "entropy.nii.gz"):
        img, ref = sitk.ReadImage(str(case / name)), sitk.ReadImage(str(files[0]))
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert slicerio.segment_names(slicerio.read_segmentation(str(case / "samples.seg.nrrd"))) == ["sample_01", "sample_02"]
    # --sampler chooses another one; the rerun replaces the earlier export of the same case
    again = demo_case("ms_lesion", checkpoint=tmp_path / "model.pt", dataset_dir=tmp_path / "demo", num_samples=2, steps=3,
                      num_slices=2, configs=[tiny], sampler="ddim")  # fmt: skip
    summary = json.loads((again / "summary.json").read_text())
    assert again == case and (summary["sampler"], summary["num_inference_steps"], summary["eta"]) == ("ddim", 3, 1.0)


def test_seg_nrrd_not_max_compressed(tmp_path):
    """slicerio writes gzip level 9 by default: 30x slower on noisy masks for a 6 % smaller file.
    The gzip header's XFL byte says 2 for level 9, 0 for levels 2-8; the masks still come back exact."""
    rng = np.random.default_rng(0)
    shape = (64, 48, 3)
    src = SourceVolume(np.zeros((1, *shape), np.float32), np.eye(4), SliceAxes(2, 1, 0), ("CT",), ["synthetic"])
    pred = VolumePrediction(rng.random((3, *shape)) < 0.5, Region.whole(shape), {})
    out = write_case(tmp_path / "case", pred, src)
    for name in ("samples.seg.nrrd", "consensus.seg.nrrd"):
        raw = (out / name).read_bytes()
        data = raw[raw.index(b"\n\n") + 2 :]
        assert data[:2] == b"\x1f\x8b" and data[8] == 0, f"{name}: gzip XFL {data[8]} (2 = level 9)"
    seg = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    for n, s in enumerate(seg["segments"]):
        np.testing.assert_array_equal(slicerio.segment_mask(seg, s), pred.samples[n])
