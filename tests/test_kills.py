"""Real SIGKILLs at arranged moments: during a resume checkpoint write, during the best
``model.pt`` write at validation, mid-patient in preprocessing, and mid-export in inference.

Each victim is a real subprocess started through ``tests/fault_injection.py``, which makes one
chosen write (the N-th call of a writer on a matching path) leave half its bytes, write a
marker file and sleep. The test waits for the marker, so the kill lands exactly inside that
write, then SIGKILLs the process and checks what a later normal run makes of the leftovers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from conftest import PYTHON, REPO, TINY, bundle_files
from monai.bundle import ConfigParser
from synthetic_dicom import write_ct_series
from synthetic_nifti import write_isbi_layout

from monai_hsrdiff.data import ItemFormatError, load_item
from monai_hsrdiff.handlers.checkpoint import latest_checkpoint
from monai_hsrdiff.infer import main as infer_main
from preprocessing.ms_lesion import preprocess_ms_lesion

INJECT = str(REPO / "tests" / "fault_injection.py")
_STATS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- ")


def _one_thread(env: dict[str, str]) -> dict[str, str]:
    """``env`` with one torch thread: on a busy machine two spinning OpenMP threads per process
    made a tiny network's step 30x slower; the kills need no threads."""
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def env(bundle_env: dict[str, str]) -> dict[str, str]:
    """Environment of a bundle run (the shared demo data, a fresh run root), one thread."""
    return _one_thread(bundle_env)


