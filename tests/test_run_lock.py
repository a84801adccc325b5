"""One process per run folder (issue 12, point 3): a training or an evaluation holds an exclusive
``flock`` on ``<run_dir>/.run.lock`` for its whole life. A second one into the same folder is
refused at once, naming the folder and the holder's PID; a SIGKILLed holder's leftover lock file
blocks nobody (``--resume True`` continues its run); under ``torchrun`` rank 0 alone holds it
(``tests/test_distributed.py::test_torchrun_two_processes_gloo``).

The holder is a real training stalled inside its 2nd checkpoint write (``tests/fault_injection.py``),
so it is alive, holds the lock and has written checkpoint 1 when the others start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, TINY, TINY_NET, bundle_files
from test_bad_inputs import tree

INJECT = str(REPO / "tests" / "fault_injection.py")
TRAIN = ["monai.bundle", "run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY,
         "--ckpt_every_n_iterations", "1"]  # fmt: skip


def _run(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _refused_at_once(res: subprocess.CompletedProcess, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    assert "ERROR: " in res.stderr, out[-3000:]
    for n in needles:
        assert n in res.stderr, (n, res.stderr[-3000:])
    assert "Epoch: 1/" not in out and "Engine run resuming" not in out, out[-3000:]  # no training or sampling began


@pytest.mark.slow
def test_second_run_refused_while_first_holds_the_folder_then_resume_after_kill(bundle_env, tmp_path: Path) -> None:
    env = {**bundle_env, "OMP_NUM_THREADS": "1"}
    run_dir = Path(env["HSRDIFF_RUN_ROOT"]) / "lidc_demo"
    ckpts, lock = run_dir / "checkpoints", run_dir / ".run.lock"
    marker, log = tmp_path / "stalled", tmp_path / "holder.log"
    inject = ["--target", "torch:save", "--out-arg", "1", "--match", r"/checkpoints/tmp[a-z0-9_]{8}$", "--call", "2"]
    with open(log, "w") as f:
        holder = subprocess.Popen([PYTHON, INJECT, *inject, "--marker", str(marker), "--", *TRAIN],
                                  cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        end = time.monotonic() + 180
        while not marker.exists():  # stalled in its 2nd checkpoint write: checkpoint 1 is complete
            assert holder.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.05)
        before = tree(run_dir)
        assert "checkpoints/resume_checkpoint_1.pt" in before and ".run.lock" in before

        # 1. a second training into the same run folder, fresh or resuming: refused at once
        for extra in ([], ["--resume", "True"]):
            t0 = time.monotonic()
            res = _run([*TRAIN, *extra], env)
            _refused_at_once(res, f"the run folder {run_dir} is in use by PID {holder.pid}", "run training", "--run_name")
            assert time.monotonic() - t0 < 90  # start-up only: it does not wait for the holder
        # 2. an evaluation writing into the same run folder: refused too
        res = _run(["monai.bundle", "run", "evaluating", "--config_file", bundle_files("lidc", "train", "evaluate", "demo"),
                    *TINY_NET, "--eval_checkpoint", str(ckpts / "resume_checkpoint_1.pt")], env)  # fmt: skip
        _refused_at_once(res, f"the run folder {run_dir} is in use by PID {holder.pid}")
        assert tree(run_dir) == before  # the holder's checkpoints (and lock file) byte-identical
        assert holder.poll() is None
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)

    # 3. the killed holder left its lock file with a dead PID: it blocks nobody, --resume continues the run
    assert lock.read_text().split("\n")[0] == str(holder.pid)
    res = _run([*TRAIN, "--resume", "True"], env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"[resume] resuming from {ckpts / 'resume_checkpoint_1.pt'} (trainer iteration 1," in out
    assert (ckpts / "model.pt").is_file() and not lock.exists()  # released (and removed) at the end
