"""Inference on whole scans: geometry back in the source grid, the real model end to end, bad input.

Geometry is checked against independent readers (SimpleITK's DICOM series reader and NIfTI
reader, nibabel's affine), and "where" against structures whose physical position the test
computes itself. A deterministic predictor (sample n = bright pixels above threshold t_n)
in the case objects of ``inference.json`` (:func:`_infer_case`) makes positions and entropies
exact; the real HSRDiff runs through the command line and the bundle config on the same inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
import torch
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_dicom import write_ct_series  # noqa: E402
from synthetic_nifti import oblique_affine  # noqa: E402

from monai_hsrdiff.export import SlicerCaseWriter  # noqa: E402
from monai_hsrdiff.infer import main  # noqa: E402
from monai_hsrdiff.inference import CaseReader, InferenceInputError, VolumeInferer, run_case  # noqa: E402
from monai_hsrdiff.tasks import get_task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TINY = {  # a tiny demo network at 32x32: the test checkpoint and the CLI build the same one
    "image_size": 32,
    "network_def#channels": [8, 16, 32],
    "network_def#norm_num_groups": 4,
}

# ------------------------------------------------------------------------- fixtures


def _infer_case(task, input, out, image_size, num_samples=16, predictor=None, overwrite=False, log=None, **reader_options):
    """One case through inference.json's objects (reader -> inferer -> writer) with a deterministic predictor."""
    reader = CaseReader(get_task(task), image_size, **reader_options)
    inferer = VolumeInferer(num_samples=num_samples, predictor=predictor)
    return run_case(input, reader, inferer, SlicerCaseWriter(out, overwrite), log=log)


def _rotation() -> np.ndarray:
    a, b = np.radians(17.0), np.radians(11.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


CT_SHAPE = (40, 40, 6)  # (I = columns, J = rows, K = slices)
CT_ORIGIN = np.array([-20.5, 13.25, 40.0])
CT_SPACING = np.array([0.8, 0.7, 1.5])  # (column spacing, row spacing, slice spacing)
BRIGHT = (slice(8, 15), slice(20, 28))  # (rows, cols): 300 HU -> +0.86 windowed
MEDIUM = (slice(26, 34), slice(6, 13))  # -300 HU -> 0.0 windowed


def _ct_index_to_lps(ijk) -> np.ndarray:
    """Independent of the code under test: LPS point of voxel (i, j, k) of the synthetic series."""
    return CT_ORIGIN + _rotation() @ (CT_SPACING * np.asarray(ijk, dtype=float))


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory) -> Path:
    r = _rotation()
    out = tmp_path_factory.mktemp("ct") / "series"

    def hu(n):
        a = np.full(CT_SHAPE[1::-1], -900.0)  # (rows, cols)
        a[BRIGHT] = 300.0
        a[MEDIUM] = -300.0
        return a

    positions = [_ct_index_to_lps((0, 0, k)) for k in range(CT_SHAPE[2])]
    write_ct_series(out, positions, hu, orientation=tuple(r[:, 0]) + tuple(r[:, 1]),
                    pixel_spacing=(CT_SPACING[1], CT_SPACING[0]), slice_thickness=CT_SPACING[2])  # fmt: skip
    return out


MS_SHAPE = (12, 22, 20)  # the axial (S) axis is array axis 0
MS_BLOB = np.array([6.0, 9.0, 12.0])


def _ms_affine() -> np.ndarray:
    return oblique_affine(0, spacing=(2.0, 0.9, 1.1), origin=(-31.5, 17.25, -8.0), signs=(-1, 1, 1))


