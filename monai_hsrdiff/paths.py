"""Where things are: the repository, the bundles, the run and data folders (as nnU-Net's ``paths.py``).

At the bottom of the package (it imports only :mod:`monai_hsrdiff.errors`), so the bundle
configs, the command lines and the library may all use it.

A bundle config cannot refer to its own file (``__file__`` is undefined in config
expressions), so paths are resolved from this package: with the checkout installed in editable
mode (what the README's commands do), :func:`repo_root` is the checkout and every run of
``bundles/<task>/*.json`` writes to ``<repo>/runs/<task>/`` whatever the working directory.
``HSRDIFF_RUN_ROOT`` and ``HSRDIFF_DATA_ROOT`` move the run and data folders; the bundle keys
``run_dir`` and ``dataset_dir`` override them per run.

Example::

    from monai_hsrdiff import paths

    paths.bundle_root("lidc")              # '<repo>/bundles/lidc'
    paths.default_run_dir("lidc", "demo")  # '$HSRDIFF_RUN_ROOT/lidc_demo', default '<repo>/runs/lidc_demo'
    paths.default_dataset_dir("lidc", demo=True)  # '<repo>/data/demo_lidc'
"""

from __future__ import annotations

import os
from pathlib import Path

from monai_hsrdiff.errors import fail

__all__ = ["TASKS", "bundle_root", "check_task", "default_dataset_dir", "default_run_dir", "repo_root"]

#: the data sets with a bundle folder ``bundles/<task>``
TASKS = ("lidc", "ms_lesion")


def repo_root() -> Path:
    """The checkout holding this package (``pyproject.toml`` beside it), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`, else stop the run (``errors.fail``) naming the known ones."""
    if task not in TASKS:
        raise fail(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return task


def bundle_root(task: str) -> str:
    """``<repo>/bundles/<task>``."""
    return str(repo_root() / "bundles" / check_task(task))


def default_run_dir(task: str, name: str = "") -> str:
    """``$HSRDIFF_RUN_ROOT/<task>[_<name>]``, default ``<repo>/runs/<task>[_<name>]``."""
    root = Path(os.environ.get("HSRDIFF_RUN_ROOT", repo_root() / "runs"))
    return str(root / (check_task(task) + (f"_{name}" if name else "")))


def default_dataset_dir(task: str, demo: bool = False) -> str:
    """``$HSRDIFF_DATA_ROOT/<task>`` (or ``demo_<task>``), default under ``<repo>/data``."""
    root = Path(os.environ.get("HSRDIFF_DATA_ROOT", repo_root() / "data"))
    return str(root / (("demo_" if demo else "") + check_task(task)))