def _start_stalling(inject: list[str], run: list[str], marker: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m <run...>`` under the fault injector (``inject``: its options)."""
    cmd = [PYTHON, INJECT, *inject, "--marker", str(marker), "--", *run]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _kill_at_marker(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 120) -> Path:
    """Wait until the injected stall has begun, SIGKILL the process; return the half-written path."""
    end = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before the stall:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"timed out waiting for the stall:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    time.sleep(0.05)  # the marker is written in one call; let it land before reading it
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return Path(marker.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ 1. checkpoint write


def _train_args(*extra: str) -> list[str]:
    # TINY: batch 8 -> 3 iterations in the one epoch, then a validation of 2 items
    return ["monai.bundle", "run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY,
            "--ckpt_every_n_iterations", "1", "--log_every_n_iterations", "1", *extra]  # fmt: skip


def _steps(ckpts: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in ckpts.glob("*.pt") if (m := re.match(r"resume_checkpoint_(\d+)\.pt$", p.name)))


@pytest.mark.slow
def test_kill_during_checkpoint_write(env, tmp_path: Path) -> None:
    """SIGKILL inside the write of the 3rd checkpoint: only a temporary file holds its bytes,
    both earlier checkpoints are still there; ``--resume True`` names and removes the leftover,
    continues from checkpoint 2 and ends where an uninterrupted run ends."""
    ckpts = Path(env["HSRDIFF_RUN_ROOT"]) / "lidc_demo" / "checkpoints"
    marker, log = tmp_path / "stalled", tmp_path / "a.log"
    # ignite's DiskSaver(atomic=True) hands torch.save the open temporary file checkpoints/tmpXXXXXXXX
    inject = ["--target", "torch:save", "--out-arg", "1", "--match", r"/checkpoints/tmp[a-z0-9_]{8}$", "--call", "3"]
    proc = _start_stalling(inject, _train_args(), marker, log, env)
    partial = _kill_at_marker(proc, marker, log)

    assert partial.parent == ckpts and partial.is_file() and partial.stat().st_size > 0
    assert _steps(ckpts) == [1, 2]  # nothing under the 3rd checkpoint's real name
    with pytest.raises(RuntimeError, match="zip archive"):  # the leftover is really half a checkpoint
        torch.load(partial, map_location="cpu", weights_only=True)
    path, previous = latest_checkpoint(ckpts)
    assert path.name == "resume_checkpoint_2.pt" and previous["trainer"]["iteration"] == 2

    res = subprocess.run([PYTHON, "-m", *_train_args("--resume", "True")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"[resume] removing {partial}: a checkpoint write interrupted before its rename" in out
    assert not partial.exists()
    assert f"[resume] resuming from {ckpts / 'resume_checkpoint_2.pt'} (trainer iteration 2," in out
    m = _STATS.search(out)
    assert m and (int(m.group(1)) - 1) * int(m.group(3)) + int(m.group(2)) == 3, out[-3000:]  # first iteration run: 3
    per_epoch = previous["trainer"]["epoch_length"]
    total = previous["trainer"]["max_epochs"] * per_epoch  # what an uninterrupted run ends at
    path, final = latest_checkpoint(ckpts)
    assert path.name == f"resume_checkpoint_{total}.pt" and final["trainer"]["iteration"] == total
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {total}
    assert not [p for p in ckpts.iterdir() if p.name.startswith("tmp")]
    assert (ckpts / "model.pt").is_file()



@pytest.mark.slow
def test_kill_during_validation_model_write(env, tmp_path: Path) -> None:
    """SIGKILL inside the write of the best ``model.pt`` at the end-of-epoch validation: no
    ``model.pt`` appears half-written (the write is atomic); ``--resume True`` from the last
    iteration's checkpoint runs that epoch's validation again (it did not finish) and writes it."""
    ckpts = Path(env["HSRDIFF_RUN_ROOT"]) / "lidc_demo" / "checkpoints"
    marker, log = tmp_path / "stalled", tmp_path / "a.log"
    # writes 1-3: the resume checkpoints of iterations 1-3; write 4: model.pt, during validation
    inject = ["--target", "torch:save", "--out-arg", "1", "--match", "/checkpoints/", "--call", "4"]
    proc = _start_stalling(inject, _train_args(), marker, log, env)
    partial = _kill_at_marker(proc, marker, log)

    assert partial.parent == ckpts and re.fullmatch(r"tmp[a-z0-9_]{8}", partial.name), partial
    assert not (ckpts / "model.pt").exists()  # not half-written under its final name
    assert "Epoch[1] Metrics -- val_" in log.read_text()  # killed after the validation metrics, in the model.pt write that follows
    path, last = latest_checkpoint(ckpts)
    assert path.name == "resume_checkpoint_3.pt" and last["epoch_end"] == {"done": False}  # saved before validation

    res = subprocess.run([PYTHON, "-m", *_train_args("--resume", "True")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"[resume] removing {partial}:" in out and not partial.exists()
    assert "[resume] epoch 1 ended but its end-of-epoch handlers (validation) did not finish" in out
    assert not _STATS.search(out)  # no training iteration was run again
    assert "Epoch[1] Metrics -- val_" in out and "Got new best metric of val_ged16" in out
    best = torch.load(ckpts / "model.pt", map_location="cpu", weights_only=True)
    assert best and all(torch.isfinite(v).all() for v in best.values() if torch.is_tensor(v))
    path, last = latest_checkpoint(ckpts)
    assert path.name == "resume_checkpoint_3.pt" and last["epoch_end"] == {"done": True}  # a later resume skips it


# ------------------------------------------------------------------ 2. preprocessing, mid-patient


def _items(out: Path) -> dict[str, dict]:
    """Items under their final names (``items/<patient>/*.npz``; hidden work folders excluded)."""
    return {str(p.relative_to(out)): load_item(p) for p in sorted((out / "items").glob("[!.]*/*.npz"))}


def _same_items(a: dict[str, dict], b: dict[str, dict]) -> bool:
    return a.keys() == b.keys() and all(
        all(np.array_equal(a[k][key], b[k][key]) for key in ("image", "masks", "item_to_index", "item_to_physical"))
        and a[k]["meta"] == b[k]["meta"]
        for k in a
    )


@pytest.mark.slow
def test_preprocessing_killed_mid_patient(tmp_path: Path) -> None:
    """``python -m preprocessing.ms_lesion`` SIGKILLed while writing the 2nd patient's items: the
    1st patient's folder is complete, the 2nd is not visible under its name; a re-run skips the
    1st, redoes the 2nd, and the result equals an uninterrupted run's."""
    write_isbi_layout(tmp_path / "in", patients={"training01": 2, "training02": 1}, time_points=("01",))
    ref, out = tmp_path / "ref", tmp_path / "out"
    preprocess_ms_lesion(tmp_path / "in", ref, size=32, log=lambda s: None)  # uninterrupted
    expected = _items(ref)
    assert sum("training02" in k for k in expected) >= 3  # the kill lands mid-patient, items remain to write
    env = _one_thread(dict(os.environ))
    cli = ["preprocessing.ms_lesion", "--root", str(tmp_path / "in"), "--out", str(out), "--size", "32"]

    marker, log = tmp_path / "stalled", tmp_path / "a.log"
    inject = ["--target", "monai_hsrdiff.data.items:save_item", "--match", r"/items/\.training02\.[^/]+\.tmp/", "--call", "2"]
    proc = _start_stalling(inject, cli, marker, log, env)
    partial = _kill_at_marker(proc, marker, log)

    assert partial.parent.parent == out / "items" and partial.parent.name.startswith(".training02.")
    assert len(list(partial.parent.glob("*.npz"))) == 2  # one whole item, one half-written
    with pytest.raises(ItemFormatError, match="truncated or corrupt"):
        load_item(partial)
    assert sorted(p.name for p in (out / "items").iterdir()) == sorted([partial.parent.name, "training01"])
    assert not (out / "datalist.json").exists()
    first = _items(out)
    assert _same_items(first, {k: v for k, v in expected.items() if "/training01/" in k})  # finished and intact
    kept = {p: p.stat().st_mtime_ns for p in (out / "items" / "training01").iterdir()}

    res = subprocess.run([PYTHON, "-m", *cli], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[1/2] training01: already done" in res.stdout
    assert re.search(r"\[2/2\] training02: \d+ items", res.stdout), res.stdout
    assert sorted(p.name for p in (out / "items").iterdir()) == ["training01", "training02"]  # leftover gone
    assert {p: p.stat().st_mtime_ns for p in (out / "items" / "training01").iterdir()} == kept  # skipped, not redone
    assert _same_items(_items(out), expected)
    doc, ref_doc = (json.loads((d / "datalist.json").read_text()) for d in (out, ref))
    assert all(doc[s] == ref_doc[s] for s in ("training", "validation", "test"))


# ------------------------------------------------------------------ 3. inference export, mid-write

CASE_FILES = ["consensus.seg.nrrd", "entropy.nii.gz", "mean_probability.nii.gz", "samples.seg.nrrd", "summary.json"]


def _ct_series(folder: Path) -> Path:
    """A small axial CT series: 40x40 pixels, 4 slices, a bright block on air."""

    def hu(n: int) -> np.ndarray:
        a = np.full((40, 40), -900.0)
        a[10:18, 20:30] = 300.0
        return a

    write_ct_series(folder, [(-20.0, 13.0, 40.0 + 1.5 * k) for k in range(4)], hu, pixel_spacing=(0.8, 0.8), slice_thickness=1.5)
    return folder


def _tiny_lidc_model(tmp: Path) -> tuple[Path, Path]:
    """Weights of a tiny demo network and the config override that makes the CLI build it."""
    tiny = tmp / "tiny.json"
    tiny.write_text(json.dumps({"image_size": 32, "network_def#channels": [8, 16, 32], "network_def#norm_num_groups": 4}))
    parser = ConfigParser()
    b = REPO / "bundles" / "lidc"
    parser.read_config([str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json"), str(tiny)])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp / "model.pt")
    return tmp / "model.pt", tiny


@pytest.mark.slow
def test_inference_export_killed_mid_write(tmp_path: Path) -> None:
    """``python -m monai_hsrdiff.infer --overwrite`` SIGKILLed while writing ``samples.seg.nrrd``:
    the case folder still holds the previous complete case, byte for byte; re-running with
    ``--overwrite`` writes a complete case that readers load, and drops the killed run's leftover."""
    ct, out = _ct_series(tmp_path / "ct"), tmp_path / "case"
    ckpt, tiny = _tiny_lidc_model(tmp_path)
    cli = ["--bundle", str(REPO / "bundles/lidc"), "--config", str(REPO / "bundles/lidc/demo.json"), str(tiny),
           "--checkpoint", str(ckpt), "--input", str(ct), "--out", str(out), "--steps", "2", "--seed", "0",
           "--device", "cpu"]  # fmt: skip
    assert infer_main([*cli, "--num-samples", "2"]) == 0  # the previous case (2 samples)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(old) == CASE_FILES

    env = _one_thread(dict(os.environ))
    marker, log = tmp_path / "stalled", tmp_path / "a.log"
    inject = ["--target", "monai_hsrdiff.export.slicer:write_segmentation", "--match", r"samples\.seg\.nrrd$"]
    run = ["monai_hsrdiff.infer", *cli, "--num-samples", "4", "--overwrite"]
    proc = _start_stalling(inject, run, marker, log, env)
    partial = _kill_at_marker(proc, marker, log)

    work = partial.parent  # the killed run's work folder beside the case, never under its name
    assert work.parent == tmp_path and work.name.startswith(".case.") and work.name.endswith(".partial")
    assert sorted(p.name for p in work.iterdir()) == ["entropy.nii.gz", "mean_probability.nii.gz", "samples.seg.nrrd"]
    with pytest.raises(OSError, match="Failed to read segmentation"):  # half a segmentation does not load
        slicerio.read_segmentation(str(partial))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # the previous case, untouched
    killed_mean = nib.load(work / "mean_probability.nii.gz").get_fdata()  # complete before the stall

    res = subprocess.run([PYTHON, "-m", *run], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == CASE_FILES
    assert f"[hsrdiff] removing {work}: left by an interrupted write of case" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".case.")) == []  # leftover removed
    mean_nib = nib.load(out / "mean_probability.nii.gz").get_fdata()
    mean_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mean_probability.nii.gz")))
    assert mean_nib.shape == (40, 40, 4) and np.array_equal(np.transpose(mean_itk, (2, 1, 0)), mean_nib)
    assert np.array_equal(mean_nib, killed_mean)  # same seed, same samples as the killed run
    assert sitk.ReadImage(str(out / "entropy.nii.gz")).GetSize() == (40, 40, 4)
    seg = slicerio.read_segmentation(str(out / "samples.seg.nrrd"))
    masks = np.stack([slicerio.segment_mask(seg, s) for s in seg["segments"]])
    assert masks.shape == (4, 40, 40, 4) and np.allclose(masks.mean(0), mean_nib, atol=1e-6)
    assert slicerio.segment_names(slicerio.read_segmentation(str(out / "consensus.seg.nrrd"))) == ["consensus"]
    assert json.loads((out / "summary.json").read_text())["num_samples"] == 4
