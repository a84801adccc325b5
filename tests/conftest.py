"""Shared fixtures: tiny demo data sets built once per test session, and a runner for the
real ``python -m monai.bundle`` command line in a subprocess.

The demo data (32x32, 24 items per task) is built by the real ``python -m preprocessing.demo``
command into one folder shared by all pytest-xdist workers (a file lock makes the first
worker build it and the others wait), so the ~15 s it costs is paid once per session.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEMO_SIZE = 32
DEMO_ITEMS = 24

# Overrides that make any bundle run tiny: 32x32 images, a 3-level net of width 8/16/32,
# T=50, 3 training iterations per epoch, 2 validation items with 2 DDIM steps, no MLflow.
TINY_NET = [
    "--image_size", str(DEMO_SIZE),
    "--preset", "hsrdiff_light",
    "--network_def#channels", "[8,16,32]",
    "--network_def#attention_levels", "[False,False,True]",
    "--network_def#norm_num_groups", "8",
    "--network_def#num_res_blocks", "1",
    "--num_train_timesteps", "50",
    "--tracking_enabled", "False",  # MLflow has its own tests (test_mlflow.py); it costs seconds per run
]  # fmt: skip
TINY = [
    *TINY_NET,
    "--batch_size", "8",
    "--num_workers", "0",
    "--num_epochs", "1",
    "--val_interval", "1",
    "--val_num_samples", "16",
    "--val_sampling_steps", "2",
    "--val_max_items", "2",
]  # fmt: skip


def bundle_files(task: str, *names: str) -> str:
    """The ``--config_file`` value for ``bundles/<task>/<name>.json`` in order, e.g. ``('train', 'demo')``."""
    return repr([str(REPO / "bundles" / task / f"{n}.json") for n in names])


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """``<root>/data`` holding ``demo_lidc`` and ``demo_ms_lesion`` (32x32, 24 items each).

    Built by the real demo command; shared by xdist workers through a file lock.
    """
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is <session>/popen-gwN: share <session>
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    data = shared / "hsrdiff_demo_data"
    with open(shared / "hsrdiff_demo_data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for task in ("lidc", "ms_lesion"):
            out = data / f"demo_{task}"
            if not (out / "datalist.json").is_file():
                cmd = [PYTHON, "-m", "preprocessing.demo", "--task", task, "--out", str(out)]
                cmd += ["--size", str(DEMO_SIZE), "--num-items", str(DEMO_ITEMS)]
                subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
            doc = json.loads((out / "datalist.json").read_text())
            assert doc["image_size"] == DEMO_SIZE and doc["synthetic"] is True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return data


@pytest.fixture
def bundle_env(demo_data: Path, tmp_path: Path) -> dict[str, str]:
    """Environment of a bundle run: the shared demo data, a fresh run root under ``tmp_path``."""
    env = dict(os.environ)
    env["HSRDIFF_DATA_ROOT"] = str(demo_data)
    env["HSRDIFF_RUN_ROOT"] = str(tmp_path / "runs")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture
def run_bundle(bundle_env: dict[str, str]):
    """Run ``python -m monai.bundle <args>`` in a subprocess; returns a :class:`Result`.

    Example::

        res = run_bundle(["run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY])
    """

    def run(args: list[str], cwd: Path | str = REPO, timeout: float = 120, env: dict | None = None) -> Result:
        proc = subprocess.run(
            [PYTHON, "-m", "monai.bundle", *args],
            cwd=cwd,
            env=env or bundle_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run
