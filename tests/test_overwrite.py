"""``--overwrite`` replaces only what the same command wrote before (issue 12, point 1).

Every case runs the real command in a subprocess (``python -m monai_hsrdiff.infer``,
``python -m preprocessing.demo``, ``python -m monai_hsrdiff.export.demo_case``) and asserts the
exit code, the message (the folder and the offending entries named, no ``Traceback``) and that
every file that was there before is byte-identical afterwards (:func:`tree` snapshots).

Refusals must come before any long work: the sampling progress line (``[hsrdiff] lidc: ...``)
never shows. Most infer refusals also pass a checkpoint path that does not exist, so the message
must be about ``--out``, not the checkpoint (read only after the output checks); the two headline
cases (an ``--out`` holding the input, an unrelated folder) pass a loadable checkpoint instead,
so that on the old code they really sample and then delete the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, TINY_NET, Result, bundle_files
from synthetic_dicom import write_ct_series
from test_bad_inputs import TINY_INFER, _state_dict, assert_unchanged, refused, tree

CASE_FILES = ["consensus.seg.nrrd", "entropy.nii.gz", "mean_probability.nii.gz", "samples.seg.nrrd", "summary.json"]
PROGRESS = "[hsrdiff] lidc:"  # printed by infer_case right before sampling starts


def _run(module: str, argv: list, cwd: Path = REPO, timeout: float = 120, **env_vars: str) -> Result:
    """``python -m module argv`` in ``cwd``; this checkout first on the path (cwd may be elsewhere)."""
    env = dict(os.environ, **env_vars, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([PYTHON, "-m", module, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny LIDC checkpoint + its config override, and a 3-slice 16x16 CT series."""
    tmp = tmp_path_factory.mktemp("overwrite_src")
    (tmp / "tiny.json").write_text(json.dumps(TINY_INFER))
    torch.save(_state_dict("lidc", TINY_INFER), tmp / "lidc.pt")
    write_ct_series(tmp / "ct", [(0, 0, z) for z in range(3)], lambda k: np.full((16, 16), -500.0))
    return tmp


def _infer(src: Path, inputs: Path, out, *extra, checkpoint: Path | None = None) -> list:
    b = REPO / "bundles" / "lidc"
    return ["--bundle", b, "--config", b / "demo.json", src / "tiny.json", "--checkpoint", checkpoint or src / "lidc.pt",
            "--input", inputs, "--out", out, "--num-samples", "1", "--steps", "1", "--device", "cpu", *extra]  # fmt: skip


def _refused_before_sampling(res: Result, *needles) -> None:
    refused(res.returncode, res.output, *needles)
    assert PROGRESS not in res.output and "checkpoint not found" not in res.output, res.output[-3000:]


def _series_copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in (src / "ct").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


# ------------------------------------------------------------------- monai_hsrdiff.infer: refusals


def test_infer_out_is_parent_of_input(src: Path, tmp_path: Path) -> None:
    """``--input P/ct --out P --overwrite`` deleted the DICOM series and every other file in P."""
    p = tmp_path / "P"
    ct = _series_copy(src, p / "ct")
    (p / "notes.txt").write_text("the patient's notes")
    before = tree(p)
    # a loadable checkpoint: the old code sampled, then swapped P for the case (the series and notes gone)
    res = _run("monai_hsrdiff.infer", _infer(src, ct, p, "--overwrite"))
    _refused_before_sampling(res, f"--out {p} contains the --input {ct}", "would replace the input")
    assert_unchanged(before, p)


def test_infer_out_inside_input(src: Path, tmp_path: Path) -> None:
    ct = _series_copy(src, tmp_path / "ct")
    before = tree(tmp_path)
    res = _run("monai_hsrdiff.infer", _infer(src, ct, ct / "case", "--overwrite", checkpoint=tmp_path / "missing.pt"))
    _refused_before_sampling(res, f"--out {ct / 'case'} lies inside the --input {ct}")
    assert_unchanged(before, tmp_path)
    assert not (ct / "case").exists()


