"""The helpers that the bundle configs call (the top of the package: only configs and command
lines import it): the paths (re-exported from :mod:`monai_hsrdiff.paths`), the start-up checks
(prepared data, a writable run folder, the command's keys and values), the dataset factory, and
the console report of what a run uses and what it measured.

Every check stops the run with one ``ERROR:`` line (:func:`monai_hsrdiff.errors.fail`, exit code
2) before anything is written.

Example (in ``bundles/lidc/train.json``)::

    "datalist": "$monai_hsrdiff.bundle.require_datalist(@dataset_dir, @task, ['training', 'validation'])"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai_hsrdiff.config_check import check_command, check_config_keys
from monai_hsrdiff.error_hook import install_error_hook
from monai_hsrdiff.errors import BundleError, DatalistError, InferenceInputError, fail
from monai_hsrdiff.paths import TASKS, bundle_root, check_task, default_dataset_dir, default_run_dir, repo_root

__all__ = [
    "TASKS",
    "BundleError",
    "announce",
    "bundle_modality",
    "bundle_root",
    "check_command_line",
    "check_config_keys",
    "default_dataset_dir",
    "default_item_spacing",
    "default_run_dir",
    "fail",
    "install_error_hook",
    "make_dataset",
    "report_metrics",
    "repo_root",
    "require_datalist",
    "require_writable",
]


def require_datalist(dataset_dir: str, task: str, splits: list[str] | tuple[str, ...] = ("training",)) -> str:
    """Return ``<dataset_dir>/datalist.json`` or stop with the commands that create it.

    Also checks (``data.load_datalist``) that each split in ``splits`` exists and is not empty,
    that its entries name item files, and that every item file it lists is there, before any
    long work starts.

    Example::

        require_datalist("data/demo_lidc", "lidc", ["training", "validation"])  # 'data/demo_lidc/datalist.json'
    """
    from monai_hsrdiff.tasks import get_task

    try:
        path = get_task(check_task(task)).require_datalist(dataset_dir, splits)
    except DatalistError as e:
        raise fail(str(e)) from e
    return str(path)


def require_writable(folder: str | Path, key: str = "run_dir") -> None:
    """Stop unless ``folder`` can be created/written (``monai_hsrdiff.utils.unwritable_reason``).
    Creates nothing, so a refused run leaves the disk as it was."""
    from monai_hsrdiff.utils import unwritable_reason

    reason = unwritable_reason(folder)
    if reason:
        raise fail(
            f"cannot write the {key} {Path(folder).absolute()}: {reason}. "
            f"Choose another folder with --{key} DIR (or move HSRDIFF_RUN_ROOT)."
        )


def announce(datalist: str, run_dir: str, network=None, datasets: dict | None = None) -> None:
    """Print what this run uses: data set (and whether its images are SYNTHETIC), run folder, model size.

    Also checks that the run folder can be written (:func:`require_writable`), before any work.
    ``datasets`` (split -> the :func:`make_dataset` it uses): building them checked every item.
    """
    from monai_hsrdiff.data import read_datalist

    require_writable(run_dir)
    doc = read_datalist(datalist)
    print(f"[hsrdiff] data: {doc.get('name', '?')} from {datalist}", flush=True)
    if doc.get("synthetic"):
        print(
            "[hsrdiff] NOTE: this data set is SYNTHETIC (demo images generated around real reader contours); "
            "its metrics say nothing about real CT/MRI.",
            flush=True,
        )
    for split in ("training", "validation", "test"):
        used = f" ({len(datasets[split])} used, checked)" if split in (datasets or {}) else ""
        print(f"[hsrdiff]   {split}: {len(doc.get(split, []))} items{used}", flush=True)
    if network is not None:
        n = sum(p.numel() for p in network.parameters())
        print(f"[hsrdiff] network: {type(network).__name__}, {n / 1e6:.2f}M parameters", flush=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        print(
            f"[hsrdiff] distributed: {dist.get_world_size()} processes ({dist.get_backend()}); "
            "this process (rank 0) writes checkpoints and logs",
            flush=True,
        )
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
    """The split's MONAI dataset, after checking EVERY item it uses (``data.check_items``: format,
    channels == ``in_channels``, size == ``image_size``; headers only), before any long work starts."""
    from monai_hsrdiff.data import check_items, get_dataset, load_datalist

    try:
        entries = load_datalist(datalist, split)
        if max_items is not None:
            entries = entries[: int(max_items)]
        check_items(entries, split, in_channels, image_size, datalist)
    except (FileNotFoundError, KeyError, ValueError) as e:  # DatalistError is a ValueError
        raise fail(str(e)) from e
    return get_dataset(entries, transforms=transforms, cache=cache)


def report_metrics(evaluator, eval_dir: str, split: str | None = None) -> dict:
    """Print the evaluator's metrics and write them to ``<eval_dir>/metrics.json`` (atomically).

    With ``split`` (evaluate.json: ``@eval_split``) each ``val_<metric>`` is also written as
    ``<split>_<metric>`` (``test_ged16``, ..., the names the MLflow evaluation run uses); the
    ``val_*`` keys stay as deprecated aliases of an evaluation's metrics.
    """
    from monai_hsrdiff.utils import atomic_write_text

    metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
    if split and split != "val":
        from monai_hsrdiff.tracking.handler import split_metric_names

        metrics.update(split_metric_names(metrics, split))
        print(f"[hsrdiff] metrics.json: the val_* keys are deprecated aliases of the {split}_* keys", flush=True)
    print("[hsrdiff] evaluation metrics:", flush=True)
    for k, v in sorted(metrics.items()):
        print(f"[hsrdiff]   {k} = {v:.4f}", flush=True)
    out = Path(eval_dir) / "metrics.json"
    atomic_write_text(out, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    print(f"[hsrdiff] metrics written to {out}", flush=True)
    return metrics


def check_command_line(task: str, argv: list[str] | None = None) -> None:
    """Start-up check of a ``python -m monai.bundle run ...`` command; the first ``initialize`` step.

    Installs the error hook (one ``ERROR:`` line instead of a traceback for errors in config
    resolution), then checks every key and value of the command's merged config against
    ``bundles/<task>``'s own config files (:func:`monai_hsrdiff.config_check.check_command`).

    Args:
        task: the bundle's task (``lidc`` or ``ms_lesion``).
        argv: the command line after the program name; default ``sys.argv[1:]`` when this
            process is the ``monai.bundle`` command line, else the check is skipped.
    """
    install_error_hook()
    check_command(task, argv)


def default_item_spacing(task: str) -> float | None:
    """The in-plane item spacing (mm) the task's model trains on (``monai_hsrdiff.tasks``): LIDC 0.5, MS None."""
    from monai_hsrdiff.tasks import get_task

    return get_task(task).item_spacing


def bundle_modality(bundle: str | os.PathLike) -> str | None:
    """The DICOM ``Modality`` the bundle's model takes: ``metadata.json`` ->
    ``network_data_format.inputs.image.modality`` (LIDC ``"CT"``); ``None`` without a metadata.json."""
    meta = Path(bundle) / "metadata.json"
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text())["network_data_format"]["inputs"]["image"].get("modality")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InferenceInputError(f"{meta}: cannot read network_data_format.inputs.image.modality ({type(e).__name__}: {e})") from e
    return None if value is None else str(value)
