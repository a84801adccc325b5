"""What a tracked run records about itself: its bundle config, data set, code version, model size,
and who started it from which command.

The config is handed over explicitly (:class:`~monai_hsrdiff.tracking.TrackingRun`'s ``config``:
the bundle command's merged config); nothing here looks for the running parser.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "bundle_config",
    "config_params",
    "count_parameters",
    "dataset_info",
    "dataset_input",
    "git_commit",
    "source_tags",
]

# sections that wire objects (handlers, transforms, run lists): logged in the config
# artifact, not as params, because they are code rather than settings
SKIP_SECTIONS = {"imports", "initialize", "training", "evaluating", "finalize", "run", "train", "validate", "_meta_"}
MAX_PARAM_VALUE = 500  # MLflow's historical limit; newer servers accept 6000
MAX_TAG_VALUE = 5000  # MLflow accepts 8000 characters per tag value
_KEY_BAD = re.compile(r"[^\w./\- ]")


def bundle_config(config: Mapping[str, Any]) -> dict:
    """A bundle run's merged config (all config files plus command-line overrides) as JSON-able
    data, expressions left as written."""
    return json.loads(json.dumps(dict(config), default=str))


def _scalar(v: Any) -> str | None:
    """A settings value as a param string, or None when it is an object (network, dataset, ...)."""
    import torch

    if v is None or isinstance(v, (bool, int, float, str)):
        return str(v)
    if isinstance(v, (Path, torch.device)):
        return str(v)
    if isinstance(v, (list, tuple)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return json.dumps(list(v))
    return None


def config_params(config: Mapping[str, Any], known: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Flatten a bundle run's settings into MLflow params.

    Every top-level key except the wiring sections (``train``, ``validate``, run lists) is
    included; nested dicts (e.g. ``network_def``) become ``network_def/channels``. An
    expression (``$...``) or reference (``@key``) is logged only when ``known`` (or, for
    ``@key``, the config itself) holds the value of the id it names (e.g. ``run_dir``, resolved
    by the tracking run) and the value is a setting rather than an object; nothing is evaluated
    for logging (the config artifact has every expression as written).

    Args:
        config: the merged config, {key: value as written}.
        known: {config id: resolved value} (ids written ``a#b``).

    Returns:
        {key: value string}, values cut to 500 characters.

    Example::

        config_params({"image_size": 32, "run_dir": "$f()", "network_def": {"channels": [8, 16]}},
                      known={"run_dir": "/runs/x"})
        # {'image_size': '32', 'run_dir': '/runs/x', 'network_def/channels': '[8, 16]'}
    """
    # "@key" of a key written as a plain value: that value
    known = {**{k: v for k, v in config.items() if not (isinstance(v, str) and v.startswith(("$", "@")))}, **(known or {})}
    out: dict[str, str] = {}

    def visit(key: str, node_id: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{key}/{k}", f"{node_id}#{k}", v)
            return
        if isinstance(value, str) and value.startswith(("$", "@")):
            # "@key" is the value of key; "$expr" the value of this id, when known
            ref = value[1:] if value.startswith("@") else node_id
            if ref not in known:
                return
            value_str = _scalar(known[ref])
            if value_str is None:  # an object (network, optimizer, ...), not a setting
                return
        else:
            value_str = _scalar(value)
            if value_str is None:  # lists of dicts and the like
                return
        if len(value_str) > MAX_PARAM_VALUE:
            value_str = value_str[: MAX_PARAM_VALUE - 3] + "..."
        out[_KEY_BAD.sub("_", key)[:250]] = value_str

    for k, v in config.items():
        if k not in SKIP_SECTIONS and not str(k).startswith("_"):
            visit(str(k), str(k), v)
    return out


def count_parameters(network: Any) -> int:
    """Number of parameters of ``network`` (DDP/EMA wrappers unwrapped)."""
    network = getattr(network, "module", network)
    return int(sum(p.numel() for p in network.parameters()))


def dataset_info(datalist: str | os.PathLike) -> dict[str, Any]:
    """Name, synthetic flag, task and split sizes from a prepared data set's ``datalist.json``."""
    doc = json.loads(Path(datalist).read_text())
    info: dict[str, Any] = {
        "dataset_name": doc.get("name", Path(datalist).parent.name),
        "dataset_synthetic": bool(doc.get("synthetic", False)),
        "dataset_path": str(Path(datalist).resolve().parent),
    }
    for split in ("training", "validation", "test"):
        if isinstance(doc.get(split), list):
            info[f"dataset_num_{split}"] = len(doc[split])
    if doc.get("description"):
        info["dataset_description"] = str(doc["description"])
    return info


def git_commit(path: str | os.PathLike | None = None) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: this package), or None
    when it is not a checkout or git is not installed."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status.strip())) if re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def source_tags(argv: Sequence[str] | None = None) -> dict[str, str]:
    """The run-context tags ``mlflow.start_run`` sets and ``MlflowClient.create_run`` does not.

    Without them the MLflow UI shows "Created by —" and "Source —". They come from MLflow's own
    context registry (``mlflow.user``, ``mlflow.source.type``, ...), with two changes for a
    ``monai.bundle`` command, whose script is MONAI's ``__main__.py``: ``mlflow.source.name`` is
    the first ``--config_file`` (absolute; the UI shows its file name) and ``hsrdiff.command`` the
    whole command line.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    from mlflow.tracking.context.registry import resolve_tags

    from monai_hsrdiff.config_check import command_config_files

    argv = list(sys.argv if argv is None else argv)
    tags = {k: str(v) for k, v in resolve_tags().items() if k != "mlflow.runName"}
    files = command_config_files(argv[1:]) if Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py") else []
    if files:
        tags["mlflow.source.name"] = str(Path(files[0]).resolve())
        tags["hsrdiff.command"] = shlex.join(["python", "-m", "monai.bundle", *argv[1:]])[:MAX_TAG_VALUE]
    return tags


def dataset_input(datalist: str | os.PathLike, context: str, info: Mapping[str, Any] | None = None) -> Any:
    """The prepared data set as an MLflow run input (the UI's "Datasets" of a run and column of the runs table).

    Name from ``datalist.json``, digest = the first 8 hex digits of its SHA-256 (a changed split
    shows as a new digest), source = the data folder, profile = the split sizes and the synthetic flag.

    Args:
        datalist: the data set's ``datalist.json``.
        context: what the run used it for (``mlflow.data.context``): "training", or the evaluated split.
        info: :func:`dataset_info` of ``datalist`` when the caller has it already (default: read it).

    Returns:
        an ``mlflow.entities.DatasetInput`` for ``MlflowClient.log_inputs``.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(datalist)
    info = dataset_info(path) if info is None else info
    profile = {k.removeprefix("dataset_"): v for k, v in info.items() if k.startswith("dataset_num_")}
    profile["synthetic"] = info["dataset_synthetic"]
    dataset = Dataset(
        name=str(info["dataset_name"]),
        digest=hashlib.sha256(path.read_bytes()).hexdigest()[:8],
        source_type="local",
        source=json.dumps({"uri": info["dataset_path"]}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
