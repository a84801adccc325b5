"""Kill and resume: training killed with SIGKILL (mid-iteration, then mid-validation) continues
from its last complete checkpoint with the same epoch/iteration counters and optimizer state;
a truncated newest checkpoint is skipped with a warning naming it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY, bundle_files

from monai_hsrdiff.handlers.checkpoint import latest_checkpoint, require_fresh_run

EPOCHS, BATCH = 2, 4
_STATS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- ")


def _args(*extra: str) -> list[str]:
    skip = {"--batch_size", "--num_epochs", "--val_sampling_steps", "--val_max_items"}
    tiny = [a for i, a in enumerate(TINY) if a not in skip and (i == 0 or TINY[i - 1] not in skip)]
    return [
        "run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *tiny,
        "--batch_size", str(BATCH), "--num_epochs", str(EPOCHS), "--ckpt_every_n_iterations", "1",
        "--log_every_n_iterations", "1",  # the per-iteration lines show where a resumed run starts
        "--val_max_items", "3", *extra,
    ]  # fmt: skip


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([PYTHON, "-m", "monai.bundle", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < end, "timed out waiting for the moment to kill the run"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _steps(ckpts: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in ckpts.glob("*.pt") if (m := re.match(r"resume_checkpoint_(\d+)\.pt$", p.name)))


def _first_logged_iteration(log: str) -> int:
    """Global iteration number of the first StatsHandler line of a run."""
    m = _STATS.search(log)
    assert m, log[-3000:]
    epoch, it, per_epoch = map(int, m.groups())
    return (epoch - 1) * per_epoch + it


@pytest.mark.slow
def test_kill_and_resume(bundle_env, tmp_path: Path) -> None:
    ckpts = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / "lidc_demo" / "checkpoints"

    # 1. killed mid-iteration, once a few per-iteration checkpoints exist
    proc = _start(_args("--val_sampling_steps", "2"), bundle_env, tmp_path / "a.log")
    _kill_when(proc, lambda: any(s >= 3 for s in _steps(ckpts)))
    steps = _steps(ckpts)
    assert len(steps) >= 2, steps  # n_saved=2: the previous complete checkpoint is kept as a fallback
    newest, previous = ckpts / f"resume_checkpoint_{steps[-1]}.pt", ckpts / f"resume_checkpoint_{steps[-2]}.pt"
    # damage the newest as a crash of a non-atomic writer (or the disk) would
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # and leave what an atomic write killed before its rename leaves
    (ckpts / "tmpab12cd34").write_bytes(b"partial")
    resumed_state = torch.load(previous, map_location="cpu", weights_only=True)["trainer"]

    # 2. resumed: skips the damaged newest, continues at the previous one; killed mid-validation
    proc = _start(_args("--resume", "True", "--val_sampling_steps", "30"), bundle_env, tmp_path / "b.log")
    _kill_when(proc, lambda: "HSRDiffEvaluator - INFO - Engine run resuming" in (tmp_path / "b.log").read_text())
    log = (tmp_path / "b.log").read_text()
    assert f"skipping damaged checkpoint {newest}" in log
    assert f"[resume] resuming from {previous} (trainer iteration {resumed_state['iteration']}," in log
    assert f"removing {ckpts / 'tmpab12cd34'}" in log and not (ckpts / "tmpab12cd34").exists()
    assert _first_logged_iteration(log) == resumed_state["iteration"] + 1
    per_epoch = resumed_state["epoch_length"]
    # validation starts after the epoch's last iteration, whose checkpoint is complete by then
    assert _steps(ckpts)[-1] == per_epoch
    assert "Epoch[1] Metrics -- val_" not in log  # the kill came before the first validation finished (the training epoch line has train_ keys)

    # 3. resumed again: from the end of epoch 1, to the end
    proc = _start(_args("--resume", "True", "--val_sampling_steps", "2"), bundle_env, tmp_path / "c.log")
    assert proc.wait(timeout=240) == 0, (tmp_path / "c.log").read_text()[-3000:]
    log = (tmp_path / "c.log").read_text()
    assert f"[resume] resuming from {ckpts / f'resume_checkpoint_{per_epoch}.pt'} (trainer iteration {per_epoch}," in log
    assert _first_logged_iteration(log) == per_epoch + 1
    assert f"Epoch: 2/{EPOCHS}, Iter: 1/" in log
    total = EPOCHS * per_epoch  # what an uninterrupted run does
    path, final = latest_checkpoint(ckpts)
    assert path.name == f"resume_checkpoint_{total}.pt"
    assert (final["trainer"]["iteration"], final["trainer"]["max_epochs"]) == (total, EPOCHS)
    # AdamW counted every step of all three runs: its state was restored at each resume
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {total}
    assert (ckpts / "model.pt").is_file()
    # n_saved=2 holds across the restarts: the earlier runs' checkpoints were counted and removed
    assert _steps(ckpts) == [total - 1, total]


def test_latest_checkpoint_skips_damaged(tmp_path: Path) -> None:
    """Newest-first; empty, truncated and non-checkpoint files are skipped with a warning naming them."""
    torch.save({"trainer": {"iteration": 2}}, tmp_path / "resume_checkpoint_2.pt")
    torch.save({"trainer": {"iteration": 10}}, tmp_path / "resume_checkpoint_10.pt")
    good = (tmp_path / "resume_checkpoint_10.pt").read_bytes()
    (tmp_path / "resume_checkpoint_11.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "resume_checkpoint_12.pt").write_bytes(b"")
    (tmp_path / "resume_checkpoint_x.pt").write_bytes(good)  # not ours: ignored
    with pytest.warns(UserWarning) as record:
        path, obj = latest_checkpoint(tmp_path)
    assert path.name == "resume_checkpoint_10.pt" and obj["trainer"]["iteration"] == 10  # 10 > 2 numerically
    named = " ".join(str(w.message) for w in record)
    assert "resume_checkpoint_12.pt" in named and "resume_checkpoint_11.pt" in named
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_fresh_run_refuses_existing_checkpoints(tmp_path: Path, capsys) -> None:
    require_fresh_run(tmp_path / "checkpoints")  # nothing there: fine
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "resume_checkpoint_7.pt")
    with pytest.raises(SystemExit) as e:
        require_fresh_run(tmp_path / "checkpoints")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "resume_checkpoint_7.pt" in err and "--resume True" in err and "--run_name" in err
