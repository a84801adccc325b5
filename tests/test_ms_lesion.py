"""ISBI-2015 MS-Lesion preprocessing end to end on a synthetic layout with oblique geometry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from monai_hsrdiff.data import load_datalist, load_item
from preprocessing.ms_lesion import MODALITIES, MSLesionInputError, main, preprocess_ms_lesion
from synthetic_nifti import oblique_affine, write_isbi_layout

SIZE = 32
SHARE = 0.5
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("isbi")
    info = write_isbi_layout(root / "in")
    logs: list[str] = []
    summary = preprocess_ms_lesion(root / "in", root / "out", size=SIZE, empty_share=SHARE, seed=3, log=logs.append)
    return root, info, summary, logs


def _entries(out: Path) -> list[dict]:
    doc = json.loads((out / "datalist.json").read_text())
    return [dict(e, split=s) for s in ("training", "validation", "test") for e in doc[s]]


def test_item_count_slices_and_splits(built) -> None:
    root, info, summary, logs = built
    entries = _entries(root / "out")
    for name, tp in info.items():
        mine = [e for e in entries if f"{e['patient']}_{e['time_point']}" == name]
        n_les = len(tp["lesion_slices"])
        n_free = min(round(SHARE * n_les), len(tp["brain_slices"] - tp["lesion_slices"]))
        assert len(mine) == n_les + n_free, name
        assert {e["slice_index"] for e in mine if e["lesion"]} == tp["lesion_slices"]
        assert {e["slice_index"] for e in mine if not e["lesion"]} <= tp["brain_slices"] - tp["lesion_slices"]
    assert summary.items == len(entries) and summary.patients == 3
    # patient-disjoint splits: 3 patients, ratios 0.7/0.1/0.2 -> one each
    split_of = {}
    for e in entries:
        assert split_of.setdefault(e["patient"], e["split"]) == e["split"]
    assert sorted(split_of.values()) == ["test", "training", "validation"]
    doc = json.loads((root / "out" / "datalist.json").read_text())
    assert doc["synthetic"] is False and doc["channels"] == ["FLAIR", "MPRAGE", "PD", "T2"]
    assert any(line.startswith("[3/3] training03:") for line in logs) and "items: " in logs[-1]
    # MONAI-style loading through the project's own datalist reader
    assert len(load_datalist(root / "out" / "datalist.json", "test")) == len([e for e in entries if e["split"] == "test"])


def _zscored(tp: dict) -> tuple[np.ndarray, dict]:
    """Independent z-scoring per the documented definition: brain = any modality > 0."""
    vols = np.stack([nib.load(tp["files"][m]).get_fdata() for m in MODALITIES])
    brain = (vols > 0).any(0)
    out, stats = np.zeros_like(vols), {}
    for c, m in enumerate(MODALITIES):
        mean, std = vols[c][brain].mean(), vols[c][brain].std()
        out[c] = np.where(brain, (vols[c] - mean) / std, 0)
        stats[m] = (mean, std)
        assert abs(out[c][brain].mean()) < 1e-6 and abs(out[c][brain].std() - 1) < 1e-6
    return out, stats


@pytest.mark.parametrize("name", ["training01_01", "training02_02", "training03_01"])
def test_geometry_zscore_and_values_round_trip(built, name: str) -> None:
    root, info, _, _ = built
    tp = info[name]
    zs, stats = _zscored(tp)
    masks_src = [sitk.GetArrayFromImage(sitk.ReadImage(str(tp["files"][r]))) for r in ("mask1", "mask2")]  # [k, j, i]
    itk = sitk.ReadImage(str(tp["files"]["flair"]))
    entries = [e for e in _entries(root / "out") if f"{e['patient']}_{e['time_point']}" == name]
    rr, cc = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    pix = np.stack([rr.ravel(), cc.ravel(), np.zeros(rr.size), np.ones(rr.size)])  # (4, P)
    for e in entries[:: max(1, len(entries) // 4)]:
        it = load_item(root / "out" / e["item"])
        assert it["image"].shape == (4, SIZE, SIZE) and it["masks"].shape == (2, SIZE, SIZE)
        for m, (mean, std) in stats.items():
            assert np.allclose(it["meta"]["zscore_mean_std"][m], [mean, std], rtol=1e-5)
        idx = it["item_to_index"] @ pix
        assert np.allclose(idx[tp["axial_axis"]], e["slice_index"])  # the slice it came from
        # physical point: nibabel's RAS affine converted to LPS, and SimpleITK reading the file
        phys = it["item_to_physical"] @ pix
        assert np.allclose(phys, LPS @ tp["affine"] @ idx, atol=1e-6)
        for p in np.linspace(0, pix.shape[1] - 1, 7).astype(int):
            assert np.allclose(itk.TransformContinuousIndexToPhysicalPoint(idx[:3, p].tolist()), phys[:3, p], atol=1e-4)
        # masks: nearest source voxel of each item pixel (no ties at 24 -> 32)
        ijk = np.rint(idx[:3]).astype(int)
        for a in range(2):
            src = masks_src[a][ijk[2], ijk[1], ijk[0]]
            assert np.array_equal(it["masks"][a].ravel(), src), (name, e["item"], a)
        # image: bilinear in-plane interpolation of the z-scored source at the mapped index
        shape = np.array(zs.shape[1:])[:, None]
        inside = np.all((idx[:3] >= 0) & (idx[:3] <= shape - 1), axis=0)
        for c in range(4):
            ref = map_coordinates(zs[c], idx[:3, inside], order=1)
            assert np.allclose(it["image"][c].ravel()[inside], ref, atol=1e-4)
        assert it["meta"]["synthetic"] is False and it["meta"]["source"].endswith(f"{name}_flair_pp.nii")


def test_resume_skips_and_overwrite_rebuilds(tmp_path: Path) -> None:
    write_isbi_layout(tmp_path / "in", patients={"training01": 2, "training02": 1}, time_points=("01",))
    out = tmp_path / "out"
    preprocess_ms_lesion(tmp_path / "in", out, size=SIZE, log=lambda s: None)
    first = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*.npz")}
    stale = out / "items" / ".training02.abc.tmp"  # an interrupted run's leftover
    stale.mkdir()
    (stale / "training02_01_s004.npz").write_bytes(b"half")
    gone = out / "items" / ".training07.k1ll3d.old"  # ... of a patient this run's --root does not have
    gone.mkdir()
    (gone / "training07_01_s001.npz").write_bytes(b"old")
    (out / "items" / "training02" / "unit.json").unlink()  # unfinished: no manifest
    logs: list[str] = []
    preprocess_ms_lesion(tmp_path / "in", out, size=SIZE, log=logs.append)
    removed = [line for line in logs if line.startswith("[hsrdiff] removing ")]  # said before the patients' lines
    assert removed == [f"[hsrdiff] removing {stale}: left by an interrupted write of training02",
                       f"[hsrdiff] removing {gone}: left by an interrupted write of training07"], logs  # fmt: skip
    logs = logs[len(removed):]
    assert logs[0].startswith("[1/2] training01: already done") and "already done" not in logs[1]
    assert not stale.exists() and not gone.exists()
    again = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*.npz")}
    assert set(again) == set(first)
    assert all(again[p] == first[p] for p in again if "training01" in p.name)
    assert all(again[p] != first[p] for p in again if "training02" in p.name)
    preprocess_ms_lesion(tmp_path / "in", out, size=SIZE, overwrite=True, log=logs.append)
    assert all(p.stat().st_mtime_ns != again[p] for p in again)
    with pytest.raises(MSLesionInputError, match=r"built with .*'size': 32.*asks .*'size': 16.*--overwrite"):
        preprocess_ms_lesion(tmp_path / "in", out, size=16, log=lambda s: None)


def test_overwrite_keeps_a_patient_folder_that_gained_a_file_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """--overwrite checks --out at the start; a file a user put into a patient folder while that
    patient was being rebuilt is not the converter's, so the old folder stays, with the file."""
    import preprocessing.ms_lesion as ms

    write_isbi_layout(tmp_path / "in", patients={"training01": 1}, time_points=("01",))
    out = tmp_path / "out"
    preprocess_ms_lesion(tmp_path / "in", out, size=SIZE, log=lambda s: None)
    folder = out / "items" / "training01"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = ms.save_item

    def meanwhile(*args, **kwargs):
        (folder / "rater_notes.txt").write_text("lesion 3 is a vessel")
        return real(*args, **kwargs)

    monkeypatch.setattr(ms, "save_item", meanwhile)
    with pytest.raises(FileExistsError, match="rater_notes.txt"):
        preprocess_ms_lesion(tmp_path / "in", out, size=SIZE, overwrite=True, log=lambda s: None)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after.pop("rater_notes.txt") == b"lesion 3 is a vessel" and after == before
    assert sorted(p.name for p in (out / "items").iterdir()) == ["training01"]  # no build folder left


