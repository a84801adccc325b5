"""Datalist loading and the standard training / evaluation pipelines.

A datalist (``datalist.json``, written by every ``python -m preprocessing.*`` command) is
MONAI style: top-level ``training`` / ``validation`` / ``test`` lists of dicts whose
``"item"`` is a path relative to the datalist's folder, plus ``name``, ``synthetic`` and
``description``. Splits are by patient.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, DeleteItemsd

from monai_hsrdiff.errors import DatalistError, ItemFormatError

from .items import read_item_header
from .transforms import LoadHSRDiffItemd, RandAnnotationd, ScaleLabeld, joint_augmentations

__all__ = ["DatalistError", "check_items", "eval_transforms", "get_dataset", "load_datalist", "read_datalist", "train_transforms"]

# generic: the task-specific commands are in each task's ``prepare_command`` (Task.require_datalist)
_HOW_TO_MAKE = (
    "create it with a preprocessing command: `python -m preprocessing.demo --task TASK --out DIR` (synthetic demo "
    "data, no download), `python -m preprocessing.lidc` or `python -m preprocessing.ms_lesion` (docs/data_*.md)"
)


def read_datalist(datalist_path: str | os.PathLike) -> dict[str, Any]:
    """Read the whole datalist JSON (all splits and the top-level ``name``/``synthetic``/``description``)."""
    path = Path(datalist_path)
    if path.is_dir():
        path = path / "datalist.json"
    if not path.is_file():
        raise DatalistError(f"datalist not found: {path}; {_HOW_TO_MAKE}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatalistError(f"cannot read datalist {path}: {e}; re-run the preprocessing command that wrote it") from e
    if not isinstance(doc, dict):
        raise DatalistError(f"datalist {path} must be a JSON object with split lists, got {type(doc).__name__}")
    return doc


def load_datalist(datalist_path: str | os.PathLike, split: str = "training", check_files: bool = True) -> list[dict]:
    """Return the entries of one split with ``"item"`` resolved to an absolute path.

    Args:
        datalist_path: the ``datalist.json`` file, or the folder holding it.
        split: ``"training"``, ``"validation"`` or ``"test"`` (any list-valued key works).
        check_files: verify each listed item file exists (names the first missing one).

    Returns:
        list of dicts (copies of the datalist entries), ``item`` absolute.

    Raises:
        DatalistError: missing/unreadable datalist (says which command makes one),
            unknown split (lists the available ones), empty split, item file missing.

    Example::

        train = load_datalist("data/lidc_demo/datalist.json", "training")
        train[0]["item"]  # '/abs/path/data/lidc_demo/items/LIDC-IDRI-0001/....npz'
    """
    path = Path(datalist_path)
    if path.is_dir():
        path = path / "datalist.json"
    doc = read_datalist(path)
    splits = sorted(k for k, v in doc.items() if isinstance(v, list))
    if split not in doc or not isinstance(doc[split], list):
        raise DatalistError(f"datalist {path} has no split {split!r}; available splits: {splits}")
    entries = doc[split]
    if not entries:
        sizes = {s: len(doc[s]) for s in splits}
        raise DatalistError(
            f"datalist {path}: split {split!r} is missing or empty (it is empty; split sizes: {sizes}); with few "
            "patients, re-run the preprocessing with other --split-ratios or more patients"
        )
    base = path.parent.resolve()
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("item"), str) or not e["item"]:
            raise DatalistError(f"datalist {path}, split {split!r}, entry {i}: expected a dict with an 'item' path, got {e!r}")
        e = dict(e)
        item = Path(e["item"])
        e["item"] = str(item if item.is_absolute() else base / item)
        out.append(e)
    missing = [e["item"] for e in out if check_files and not Path(e["item"]).is_file()]
    if missing:
        more = f", and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatalistError(
            f"datalist {path}: {len(missing)} item file(s) of split {split!r} are missing (item file {missing[0]} "
            f"is missing{more}); re-run the preprocessing command (it resumes and rewrites missing patients)"
        )
    return out


def check_items(
    entries: Sequence[dict],
    split: str,
    in_channels: int | None = None,
    image_size: int | None = None,
    datalist: str | os.PathLike | None = None,
) -> None:
    """Check EVERY item of a split against the item format and the network, before a run starts.

    Only the zip directory and array headers are read (:func:`~monai_hsrdiff.data.read_item_header`;
    about 2 s per 10,000 items on 2 CPU cores, ``benchmarks/datalist_check.py``), so a truncated
    or mis-shaped 5th item stops the run at start-up instead of in its first epoch.

    Args:
        entries: the split's entries (:func:`load_datalist`), ``item`` absolute.
        split: the split's name, for the message.
        in_channels: the channel count the network expects (None: not checked).
        image_size: the image height and width the bundle expects (None: not checked).
        datalist: the datalist path, for the message.

    Raises:
        DatalistError: naming the split, the entry index and the item file of up to three
            failing items and how many fail in all.

    Example::

        check_items(load_datalist("data/demo_lidc", "training"), "training", in_channels=1, image_size=64)
    """
    problems: list[str] = []
    count = 0
    for i, e in enumerate(entries):
        path = e["item"]
        try:
            head = read_item_header(path)
        except ItemFormatError as err:
            why = str(err)
        else:
            c, h, w = head.image_shape
            if in_channels is not None and c != in_channels:
                why = (
                    f"{path}: image has {c} channel(s) but the network expects in_channels={in_channels}; "
                    f"set --in_channels {c} or use the data set this bundle was made for"
                )
            elif image_size is not None and (h, w) != (image_size, image_size):
                why = (
                    f"{path}: image is {h}x{w} but the bundle's image_size is {image_size}; "
                    f"set --image_size {h} or re-run preprocessing with --size {image_size}"
                )
            else:
                continue
        count += 1
        if len(problems) < 3:
            problems.append(f"  entry {i}: {why}")
    if count:
        where = f"datalist {datalist}, split {split!r}" if datalist else f"split {split!r}"
        more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
        raise DatalistError(
            f"{where}: {count} of {len(entries)} item(s) fail the start-up check:\n" + "\n".join(problems) + more + "\n"
            "  Re-run the preprocessing command that wrote them, or remove them from the datalist."
        )


def train_transforms(
    num_classes: int = 2,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.5,
    keep_masks: bool = False,
) -> Compose:
    """Training pipeline (Algorithm 1): load, pick one annotation, scale to {-1, +1}, augment.

    Args:
        num_classes: 2 for binary tasks (label (1, H, W)), >2 for one-hot (M, H, W).
        flip_prob: per-axis flip probability (see :func:`joint_augmentations`).
        rot90_prob: 90° rotation probability.
        keep_masks: also keep all (A, H, W) masks (unscaled, augmented with the image).

    Returns:
        ``Compose`` giving ``image`` (C, H, W) float32 and ``label`` (M, H, W) in {-1, +1},
        plus geometry, ``meta`` (JSON string) and ``annotation_index``.
        Seed it with ``.set_random_state(seed)``.
    """
    xs: list[Callable] = [
        LoadHSRDiffItemd(keys="item"),
        RandAnnotationd(keys="masks", label_key="label"),
        ScaleLabeld(keys="label", num_classes=num_classes),
    ]
    if not keep_masks:
        xs.append(DeleteItemsd(keys="masks"))
    xs += joint_augmentations(("image", "label", "masks"), flip_prob=flip_prob, rot90_prob=rot90_prob)
    return Compose(xs)


def eval_transforms(num_classes: int = 2, scale_masks: bool = True) -> Compose:
    """Evaluation pipeline: load and keep ALL annotations; no augmentation.

    Args:
        num_classes: 2 for binary tasks, >2 for one-hot multi-class.
        scale_masks: map ``masks`` to {-1, +1} (binary: (A, H, W); multi-class:
            (A, M, H, W)); if False they stay {0, 1} / class labels.

    Returns:
        ``Compose`` giving ``image`` (C, H, W), ``masks``, geometry and ``meta``.
    """
    xs: list[Callable] = [LoadHSRDiffItemd(keys="item")]
    if scale_masks:
        xs.append(ScaleLabeld(keys="masks", num_classes=num_classes))
    return Compose(xs)


def get_dataset(
    datalist: str | os.PathLike | Sequence[dict],
    split: str = "training",
    transforms: Callable | None = None,
    cache: bool = False,
    cache_rate: float = 1.0,
    num_workers: int | None = 0,
) -> Dataset:
    """MONAI ``Dataset`` (or ``CacheDataset``) over one split.

    Args:
        datalist: path of ``datalist.json`` (or its folder), or already-loaded entries.
        split: split name, used when ``datalist`` is a path.
        transforms: the pipeline; default :func:`train_transforms` for ``"training"``,
            :func:`eval_transforms` otherwise.
        cache: use ``CacheDataset`` (caches the deterministic prefix: loading, and for
            evaluation also scaling; the random annotation pick is never cached).
        cache_rate: fraction of items to cache.
        num_workers: workers for filling the cache.
    """
    data = list(datalist) if isinstance(datalist, Sequence) and not isinstance(datalist, str) else load_datalist(datalist, split)
    if transforms is None:
        transforms = train_transforms() if split == "training" else eval_transforms()
    if cache:
        return CacheDataset(data, transform=transforms, cache_rate=cache_rate, num_workers=num_workers, progress=False)
    return Dataset(data, transform=transforms)

