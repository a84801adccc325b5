"""Training throughput and peak memory: HSRDiff presets against a plain conditional DDPM of similar size.

Models (1-channel condition, 1-channel label, 128x128 by default):

- ``hsrdiff_light`` and ``hsrdiff``: one Algorithm-1 iteration = ``SelfRegulatedDiffusion.training_losses``
  (eps, x0 and kappa heads, L_d + L_u), backward, AdamW step;
- ``ddpm_light`` / ``ddpm``: MONAI's ``DiffusionModelUNet`` with the condition concatenated to
  x_t at the input (the CIMD-style baseline), eps prediction, MSE loss, widths chosen for a
  parameter count close to the matching preset (13.0M vs 13.6M, 96.3M vs 102.6M).

Each model is measured in its OWN subprocess, so that peak memory is that model's: on CPU the
peak is the process's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
reported as the increase over the RSS after imports and data creation (``tracemalloc`` does not
see PyTorch's allocator); on CUDA ``torch.cuda.max_memory_allocated``. Rounds are interleaved
(every model once per round, ``--rounds`` rounds) and the median iteration time is taken, so
load from other jobs on a shared machine hits all models alike; results are ratios against
``hsrdiff_light``. With CUDA available the same script reports images/s on the GPU.

Run::

    python benchmarks/training.py                      # CPU, 2 threads
    python benchmarks/training.py --device cuda --batch-size 16

Quick check (a test runs this)::

    python benchmarks/training.py --quick --out /tmp/t
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LIGHT_DEMO_NET, REPO_ROOT, command_line, machine_info, markdown_table, write_results  # noqa: E402

#: MONAI DiffusionModelUNet widths with a parameter count close to each HSRDiff preset (in=2, out=1).
DDPM_CHANNELS = {"ddpm_light": (32, 64, 128, 224), "ddpm": (64, 128, 320, 640), "ddpm_tiny": (16, 32, 64)}
MODELS = ("hsrdiff_light", "ddpm_light", "hsrdiff", "ddpm")


def _rss_kib() -> int:
    # current resident set size from /proc (Linux); ru_maxrss is the peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def build(name: str, quick: bool):
    """(model, step_fn(image, label)) for a model name."""
    from monai.networks.nets import DiffusionModelUNet

    from monai_hsrdiff.diffusion import SelfRegulatedDiffusion
    from monai_hsrdiff.networks import get_preset

    process = SelfRegulatedDiffusion()
    if name.startswith("hsrdiff"):
        net = get_preset(name, **(LIGHT_DEMO_NET if quick else {}))

        def loss_fn(image, label):
            return process.training_losses(net, label, image).loss

    else:
        quick_attn = (False, False, True)
        net = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=2,
            out_channels=1,
            channels=DDPM_CHANNELS["ddpm_tiny" if quick else name],
            attention_levels=quick_attn if quick else (False, False, True, True),
            num_res_blocks=1 if quick else 2,
            num_head_channels=32 if not quick else 16,
            norm_num_groups=8 if quick else 32,
            use_flash_attention=True,  # the same fused attention kernel HSRDiff uses by default
        )

        def loss_fn(image, label):
            t = torch.randint(0, process.num_timesteps, (label.shape[0],), device=label.device)
            noise = torch.randn_like(label)
            x_t = process.q_sample(label, t, noise)
            return torch.nn.functional.mse_loss(net(torch.cat([x_t, image], dim=1), t), noise)

    return net, loss_fn


def worker(name: str, size: int, batch: int, iterations: int, warmup: int, device: str, quick: bool, threads: int) -> dict:
    """Time ``iterations`` training iterations of one model after ``warmup`` (runs in a subprocess)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    image = torch.randn(batch, 1, size, size, device=dev)
    label = (torch.rand(batch, 1, size, size, device=dev) > 0.5).float() * 2 - 1
    rss0 = _rss_kib()
    net, loss_fn = build(name, quick)
    net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(image, label)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"name": name, "parameters": sum(p.numel() for p in net.parameters()), "seconds": times}
    if dev.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        out["peak_kind"] = "ru_maxrss - RSS before the model (CPU)"
    return out


def run(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)  # recorded in machine_info; the workers set their own
    per_model: dict[str, list[dict]] = {m: [] for m in args.models}
    for _ in range(args.rounds):
        for name in args.models:
            cmd = [sys.executable, __file__, "--worker", name, "--size", str(args.size), "--batch-size",
                   str(args.batch_size), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                   "--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
            if res.returncode != 0:
                raise RuntimeError(f"training benchmark worker {name!r} failed:\n{res.stderr[-3000:]}")
            per_model[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(name, per_model[name][-1]["seconds"], flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in per_model.items():
        sec = statistics.median(s for r in runs for s in r["seconds"])
        summary[name] = {"parameters": runs[0]["parameters"], "seconds_per_iteration": sec,
                         "iterations_per_s": 1 / sec, "images_per_s": args.batch_size / sec,
                         "peak_mib": max(r["peak_mib"] for r in runs), "peak_kind": runs[0]["peak_kind"]}  # fmt: skip
    ref = summary[args.models[0]]
    rows = [[name, f"{s['parameters'] / 1e6:.2f}M", f"{s['iterations_per_s']:.3f}", f"{s['images_per_s']:.2f}",
             f"{ref['seconds_per_iteration'] / s['seconds_per_iteration']:.2f}x", f"{s['peak_mib']:.0f}",
             f"{s['peak_mib'] / ref['peak_mib']:.2f}x"] for name, s in summary.items()]  # fmt: skip
    header = ["model", "params", "it/s", "images/s", f"speed vs {args.models[0]}", "peak MiB", f"memory vs {args.models[0]}"]
    where = "GPU " + torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} threads"
    md = (f"Batch {args.batch_size}, {args.size}x{args.size}, {where}; median of {args.rounds} interleaved rounds x "
          f"{args.iterations} iterations (after {args.warmup} warm-up per process). Peak memory: "
          f"{ref['peak_kind']}.\n\n" + markdown_table(header, rows))  # fmt: skip
    data = {"command": command_line(), "machine": machine_info(shared=args.shared), "settings": vars(args),
            "summary": summary, "runs": per_model}  # fmt: skip
    path = write_results(args.out, "HSRDiff training throughput and memory", md, data)
    print(path.read_text())
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32x32, tiny widths, batch 2, 1 iteration, 1 round")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shared", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/training_<device>)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.iterations, args.rounds = 32, 2, 1, 1
        args.models = ["hsrdiff_light", "ddpm_light"]
    args.out = args.out or str(REPO_ROOT / "benchmarks" / "results" / f"training_{args.device}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.size, args.batch_size, args.iterations, args.warmup, args.device, args.quick,
                     args.threads)  # fmt: skip
        print(json.dumps(res))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
