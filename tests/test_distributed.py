"""Multi-process training: ``torchrun --nproc_per_node=2 -m monai.bundle run training`` with
``multi_gpu_train.json`` on CPU (gloo), as the user would run it on K GPUs (NCCL); and a NaN in
one process's batch stopping every process (the trainer's loss vote)."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY, TINY_NET, bundle_files


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
    identical, and only rank 0 logs and writes checkpoints. Rank 0 holds the run folder's lock,
    rank 1 does not take it (and neither deadlocks nor refuses); the lock is gone at the end."""
    run_dir = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / "lidc_demo"
    weights = tmp_path / "weights"
    weights.mkdir()
    # extra finalize steps (test-only): each rank saves its weights, to compare them afterwards,
    # and records whether it holds the lock, its PID and the holder the lock file names
    finalize = [
        f"$torch.save(@network.module.state_dict(), '{weights}/rank' + str(dist.get_rank()) + '.pt')",
        f"$open('{weights}/lock' + str(dist.get_rank()), 'w').write(str(@run_lock.held) + ' ' + str(os.getpid()) + "
        "' ' + monai_hsrdiff.utils.RunLock(@run_dir).holder())",
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
    held0, pid0, *holder0 = (weights / "lock0").read_text().split(" ")
    held1, pid1, *holder1 = (weights / "lock1").read_text().split(" ")
    assert (held0, held1) == ("True", "False") and pid0 != pid1
    assert holder0[:2] == holder1[:2] == ["PID", pid0]
    assert not (run_dir / ".run.lock").exists()

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

    # both processes ran the trainer; only rank 0 announced the run and logged the epoch (StatsHandler:
    # the loss means over both ranks' iterations, one line per epoch)
    assert len(re.findall(r"HSRDiffTrainer - INFO - Engine run finished", out)) == 2
    assert out.count("[hsrdiff] run directory:") == 1
    assert "[hsrdiff] distributed: 2 processes (gloo)" in out
    assert len(re.findall(r"Epoch\[1\] Metrics -- train_kappa: [0-9.]+ train_loss: [0-9.]+ ", out)) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_nan_in_one_process_stops_both(bundle_env, tmp_path: Path) -> None:
    """A NaN pixel in rank 1's batch at iteration 2: the loss vote stops BOTH processes, each on
    its own, with the non-finite message and no traceback, before either takes the step.

    The two processes are started directly with the variables torchrun sets (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT): torchrun's agent would kill the survivor as soon as one process fails,
    hiding a process left hanging in the gradient all-reduce, which is what the vote prevents."""
    run_dir = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / "lidc_demo"
    ckpt = run_dir / "checkpoints" / "resume_checkpoint_1.pt"
    weights = tmp_path / "weights"
    weights.mkdir()
    multi = REPO / "bundles" / "lidc" / "multi_gpu_train.json"
    # test-only entries before the bundle's own "training" list: at the start of iteration 2 each
    # rank saves its weights, then rank 1 alone gets one NaN pixel in its image batch (ignite
    # fetches the batch before ITERATION_STARTED); at exit each rank saves its weights again
    rank = "str(dist.get_rank())"
    training = [
        "$from ignite.engine import Events",
        "$import atexit",
        (
            f"$@train#trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda e, net=@network.module, "
            f"path='{weights}/before' + {rank} + '.pt': torch.save(net.state_dict(), path))"
        ),
        (
            "$@train#trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda e: "
            "e.state.batch['image'][:1, :1, :1, :1].fill_(float('nan'))) if dist.get_rank() == 1 else None"
        ),
        (
            f"$atexit.register(lambda net=@network.module, path='{weights}/exit' + {rank} + '.pt': "
            "torch.save(net.state_dict(), path))"
        ),
        *json.loads(multi.read_text())["training"],
    ]
    cmd = [
        PYTHON, "-m", "monai.bundle", "run", "training",
        "--config_file", bundle_files("lidc", "train", "multi_gpu_train", "demo"),
        *_without(TINY, "--batch_size"), "--batch_size", "4", "--ckpt_every_n_iterations", "1",
        "--log_every_n_iterations", "1", "--training", repr(training),
    ]  # fmt: skip
    env = {**bundle_env, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    procs, logs = [], [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    for r in (0, 1):
        with logs[r].open("w") as log:
            rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    try:
        # start-up (imports, data, 2 processes on a busy machine) may be slow; once the first
        # process has exited, the other must follow promptly: a hang in the all-reduce never would
        end = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.1)
        end = time.monotonic() + 30
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.1)
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = [log.read_text() for log in logs]
    assert not hung, f"rank(s) {hung} still running; rank 0:\n{out[0][-3000:]}\nrank 1:\n{out[1][-3000:]}"

    for r, p in enumerate(procs):
        assert p.returncode == 1, f"rank {r} exited with {p.returncode}:\n{out[r][-4000:]}"
        assert "Traceback" not in out[r], f"rank {r}:\n{out[r][-4000:]}"
        assert f"the last good checkpoint is {ckpt}" in out[r], out[r][-4000:]
    # rank 1 saw the NaN itself; rank 0's own loss was finite, it stopped on the vote
    assert "ERROR: non-finite loss at epoch 1, iteration 2 (loss=nan" in out[1], out[1][-4000:]
    m = re.search(r"ERROR: non-finite loss in another process at epoch 1, iteration 2 \(loss=(\S+?),", out[0])
    assert m and math.isfinite(float(m.group(1))), out[0][-4000:]
    # iteration 1 ran and was logged (so the fault, not a start-up failure, stopped the run)
    assert re.search(r"Epoch: 1/1, Iter: 1/\d+ -- ", out[0]) and not re.search(r"Iter: 2/\d+ -- ", out[0])

    # neither rank stepped on the faulty iteration: each ends with its weights of iteration 1,
    # which are the same on both ranks and the ones in the checkpoint rank 0 wrote after it
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["network"]
    assert sorted(p.name for p in ckpt.parent.glob("*.pt")) == [ckpt.name]
    for r in (0, 1):
        before = torch.load(weights / f"before{r}.pt", weights_only=True)
        after = torch.load(weights / f"exit{r}.pt", weights_only=True)
        assert before.keys() == after.keys() == state.keys()
        for k in state:
            assert torch.equal(before[k], after[k]) and torch.equal(after[k], state[k]), (r, k)


def _eval_outputs(eval_dir: Path, preds: Path) -> tuple[dict, dict, dict]:
    """metrics.json, the per-item values of each ``*_raw.csv`` (sorted: the ranks' order differs)
    and the saved sample masks by item file name."""
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    raw = {}
    for csv in sorted(eval_dir.glob("*_raw.csv")):
        rows = [line.split("\t") for line in csv.read_text().splitlines()[1:] if line.strip()]
        raw[csv.name] = sorted(float(v) for row in rows for v in row[1:])
    masks = {p.name: torch.load(p, weights_only=True) for p in sorted(preds.glob("*.pt"))}
    return metrics, raw, masks


@pytest.mark.slow
def test_torchrun_evaluation_equals_one_process(bundle_env, run_bundle, tmp_path: Path) -> None:
    """multi_gpu_evaluate.json on 2 ranks (gloo) over 3 test items (uneven shards: 2 + 1) writes the
    metrics of the one-process evaluation: per-item seeds make each item's samples depend on the
    seed and the item only. Only rank 0 announces, reports and writes metrics.json."""
    run_dir = Path(bundle_env["HSRDIFF_RUN_ROOT"]) / "lidc_demo"
    res = run_bundle(["run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY], timeout=240)
    assert res.returncode == 0, res.output[-3000:]
    assert (run_dir / "checkpoints" / "model.pt").is_file()

    evaluate = json.loads((REPO / "bundles" / "lidc" / "evaluate.json").read_text())["evaluating"]
    multi = json.loads((REPO / "bundles" / "lidc" / "multi_gpu_evaluate.json").read_text())["evaluating"]
    # η = 1 DDIM: fresh noise at every step, the draws per-item seeding has to reproduce
    args = [*TINY_NET, "--eval_num_samples", "32", "--eval_sampler", "ddim", "--eval_sampling_steps", "3",
            "--eval_sampler_eta", "1.0", "--eval_max_items", "3"]  # fmt: skip

    def save_preds(folder: Path) -> list[str]:  # test-only: every item's 32 sample masks, by item file name
        folder.mkdir()
        return [
            "$from ignite.engine import Events",
            f"$@validate#evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: [torch.save(p.clone(), "
            f"'{folder}/' + os.path.basename(i) + '.pt') "
            "for p, i in zip(e.state.output['pred'], e.state.batch['item'])])",
        ]

    one = [*save_preds(tmp_path / "preds1"), *evaluate]
    res = run_bundle(
        ["run", "evaluating", "--config_file", bundle_files("lidc", "train", "evaluate", "demo"), *args,
         "--eval_dir", str(tmp_path / "eval1"), "--evaluating", repr(one)], timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.output[-3000:]

    two = [*save_preds(tmp_path / "preds2"), *multi]
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "evaluating",
        "--config_file", bundle_files("lidc", "train", "evaluate", "multi_gpu_evaluate", "demo"),
        *args, "--eval_dir", str(tmp_path / "eval2"), "--evaluating", repr(two),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**bundle_env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert len(re.findall(r"HSRDiffEvaluator - INFO - Engine run finished", out)) == 2  # both ranks evaluated
    assert out.count("[hsrdiff] run directory:") == out.count("[hsrdiff] evaluation metrics:") == 1  # rank 0 only
    assert not (run_dir / ".run.lock").exists()

    metrics1, raw1, masks1 = _eval_outputs(tmp_path / "eval1", tmp_path / "preds1")
    metrics2, raw2, masks2 = _eval_outputs(tmp_path / "eval2", tmp_path / "preds2")
    # the same samples of the same 3 items, drawn on 2 ranks
    assert len(masks1) == 3 and masks1.keys() == masks2.keys()
    for name in masks1:
        assert masks1[name].shape[0] == 32 and torch.equal(masks1[name], masks2[name]), name
    # the same per-item scores; the means add them up in the gathered (rank) order, which may
    # change the last float32 bit, hence 1e-6
    assert raw1.keys() == raw2.keys() and raw1
    for name in raw1:
        assert raw1[name] == raw2[name], name
    assert metrics1.keys() == metrics2.keys() and "test_ged32" in metrics1
    for name in metrics1:
        assert metrics2[name] == pytest.approx(metrics1[name], abs=1e-6), name


def test_per_item_generators_make_samples_independent_of_the_batch() -> None:
    """With one generator per image, an image's samples are the same sampled alone or in a batch
    (with any chunking): what a sharded evaluation relies on. Stochastic DDIM (η = 1)."""
    from monai_hsrdiff.diffusion import DDIMSampler, DiffusionSchedule, HSRDiffPipeline, SelfRegulatedDiffusion
    from monai_hsrdiff.engines.evaluator import item_seed
    from monai_hsrdiff.networks import HSRDiff

    torch.manual_seed(0)
    net = HSRDiff(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                  norm_num_groups=4, num_head_channels=8, num_res_blocks=1)  # fmt: skip
    process = SelfRegulatedDiffusion(DiffusionSchedule(20, beta_start=1e-3, beta_end=0.2))
    pipe = HSRDiffPipeline(net, DDIMSampler(process, eta=1.0, num_inference_steps=3))
    c = torch.randn(3, 1, 16, 16)

    def gens(ids):
        return [torch.Generator().manual_seed(item_seed(7, i)) for i in ids]

    batch = pipe(c, num_samples=4, generator=gens(["a", "b", "c"]), max_batch_size=None).samples
    chunked = pipe(c, num_samples=4, generator=gens(["a", "b", "c"]), max_batch_size=5).samples
    torch.testing.assert_close(chunked, batch, rtol=1e-5, atol=1e-5)
    for j, name in enumerate("abc"):  # alone, with the same item's generator: the same samples
        alone = pipe(c[j : j + 1], num_samples=4, generator=gens([name]), max_batch_size=None).samples
        torch.testing.assert_close(alone[0], batch[j], rtol=1e-5, atol=1e-5)
    other = pipe(c[:1], num_samples=4, generator=gens(["b"]), max_batch_size=None).samples
    assert (other[0] - batch[0]).abs().max() > 0.1  # the item's name does choose the noise
    with pytest.raises(ValueError, match="2 generators for 3 condition images"):
        pipe(c, num_samples=4, generator=gens(["a", "b"]))
    assert item_seed(0, "x.npz") == item_seed(0, "x.npz") != item_seed(1, "x.npz")
