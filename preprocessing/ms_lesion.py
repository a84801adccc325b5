"""ISBI-2015 longitudinal MS-Lesion (NIfTI) -> HSRDiff items and a patient-split datalist.

Input layout (the challenge's training data, as unpacked)::

    ROOT/training/trainingXX/preprocessed/trainingXX_YY_{flair,mprage,pd,t2}_pp.nii
    ROOT/training/trainingXX/masks/trainingXX_YY_mask{1,2}.nii

(patient = ``trainingXX``, time point = ``YY``; ``.nii.gz`` works too; ``ROOT`` may also be
the ``training`` folder itself). Per time point:

1. read the 4 modalities and 2 rater masks with nibabel; shapes and affines must agree;
   no NaN/inf voxels;
2. brain = voxels where any modality is > 0 (the ``_pp`` images are skull-stripped, the
   background is exactly 0); each modality is z-scored over the brain, outside set to 0;
3. the axial axis is the array axis whose direction is closest to the physical S axis
   (found from the affine, not assumed to be the last array axis). Slices are taken
   in DICOM display orientation: columns run towards patient Left (+x in LPS), rows
   towards Posterior (+y);
4. every axial slice with a lesion in either rater, plus ``round(empty_share × #lesion
   slices)`` lesion-free brain slices drawn with a seed derived from (seed, patient,
   time point);
5. resize to ``size``×``size`` with MONAI ``Resize`` (image: bilinear, align_corners=False,
   anti-aliased when shrinking; masks: nearest-exact, same pixel-centre mapping), and
   store ``item_to_index`` for that mapping and ``item_to_physical`` in LPS (the nibabel
   RAS affine with x and y negated).

One unit of work = one patient, built in a temporary folder and renamed when complete;
a re-run skips finished patients, ``--overwrite`` rebuilds them. ``--workers N`` builds
N patients at once (one process each); the output is the same for any N.

Example::

    python -m preprocessing.ms_lesion --root /data/ISBI2015 --out data/ms_lesion
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_hsrdiff.data.items import save_item
from monai_hsrdiff.io.geometry import LPS_FROM_RAS, SliceAxes, axial_axis, slice_axes, slice_item_to_index
from monai_hsrdiff.tasks.ms_lesion import MODALITIES, RATERS, MSLesionInputError, zscore_brain
from monai_hsrdiff.utils import STAMP_KEY, atomic_write_text, building_dir, replace_dir

from .common import (
    RunSummary,
    add_split_arguments,
    add_workers_argument,
    check_workers,
    run_patients,
    split_by_patient,
    write_datalist,
)
from .output_folder import (
    check_output_folder,
    converter_layout,
    foreign_item_files,
    remove_killed_unit_writes,
    require_out_folder,
)
from .ms_lesion_input import TimePoint, check_headers, find_time_points, read_volume, time_point_errors, volume_shape

__all__ = [
    "LAYOUT",
    "LPS_FROM_RAS",  # from monai_hsrdiff.io.geometry
    "MODALITIES",  # from monai_hsrdiff.tasks.ms_lesion, as RATERS, MSLesionInputError, zscore_brain
    "RATERS",
    "MSLesionInputError",
    "TimePoint",
    "axial_axis",
    "check_headers",
    "find_time_points",
    "main",
    "preprocess_ms_lesion",
    "slice_axes",
    "slice_item_to_index",
    "volume_shape",
    "zscore_brain",
]

MANIFEST = "unit.json"
PATIENT_FOLDER = r"training\d+"  # items/<patient>/ folder names
# What this converter writes into --out, and how its output of a release before stamps is recognised.
LAYOUT = converter_layout(
    "preprocessing.ms_lesion", "MS-Lesion data set",
    lambda doc: doc.get("name") == "ms_lesion" and doc.get("task") == "ms_lesion" and "settings" in doc,
    unit=r"training\d+", manifest=MANIFEST,
)  # fmt: skip

def _itk_geometry(affine_lps: np.ndarray) -> dict[str, list[float]]:
    cols = affine_lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    direction = cols / spacing
    return {
        "source_origin": affine_lps[:3, 3].tolist(),
        "source_spacing": spacing.tolist(),
        "source_direction": direction.reshape(-1).tolist(),
    }


def _time_point_items(
    tp: TimePoint, root: Path, size: int, empty_share: float, seed: int
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]]:
    """Build the (name, image, masks, item_to_index, item_to_physical, meta) of one time point."""
    with time_point_errors(tp):
        return _time_point_items_checked(tp, root, size, empty_share, seed)


def _time_point_items_checked(
    tp: TimePoint, root: Path, size: int, empty_share: float, seed: int
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]]:
    check_headers(tp)
    vols = np.stack([read_volume(tp.images[m]) for m in MODALITIES])  # (4, X, Y, Z)
    masks = np.stack([read_volume(tp.masks[r]) > 0 for r in RATERS])  # (2, X, Y, Z)
    affine_lps = LPS_FROM_RAS @ nib.load(tp.images["flair"]).affine

    vols, brain, by_file = zscore_brain(vols, [str(tp.images[m]) for m in MODALITIES])
    stats = dict(zip(MODALITIES, by_file.values()))

    axes = slice_axes(affine_lps)
    k_axis = axes[0]
    planes = SliceAxes(*axes).to_plane  # (C, X, Y, Z) -> (C, K, rows, cols), display orientation (as inference)
    img_p, mask_p, brain_p = planes(vols), planes(masks), planes(brain[None])[0]
    lesion = mask_p.any(axis=(0, 2, 3))
    lesion_slices = np.flatnonzero(lesion)
    free = np.flatnonzero(~lesion & brain_p.any(axis=(1, 2)))
    rng = np.random.default_rng([seed, zlib.crc32(tp.name.encode())])
    n_free = min(int(round(empty_share * len(lesion_slices))), len(free))
    chosen = sorted(lesion_slices.tolist() + rng.choice(free, size=n_free, replace=False).tolist())
    if not chosen:
        return []

    import torch  # with MONAI, imported here: a refused run does not pay seconds for them
    from monai.transforms import Resize
    from monai.utils import convert_to_numpy

    # one Resize call per time point: slices stacked along the channel axis
    img_in = torch.from_numpy(np.ascontiguousarray(img_p[:, chosen]).reshape(-1, *img_p.shape[2:]))
    msk_in = torch.from_numpy(np.ascontiguousarray(mask_p[:, chosen]).reshape(-1, *mask_p.shape[2:]).astype(np.float32))
    img_r = convert_to_numpy(Resize((size, size), mode="bilinear", align_corners=False, anti_aliasing=True)(img_in))
    msk_r = convert_to_numpy(Resize((size, size), mode="nearest-exact")(msk_in))
    img_r = img_r.reshape(len(MODALITIES), len(chosen), size, size).astype(np.float32)
    msk_r = (msk_r.reshape(len(RATERS), len(chosen), size, size) > 0.5).astype(np.uint8)

    shape = vols.shape[1:]
    base_meta = {
        "task": "ms_lesion",
        "synthetic": False,
        "patient": tp.patient,
        "time_point": tp.time_point,
        "source": tp.images["flair"].relative_to(root).as_posix(),
        "sources": {m: tp.images[m].relative_to(root).as_posix() for m in MODALITIES},
        "mask_sources": {r: tp.masks[r].relative_to(root).as_posix() for r in RATERS},
        "channels": [m.upper() for m in MODALITIES],
        "readers": list(RATERS),
        "slice_axis": k_axis,
        "source_size": list(shape),
        "zscore_mean_std": stats,
        "resize": {"image": "bilinear, align_corners=False, anti-aliased", "masks": "nearest-exact"},
        **_itk_geometry(affine_lps),
    }
    out = []
    for n, k in enumerate(chosen):
        i2i = slice_item_to_index(shape, axes, k, size)
        meta = dict(base_meta, slice_index=int(k), lesion=bool(lesion[k]))
        out.append((f"{tp.name}_s{k:03d}", img_r[:, n], msk_r[:, n], i2i, affine_lps @ i2i, meta))
    return out


def _settings(size: int, empty_share: float, seed: int) -> dict[str, Any]:
    return {"size": size, "empty_share": empty_share, "seed": seed}


def _finished(unit_dir: Path, settings: dict[str, Any]) -> list[dict] | None:
    """Datalist entries of a finished patient folder, or None if it must be (re)built."""
    manifest = unit_dir / MANIFEST
    if not manifest.is_file():
        return None
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    if doc.get("settings") != settings:
        raise MSLesionInputError(
            f"{unit_dir} was built with {doc.get('settings')}, this run asks {settings}; "
            "pass --overwrite to rebuild, or use another --out"
        )
    base = unit_dir.parent.parent
    if not all((base / e["item"]).is_file() for e in doc["entries"]):
        return None
    return doc["entries"]


def _build_patient(
    patient: str, tps: list[TimePoint], root: Path, out: Path, settings: dict[str, Any]
) -> list[dict]:
    """Build one patient's items in a temporary folder and rename it into place."""
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    final = items_dir / patient
    with building_dir(final, "tmp") as tmp:
        entries = []
        for tp in tps:
            for name, image, masks, i2i, i2p, meta in _time_point_items(
                tp, root, settings["size"], settings["empty_share"], settings["seed"]
            ):
                save_item(tmp / f"{name}.npz", image, masks, i2i, i2p, meta)
                entries.append(
                    {
                        "item": f"items/{patient}/{name}.npz",
                        "patient": patient,
                        "time_point": tp.time_point,
                        "slice_index": meta["slice_index"],
                        "lesion": meta["lesion"],
                        "num_annotations": len(RATERS),
                        "nonempty_annotations": int(masks.reshape(len(RATERS), -1).any(axis=1).sum()),
                    }
                )
        atomic_write_text(tmp / MANIFEST, json.dumps({"patient": patient, "settings": settings, "entries": entries}, indent=1))
        # --overwrite, or an unfinished folder: the old one is dropped, unless a file appeared in it meanwhile
        replace_dir(tmp, final, check=lambda p: foreign_item_files(p, MANIFEST))
    return entries