def _no_output(out: Path) -> None:
    assert not (out / "datalist.json").exists()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.old"))


@pytest.fixture()
def small(tmp_path: Path) -> tuple[Path, dict]:
    info = write_isbi_layout(tmp_path / "in", patients={"training01": 2, "training02": 2}, time_points=("01",))
    return tmp_path, info


def test_missing_modality_and_mask(small) -> None:
    tmp, info = small
    info["training02_01"]["files"]["t2"].unlink()
    with pytest.raises(MSLesionInputError, match=r"training02, time point 01: missing T2 image .*training02_01_t2_pp.nii"):
        preprocess_ms_lesion(tmp / "in", tmp / "out", size=SIZE, log=lambda s: None)
    _no_output(tmp / "out")
    info["training01_01"]["files"]["mask2"].unlink()
    with pytest.raises(MSLesionInputError, match=r"missing rater mask .*training01_01_mask2.nii"):
        preprocess_ms_lesion(tmp / "in", tmp / "out", size=SIZE, log=lambda s: None)
    _no_output(tmp / "out")


def test_shape_and_affine_mismatch(small, capsys) -> None:
    tmp, info = small
    files = info["training02_01"]["files"]
    nib.save(nib.Nifti1Image(np.ones((24, 24, 11), np.float32), info["training02_01"]["affine"]), files["pd"])
    with pytest.raises(MSLesionInputError, match=r"shape mismatch: .*training02_01_pd_pp.nii has shape \(24, 24, 11\) but .*flair_pp.nii has \(24, 24, 12\)"):
        preprocess_ms_lesion(tmp / "in", tmp / "out", size=SIZE, log=lambda s: None)
    assert not (tmp / "out" / "items" / "training01").exists()  # headers are checked before any work
    _no_output(tmp / "out")
    files = info["training01_01"]["files"]
    shifted = oblique_affine(2, spacing=(0.9, 1.1, 2.0), origin=(0.0, 0.0, 5.0))
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 12), np.uint8), shifted), files["mask1"])
    assert main(["--root", str(tmp / "in"), "--out", str(tmp / "out")]) == 2
    err = capsys.readouterr().err
    assert "affine mismatch: " in err and "training01_01_mask1.nii" in err and "training01_01_flair_pp.nii" in err


def test_nan_volume_leaves_nothing_half_written(small) -> None:
    tmp, info = small
    f = info["training02_01"]["files"]["flair"]
    img = nib.load(f)
    data = img.get_fdata().astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), f)
    with pytest.raises(MSLesionInputError, match=r"training02_01_flair_pp.nii: 1 NaN/inf voxels"):
        preprocess_ms_lesion(tmp / "in", tmp / "out", size=SIZE, log=lambda s: None)
    items = tmp / "out" / "items"
    assert (items / "training01" / "unit.json").is_file()  # finished before the error: complete
    assert not (items / "training02").exists()
    assert sorted(os.listdir(items)) == ["training01"]
    _no_output(tmp / "out")


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "root" / "training").mkdir(parents=True)
    with pytest.raises(MSLesionInputError, match=r"no trainingXX folders under .*training"):
        preprocess_ms_lesion(tmp_path / "root", tmp_path / "out", log=lambda s: None)