def test_infer_overwrite_refuses_unrelated_folder(src: Path, tmp_path: Path) -> None:
    """``--out X --overwrite`` on a non-empty folder that is no inference case deleted it."""
    x = tmp_path / "X"
    (x / "thesis").mkdir(parents=True)
    (x / "thesis" / "chapter1.tex").write_text("years of work")
    (x / "summary.json").write_text('{"mine": true}')  # a case file name is not enough to make it a case
    before = tree(tmp_path)
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", x, "--overwrite"))  # old code: sampled, then deleted X
    _refused_before_sampling(res, f"--out {x} holds entries that monai_hsrdiff.infer did not write: thesis",
                             "nothing was deleted")  # fmt: skip
    assert_unchanged(before, tmp_path)
    # without --overwrite the message says that --overwrite would not help either
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", x, checkpoint=tmp_path / "missing.pt"))
    _refused_before_sampling(res, f"--out {x} already holds files that are not an inference case (thesis)")
    assert_unchanged(before, tmp_path)


def test_infer_out_is_cwd(src: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("kept")
    before = tree(work)
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", ".", "--overwrite", checkpoint=tmp_path / "missing.pt"), cwd=work)
    _refused_before_sampling(res, "--out . is the current directory", str(work))
    assert_unchanged(before, work)


def _top_level(folder: Path) -> dict[str, str]:
    """Names at the top of ``folder`` and the sha256 of each regular file there: a snapshot of the
    repository that other tests writing caches deeper down cannot disturb."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>" for p in folder.iterdir()}


def test_infer_out_is_repo_root(src: Path, tmp_path: Path) -> None:
    before = _top_level(REPO)
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", REPO, "--overwrite", checkpoint=tmp_path / "missing.pt"),
               cwd=tmp_path)  # fmt: skip
    _refused_before_sampling(res, f"--out {REPO} is the repository root")
    assert _top_level(REPO) == before


def test_infer_out_is_filesystem_root(src: Path, tmp_path: Path) -> None:
    before = sorted(os.listdir("/"))
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", "/", "--overwrite", checkpoint=tmp_path / "missing.pt"),
               cwd=tmp_path)  # fmt: skip
    _refused_before_sampling(res, "--out / is a file system root")
    assert sorted(os.listdir("/")) == before


def test_infer_dangling_symlink_out(src: Path, tmp_path: Path) -> None:
    """A dangling ``--out`` link was replaced by a real folder (the link lost); now refused up front."""
    link = tmp_path / "case"
    link.symlink_to(tmp_path / "nowhere")
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", link, checkpoint=tmp_path / "missing.pt"))
    _refused_before_sampling(res, f"--out {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist")
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "nowhere") and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


# ------------------------------------------------------------ monai_hsrdiff.infer: what it replaces


def test_infer_overwrite_replaces_own_case_and_keeps_mode(src: Path, tmp_path: Path) -> None:
    """A new case folder gets the umask mode (was mkdtemp's 0700); ``--overwrite`` of our own case
    replaces it and keeps the folder's mode (e.g. a group-shared 0o750)."""
    case = tmp_path / "case"
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", case, "--seed", "1"))
    assert res.returncode == 0, res.output[-3000:]
    assert stat.S_IMODE(case.stat().st_mode) == _umask_mode()
    doc = json.loads((case / "summary.json").read_text())
    assert doc["hsrdiff_output"]["writer"] == "monai_hsrdiff.infer" and doc["seed"] == 1
    case.chmod(0o750)
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", case, "--seed", "2", "--overwrite"))
    assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
    assert sorted(p.name for p in case.iterdir()) == CASE_FILES
    assert json.loads((case / "summary.json").read_text())["seed"] == 2
    assert stat.S_IMODE(case.stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]  # no .case.*.old / .partial left


def test_infer_overwrite_previous_release_case(src: Path, tmp_path: Path) -> None:
    """A case without the stamp (written by an earlier release: only the case files) is still
    replaced by ``--overwrite``; the same folder with one file of the user's beside it is not."""
    case = tmp_path / "case"
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", case))
    assert res.returncode == 0, res.output[-3000:]
    doc = json.loads((case / "summary.json").read_text())
    doc.pop("hsrdiff_output", None)  # what the earlier release wrote
    (case / "summary.json").write_text(json.dumps(doc))
    (case / "my_edits.seg.nrrd").write_bytes(b"a segmentation the user corrected in Slicer")
    before = tree(tmp_path)
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", case, "--overwrite", checkpoint=tmp_path / "missing.pt"))
    _refused_before_sampling(res, f"--out {case} holds entries that monai_hsrdiff.infer did not write: my_edits.seg.nrrd")
    assert_unchanged(before, tmp_path)
    (case / "my_edits.seg.nrrd").unlink()
    res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", case, "--seed", "3", "--overwrite"))
    assert res.returncode == 0, res.output[-3000:]
    doc = json.loads((case / "summary.json").read_text())
    assert doc["seed"] == 3 and doc["hsrdiff_output"]["writer"] == "monai_hsrdiff.infer"


def test_infer_symlinked_out_is_written_through(src: Path, tmp_path: Path) -> None:
    """``--out LINK`` (to a folder): the link stays, the case lands where it points (the link was replaced)."""
    target = tmp_path / "storage" / "case"
    target.mkdir(parents=True)
    link = tmp_path / "case"
    link.symlink_to(target)
    for extra in ((), ("--overwrite",)):  # into the empty target, then replacing that case through the link
        res = _run("monai_hsrdiff.infer", _infer(src, src / "ct", link, *extra))
        assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
        assert link.is_symlink() and Path(os.readlink(link)) == target
        assert sorted(p.name for p in target.iterdir()) == CASE_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case", "storage"]


# --------------------------------------------------------------------------- preprocessing.demo


def _demo(out, *extra) -> list:
    return ["--task", "ms_lesion", "--out", out, "--num-items", "3", "--size", "16", *extra]


def test_demo_overwrite_refuses_unrelated_folder(tmp_path: Path) -> None:
    """``preprocessing.demo --out Y --overwrite`` on an unrelated folder deleted it."""
    y = tmp_path / "Y"
    (y / "items").mkdir(parents=True)
    (y / "items" / "scan.dcm").write_bytes(b"DICM not ours")
    (y / "datalist.json").write_text('{"name": "my own study", "training": []}')  # our file names, not our content
    (y / "results.csv").write_text("a,b\n")
    before = tree(tmp_path)
    res = _run("preprocessing.demo", _demo(y, "--overwrite"))
    refused(res.returncode, res.output, f"--out {y} holds entries that preprocessing.demo did not write: datalist.json, items, results.csv",
            "nothing was deleted")  # fmt: skip
    assert "SYNTHETIC images" not in res.output  # refused before the build started
    assert_unchanged(before, tmp_path)


def test_demo_overwrite_replaces_own_build_and_refuses_cwd(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert _run("preprocessing.demo", _demo(out)).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == _umask_mode()  # not mkdtemp's 0700
    out.chmod(0o750)
    res = _run("preprocessing.demo", _demo(out, "--overwrite", "--seed", "5"))
    assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["seed"] == 5 and doc["hsrdiff_output"]["writer"] == "preprocessing.demo"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    before = tree(tmp_path)
    res = _run("preprocessing.demo", _demo(".", "--overwrite"), cwd=tmp_path)
    refused(res.returncode, res.output, "--out . is the current directory")
    assert_unchanged(before, tmp_path)


# ----------------------------------------------------------------- monai_hsrdiff.export.demo_case


def test_demo_case_refuses_unrelated_out(demo_data: Path, tmp_path: Path) -> None:
    """The demo export always passes overwrite: an unrelated ``--out`` must be refused before the
    SYNTHETIC source is written or the checkpoint read."""
    item = min((demo_data / "demo_lidc" / "items").rglob("*.npz"))
    x = tmp_path / "X"
    x.mkdir()
    (x / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    runs = tmp_path / "runs"
    res = _run("monai_hsrdiff.export.demo_case", ["--item", item, "--out", x, "--checkpoint", tmp_path / "missing.pt"],
               HSRDIFF_RUN_ROOT=str(runs))  # fmt: skip
    _refused_before_sampling(res, f"--out {x} holds entries that monai_hsrdiff.infer did not write: notes.txt")
    assert_unchanged(before, tmp_path)
    assert not runs.exists()  # not even the SYNTHETIC source volume


# --------------------------------------------------------------- bundle inference.json (same rule)


def test_bundle_inference_refuses_out_holding_input(run_bundle, src: Path, tmp_path: Path) -> None:
    """``monai.bundle run inference`` (``bundle_infer_case``): ``output_dir`` holding the input series
    is refused before the checkpoint is read, with ``overwrite`` true."""
    p = tmp_path / "P"
    ct = _series_copy(src, p / "ct")
    (p / "report.pdf").write_bytes(b"%PDF report")
    before = tree(p)
    res = run_bundle(["run", "inference", "--config_file", bundle_files("lidc", "train", "inference", "demo"), *TINY_NET,
                      "--input", str(ct), "--output_dir", str(p), "--overwrite", "True",
                      "--checkpoint", str(tmp_path / "missing.pt")])  # fmt: skip
    _refused_before_sampling(res, f"--out {p} contains the --input {ct}")
    assert "ERROR: " in res.stderr
    assert_unchanged(before, p)
    assert not (tmp_path / "runs").exists()