_WORKER: tuple | None = None  # (time points by patient, root, out, settings) of this process


def _start_ms_worker(patients: dict[str, list[TimePoint]], root: Path, out: Path, settings: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = (patients, root, out, settings)


def _build_in_worker(patient: str) -> list[dict]:
    patients, root, out, settings = _WORKER
    return _build_patient(patient, patients[patient], root, out, settings)


def preprocess_ms_lesion(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 128,
    empty_share: float = 0.1,
    seed: int = 0,
    split_ratios: Sequence[float] = (0.7, 0.1, 0.2),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    workers: int = 1,
    on_error: str = "raise",
) -> RunSummary:
    """Convert the ISBI-2015 training data under ``root`` into items + ``out/datalist.json``.

    Args:
        root: folder holding ``training/trainingXX/...`` (or the ``training`` folder).
        out: output folder (``items/<patient>/*.npz``, ``datalist.json``).
        size: item height = width in pixels.
        empty_share: lesion-free slices added per time point, as a fraction of its lesion
            slices (0.1 -> one lesion-free slice per ten lesion slices), >= 0.
        seed: seeds the lesion-free slice choice and the patient split.
        split_ratios: (training, validation, test) fractions of PATIENTS.
        overwrite: rebuild patients that are already finished. Either way ``out`` must be new,
            empty or this command's own output: anything else is refused, never deleted.
        log: progress sink (``[done/total] patient: status (elapsed, ETA)`` lines, the summary).
        workers: patients built at once, each in its own process
            (:func:`preprocessing.common.run_patients`); items, ``datalist.json`` and the
            summary are the same for any number.
        on_error: ``"raise"`` stops at the first bad patient (those already running finish
            and are kept); ``"skip"`` names it in the summary, leaves it out of the
            datalist and goes on.

    Returns:
        the run's :class:`RunSummary` (also logged).

    Raises:
        MSLesionInputError: missing/unreadable file, shape/affine mismatch, NaN voxels;
            patients finished before the error stay valid, the failing one leaves nothing.
    """
    root, out = Path(root), Path(out)
    check_workers(workers)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if size < 8:
        raise ValueError(f"--size must be >= 8, got {size}")
    if empty_share < 0:
        raise ValueError(f"--empty-share must be >= 0 (a fraction of the lesion slices), got {empty_share}")
    settings = _settings(size, float(empty_share), seed)
    out = check_output_folder(out, LAYOUT, overwrite, PATIENT_FOLDER, MANIFEST, inputs=[root])
    patients = find_time_points(root)
    items_dir = out / "items"
    # killed runs' leftovers (of any patient; a running build's are left alone) are never mistaken for finished
    remove_killed_unit_writes(items_dir, PATIENT_FOLDER, log=log)

    todo, done = [], {}
    for patient in patients:
        entries = None if overwrite else _finished(items_dir / patient, settings)
        if entries is None:
            todo.append(patient)
        else:
            done[patient] = entries
    for patient in todo:  # validate every header first, so a bad file stops the run before any work
        for tp in patients[patient]:
            check_headers(tp)

    summary = RunSummary()
    built, failed = run_patients(
        _build_in_worker, list(patients), done, workers, (MSLesionInputError,), on_error, log,
        lambda entries: f"already done, {len(entries)} items (resume; --overwrite rebuilds)",
        lambda p, entries: f"{len(entries)} items from {len(patients[p])} time points",
        initializer=_start_ms_worker, initargs=({p: patients[p] for p in todo}, root, out, settings),
        preload=("torch", "monai.transforms"),  # what _time_point_items imports: once, in the fork server
    )  # fmt: skip
    all_entries: list[dict] = []
    for patient in patients:  # the summary and the datalist in patient order, whatever the finishing order
        if patient in failed:
            summary.skip(patient, str(failed[patient]))
            continue
        entries = built[patient]
        if not entries:
            summary.skip(patient, "no lesion slice in any time point")
        all_entries += entries
        for e in entries:
            summary.add_item(e["nonempty_annotations"])
    with_items = sorted({e["patient"] for e in all_entries})
    summary.patients = len(with_items)
    splits = split_by_patient(with_items, split_ratios, seed)
    write_datalist(
        out,
        all_entries,
        splits,
        name="ms_lesion",
        synthetic=False,
        description=(
            f"ISBI-2015 longitudinal MS-Lesion: axial slices resized to {size}x{size}, channels FLAIR, MPRAGE, PD, T2 "
            "z-scored over brain voxels, 2 rater masks (mask1, mask2)"
        ),
        extra={"task": "ms_lesion", "channels": [m.upper() for m in MODALITIES], "num_annotations": len(RATERS), "settings": settings,
               STAMP_KEY: LAYOUT.stamp()},  # fmt: skip
    )
    log(f"datalist: {out / 'datalist.json'} ({', '.join(f'{s}: {len(p)} patients' for s, p in splits.items())})")
    log(summary.render())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocessing.ms_lesion", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="ISBI-2015 folder holding training/trainingXX/...")
    p.add_argument("--out", required=True, help="output folder (items/ and datalist.json)")
    p.add_argument("--size", type=int, default=128, help="item size in pixels (default 128)")
    p.add_argument("--empty-share", type=float, default=0.1, help="lesion-free slices per lesion slice (default 0.1)")
    add_split_arguments(p, seed_help="seed of the lesion-free slice choice and the split", overwrite_help="rebuild patients that are already finished")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="stop at, or skip, a bad patient")
    add_workers_argument(p)
    a = p.parse_args(argv)
    try:
        require_out_folder(a.out)
        preprocess_ms_lesion(
            a.root, a.out, a.size, a.empty_share, a.seed, a.split_ratios, a.overwrite, workers=a.workers, on_error=a.on_error
        )
    except (MSLesionInputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
