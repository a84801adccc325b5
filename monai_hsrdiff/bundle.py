"""Helpers the bundle configs call: where a bundle's data and run directory are, and the
start-up checks that stop a run at once with a message instead of a traceback.

A bundle config cannot refer to its own file (``__file__`` is undefined in config
expressions), so paths are resolved from this package: with the repository checkout
installed in editable mode (what the README's commands do), ``repo_root()`` is the checkout,
and every run of ``bundles/<task>/*.json`` writes to ``<repo>/runs/<task>/`` whatever the
working directory. ``HSRDIFF_RUN_ROOT`` and ``HSRDIFF_DATA_ROOT`` move them elsewhere; the
config keys ``run_dir`` and ``dataset_dir`` override them per run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = [
    "BundleError",
    "bundle_root",
    "default_dataset_dir",
    "default_run_dir",
    "fail",
    "repo_root",
    "require_datalist",
]

TASKS = ("lidc", "ms_lesion")


class BundleError(SystemExit):
    """Stops a bundle run with a one-paragraph message (exit code 2), no traceback.

    It derives from ``SystemExit`` because ``python -m monai.bundle`` prints a full
    traceback for ordinary exceptions raised inside config expressions.
    """

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> BundleError:
    """Print ``message`` to stderr (so it shows even when the caller catches nothing) and return the error."""
    print(f"\nERROR: {message}\n", file=sys.stderr, flush=True)
    return BundleError(message)


def repo_root() -> Path:
    """The checkout holding this package (``pyproject.toml`` beside it), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise fail(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return task


def bundle_root(task: str) -> str:
    """``<repo>/bundles/<task>``."""
    return str(repo_root() / "bundles" / _check_task(task))


def default_run_dir(task: str, name: str = "") -> str:
    """``$HSRDIFF_RUN_ROOT/<task>[_<name>]``, default ``<repo>/runs/<task>[_<name>]``."""
    root = Path(os.environ.get("HSRDIFF_RUN_ROOT", repo_root() / "runs"))
    return str(root / (_check_task(task) + (f"_{name}" if name else "")))


def default_dataset_dir(task: str, demo: bool = False) -> str:
    """``$HSRDIFF_DATA_ROOT/<task>`` (or ``demo_<task>``), default under ``<repo>/data``."""
    root = Path(os.environ.get("HSRDIFF_DATA_ROOT", repo_root() / "data"))
    return str(root / (("demo_" if demo else "") + _check_task(task)))


_PREPARE = {
    "lidc": "python -m preprocessing.lidc --dicom-root /path/to/LIDC-IDRI --out {d}",
    "ms_lesion": "python -m preprocessing.ms_lesion --root /path/to/ISBI2015 --out {d}",
}


def require_datalist(dataset_dir: str, task: str, splits: list[str] | tuple[str, ...] = ("training",)) -> str:
    """Return ``<dataset_dir>/datalist.json`` or stop with the commands that create it.

    Also checks that each split in ``splits`` exists and is not empty, and that every item
    file it lists is there, before any long work starts.
    """
    path = Path(dataset_dir) / "datalist.json"
    if not path.is_file():
        raise fail(
            f"no prepared {task} data: {path} does not exist.\n"
            f"  Prepare the real data set:  {_PREPARE[_check_task(task)].format(d=dataset_dir)}\n"
            f"  or build the synthetic demo: python -m preprocessing.demo --task {task} --out {dataset_dir}\n"
            f"  (or point the run at prepared data with --dataset_dir DIR)"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"{path} is not a readable datalist JSON: {e}") from e
    for split in splits:
        entries = doc.get(split)
        if not entries:
            raise fail(f"{path}: split {split!r} is missing or empty; re-run preprocessing with other --split-ratios")
        missing = [e["item"] for e in entries if not (path.parent / e["item"]).is_file()]
        if missing:
            raise fail(f"{path}: {len(missing)} item file(s) of split {split!r} are missing, e.g. {missing[0]}")
    return str(path)


def announce(datalist: str, run_dir: str, network=None) -> None:
    """Print what this run uses: data set (and whether its images are SYNTHETIC), run folder, model size."""
    doc = json.loads(Path(datalist).read_text())
    print(f"[hsrdiff] data: {doc.get('name', '?')} from {datalist}", flush=True)
    if doc.get("synthetic"):
        print(
            "[hsrdiff] NOTE: this data set is SYNTHETIC (demo images generated around real reader contours); "
            "its metrics say nothing about real CT/MRI.",
            flush=True,
        )
    for split in ("training", "validation", "test"):
        print(f"[hsrdiff]   {split}: {len(doc.get(split, []))} items", flush=True)
    if network is not None:
        n = sum(p.numel() for p in network.parameters())
        print(f"[hsrdiff] network: {type(network).__name__}, {n / 1e6:.2f}M parameters", flush=True)
    print(f"[hsrdiff] run directory: {run_dir}", flush=True)


def make_dataset(
    datalist: str,
    split: str,
    transforms,
    in_channels: int,
    image_size: int | None = None,
    max_items: int | None = None,
    cache: bool = False,
):
    """The split's MONAI dataset, after checking its first item against the network's input.

    Stops with a message naming the item file when its channel count differs from
    ``in_channels`` or its size from ``image_size``: before any long work starts.
    """
    from monai_hsrdiff.data import ItemFormatError, get_dataset, load_datalist, load_item

    try:
        entries = load_datalist(datalist, split)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise fail(str(e)) from e
    if max_items is not None:
        entries = entries[: int(max_items)]
    try:
        first = load_item(entries[0]["item"])
    except ItemFormatError as e:
        raise fail(str(e)) from e
    c, h, w = first["image"].shape
    if c != in_channels:
        raise fail(
            f"{entries[0]['item']}: image has {c} channel(s) but the network expects in_channels={in_channels}; "
            f"set --in_channels {c} or use the data set this bundle was made for"
        )
    if image_size is not None and (h, w) != (image_size, image_size):
        raise fail(
            f"{entries[0]['item']}: image is {h}x{w} but the bundle's image_size is {image_size}; "
            f"set --image_size {h} or re-run preprocessing with --size {image_size}"
        )
    return get_dataset(entries, transforms=transforms, cache=cache)


def report_metrics(evaluator, eval_dir: str) -> dict:
    """Print the evaluator's metrics and write them to ``<eval_dir>/metrics.json`` (atomically)."""
    from monai_hsrdiff.utils import atomic_write_text

    metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
    print("[hsrdiff] evaluation metrics:", flush=True)
    for k, v in sorted(metrics.items()):
        print(f"[hsrdiff]   {k} = {v:.4f}", flush=True)
    out = Path(eval_dir) / "metrics.json"
    atomic_write_text(out, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    print(f"[hsrdiff] metrics written to {out}", flush=True)
    return metrics
