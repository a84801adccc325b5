"""Multi-process training: ``torchrun --nproc_per_node=2 -m monai.bundle run training`` with
``multi_gpu_train.json`` on CPU (gloo), as the user would run it on K GPUs (NCCL)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY, bundle_files


def _without(args: list[str], *keys: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in keys:
            skip = True
            continue
        out.append(a)
    return out


@pytest.mark.slow
def test_torchrun_two_processes_gloo(bundle_env, demo_data: Path, tmp_path: Path) -> None:
    """2 ranks: each trains on its half of the data (DistributedSampler), DDP keeps their weights
    identical, and only rank 0 logs and writes checkpoints."""
    run_dir = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / "lidc_demo"
    weights = tmp_path / "weights"
    weights.mkdir()
    # an extra finalize step (test-only) saves each rank's weights, to compare them afterwards
    finalize = [
        f"$torch.save(@network.module.state_dict(), '{weights}/rank' + str(dist.get_rank()) + '.pt')",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ]
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training",
        "--config_file", bundle_files("lidc", "train", "multi_gpu_train", "demo"),
        *_without(TINY, "--batch_size"), "--batch_size", "4",
        "--finalize", repr(finalize),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=bundle_env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    # DistributedSampler: 17 items -> 9 per rank (padded to be evenly divisible) -> 3 batches of 4
    n_train = len(json.loads((demo_data / "demo_lidc" / "datalist.json").read_text())["training"])
    its = math.ceil(math.ceil(n_train / 2) / 4)
    assert its != math.ceil(n_train / 4), "the test needs a data size where sharding changes the epoch length"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["model.pt", f"resume_checkpoint_{its}.pt"]
    state = torch.load(run_dir / "checkpoints" / f"resume_checkpoint_{its}.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == its
    # saved unwrapped (no DDP "module." prefix), so single-process evaluation/resume can load it
    assert not any(k.startswith("module.") for k in state["network"])

    # DDP: both ranks trained on different shards, yet end with the same weights, equal to the checkpoint's
    rank0 = torch.load(weights / "rank0.pt", weights_only=True)
    rank1 = torch.load(weights / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == state["network"].keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], state["network"][k]), k

    # both processes ran the trainer; only rank 0 announced the run and logged iterations
    assert len(re.findall(r"HSRDiffTrainer - INFO - Engine run finished", out)) == 2
    assert out.count("[hsrdiff] run directory:") == 1
    assert "[hsrdiff] distributed: 2 processes (gloo)" in out
    for i in range(1, its + 1):
        assert len(re.findall(rf"Epoch: 1/1, Iter: {i}/{its} -- ", out)) == 1