def _write_ms(folder: Path, shapes=None, affines=None, skip=(), names=None) -> list[Path]:
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in MS_SHAPE], indexing="ij"))
    centre = (np.asarray(MS_SHAPE) - 1) / 2
    brain = (((grid - centre[:, None, None, None]) / (np.asarray(MS_SHAPE) * 0.45)[:, None, None, None]) ** 2).sum(0) <= 1
    blob = np.sqrt(((grid - MS_BLOB[:, None, None, None]) ** 2).sum(0)) <= 2.6
    rng = np.random.default_rng(0)
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for c, mod in enumerate(("flair", "mprage", "pd", "t2")):
        if mod in skip:
            continue
        vol = 300.0 + 10.0 * rng.standard_normal(MS_SHAPE) + (900.0 * blob if mod == "flair" else 0.0)
        vol = np.where(brain, vol, 0.0).astype(np.float32)
        if shapes and mod in shapes:
            vol = np.zeros(shapes[mod], np.float32) + 1.0
        img = nib.Nifti1Image(vol, (affines or {}).get(mod, _ms_affine()))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        p = folder / ((names or {}).get(mod, f"case01_{mod}.nii.gz"))
        nib.save(img, p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def ms_files(tmp_path_factory) -> list[Path]:
    return _write_ms(tmp_path_factory.mktemp("ms") / "case01")


def _threshold_predictor(thresholds):
    """Deterministic stand-in for the sampler: sample n marks channel-0 values above thresholds[n]."""
    t = torch.tensor(thresholds, dtype=torch.float32)[None, :, None, None]
    return lambda x: x[:, :1] - t


def _tiny_config(tmp: Path, task: str, **extra) -> Path:
    p = tmp / f"tiny_{task}.json"
    p.write_text(json.dumps({**TINY, **extra}))
    return p


def _configs(task: str, tiny: Path) -> list[str]:
    b = REPO / "bundles" / task
    return [str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json"), str(tiny)]


@pytest.fixture(scope="module")
def lidc_ckpt(tmp_path_factory):
    """Weights of the tiny demo network, built from the same config files the CLI reads."""
    tmp = tmp_path_factory.mktemp("lidc_ckpt")
    tiny = _tiny_config(tmp, "lidc", inference_item_spacing=1.1)
    parser = ConfigParser()
    parser.read_config(_configs("lidc", tiny))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp / "model.pt")
    return tmp / "model.pt", tiny


def _geometry(img: sitk.Image):
    return img.GetSize(), np.array(img.GetOrigin()), np.array(img.GetSpacing()), np.array(img.GetDirection())


def _assert_same_grid(out: sitk.Image, ref: sitk.Image):
    s1, o1, sp1, d1 = _geometry(out)
    s2, o2, sp2, d2 = _geometry(ref)
    assert s1 == s2
    np.testing.assert_allclose(o1, o2, atol=1e-4)
    np.testing.assert_allclose(sp1, sp2, atol=1e-5)
    np.testing.assert_allclose(d1, d2, atol=1e-5)


def _read_dicom_sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _value_at(img: sitk.Image, point) -> float:
    idx = img.TransformPhysicalPointToIndex(tuple(float(v) for v in point))
    return float(img.GetPixel(idx))


def _centre(sl: tuple[slice, slice], k: int) -> tuple[float, float, float]:
    """Voxel (i, j, k) at the centre of a (rows, cols) block."""
    return (0.5 * (sl[1].start + sl[1].stop - 1), 0.5 * (sl[0].start + sl[0].stop - 1), k)


# ------------------------------------------------------- deterministic predictor: where


def test_dicom_oblique_outputs_in_source_grid_and_place(ct_dir, tmp_path):
    out = _infer_case(
        task="lidc", input=str(ct_dir), out=tmp_path / "case", image_size=32, num_samples=4,
        item_spacing=0.9, predictor=_threshold_predictor([-0.5, -0.5, 0.5, 0.5]), log=None,
    )  # fmt: skip
    ref = _read_dicom_sitk(ct_dir)
    mean = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    ent = sitk.ReadImage(str(out / "entropy.nii.gz"))
    for img in (mean, ent, sitk.ReadImage(str(out / "consensus.seg.nrrd"))):
        _assert_same_grid(img, ref)
    for k in range(CT_SHAPE[2]):
        # bright block: every sample marks it -> p 1, entropy 0; medium block: 2 of 4 -> p 0.5, 1 bit
        bright, medium = _ct_index_to_lps(_centre(BRIGHT, k)), _ct_index_to_lps(_centre(MEDIUM, k))
        assert _value_at(mean, bright) == 1.0 and _value_at(ent, bright) == 0.0
        assert _value_at(mean, medium) == 0.5 and _value_at(ent, medium) == pytest.approx(1.0)
        background = _ct_index_to_lps((35, 3, k))
        assert _value_at(mean, background) == 0.0 and _value_at(ent, background) == 0.0
    # the marked voxels are where the bright block is, not shifted/flipped: compare whole masks
    arr = sitk.GetArrayFromImage(mean)  # (K, rows, cols)
    expect = np.zeros(CT_SHAPE[::-1])
    expect[:, BRIGHT[0], BRIGHT[1]] = 1.0
    inner = (slice(None), slice(BRIGHT[0].start + 1, BRIGHT[0].stop - 1), slice(BRIGHT[1].start + 1, BRIGHT[1].stop - 1))
    assert np.all(arr[inner] == 1.0)
    assert np.all(arr[expect == 0] <= 0.5)  # nothing marked by all samples outside the bright block
    seg = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    assert slicerio.segment_names(seg) == ["sample_01", "sample_02", "sample_03", "sample_04"]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = _rotation() @ np.diag(CT_SPACING)
    ijk_to_lps[:3, 3] = CT_ORIGIN
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps, atol=1e-4)


