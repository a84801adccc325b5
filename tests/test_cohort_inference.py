"""Many cases in one inference run (``--input-list`` / ``--input-root``; bundle keys ``input_list`` / ``input_root``).

The real command line and the real ``python -m monai.bundle`` run in subprocesses on synthetic
DICOM series with a tiny randomly initialised network (the test checkpoint), so what is checked
is what a user sees: the case folders, stderr, ``cohort.json``, the exit code and the file mtimes
a rerun leaves alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_dicom import write_ct_series  # noqa: E402

from monai_hsrdiff.export.slicer import CASE_FILES, CASE_LAYOUT  # noqa: E402
from monai_hsrdiff.inference import InferenceInputError, case_state, cases_under_root, read_case_list  # noqa: E402
from monai_hsrdiff.inference.cohort import CohortCase, run_cohort  # noqa: E402
from monai_hsrdiff.inference.cohort_lock import LOCK_FILE, CohortLockedError, lock_holder, take_lock  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TINY = {"image_size": 32, "network_def#channels": [8, 16, 32], "network_def#norm_num_groups": 4}
LOADED = "[hsrdiff] loading network weights from"


def _configs(tiny: Path) -> list[str]:
    b = REPO / "bundles" / "lidc"
    return [str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json"), str(tiny)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """Three LIDC cases (two small CT series, one folder with a corrupt DICOM file), their CSV, a tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("cohort")
    for n, name in enumerate(("ct_a", "ct_b")):
        hu = lambda k, n=n: np.where(np.add.outer(np.arange(24), np.arange(24)) % (7 + n) < 3, 200.0, -800.0)  # noqa: E731
        write_ct_series(tmp / "scans" / name, [(0.0, 0.0, 2.0 * k) for k in range(3)], hu, pixel_spacing=(1.2, 1.2))
    bad = tmp / "scans" / "broken"
    bad.mkdir()
    (bad / "000001.dcm").write_bytes(b"DICM" + os.urandom(300))  # not a DICOM file: cut/corrupt
    csv = tmp / "cases.csv"
    csv.write_text("id,input,slices\ncase_a,scans/ct_a,\ncase_broken,scans/broken,\ncase_b,scans/ct_b,1:3\n")
    tiny = tmp / "tiny.json"
    tiny.write_text(json.dumps({**TINY, "inference_item_spacing": 1.5}))
    parser = ConfigParser()
    parser.read_config(_configs(tiny))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp / "model.pt")
    return {"tmp": tmp, "csv": csv, "tiny": tiny, "ckpt": tmp / "model.pt", "bad": bad / "000001.dcm"}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, HSRDIFF_RUN_ROOT=str(tmp / "runs"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    return env


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=240)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cohort_cli_then_bundle_rerun(cohort):
    """The CLI runs 3 cases (one broken: reported, the others finish, exit 1, the model loaded once);
    ``monai.bundle run inference --input_list`` then skips the finished cases and redoes a killed one."""
    tmp, out = cohort["tmp"], cohort["tmp"] / "out"
    res = _run(["-m", "monai_hsrdiff.infer", "--bundle", "bundles/lidc", "--config", "bundles/lidc/demo.json", str(cohort["tiny"]),
                "--checkpoint", str(cohort["ckpt"]), "--input-list", str(cohort["csv"]), "--out", str(out),
                "--num-samples", "2", "--steps", "2", "--device", "cpu"], tmp)  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.count(LOADED) == 1  # once for the three cases
    err = [line for line in res.stderr.splitlines() if line.startswith("error: case")]
    assert len(err) == 1 and "case_broken" in err[0] and str(cohort["bad"]) in err[0], res.stderr
    doc = json.loads((out / "cohort.json").read_text())
    status = {c["id"]: c["status"] for c in doc["cases"]}
    assert status == {"case_a": "ok", "case_broken": "failed", "case_b": "ok"}
    assert doc["totals"] == {**doc["totals"], "cases": 3, "ok": 2, "skipped": 0, "failed": 1}
    assert doc["settings"]["num_samples"] == 2 and doc["settings"]["num_inference_steps"] == 2
    assert doc["totals"]["ok_cases_per_hour"] > 0
    broken = next(c for c in doc["cases"] if c["id"] == "case_broken")
    assert str(cohort["bad"]) in broken["error"] and broken["mean_entropy_bits"] is None
    assert not (out / "case_broken").exists()  # a failed case writes nothing
    assert not (out / LOCK_FILE).exists()  # released at the end, also when a case failed
    for cid in ("case_a", "case_b"):
        assert sorted(p.name for p in (out / cid).iterdir()) == sorted(CASE_FILES)  # what a single-case run writes
        row = next(c for c in doc["cases"] if c["id"] == cid)
        assert 0.0 <= row["mean_entropy_bits"] <= 1.0 and row["seconds"] > 0
    summary_a = json.loads((out / "case_a" / "summary.json").read_text())
    summary_b = json.loads((out / "case_b" / "summary.json").read_text())
    assert summary_a["checkpoint"] == str(cohort["ckpt"]) and summary_a["num_samples"] == 2
    assert summary_a["region"]["index_lo"][2] == 0 and summary_a["region"]["index_hi"][2] == 2  # all 3 slices
    assert summary_b["region"]["index_lo"][2] == 1 and summary_b["region"]["index_hi"][2] == 2  # its row's slices 1:3

    # the same case through the single-case command: the same files and summary fields
    single = tmp / "single_a"
    res1 = _run(["-m", "monai_hsrdiff.infer", "--bundle", "bundles/lidc", "--config", "bundles/lidc/demo.json", str(cohort["tiny"]),
                 "--checkpoint", str(cohort["ckpt"]), "--input", str(tmp / "scans" / "ct_a"), "--out", str(single),
                 "--num-samples", "2", "--steps", "2", "--device", "cpu"], tmp)  # fmt: skip
    assert res1.returncode == 0, res1.stderr
    assert sorted(p.name for p in single.iterdir()) == sorted(CASE_FILES)
    summary_1 = json.loads((single / "summary.json").read_text())
    assert sorted(summary_1) == sorted(summary_a)
    assert {k: v for k, v in summary_1.items() if k != "timings"} == {k: v for k, v in summary_a.items() if k != "timings"}

    # a killed case: case_b lost files mid-way (only names this command writes) and left a .partial beside it
    (out / "case_b" / "summary.json").unlink()
    (out / "case_b" / "samples.seg.nrrd").unlink()
    partial = out / ".case_b.x1y2.partial"
    partial.mkdir()
    (partial / "entropy.nii.gz").write_bytes(b"cut")
    a_before = _mtimes(out / "case_a")
    # a folder the command did not write: refused, never deleted
    foreign = out / "case_x"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    csv2 = cohort["tmp"] / "cases2.csv"
    csv2.write_text(cohort["csv"].read_text() + "case_x,scans/ct_a,\n")
    res2 = _run(["-m", "monai.bundle", "run", "inference", "--config_file", repr(_configs(cohort["tiny"])),
                 "--checkpoint", str(cohort["ckpt"]), "--input_list", str(csv2), "--output_dir", str(out),
                 "--num_samples", "2", "--sampling_steps", "2", "--device", "cpu"], tmp)  # fmt: skip
    assert res2.returncode == 1, res2.stderr
    assert res2.stdout.count(LOADED) == 1
    doc2 = json.loads((out / "cohort.json").read_text())
    status2 = {c["id"]: c["status"] for c in doc2["cases"]}
    assert status2 == {"case_a": "skipped", "case_broken": "failed", "case_b": "ok", "case_x": "failed"}
    assert _mtimes(out / "case_a") == a_before  # a finished case is not touched
    assert sorted(p.name for p in (out / "case_b").iterdir()) == sorted(CASE_FILES)
    assert case_state(out / "case_b", CASE_LAYOUT) == "finished" and not partial.exists()
    assert (foreign / "notes.txt").read_text() == "mine"
    x_err = next(c["error"] for c in doc2["cases"] if c["id"] == "case_x")
    assert "notes.txt" in x_err and "case_x" in x_err
    assert "case_x" in res2.stderr and "case_broken" in res2.stderr
    assert sorted(p.name for p in out.iterdir()) == ["case_a", "case_b", "case_x", "cohort.json"]  # no lock, no leftover
    a_row = next(c for c in doc2["cases"] if c["id"] == "case_a")
    assert a_row["mean_entropy_bits"] == next(c for c in doc["cases"] if c["id"] == "case_a")["mean_entropy_bits"]


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def _wait_for(what: str, done, proc: subprocess.Popen, log: Path, timeout: float = 150.0) -> None:
    """Poll ``done()`` until it holds; fail (showing the log) when the run ended first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"the cohort run ended (exit code {proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.02)


def test_cohort_killed_mid_case_then_rerun(cohort, tmp_path, capsys):
    """A real SIGKILL: the run is killed while its 2nd case samples (the 1st finished). While it runs a 2nd
    run on the same --out stops at once (its lock: the live pid), before the model loads; the rerun takes
    over the killed run's lock, skips the finished case untouched, redoes the killed one, runs the rest."""
    from monai_hsrdiff.infer import main

    tmp = cohort["tmp"]
    n_long = 100  # slices of the case that is killed: the window to kill it in, on a loaded machine too
    hu = lambda k: np.where(np.add.outer(np.arange(24), np.arange(24)) % (5 + k % 3) < 2, 150.0, -700.0)  # noqa: E731
    write_ct_series(tmp_path / "ct_long", [(0.0, 0.0, 2.0 * k) for k in range(n_long)], hu, pixel_spacing=(1.2, 1.2))
    csv = tmp_path / "cases.csv"
    csv.write_text(f"id,input\ncase_a,{tmp / 'scans' / 'ct_a'}\ncase_long,{tmp_path / 'ct_long'}\ncase_c,{tmp / 'scans' / 'ct_b'}\n")
    out = tmp_path / "out"
    args = ["--bundle", str(REPO / "bundles" / "lidc"), "--config", str(REPO / "bundles" / "lidc" / "demo.json"), str(cohort["tiny"]),
            "--checkpoint", str(cohort["ckpt"]), "--input-list", str(csv), "--out", str(out),
            "--num-samples", "2", "--steps", "2", "--device", "cpu"]  # fmt: skip
    log = tmp_path / "run1.log"
    with log.open("w") as f:
        proc = subprocess.Popen([PYTHON, "-m", "monai_hsrdiff.infer", *args], cwd=REPO, env=_env(tmp), stdout=f, stderr=subprocess.STDOUT)
    try:
        started = "case 2/3 case_long:"
        _wait_for("2nd slice of case_long", lambda: "[hsrdiff] slice 2/" in log.read_text().partition(started)[2], proc, log)
        assert case_state(out / "case_a", CASE_LAYOUT) == "finished"
        assert lock_holder(out)["pid"] == proc.pid and lock_holder(out)["host"] == socket.gethostname()
        lock_bytes = (out / LOCK_FILE).read_bytes()
        capsys.readouterr()
        assert main(args) == 2  # a second run on the same folder, while the first one runs
        second = capsys.readouterr()
        assert f"pid {proc.pid}" in second.err and str(out) in second.err and "another cohort run" in second.err, second.err
        assert LOADED not in second.out and (out / LOCK_FILE).read_bytes() == lock_bytes
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = log.read_text()
    assert case_state(out / "case_long", CASE_LAYOUT) != "finished", f"the kill came after case_long finished:\n{first}"
    assert f"slice {n_long}/{n_long}" not in first.partition(started)[2] and "case 3/3" not in first
    assert (out / LOCK_FILE).read_bytes() == lock_bytes  # a SIGKILL leaves the lock: its pid is now dead
    a_before = _files(out / "case_a")

    res = _run(["-m", "monai_hsrdiff.infer", *args], tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"taking over the lock of pid {proc.pid}" in res.stdout and res.stdout.count(LOADED) == 1
    assert "case 1/3 case_a: finished earlier" in res.stdout and "case 2/3 case_long" in res.stdout
    doc = json.loads((out / "cohort.json").read_text())
    assert {c["id"]: c["status"] for c in doc["cases"]} == {"case_a": "skipped", "case_long": "ok", "case_c": "ok"}
    assert all(c["error"] is None for c in doc["cases"])
    assert _files(out / "case_a") == a_before  # the finished case: not touched (same bytes, same mtimes)
    for cid in ("case_long", "case_c"):
        assert sorted(p.name for p in (out / cid).iterdir()) == sorted(CASE_FILES)
        assert case_state(out / cid, CASE_LAYOUT) == "finished"
    region = json.loads((out / "case_long" / "summary.json").read_text())["region"]
    assert region["index_lo"][2] == 0 and region["index_hi"][2] == n_long - 1  # redone in full
    assert sorted(p.name for p in out.iterdir()) == ["case_a", "case_c", "case_long", "cohort.json"]  # no lock, no temporary


def test_cohort_lock_refusals_and_takeover(tmp_path, monkeypatch):
    """The lock alone: a live holder (this process) refused, naming the folder and pid, also by ``run_cohort``
    before it loads the checkpoint; a dead pid's lock (an exited process) and a reused pid's taken over;
    another host's and an unreadable lock refused and left as they are."""
    out = tmp_path / "out"
    held = take_lock(out, log=None)
    record = lock_holder(out)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["token"] == held.token
    with pytest.raises(CohortLockedError, match=f"pid {os.getpid()} on this host") as e:
        take_lock(out)
    assert str(out) in str(e.value)
    cases = [CohortCase("c1", str(tmp_path / "nowhere"))]
    with pytest.raises(CohortLockedError, match="another cohort run"):  # the bundle path: before load_weights
        run_cohort(cases, out, reader=None, inferer=None, writer=None, checkpoint=tmp_path / "missing.pt", log=None)
    held.release()
    assert not out.exists()  # the lock gone, and the folder it created (left empty) with it

    done = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = int(done.stdout)
    out.mkdir()
    lock = out / LOCK_FILE
    for stale in ({"pid": dead, "host": socket.gethostname()},  # exited
                  {**record, "token": "old", "proc_start": (record["proc_start"] or 0) + 1}):  # this pid, another process's start
        lock.write_text(json.dumps(stale))
        said: list[str] = []
        taken = take_lock(out, log=said.append)
        assert len(said) == 1 and f"taking over the lock of pid {stale['pid']}" in said[0] and str(lock) in said[0]
        assert lock_holder(out)["token"] == taken.token
        taken.release()
        assert not lock.exists() and out.is_dir()  # a folder it did not create stays
        assert sorted(p.name for p in out.iterdir()) == []

    monkeypatch.setattr("monai_hsrdiff.inference.cohort_lock._READ_WAIT_S", 0.0)
    for text, problem in ((json.dumps({"pid": 1, "host": "other-node-7", "started": "t"}), "delete"), ("garbage", "not a cohort lock")):
        lock.write_text(text)
        with pytest.raises(CohortLockedError, match=problem) as e:
            take_lock(out)
        assert str(lock) in str(e.value) and lock.read_text() == text  # never deleted


def test_case_list_columns_and_refusals(tmp_path):
    """The CSV's columns reach the cases (paths relative to the CSV, ';' between NIfTI paths, the region);
    a bad list is refused naming the file and line."""
    csv = tmp_path / "cases.csv"
    csv.write_text("id,input,center,size,units\nms01,ms/01/flair.nii.gz; ms/01/mprage.nii.gz;/abs/pd.nii;t2.nii,10 20 5,8 8 4,mm\n")
    (case,) = read_case_list(csv)
    assert case.input == [str(tmp_path / "ms/01/flair.nii.gz"), str(tmp_path / "ms/01/mprage.nii.gz"), "/abs/pd.nii", str(tmp_path / "t2.nii")]
    assert case.center == [10.0, 20.0, 5.0] and case.size == [8.0, 8.0, 4.0] and case.units == "mm" and case.slices is None
    bad = {
        "id,path\na,x\n": "unknown column",
        "id,input\na,x\na,y\n": "appears twice",
        "id,input\n../up,x\n": "cannot name a case folder",
        "id,input,center\na,x,1 2\n": "line 2: center",
        "id,input,slices,center,size\na,x,1:2,1 2 3,4 4 4\n": "not both",
    }
    for text, problem in bad.items():
        csv.write_text(text)
        with pytest.raises(InferenceInputError, match=problem) as e:
            read_case_list(csv)
        assert str(csv) in str(e.value)
    (tmp_path / "root" / "b").mkdir(parents=True)
    (tmp_path / "root" / "a").mkdir()
    (tmp_path / "root" / ".a.tmp").mkdir()
    (tmp_path / "root" / "notes.txt").write_text("")
    assert [c.id for c in cases_under_root(tmp_path / "root")] == ["a", "b"]  # sub-folders only, hidden ones left out


def test_cli_refuses_a_bad_list_before_loading(cohort, capsys):
    """A CSV error and --input with --input-list stop with exit code 2 and one error line, nothing written."""
    from monai_hsrdiff.infer import main

    csv = cohort["tmp"] / "dup.csv"
    csv.write_text("id,input\na,scans/ct_a\na,scans/ct_b\n")
    out = cohort["tmp"] / "never"
    rc = main(["--bundle", "bundles/lidc", "--checkpoint", str(cohort["ckpt"]), "--input-list", str(csv), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "appears twice" in err and str(csv) in err and not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["--bundle", "bundles/lidc", "--input", "x", "--input-list", str(csv)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    (cohort["tmp"] / "root" / "c1").mkdir(parents=True)
    rc = main(["--bundle", "bundles/lidc", "--checkpoint", str(cohort["ckpt"]), "--input-root", str(cohort["tmp"] / "root"),
               "--out", str(cohort["tmp"] / "root" / "results")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "lies inside the --input-root" in err and not (cohort["tmp"] / "root" / "results").exists()


def test_ms_lesion_input_root_missing_modality(tmp_path, capsys, monkeypatch):
    """``--input-root``: one MRI per sub-folder (its four NIfTI files); a folder lacking T2 is reported, the other finishes."""
    import nibabel as nib

    from monai_hsrdiff.infer import main

    monkeypatch.setenv("HSRDIFF_RUN_ROOT", str(tmp_path / "runs"))
    rng = np.random.default_rng(0)
    for case, mods in (("p1", ("flair", "mprage", "pd", "t2")), ("p2", ("flair", "mprage", "pd"))):
        (tmp_path / "root" / case).mkdir(parents=True)
        for m in mods:
            nib.save(nib.Nifti1Image(rng.normal(300, 10, (6, 20, 18)).astype(np.float32), np.diag([2.0, 1.0, 1.0, 1.0])),
                     tmp_path / "root" / case / f"{case}_{m}.nii.gz")  # fmt: skip
    b = REPO / "bundles" / "ms_lesion"
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY))
    parser = ConfigParser()
    parser.read_config([str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json"), str(tiny)])
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    rc = main(["--bundle", str(b), "--config", str(b / "demo.json"), str(tiny), "--checkpoint", str(tmp_path / "model.pt"),
               "--input-root", str(tmp_path / "root"), "--out", str(out), "--num-samples", "2", "--steps", "1",
               "--slices", "2:4", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1
    assert "error: case p2" in captured.err and "missing T2" in captured.err and str(tmp_path / "root" / "p2") in captured.err
    doc = json.loads((out / "cohort.json").read_text())
    assert [(c["id"], c["status"]) for c in doc["cases"]] == [("p1", "ok"), ("p2", "failed")]
    assert sorted(p.name for p in (out / "p1").iterdir()) == sorted(CASE_FILES)
    summary = json.loads((out / "p1" / "summary.json").read_text())
    assert summary["input"] == [str(tmp_path / "root" / "p1")] and len(summary["source"]["files"]) == 4
    # the command's --slices, along the axial (S) array axis: k here
    assert summary["region"]["index_lo"][2] == 2 and summary["region"]["index_hi"][2] == 3

    # a rerun skips p1; with --overwrite it is redone (the folder replaced)
    cmd = ["--bundle", str(b), "--config", str(b / "demo.json"), str(tiny), "--checkpoint", str(tmp_path / "model.pt"),
           "--input-root", str(tmp_path / "root"), "--out", str(out), "--num-samples", "2", "--steps", "1", "--slices", "2:4"]  # fmt: skip
    before = _mtimes(out / "p1")
    assert main(cmd) == 1
    assert [c["status"] for c in json.loads((out / "cohort.json").read_text())["cases"]] == ["skipped", "failed"]
    assert _mtimes(out / "p1") == before
    assert main([*cmd, "--overwrite"]) == 1
    assert [c["status"] for c in json.loads((out / "cohort.json").read_text())["cases"]] == ["ok", "failed"]
    assert _mtimes(out / "p1") != before and case_state(out / "p1", CASE_LAYOUT) == "finished"


def test_benchmark_quick(tmp_path):
    """benchmarks/cohort_inference.py --quick (demo setting): its result files and a positive throughput."""
    sys.path.insert(0, str(REPO))
    from benchmarks.cohort_inference import main as bench

    assert bench(["--quick", "--settings", "demo", "--threads", "1", "--out", str(tmp_path / "c")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    (r,) = data["results"]
    assert r["setting"] == "demo" and len(r["cases"]) == 2 and r["cases_per_hour"] > 0
    assert "cases / hour" in (tmp_path / "c.md").read_text()
