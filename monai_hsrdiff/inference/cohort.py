"""Many cases in one inference run: the model is loaded once, each case goes to ``<out>/<case id>/``.

A cohort is a case list (:func:`read_case_list`, a CSV file) or a folder of cases
(:func:`cases_under_root`, one series/case per sub-folder). :func:`run_cohort` runs the
single-case path (:func:`~monai_hsrdiff.inference.inferer.run_case`) on each with the one loaded
network, so every case folder holds exactly what a single-case run writes. A rerun skips the
finished cases (:func:`case_state`: the ``summary.json`` stamp of ``monai_hsrdiff.infer`` with all
its files present) and redoes a case a killed run left half-written; a folder holding anything
else is refused, never deleted. A failing case is reported and the others go on; ``<out>/cohort.json``
(written atomically at the end) lists every case's status, error, seconds and mean entropy.
While it runs, ``<out>/.cohort.lock`` (pid, host, start time; :mod:`~monai_hsrdiff.inference.cohort_lock`)
keeps a second run off the same folder: a live holder stops it at once (before the model loads),
the lock of a killed run (its pid gone on this host) is taken over with a message; it is removed
when the run ends, also when it fails.

The CSV (header row required; relative paths are relative to the CSV's folder)::

    id,input,slices,center,size,units,series_uid
    LIDC-0001,/data/LIDC-IDRI-0001/1.3.6.1.4/,,,,,
    LIDC-0002,/data/LIDC-IDRI-0002/1.3.6.1.4/,40:80,,,,
    ms01,ms/01/flair.nii.gz;ms/01/mprage.nii.gz;ms/01/pd.nii.gz;ms/01/t2.nii.gz,,,,,
    ms02,ms/02/,,60 80 90,32 32 20,voxel,

``id`` and ``input`` are required; ``input`` is one path (a DICOM series folder, a NIfTI file
or a folder of the MS-Lesion modalities) or several NIfTI paths separated by ``;`` (FLAIR MPRAGE
PD T2). The optional region columns are the single-case options: ``slices`` ``a:b``, or
``center`` and ``size`` (three numbers separated by spaces) in ``units`` ``voxel`` or ``mm``;
an empty cell keeps the command's option.

Example::

    cases = read_case_list("cases.csv")
    doc = run_cohort(cases, "runs/lidc/inference", reader, inferer, writer, checkpoint="model.pt")
    doc["totals"]   # {"ok": 2, "skipped": 0, "failed": 1, "cases": 3, "seconds": ..., "ok_cases_per_hour": ...}
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from monai_hsrdiff.errors import BundleError, InferenceInputError
from monai_hsrdiff.inference.cohort_lock import LOCK_FILE, CohortLockedError, refuse_live_lock
from monai_hsrdiff.utils.outputs import OutputLayout

__all__ = [
    "CASE_COLUMNS",
    "COHORT_FILE",
    "LOCK_FILE",
    "CohortCase",
    "CohortFailedError",
    "CohortLockedError",
    "case_state",
    "cases_under_root",
    "read_case_list",
    "refuse_live_lock",
    "run_cohort",
]

COHORT_FILE = "cohort.json"
CASE_COLUMNS = ("id", "input", "slices", "center", "size", "units", "series_uid")
_REGION_COLUMNS = ("slices", "center", "size", "units")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")  # a folder name on every file system; no hidden names


class CohortFailedError(SystemExit):
    """A cohort ran and some case failed (each was reported): exit code 1, ``doc`` = ``cohort.json``.

    A ``SystemExit``, so ``python -m monai.bundle`` exits with 1 without a traceback.
    """

    def __init__(self, doc: dict[str, Any]):
        super().__init__(1)
        self.doc = doc


@dataclass
class CohortCase:
    """One case of a cohort.

    Attributes:
        id: the case folder's name under the cohort folder.
        input: one path, or the NIfTI paths in channel order.
        slices, center, size, units: the case's region (``None``: the command's option).
        series_uid: the series to read when the DICOM folder holds several.
    """

    id: str
    input: str | list[str]
    slices: str | None = None
    center: list[float] | None = None
    size: list[float] | None = None
    units: Literal["voxel", "mm"] | None = None
    series_uid: str | None = None

    @property
    def has_region(self) -> bool:
        return self.slices is not None or self.center is not None


def _check_ids(cases: Sequence[CohortCase], where: str) -> None:
    seen: dict[str, int] = {}
    for n, case in enumerate(cases):
        if not _SAFE_ID.match(case.id) or case.id == COHORT_FILE:
            raise InferenceInputError(
                f"{where}: case id {case.id!r} cannot name a case folder; use letters, digits, '_', '-', '.' "
                f"(not starting with '.' or '-', and not {COHORT_FILE!r})"
            )
        if case.id in seen:
            raise InferenceInputError(f"{where}: case id {case.id!r} appears twice; each case needs its own id (its folder)")
        seen[case.id] = n
    if not cases:
        raise InferenceInputError(f"{where}: no case to run")


def _numbers(text: str, column: str, where: str) -> list[float]:
    parts = text.replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise InferenceInputError(f"{where}: {column} {text!r}: expected three numbers separated by spaces, e.g. '60 80 90'")
    return values


def read_case_list(path: str | os.PathLike) -> list[CohortCase]:
    """The cases of a CSV case list (the module docstring gives the columns).

    Raises:
        InferenceInputError: the file is missing or unreadable, lacks ``id``/``input``, has an
            unknown column, an empty id or input, a bad region value, or an id twice (names the
            file and line). Whether each input exists is checked when its case runs.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceInputError(f"--input-list {path}: no such file; pass a CSV with the columns {', '.join(CASE_COLUMNS)}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InferenceInputError(f"--input-list {path}: cannot read it as a CSV file ({type(e).__name__}: {e})") from e
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise InferenceInputError(f"--input-list {path}: empty; the first row names the columns ({', '.join(CASE_COLUMNS)})")
    header = [c.strip().lower() for c in rows[0]]
    unknown = [c for c in header if c not in CASE_COLUMNS]
    missing = [c for c in ("id", "input") if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        what = "; ".join(filter(None, [unknown and f"unknown column(s) {unknown}", missing and f"missing column(s) {missing}",
                                       len(set(header)) != len(header) and "a column twice"]))  # fmt: skip
        raise InferenceInputError(f"--input-list {path}: header {rows[0]}: {what}; the columns are {', '.join(CASE_COLUMNS)} (id and input required)")
    cases = []
    for line, row in enumerate(rows[1:], start=2):
        where = f"--input-list {path} line {line}"
        if len(row) > len(header):
            raise InferenceInputError(f"{where}: {len(row)} cells but {len(header)} columns (a path with a comma needs quotes)")
        cell = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(header)}
        if not cell["id"] or not cell["input"]:
            raise InferenceInputError(f"{where}: empty {'id' if not cell['id'] else 'input'}")
        paths = [p.strip() for p in cell["input"].split(";") if p.strip()]
        paths = [p if os.path.isabs(p) else str(path.parent / p) for p in paths]
        case = CohortCase(id=cell["id"], input=paths[0] if len(paths) == 1 else paths)
        if cell.get("slices"):
            case.slices = cell["slices"]
        if cell.get("center"):
            case.center = _numbers(cell["center"], "center", where)
        if cell.get("size"):
            case.size = _numbers(cell["size"], "size", where)
        if cell.get("units"):
            if cell["units"] not in ("voxel", "mm"):
                raise InferenceInputError(f"{where}: units {cell['units']!r}: expected voxel or mm")
            case.units = cell["units"]  # type: ignore[assignment]
        if (case.center is None) != (case.size is None):
            raise InferenceInputError(f"{where}: center and size go together (a box: its centre and its size)")
        if case.slices is not None and case.center is not None:
            raise InferenceInputError(f"{where}: give slices or center/size, not both")
        case.series_uid = cell.get("series_uid") or None
        cases.append(case)
    _check_ids(cases, f"--input-list {path}")
    return cases


def cases_under_root(root: str | os.PathLike) -> list[CohortCase]:
    """One case per (non-hidden) sub-folder of ``root``, id = the sub-folder's name, in name order.

    Raises:
        InferenceInputError: ``root`` is not a folder or has no sub-folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InferenceInputError(f"--input-root {root}: not a folder; pass the folder holding one sub-folder per case")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise InferenceInputError(f"--input-root {root}: no sub-folder; each case (a DICOM series or the NIfTI files of one MRI) needs its own")
    cases = [CohortCase(id=p.name, input=str(p)) for p in subs]
    _check_ids(cases, f"--input-root {root}")
    return cases


def case_state(folder: str | os.PathLike, layout: OutputLayout) -> Literal["new", "finished", "unfinished", "foreign"]:
    """What the cohort finds in a case folder whose writer writes ``layout`` (the case writer's ``layout``,
    ``monai_hsrdiff.export.slicer.CASE_LAYOUT``).

    ``finished``: the ``summary.json`` stamp of ``monai_hsrdiff.infer`` and every file it lists;
    ``unfinished``: only names a case of this command holds (e.g. a case whose files were
    partly deleted, or an empty folder): redone; ``foreign``: anything else: refused, never deleted.
    """
    from monai_hsrdiff.utils.outputs import read_stamp, unexpected_entries

    folder = Path(folder)
    if not folder.exists():
        return "new"
    if not folder.is_dir() or unexpected_entries(folder, layout):
        return "foreign"
    stamp = read_stamp(folder, layout.stamp_file)
    if stamp is not None and stamp["writer"] == layout.writer and all((folder / e).is_file() for e in stamp["entries"]):
        return "finished"
    return "unfinished"


def mean_entropy(folder: str | os.PathLike) -> float | None:
    """Mean of ``entropy.nii.gz`` (bits) over the predicted region of ``summary.json``; ``None`` if unreadable."""
    import nibabel as nib

    folder = Path(folder)
    try:
        region = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["region"]
        lo, hi = region["index_lo"], region["index_hi"]
        ent = np.asarray(nib.load(folder / "entropy.nii.gz").dataobj, dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    box = ent[tuple(slice(a, b + 1) for a, b in zip(lo, hi))]  # inclusive bounds (Region)
    return round(float(box.mean()), 6) if box.size else None


def _case_objects(case: CohortCase, folder: Path, reader: Any, writer: Any, redo: bool) -> tuple[Any, Any]:
    """Copies of the bundle's reader and writer for ``case``: its region and series, its folder."""
    r = copy.copy(reader)
    if case.has_region:  # the row's region replaces the command's
        r.slices, r.center, r.size = case.slices, case.center, case.size
        r.region_units = case.units or "voxel"
    elif case.units is not None:
        r.region_units = case.units
    if case.series_uid is not None:
        r.series_uid = case.series_uid
    w = copy.copy(writer)
    w.output_dir, w._instances = folder, None
    w.overwrite = bool(writer.overwrite or redo)
    return r, w


def _error_text(exc: BaseException) -> str:
    """The message of a case's failure: ours as it is (it names the file), others with their type."""
    from monai_hsrdiff.errors import HSRDiffInputError
    from monai_hsrdiff.inference.inferer import _user_error

    if isinstance(exc, BundleError):
        return exc.message
    inner = _user_error(exc) or exc
    return str(inner) if isinstance(inner, HSRDiffInputError) else f"{type(inner).__name__}: {inner}"


def run_cohort(
    cases: Sequence[CohortCase],
    out: str | os.PathLike,
    reader: Any,
    inferer: Any,
    writer: Any,
    checkpoint: str | os.PathLike | None = None,
    log: Any = print,
    err: Any = None,
) -> dict[str, Any]:
    """Run every case into ``out/<id>/`` with one loaded network; write ``out/cohort.json``; return it.

    Args:
        cases: :func:`read_case_list` or :func:`cases_under_root`.
        out: the cohort folder.
        reader, inferer, writer: the single case's objects (``inference.json``'s ``case_reader``,
            ``volume_inferer``, ``case_writer``); the reader and writer are copied per case, the
            inferer (its network) is shared.
        checkpoint: loaded ONCE into the inferer's network before the first case.
        log: progress sink (``None``: quiet); ``err``: where failures are reported (default stderr).

    Returns:
        the ``cohort.json`` document: ``cohort_dir``, ``settings`` (task, checkpoint, N, sampler, steps,
        eta, precision, seed), ``cases`` (id, input, output, status ``ok``/``skipped``/``failed``, error,
        seconds, mean_entropy_bits: the mean entropy in bits over the case's region) and ``totals``
        (cases, ok, skipped, failed, seconds, ok_cases_per_hour: from the ok cases' seconds).

    Raises:
        InferenceInputError: ``out`` is unusable (a file; is or contains an input, the working
            directory or the repository); :class:`~monai_hsrdiff.inference.cohort_lock.CohortLockedError`
            (an ``InferenceInputError``): another live run holds ``out/.cohort.lock``, raised before the
            checkpoint loads. BundleError: the checkpoint does not load. A case's own error is not
            raised: it is recorded and the next case runs.
    """
    import sys

    from monai_hsrdiff.inference.cohort_lock import take_lock
    from monai_hsrdiff.inference.inferer import load_weights, run_case
    from monai_hsrdiff.utils.atomic import atomic_write_text
    from monai_hsrdiff.utils.outputs import OutputFolderError, guard_output_path

    say = log or (lambda _m: None)
    report = err or (lambda m: print(m, file=sys.stderr, flush=True))
    inputs = [p for c in cases for p in ([c.input] if isinstance(c.input, str) else c.input)]
    try:
        root = guard_output_path(out, inputs)
    except OutputFolderError as e:
        raise InferenceInputError(str(e)) from None
    if root.exists() and not root.is_dir():
        raise InferenceInputError(f"--out {out} is a file; pass a folder for the cohort (one sub-folder per case)")
    lock = take_lock(root, say)  # before the model loads: a second run on this folder stops here
    try:
        t_start = time.perf_counter()
        if checkpoint is not None:
            load_weights(checkpoint, inferer, reader.task.name, say)
        summary = None if checkpoint is None else {"checkpoint": str(checkpoint)}  # as a single-case run records it
        rows: list[dict[str, Any]] = []
        for n, case in enumerate(cases, start=1):
            folder = root / case.id
            t0 = time.perf_counter()
            row: dict[str, Any] = {"id": case.id, "input": case.input, "output": str(folder), "status": "ok", "error": None}
            state = case_state(folder, writer.layout)
            if state == "finished" and not writer.overwrite:
                row["status"] = "skipped"
                say(f"[hsrdiff] case {n}/{len(cases)} {case.id}: finished earlier ({folder}), skipped")
            else:
                if state == "unfinished" and any(folder.iterdir()):
                    say(f"[hsrdiff] case {n}/{len(cases)} {case.id}: {folder} holds an unfinished case of this command: redone")
                say(f"[hsrdiff] case {n}/{len(cases)} {case.id}: {case.input}")
                r, w = _case_objects(case, folder, reader, writer, redo=state == "unfinished")
                try:
                    run_case(case.input, r, inferer, w, summary=summary, log=log)
                except (Exception, BundleError) as e:  # noqa: BLE001 - one case's failure must not stop the cohort
                    row.update(status="failed", error=_error_text(e))
                    report(f"error: case {case.id} ({case.input}): {row['error']}")
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["mean_entropy_bits"] = None if row["status"] == "failed" else mean_entropy(folder)
            rows.append(row)
        totals: dict[str, Any] = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        ok_s = sum(r["seconds"] for r in rows if r["status"] == "ok")
        totals.update(cases=len(rows), seconds=round(time.perf_counter() - t_start, 3),
                      ok_cases_per_hour=round(3600.0 * totals["ok"] / ok_s, 2) if ok_s > 0 else None)  # fmt: skip
        settings = {k: v for k, v in inferer.summary().items() if k != "kappa_trace_mean"}
        settings.update(task=reader.task.name, num_samples=inferer.num_samples, checkpoint=None if checkpoint is None else str(checkpoint))
        doc = {"cohort_dir": str(root), "settings": settings, "cases": rows, "totals": totals}
        atomic_write_text(root / COHORT_FILE, json.dumps(doc, indent=1) + "\n")
        say(f"[hsrdiff] cohort: {totals['ok']} ok, {totals['skipped']} skipped, {totals['failed']} failed -> {root / COHORT_FILE}")
    finally:
        lock.release()
    return doc