def test_region_slices_and_mm_box_leave_zeros_outside(ct_dir, tmp_path):
    pred = _threshold_predictor([-0.5, -0.5, -0.5, -0.5])
    out = _infer_case("lidc", str(ct_dir), tmp_path / "a", 32, num_samples=4, slices="2:4",
                     item_spacing=0.9, predictor=pred, log=None)  # fmt: skip
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mean_probability.nii.gz")))
    assert arr[2:4][:, BRIGHT[0], BRIGHT[1]].min() == 1.0
    assert arr[[0, 1, 4, 5]].max() == 0.0
    # a 6 mm box (physical) around the bright block's centre on slice 3: only voxels in that box
    centre = _ct_index_to_lps(_centre(BRIGHT, 3))
    out = _infer_case("lidc", str(ct_dir), tmp_path / "b", 32, num_samples=4, center=centre,
                     size=(4.0, 4.0, 1.0), region_units="mm", item_spacing=0.9, predictor=pred, log=None)  # fmt: skip
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mean_probability.nii.gz")))
    ks, js, is_ = np.nonzero(arr)
    assert set(ks.tolist()) == {3}
    ci, cj = _centre(BRIGHT, 3)[:2]
    assert np.all(np.abs(is_ - ci) * CT_SPACING[0] <= 2.0 + 1e-6) and np.all(np.abs(js - cj) * CT_SPACING[1] <= 2.0 + 1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["region"]["index_lo"][2] == summary["region"]["index_hi"][2] == 3


def test_nifti_oblique_axial_axis_first_lands_blob(ms_files, tmp_path):
    out = _infer_case("ms_lesion", [str(p) for p in ms_files], tmp_path / "case", 32, num_samples=2,
                     predictor=_threshold_predictor([2.0, 2.0]), log=None)  # fmt: skip
    ref = sitk.ReadImage(str(ms_files[0]))
    mean = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    _assert_same_grid(mean, ref)
    blob_lps = (LPS_FROM_RAS @ _ms_affine() @ np.append(MS_BLOB, 1.0))[:3]
    assert _value_at(mean, blob_lps) == 1.0
    arr = np.transpose(sitk.GetArrayFromImage(mean), (2, 1, 0))  # back to nibabel (i, j, k) order
    marked = np.argwhere(arr > 0)
    np.testing.assert_allclose(marked.mean(0), MS_BLOB, atol=0.6)  # centred on the blob, no flip/transpose
    assert np.linalg.norm(marked - MS_BLOB, axis=1).max() <= 3.6


def test_ms_slice_mapping_equals_training_items():
    """Item pixel -> source index of the inference slices is preprocessing.ms_lesion.slice_item_to_index."""
    from preprocessing.ms_lesion import LPS_FROM_RAS as lps, slice_axes, slice_item_to_index

    from monai_hsrdiff.inference import SliceAxes
    from monai_hsrdiff.tasks import get_task

    for axial, signs in ((0, (-1, 1, 1)), (1, (1, -1, 1)), (2, (-1, -1, 1))):
        shape = [14, 18]
        shape.insert(axial, 7)
        axes = SliceAxes(*slice_axes(lps @ oblique_affine(axial, signs=signs)))
        vol = np.random.default_rng(axial).random((1, *shape)).astype(np.float32)
        np.testing.assert_array_equal(axes.from_plane(axes.to_plane(vol)), vol)
        k = 3
        plane = axes.to_plane(vol)[:, k]
        box = (0, plane.shape[1] - 1, 0, plane.shape[2] - 1)
        _, scale, offset = get_task("ms_lesion").slice_preprocessing(32).plane_to_input(plane, (1.0, 1.0), box)
        expected = slice_item_to_index(shape, axes.as_tuple(), k, 32)
        for r, c in ((0.0, 0.0), (31.0, 5.0), (12.5, 30.0)):
            disp = np.array([scale[0] * r + offset[0], scale[1] * c + offset[1]])  # display row, col
            idx = np.zeros(3)
            idx[axes.slice_axis] = k
            idx[axes.row_axis] = shape[axes.row_axis] - 1 - disp[0] if axes.flip_rows else disp[0]
            idx[axes.col_axis] = shape[axes.col_axis] - 1 - disp[1] if axes.flip_cols else disp[1]
            np.testing.assert_allclose(idx, (expected @ [r, c, 0.0, 1.0])[:3], atol=1e-9)


# ------------------------------------------------------------- the real model, end to end


def test_cli_real_model_dicom(ct_dir, lidc_ckpt, tmp_path, capsys):
    ckpt, tiny = lidc_ckpt
    out = tmp_path / "case"
    rc = main([
        "--bundle", str(REPO / "bundles/lidc"), "--config", str(REPO / "bundles/lidc/demo.json"), str(tiny),
        "--checkpoint", str(ckpt), "--input", str(ct_dir), "--out", str(out), "--num-samples", "4",
        "--steps", "3", "--slices", "1:5",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    ref = _read_dicom_sitk(ct_dir)
    mean_img = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    ent_img = sitk.ReadImage(str(out / "entropy.nii.gz"))
    _assert_same_grid(mean_img, ref)
    _assert_same_grid(ent_img, ref)
    samples = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    names = slicerio.segment_names(samples)
    assert names == [f"sample_{i:02d}" for i in range(1, 5)]
    assert len({tuple(s["color"]) for s in samples["segments"]}) == 4
    masks = np.stack([slicerio.segment_mask(samples, s) for s in samples["segments"]])  # (N, I, J, K)
    mean = np.transpose(sitk.GetArrayFromImage(mean_img), (2, 1, 0))
    np.testing.assert_allclose(mean, masks.mean(0), atol=1e-6)  # the probability is the fraction of samples
    p = masks.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.nan_to_num(-p * np.log2(p) - (1 - p) * np.log2(1 - p))
    np.testing.assert_allclose(np.transpose(sitk.GetArrayFromImage(ent_img), (2, 1, 0)), h, atol=1e-5)
    assert not masks[:, :, :, [0, 5]].any()  # outside --slices 1:5
    consensus = slicerio.read_segmentation(str(out / "consensus.seg.nrrd"))
    assert slicerio.segment_names(consensus) == ["consensus"]
    np.testing.assert_array_equal(slicerio.segment_mask(consensus, consensus["segments"][0]), p >= 0.5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 4 and summary["sampler"] == "dpmpp_2m_sde" and summary["num_inference_steps"] == 3
    assert summary["checkpoint"] == str(ckpt) and len(summary["kappa_trace_mean"]) == 3
    assert summary["preprocessing"]["item_spacing_mm"] == 1.1
    assert summary["precision"] == "float32" and summary["eta"] == 1.0  # inference.json's defaults

    def run_precision(name: str) -> tuple[dict, np.ndarray]:
        rc = main([
            "--bundle", str(REPO / "bundles/lidc"), "--config", str(REPO / "bundles/lidc/demo.json"), str(tiny),
            "--checkpoint", str(ckpt), "--input", str(ct_dir), "--out", str(tmp_path / name), "--num-samples", "4",
            "--steps", "3", "--slices", "1:5", "--precision", name, "--eta", "0.5",
        ])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        seg = slicerio.read_segmentation(str(tmp_path / name / "samples.seg.nrrd"))
        return json.loads((tmp_path / name / "summary.json").read_text()), np.stack([slicerio.segment_mask(seg, s) for s in seg["segments"]])

    # --precision bfloat16 --eta 0.5: bf16 autocast and less step noise, still mostly the same masks
    summary16, masks16 = run_precision("bfloat16")
    assert summary16["precision"] == "bfloat16" and summary16["eta"] == 0.5
    assert (masks16 == masks).mean() > 0.95
    # --precision bfloat16-true: the bf16 channels-last copy of the network; recorded in summary.json
    summary_true, masks_true = run_precision("bfloat16-true")
    assert summary_true["precision"] == "bfloat16-true" and summary_true["compile"] is False
    assert (masks_true == masks16).mean() > 0.95


def test_bundle_run_inference_ms(ms_files, tmp_path, monkeypatch):
    """``python -m monai.bundle run inference`` with train.json + inference.json (+ demo + tiny)."""
    from monai.bundle import run

    monkeypatch.setenv("HSRDIFF_RUN_ROOT", str(tmp_path / "runs"))
    tiny = _tiny_config(tmp_path, "ms_lesion")
    parser = ConfigParser()
    parser.read_config(_configs("ms_lesion", tiny))
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    run("inference", config_file=_configs("ms_lesion", tiny), input=str(ms_files[0].parent), checkpoint=str(tmp_path / "model.pt"),
        num_samples=2, sampling_steps=2, slices=[5, 7])  # fmt: skip
    out = tmp_path / "runs" / "ms_lesion_demo" / "inference" / "case01"
    _assert_same_grid(sitk.ReadImage(str(out / "entropy.nii.gz")), sitk.ReadImage(str(ms_files[0])))
    seg = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    assert slicerio.segment_names(seg) == ["sample_01", "sample_02"]
    masks = np.stack([slicerio.segment_mask(seg, s) for s in seg["segments"]])
    assert not masks[:, :5].any() and not masks[:, 7:].any()  # slices along the axial array axis 0


# ------------------------------------------------------------------------- bad input


def _run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _cli_lidc(ckpt, tiny, inp, out, *extra):
    return ("--bundle", str(REPO / "bundles/lidc"), "--config", str(REPO / "bundles/lidc/demo.json"), str(tiny),
            "--checkpoint", str(ckpt), "--input", *inp, "--out", str(out), "--num-samples", "2", "--steps", "2", *extra)  # fmt: skip


def _cli_ms(ckpt, tiny, inp, out, *extra):
    return ("--bundle", str(REPO / "bundles/ms_lesion"), "--config", str(REPO / "bundles/ms_lesion/demo.json"), str(tiny),
            "--checkpoint", str(ckpt), "--input", *inp, "--out", str(out), "--num-samples", "2", "--steps", "2", *extra)  # fmt: skip


def _nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_dicom_inputs(ct_dir, lidc_ckpt, tmp_path, capsys):
    ckpt, tiny = lidc_ckpt
    out = tmp_path / "out" / "case"
    out.parent.mkdir()
    # a folder with no DICOM
    empty = tmp_path / "nodicom"
    empty.mkdir()
    (empty / "readme.txt").write_text("not dicom")
    rc, err = _run_cli(capsys, *_cli_lidc(ckpt, tiny, [str(empty)], out))
    assert rc == 2 and "no DICOM file" in err and str(empty) in err
    _nothing_written(out)
    # several series: listed, and --series-uid picks one
    two = tmp_path / "two"
    uids = []
    for n in range(2):
        uid = pydicom.uid.generate_uid()
        uids.append(uid)
        write_ct_series(two / f"s{n}", [(0, 0, z) for z in range(3)], lambda k: np.full((8, 8), -500.0), series_uid=uid)
    rc, err = _run_cli(capsys, *_cli_lidc(ckpt, tiny, [str(two)], out))
    assert rc == 2 and "--series-uid" in err and all(u in err for u in uids)
    _nothing_written(out)
    case = _infer_case("lidc", str(two), tmp_path / "picked", 32, num_samples=1, series_uid=uids[1],
                      predictor=_threshold_predictor([0.0]), log=None)  # fmt: skip
    assert json.loads((case / "summary.json").read_text())["source"]["series_uid"] == uids[1]
    # a non-image DICOM (a structured report: no pixel geometry)
    sr = tmp_path / "sr"
    [f] = write_ct_series(sr, [(0, 0, 0)], lambda k: np.zeros((4, 4)))
    ds = pydicom.dcmread(f)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PixelData"):
        delattr(ds, tag)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.save_as(f)
    rc, err = _run_cli(capsys, *_cli_lidc(ckpt, tiny, [str(sr)], out))
    assert rc == 2 and "not an image" in err and str(f) in err
    _nothing_written(out)
    # region outside the volume: slice range and physical box
    rc, err = _run_cli(capsys, *_cli_lidc(ckpt, tiny, [str(ct_dir)], out, "--slices", "4:9"))
    assert rc == 2 and "--slices 4:9" in err and "6 slices" in err
    rc, err = _run_cli(capsys, *_cli_lidc(ckpt, tiny, [str(ct_dir)], out, "--center", "500", "0", "0", "--size", "5", "5", "5", "--units", "mm"))
    assert rc == 2 and "outside the volume" in err
    _nothing_written(out)


def test_checkpoint_of_another_network(ct_dir, lidc_ckpt, tmp_path, capsys):
    _, tiny = lidc_ckpt
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY, "network_def#channels": [8, 32, 32]}))
    parser = ConfigParser()
    parser.read_config(_configs("lidc", other))
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "other.pt")
    out = tmp_path / "case"
    rc, err = _run_cli(capsys, *_cli_lidc(tmp_path / "other.pt", tiny, [str(ct_dir)], out))
    assert rc == 2 and "does not match" in err and "other.pt" in err
    _nothing_written(out)
    rc, err = _run_cli(capsys, *_cli_lidc(tmp_path / "missing.pt", tiny, [str(ct_dir)], out))
    assert rc == 2 and "checkpoint not found" in err and "missing.pt" in err
    _nothing_written(out)


def test_existing_results_need_overwrite(ct_dir, lidc_ckpt, tmp_path, capsys):
    ckpt, tiny = lidc_ckpt
    out = tmp_path / "case"
    out.mkdir()
    (out / "mean_probability.nii.gz").write_bytes(b"old")
    rc, err = _run_cli(capsys, *_cli_lidc(ckpt, tiny, [str(ct_dir)], out))
    assert rc == 2 and "already holds results" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["mean_probability.nii.gz"]
    assert (out / "mean_probability.nii.gz").read_bytes() == b"old"
    with pytest.raises(InferenceInputError, match="already holds results"):
        _infer_case("lidc", str(ct_dir), out, 32, predictor=_threshold_predictor([0.0]), log=None)
    _infer_case("lidc", str(ct_dir), out, 32, num_samples=1, slices=(0, 1), overwrite=True,
               predictor=_threshold_predictor([0.0]), log=None)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mean_probability.nii.gz", "entropy.nii.gz", "samples.seg.nrrd", "consensus.seg.nrrd", "summary.json"]
    )
    assert sitk.ReadImage(str(out / "mean_probability.nii.gz")).GetSize() == CT_SHAPE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".case.")]


def test_bad_nifti_inputs(ms_files, tmp_path, capsys):
    tiny = _tiny_config(tmp_path, "ms_lesion")
    parser = ConfigParser()
    parser.read_config(_configs("ms_lesion", tiny))
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    ckpt = tmp_path / "model.pt"
    out = tmp_path / "case"
    # missing modality (folder search)
    three = tmp_path / "three"
    _write_ms(three, skip=("pd",))
    rc, err = _run_cli(capsys, *_cli_ms(ckpt, tiny, [str(three)], out))
    assert rc == 2 and "missing PD" in err and str(three) in err
    # three files given explicitly
    rc, err = _run_cli(capsys, *_cli_ms(ckpt, tiny, [str(p) for p in ms_files[:3]], out))
    assert rc == 2 and "3 file(s) given" in err and "FLAIR, MPRAGE, PD, T2" in err
    # a 4D volume and a 2D image where 3D volumes are expected
    for name, shape in (("four_d", (*MS_SHAPE, 2)), ("two_d", MS_SHAPE[:2])):
        folder = tmp_path / name
        files = _write_ms(folder, shapes={"t2": shape})
        rc, err = _run_cli(capsys, *_cli_ms(ckpt, tiny, [str(p) for p in files], out))
        assert rc == 2 and "case01_t2.nii.gz" in err and "3D volume is expected" in err and str(shape) in err
    # modalities on different grids
    moved = _ms_affine()
    moved[:3, 3] += 5.0
    folder = tmp_path / "grids"
    files = _write_ms(folder, affines={"mprage": moved})
    rc, err = _run_cli(capsys, *_cli_ms(ckpt, tiny, [str(p) for p in files], out))
    assert rc == 2 and "not on the same voxel grid" in err and "case01_mprage.nii.gz" in err
    # region outside: centre in voxels beyond the volume
    rc, err = _run_cli(capsys, *_cli_ms(ckpt, tiny, [str(p) for p in ms_files], out, "--center", "50", "3", "3", "--size", "4", "4", "4"))
    assert rc == 2 and "outside the volume" in err
    _nothing_written(out)


# ------------------------------------------------------- inference.json's objects: the samples


def test_bundle_inferer_draws_the_pipelines_samples(ct_dir, tmp_path):
    """inference.json's ``volume_inferer`` gives bit-identical samples to ``HSRDiffPipeline`` called directly
    on the same inputs: one CPU generator seeded with ``seed`` for all sliding-window calls of a
    case, and the sampler, steps, eta and precision of the bundle keys."""
    from monai_hsrdiff.diffusion import HSRDiffPipeline, get_sampler
    from monai_hsrdiff.inference import Region

    class Recording(HSRDiffPipeline):
        calls: list = []

        def __call__(self, condition, **kwargs):
            out = super().__call__(condition, **kwargs)
            self.calls.append((condition.clone(), out.samples.clone()))
            return out

    parser = ConfigParser()
    parser.read_config(_configs("lidc", _tiny_config(tmp_path, "lidc")))
    for key, value in {"device": "cpu", "num_samples": 2, "sampling_steps": 3, "sampler_eta": 0.5, "seed": 5}.items():
        parser[key] = value
    torch.manual_seed(0)
    inferer = parser.get_parsed_content("volume_inferer")  # untrained: the weights do not matter here
    pipe = inferer.pipeline
    assert (pipe.sampler.num_inference_steps, pipe.sampler.eta, pipe.precision) == (3, 0.5, "float32")
    inferer.pipeline = Recording(pipe.model, pipe.sampler, pipe.autocast_dtype, pipe.max_batch_size)
    task = get_task("lidc")
    source = task.read_source(str(ct_dir))
    pred = inferer(source, task.slice_preprocessing(32, 1.1), Region.from_options(source, (2, 4), None, None, "voxel"))
    assert pred.samples.shape == (2, *CT_SHAPE) and len(Recording.calls) >= 2
    assert parser["sampler"] == "dpmpp_2m_sde"  # the bundle's default (0.5.0)
    reference = HSRDiffPipeline(pipe.model, get_sampler(parser["sampler"], parser.get_parsed_content("diffusion"), eta=0.5,
                                                       num_inference_steps=3))  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    for condition, samples in Recording.calls:
        assert torch.equal(reference(condition, num_samples=2, generator=generator).samples, samples)
    summary = inferer.summary()
    assert {k: summary[k] for k in ("sampler", "num_inference_steps", "eta", "precision", "seed")} == {
        "sampler": "dpmpp_2m_sde", "num_inference_steps": 3, "eta": 0.5, "precision": "float32", "seed": 5}  # fmt: skip
    assert len(summary["kappa_trace_mean"]) == 3
    # DDPM: no step count and no eta in summary.json, whatever the bundle keys say
    parser["sampler"] = "ddpm"
    assert {k: v for k, v in parser.get_parsed_content("volume_inferer").summary().items() if k != "seed"} == {
        "sampler": "ddpm", "num_inference_steps": None, "eta": None, "precision": "float32", "compile": False}  # fmt: skip
    # the compile key (and --compile, which sets it) reaches the pipeline and summary.json
    parser["compile"] = True
    compiled = parser.get_parsed_content("volume_inferer", lazy=False)
    assert compiled.pipeline.compile is True and compiled.summary()["compile"] is True
    from monai_hsrdiff.infer import _parser

    argv = ["--bundle", "b", "--input", "x"]
    assert _parser().parse_args([*argv, "--compile"]).compile is True and _parser().parse_args(argv).compile is False


def test_cli_choices_are_the_library_names():
    """infer.py writes the sampler and precision names out (to refuse a bad --out before MONAI loads)."""
    from monai_hsrdiff.diffusion import SAMPLERS
    from monai_hsrdiff.diffusion.pipeline import PRECISIONS
    from monai_hsrdiff.infer import PRECISION_NAMES, SAMPLER_NAMES

    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS) and sorted(PRECISION_NAMES) == sorted(PRECISIONS)
