"""Sampling speed: the literal Algorithm 2 against our DDPM pipeline and strided DDIM, plus CPU tricks.

Variants, all for N samples of one image on ``hsrdiff_light`` (random weights: the cost of a
step does not depend on the weights):

(a) the paper's Algorithm 2 taken literally: one sample at a time, the network called with the
    condition IMAGE at every step (``model(x, t, condition=c)``, so E_c runs T·N times), 250 steps;
(b) :class:`~monai_hsrdiff.diffusion.HSRDiffPipeline` with :class:`DDPMSampler`: E_c once per
    image, the N samples in one batch, ``torch.inference_mode``, 250 steps;
(c) the same pipeline with :class:`DDIMSampler` (eta=0) at 25 / 50 / 100 steps;
(d) the same pipeline with SDE-DPM-Solver++(2M) (:class:`DPMSolverSampler`, eta=1) at ``--dpm-steps``
    (10: the bundles' validation and inference default).

Each runs in fp32, fp32 + ``torch.compile``, bf16 autocast + channels-last, bf16 weights +
channels-last, and the latter compiled; a table gives each one's FLOP/s as a fraction of its
precision's matmul peak, measured in the same run with the CPU model printed (issue 17 item 4).

Full-length runs at 128x128 take hours on 2 CPU cores, so each variant is timed over
``--timed-steps`` steps (interleaved with the others, ``--repeats`` rounds, median) and the
time per image is extrapolated linearly to the step count: (a) and (b) run a DDPM over a
``--timed-steps``-step schedule (same network, same per-step work), (c) a DDIM over the real
T=250 schedule with ``--timed-steps`` steps. The per-step cost is the same at every t, so
the extrapolation is exact up to timing noise; for (b) and (c) it slightly overcounts E_c.

Also measured: that (a) and (b) give the same samples for the same noise (a short run),
bf16 autocast, channels-last, ``torch.compile``, 1 vs 2 threads, the two decoders batched by
``torch.func.vmap``, FLOPs per image-step (``torch.utils.flop_counter``) and the achieved
FLOP/s against large fp32 / bf16 matrix products timed in the same run; and, with
``--checkpoint`` (a model written by ``benchmarks/quality.py``), GED16 of DDIM 25/50/100 and of
bf16 against DDPM-250 on demo test items.

``--ged-table`` runs only the few-step quality table of issue 17: GED16, HM-IoU16 and MDM16 of
DDIM eta=1, DPM-Solver++(2M) and its SDE at ``--ged-steps`` against DDPM-250 over
``--ged-items`` test items x ``--ged-seeds`` noise seeds, each as the paired difference with a 95 %
bootstrap CI, the network calls per sample counted, and issue 17's targets checked per row.

Run::

    python benchmarks/sampling.py --checkpoint runs/bench_quality_32/srdiff_s0.pt
    python benchmarks/sampling.py --ged-table --checkpoint runs/lidc_tune60/checkpoints/model.pt \
        --bundle-config bundles/lidc/train.json bundles/lidc/demo.json --ged-data data/demo32 --ged-items 24 \
        --threads 1 --out benchmarks/results/sampling_quality_demo32

Quick check (a test runs this; the second with random weights, 16x16 demo data and a T=10 DDPM)::

    python benchmarks/sampling.py --quick --out /tmp/s
    python benchmarks/sampling.py --quick --ged-table --threads 1 --out /tmp/q
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    LIGHT_DEMO_NET,
    REPO_ROOT,
    command_line,
    flop_counter,
    interleaved_medians,
    machine_info,
    markdown_table,
    paired_bootstrap_ci,
    write_results,
)
from benchmarks.vmap_decoders import VmapDecoders, forward_vmap_decoders  # noqa: E402
from monai_hsrdiff.diffusion import DDIMSampler, DDPMSampler, DiffusionSchedule, HSRDiffPipeline, SelfRegulatedDiffusion  # noqa: E402
from monai_hsrdiff.diffusion import DPMSolverSampler, get_sampler  # noqa: E402
from monai_hsrdiff.diffusion.process import randn  # noqa: E402
from monai_hsrdiff.networks import get_preset  # noqa: E402

T = 250


def literal_algorithm2(model, condition: torch.Tensor, num_samples: int, process: SelfRegulatedDiffusion,
                       generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """(a) Paper Algorithm 2 as printed: per sample, per step, the network sees the condition image.

    The noise is drawn in the order :class:`HSRDiffPipeline` draws it (x_T for all N, then one
    (N, ...) draw per step with t > 0), so both give the same samples for the same generator.

    Returns:
        (N, M, *spatial) samples.
    """
    sampler = DDPMSampler(process)
    sampler.set_timesteps()
    shape = (num_samples, int(model.out_channels), *condition.shape[2:])
    x_all = randn(shape, generator, condition.device, condition.dtype)
    noises = {int(t): randn(shape, generator, condition.device, condition.dtype) for t in sampler.timesteps if int(t) > 0}
    out = []
    with torch.no_grad():
        for i in range(num_samples):
            x = x_all[i : i + 1]
            for t in sampler.timesteps:
                t_b = torch.full((1,), int(t), dtype=torch.long)
                pred = model(x, t_b, condition=condition)  # E_c inside, every step
                x = sampler.step(pred, int(t), x, noise=noises[int(t)][i : i + 1] if int(t) > 0 else None).prev_sample
            out.append(x)
    return torch.cat(out)


def pipeline_samples(pipe: HSRDiffPipeline, condition, num_samples, generator) -> torch.Tensor:
    """(b)/(c) one call of the sampling object (its sampler's steps, precision, chunking); (N, M, *spatial)."""
    with torch.inference_mode():
        return pipe(condition, num_samples=num_samples, generator=generator).samples[0]


def encode_once(model, condition: torch.Tensor) -> None:
    """E_c alone, as the pipeline runs it once per image."""
    with torch.inference_mode():
        model.encode_condition(condition)


def pipeline_configs(model, args) -> dict[str, HSRDiffPipeline]:
    """How (b), (c) and (d) run: name -> an HSRDiffPipeline with that precision and compile setting
    (the product's own options; its sampler is set per row). fp32 eager always; then what is asked for."""
    configs = {"fp32": HSRDiffPipeline(model, None)}
    if args.compile:  # inductor with freezing: weights become constants that oneDNN pre-packs (inference only)
        configs["fp32 + torch.compile"] = HSRDiffPipeline(model, None, compile=True)
    if args.bf16:
        # precision "bfloat16": autocast (fp32 weights cast at every call) on the pipeline's channels-last copy
        configs["bf16 + channels-last"] = HSRDiffPipeline(model, None, "bfloat16")
        # precision "bfloat16-true": a bf16 channels-last copy, nothing cast per call, GroupNorm/SiLU in bf16
        configs["bf16 weights + channels-last"] = HSRDiffPipeline(model, None, "bfloat16-true")
        if args.compile:  # inductor fuses GroupNorm + SiLU + add, the memory-bound half of a bf16 step
            configs["bf16 weights + channels-last + torch.compile"] = HSRDiffPipeline(model, None, "bfloat16-true", compile=True)
    return configs


def with_sampler(pipe: HSRDiffPipeline, sampler) -> HSRDiffPipeline:
    """``pipe`` set to draw with ``sampler`` (one pipeline per config, so a compiled copy is compiled once)."""
    pipe.sampler = sampler
    return pipe


def precision_of(config: str) -> torch.dtype:
    """The matmul peak a :func:`pipeline_configs` entry is held to: bf16 for the bf16 ones, else fp32."""
    return torch.bfloat16 if config.startswith("bf16") else torch.float32


#: the precisions whose matmul peak each timing round measures, and the products per round (~0.5 s in fp32)
PEAK_DTYPES = (torch.float32, torch.bfloat16)
MATMULS_PER_ROUND = 5


def matmul_round(n: int, dtype: torch.dtype, products: int = MATMULS_PER_ROUND) -> tuple[Any, float]:
    """A callable doing ``products`` n×n @ n×n products (one entry of :func:`interleaved_medians`), and its FLOPs."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

    def run() -> None:
        for _ in range(products):
            a @ b

    return run, products * 2.0 * n**3


def matmul_peak(n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of an n×n @ n×n product (median of repeats, after one untimed product)."""
    run, flops = matmul_round(n, dtype, products=1)
    return flops / interleaved_medians({"matmul": run}, repeats=repeats, warmup=1)["matmul"]


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` (convolutions, linears and attention: :func:`~benchmarks.common.flop_counter`)."""
    with flop_counter() as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def load_trained(args) -> tuple[torch.nn.Module, int, Path, SelfRegulatedDiffusion]:
    """The trained network of ``--checkpoint`` (eval mode), its image size, its demo datalist and process.

    A bundle run's ``model.pt`` (a state dict) is rebuilt from ``--bundle-config`` (network_def,
    image_size and the ``diffusion`` process the bundle trained and samples with); a
    ``benchmarks/quality.py`` checkpoint carries its network overrides and size.
    """
    if args.bundle_config:  # a bundle run's model.pt (a state dict); the network from the bundle configs
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(args.bundle_config)
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        size = int(parser.get_parsed_content("image_size"))
        process = parser.get_parsed_content("diffusion")
        datalist = Path(args.ged_data or REPO_ROOT / "data" / "demo_lidc") / "datalist.json"
    else:  # a benchmarks/quality.py checkpoint: weights, network overrides, image size
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        net = get_preset("hsrdiff_light", in_channels=1, out_channels=1, **ckpt["config"])
        net.load_state_dict(ckpt["state_dict"])
        size = int(ckpt["size"])
        process = SelfRegulatedDiffusion()
        datalist = Path(args.ged_data or REPO_ROOT / "data" / f"bench_demo_lidc_{size}") / "datalist.json"
    if not datalist.is_file():
        raise SystemExit(f"sampling: no demo datalist at {datalist}; pass --ged-data <folder with datalist.json>")
    return net.eval(), size, datalist, process


def ged_check(args, rows: list, data: dict) -> None:
    """GED16 of DDIM 25/50/100 (fp32) and bf16 variants against DDPM-250 on a trained checkpoint."""
    from benchmarks.quality import load_eval_items, score
    from monai_hsrdiff.engines.evaluator import samples_to_masks

    net, size, datalist, process = load_trained(args)
    images, masks = load_eval_items(datalist, args.ged_items)
    if args.ged_variants:
        specs = args.ged_variants
    else:  # DDPM-250, deterministic DDIM at each step count, DDIM at the middle count under bf16
        specs = ["ddpm", *(f"ddim:{st}" for st in args.ddim_steps), f"ddim:{args.ddim_steps[1]}:0:bf16"]
        specs += ["ddpm:bf16"] if args.ged_bf16_ddpm else []
    res = {}
    if args.ged_reference:  # DDPM-250 of an earlier run on the same checkpoint, items and seed
        res["DDPM 250"] = json.loads(Path(args.ged_reference).read_text())["ged_check"]["results"]["DDPM 250"]
    for spec in specs:
        name, smp, precision = _ged_variant(spec, process)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe = HSRDiffPipeline(net, smp, autocast_dtype=precision)
            out = pipe(images, num_samples=16, generator=torch.Generator().manual_seed(7))
        r = score(samples_to_masks(out.samples.float()).numpy(), masks)
        r["seconds"] = time.perf_counter() - t0
        res[name] = r
        print(name, r, flush=True)
    if "DDPM 250" not in res:
        raise SystemExit("the GED16 comparison needs DDPM 250: add 'ddpm' to --ged-variants or give --ged-reference")
    ref = res["DDPM 250"]["ged_16"]
    for name, r in res.items():
        rel = (r["ged_16"] - ref) / ref
        rows.append([name, f"{r['ged_16']:.4f}", f"{100 * rel:+.1f} %", f"{r['hm_iou_16']:.3f}", f"{r['mdm_16']:.3f}",
                     f"{r['seconds']:.1f}"])  # fmt: skip
    data["ged_check"] = {"checkpoint": str(args.checkpoint), "items": int(images.shape[0]), "image_size": size,
                         "results": res}  # fmt: skip


#: precision suffixes of a --ged-variants spec -> (row-name suffix, HSRDiffPipeline precision)
_SPEC_PRECISIONS = {"bf16": (" bf16", "bfloat16"), "bf16true": (" bf16-true", "bfloat16-true")}


def _ged_variant(spec: str, process: SelfRegulatedDiffusion) -> tuple[str, Any, str]:
    """``ddpm[:P]``, ``ddim:<steps>[:<eta>][:P]``, ``dpmpp_2m:<steps>[:P]`` or
    ``dpmpp_2m_sde:<steps>[:<eta>][:P]``, P = ``bf16`` (autocast) or ``bf16true`` (bf16 weights)
    -> (row name, sampler with its steps, the pipeline's precision name)."""
    parts = spec.split(":")
    suffix, precision = _SPEC_PRECISIONS.get(parts[-1], ("", "float32"))
    parts = parts[:-1] if suffix else parts
    if parts == ["ddpm"]:
        return f"DDPM {process.schedule.num_train_timesteps}{suffix}", DDPMSampler(process), precision
    if parts[0] == "ddim" and len(parts) in (2, 3):
        steps, eta = int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0
        name = f"DDIM {steps}" + (f" eta={eta:g}" if eta else "") + suffix
        return name, DDIMSampler(process, eta=eta, num_inference_steps=steps), precision
    sde = parts[0] == "dpmpp_2m_sde"
    if (parts[0] == "dpmpp_2m" and len(parts) == 2) or (sde and len(parts) in (2, 3)):
        steps, eta = int(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0  # the ODE ignores eta
        name = f"DPM++2M{' SDE' if sde else ''} {steps}" + (f" eta={eta:g}" if sde and eta != 1.0 else "") + suffix
        return name, get_sampler(parts[0], process, eta=eta, num_inference_steps=steps), precision
    raise SystemExit(f"--ged-variants: cannot read {spec!r}; write ddpm[:P], ddim:<steps>[:<eta>][:P], "
                     "dpmpp_2m:<steps>[:P] or dpmpp_2m_sde:<steps>[:<eta>][:P] with P = bf16 or bf16true")


#: issue 17 item 3's quality targets, checked on every row of the table (stated for 10 network calls)
GED_MARGIN = 0.03
TARGET_NFE = 10


def _per_item_metrics(samples: torch.Tensor, masks) -> dict[str, list[float]]:
    """GED16, HM-IoU16, MDM16 of each item; ``samples`` (B, N>=16, M, H, W) continuous, ``masks`` (B, A, H, W)."""
    from benchmarks.quality import METRICS
    from monai_hsrdiff.engines.evaluator import samples_to_masks
    from monai_hsrdiff.metrics import sample_set_metrics

    pred = samples_to_masks(samples.float()).numpy()
    per_item = [sample_set_metrics(p, m, num_samples=16) for p, m in zip(pred, masks)]
    return {k: [float(d[k]) for d in per_item] for k in METRICS}


def _relative_ci(a, b, seed: int = 0) -> tuple[float, float, float]:
    """mean(a)/mean(b) - 1 and its 95 % percentile bootstrap CI, the (a_i, b_i) pairs resampled together."""
    import numpy as np
    from scipy.stats import bootstrap

    a, b = np.asarray(a, float), np.asarray(b, float)
    res = bootstrap((a, b), lambda x, y, axis: x.mean(axis) / y.mean(axis) - 1.0, paired=True, vectorized=True,
                    n_resamples=10_000, confidence_level=0.95, method="percentile", random_state=seed)  # fmt: skip
    return float(a.mean() / b.mean() - 1.0), float(res.confidence_interval.low), float(res.confidence_interval.high)


def _row_stats(row: dict[str, list[float]], ref: dict[str, list[float]], num_seeds: int) -> dict[str, Any]:
    """A sampler's metrics against DDPM-250 over the same (seed, item) pairs, and the two targets.

    GED16: holds when the upper 95 % bound of the relative difference is <= +3 %. HM-IoU16: holds
    when the sampler's mean is not below the lower 95 % bound of DDPM-250's own mean (bootstrap over
    the same pairs); a miss is the distance to that bound.
    """
    import numpy as np

    from benchmarks.quality import METRICS

    out: dict[str, Any] = {}
    for k in METRICS:
        mean, lo, hi = paired_bootstrap_ci(row[k], ref[k])
        out[k] = {"mean": float(np.mean(row[k])), "ref_mean": float(np.mean(ref[k])), "diff": mean, "diff_ci95": [lo, hi]}
    rel = _relative_ci(row["ged_16"], ref["ged_16"])
    # the same ratio with the seeds averaged per item: pairs = items (the items are what repeats)
    by_item = lambda v: np.asarray(v, float).reshape(num_seeds, -1).mean(0)  # noqa: E731
    rel_items = _relative_ci(by_item(row["ged_16"]), by_item(ref["ged_16"])) if len(by_item(ref["ged_16"])) > 1 else None
    out["ged_16"].update(rel=rel[0], rel_ci95=list(rel[1:]), rel_ci95_items_seed_averaged=rel_items and list(rel_items[1:]))
    ref_lo = paired_bootstrap_ci(ref["hm_iou_16"], [0.0] * len(ref["hm_iou_16"]))[1]  # DDPM-250's CI of its mean
    out["targets"] = {
        "ged_16_within_3pct": rel[2] <= GED_MARGIN,
        "ged_16_miss_points": max(0.0, rel[2] - GED_MARGIN),
        "hm_iou_16_not_below_ddpm_ci": out["hm_iou_16"]["mean"] >= ref_lo,
        "hm_iou_16_ddpm_ci_low": ref_lo,
        "hm_iou_16_miss": max(0.0, ref_lo - out["hm_iou_16"]["mean"]),
    }
    return out


def _quick_model_and_data(args) -> tuple[torch.nn.Module, int, Path, SelfRegulatedDiffusion]:
    """--quick without --checkpoint: random light weights, 16x16 LIDC demo data and a T=10 process
    (so its "DDPM 250" reference row is a DDPM 10: structure only)."""
    from benchmarks.quality import ensure_demo_data

    data_dir = Path(args.ged_data or Path(args.out).parent / "sampling_quality_quick_data")
    ensure_demo_data(data_dir, 16, 24)
    net = get_preset("hsrdiff_light", in_channels=1, out_channels=1, **LIGHT_DEMO_NET).eval()
    return net, 16, data_dir / "datalist.json", SelfRegulatedDiffusion(DiffusionSchedule(10, beta_start=1e-3, beta_end=0.2))


def _fmt_ci(d: dict, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    lo, hi = d["diff_ci95"]
    return f"{scale * d['diff']:+.{digits}f}{unit} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def _table_md(res: dict[str, dict], order: list[str], ref_name: str) -> str:
    """The markdown table: DDPM-250's means, then each sampler as paired differences with 95 % CIs."""
    ref = res[ref_name]
    r0 = ref["per_pair"]
    import numpy as np

    rows = [[f"{ref_name} (reference)", ref["nfe"], f"{np.mean(r0['ged_16']):.4f}", "0", "0", f"{np.mean(r0['hm_iou_16']):.3f}",
             "0", f"{np.mean(r0['mdm_16']):.3f}", "0", "-", "-", f"{ref['seconds']:.0f}"]]  # fmt: skip
    for name in order:
        if name not in res or "stats" not in res[name]:
            continue
        r, st = res[name], res[name]["stats"]
        g, h, m, tg = st["ged_16"], st["hm_iou_16"], st["mdm_16"], st["targets"]
        rlo, rhi = g["rel_ci95"]
        ged_t = "yes" if tg["ged_16_within_3pct"] else f"no, upper bound {100 * rhi:+.1f} % misses by {100 * tg['ged_16_miss_points']:.1f} pts"
        hm_t = "yes" if tg["hm_iou_16_not_below_ddpm_ci"] else f"no, {tg['hm_iou_16_miss']:.3f} below {tg['hm_iou_16_ddpm_ci_low']:.3f}"
        rows.append([name, r["nfe"], f"{g['mean']:.4f}", _fmt_ci(g, digits=4), f"{100 * g['rel']:+.1f} % [{100 * rlo:+.1f}, {100 * rhi:+.1f}]",
                     f"{h['mean']:.3f}", _fmt_ci(h), f"{m['mean']:.3f}", _fmt_ci(m), ged_t, hm_t, f"{r['seconds']:.0f}"])  # fmt: skip
    header = ["sampler", "NFE / sample", "GED16", "ΔGED16 [95 % CI]", "ΔGED16 relative [95 % CI]", "HM-IoU16",
              "ΔHM-IoU16 [95 % CI]", "MDM16", "ΔMDM16 [95 % CI]", "GED16 within 3 %", "HM-IoU16 not below the reference's CI",
              "seconds (all seeds)"]  # fmt: skip
    return markdown_table(header, rows)


def ged_table(args, data: dict) -> Path:
    """Issue 17's quality table: DDIM eta=1, DPM-Solver++(2M) and its SDE at each step count against
    DDPM-250 on the same items and seeds (the same x_T: every sampler's first draw from the seeded
    generator), as paired differences with 95 % bootstrap CIs over the (seed, item) pairs.

    The result files are rewritten after every row, so a stopped run keeps the rows it finished.
    """
    from benchmarks.quality import load_eval_items

    if args.ged_merge:
        return merge_ged_tables(args, data)
    if args.checkpoint:
        net, size, datalist, process = load_trained(args)
    elif args.quick:
        net, size, datalist, process = _quick_model_and_data(args)
    else:
        raise SystemExit("--ged-table needs --checkpoint (and --bundle-config for a bundle run's model.pt)")
    images, masks = load_eval_items(datalist, args.ged_items)
    b, n = int(images.shape[0]), 16
    if b < 2:
        raise SystemExit(f"--ged-table: {datalist} has {b} test item(s); the paired CIs need >= 2")
    specs = args.ged_variants or [v for st in args.ged_steps for v in (f"ddim:{st}:1", f"dpmpp_2m:{st}", f"dpmpp_2m_sde:{st}")]
    # network calls per sample, counted: items the network saw / (B·N) (E_c is encode_condition, not forward)
    seen = [0]
    hook = net.register_forward_pre_hook(lambda mod, a: seen.__setitem__(0, seen[0] + int(a[0].shape[0])))
    res: dict[str, dict] = {}
    table = data["ged_table"] = {"checkpoint": str(args.checkpoint), "bundle_config": args.bundle_config,
                                 "datalist": str(datalist), "items": b, "image_size": size, "num_samples": n,
                                 "seeds": args.ged_seeds, "pairs": "(seed, item), seed-major", "results": res}  # fmt: skip
    ref_name = table["reference"] = _ged_variant(args.ged_baseline, process)[0]
    if args.ged_reference:  # the reference row of an earlier --ged-table run of the same table (saves DDPM-250)
        old = _read_ged_table(args.ged_reference, "--ged-reference")
        diff = [k for k in (*_MERGE_KEYS, "seeds") if old.get(k) != table[k]]
        if diff:
            raise SystemExit(f"--ged-reference {args.ged_reference}: " + ", ".join(f"{k} {old.get(k)!r}" for k in diff)
                             + " differ(s) from this run's " + ", ".join(repr(table[k]) for k in diff))  # fmt: skip
        if ref_name not in old["results"]:
            raise SystemExit(f"--ged-reference {args.ged_reference}: has no {ref_name!r} row")
        res[ref_name] = old["results"][ref_name]
    names = []
    for spec in ([] if ref_name in res else [args.ged_baseline]) + specs:
        name, smp, precision = _ged_variant(spec, process)
        per_pair: dict[str, list[float]] = {}
        seen[0], t0 = 0, time.perf_counter()
        for seed in args.ged_seeds:
            with torch.inference_mode():
                pipe = HSRDiffPipeline(net, smp, autocast_dtype=precision)
                out = pipe(images, num_samples=n, generator=torch.Generator().manual_seed(seed))
            for k, v in _per_item_metrics(out.samples, masks).items():
                per_pair.setdefault(k, []).extend(v)
        nfe = seen[0] / (b * n * len(args.ged_seeds))
        res[name] = {"spec": spec, "nfe": int(nfe) if nfe == int(nfe) else nfe, "seconds": time.perf_counter() - t0,
                     "per_pair": per_pair}  # fmt: skip
        if name != ref_name:
            names.append(name)
            res[name]["stats"] = _row_stats(per_pair, res[ref_name]["per_pair"], len(args.ged_seeds))
        print(name, {k: round(sum(v) / len(v), 4) for k, v in per_pair.items()}, f"NFE {nfe:g}",
              f"{res[name]['seconds']:.0f} s", flush=True)  # fmt: skip
        done = len(names) == len(specs)
        _write_ged_table(args, data, names, size, b, complete=done)
    hook.remove()
    return _write_ged_table(args, data, names, size, b, complete=True)


#: what every --ged-merge part must share (the rows are checked separately)
_MERGE_KEYS = ("checkpoint", "bundle_config", "datalist", "items", "image_size", "num_samples", "reference")


def _read_ged_table(path: str, flag: str) -> dict:
    try:
        return json.loads(Path(path).read_text())["ged_table"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{flag} {path}: not a --ged-table result ({type(e).__name__}: {e})") from None


def merge_ged_tables(args, data: dict) -> Path:
    """``--ged-merge``: one table from complete ``--ged-table`` runs over disjoint seeds of the same
    checkpoint, items and rows (one process per seed uses both cores of a 2-core machine; a
    pipeline call's noise depends only on its seed, so the pairs are those of one joint run)."""
    parts = [_read_ged_table(path, "--ged-merge") for path in args.ged_merge]
    first = parts[0]
    for path, part in zip(args.ged_merge, parts):
        if part.get("status") != "complete":
            raise SystemExit(f"--ged-merge {path}: that run is {part.get('status')!r}; merge complete runs only")
        diff = [k for k in _MERGE_KEYS if part.get(k) != first.get(k)]
        if diff or list(part["results"]) != list(first["results"]):
            what = ", ".join(diff) or "sampler rows"
            raise SystemExit(f"--ged-merge {path}: {what} differ(s) from {args.ged_merge[0]}; merge runs of one table")
    seeds = [s for part in parts for s in part["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--ged-merge: the parts repeat a seed ({seeds}); each (seed, item) pair must come once")
    ref = first["reference"]
    res: dict[str, dict] = {}
    for name, row in first["results"].items():
        rows = [part["results"][name] for part in parts]
        res[name] = {"spec": row["spec"], "nfe": row["nfe"], "seconds": sum(r["seconds"] for r in rows),
                     "per_pair": {k: [v for r in rows for v in r["per_pair"][k]] for k in row["per_pair"]}}  # fmt: skip
    names = [name for name in res if name != ref]
    for name in names:
        res[name]["stats"] = _row_stats(res[name]["per_pair"], res[ref]["per_pair"], len(seeds))
    data["ged_table"] = {**{k: first[k] for k in (*_MERGE_KEYS, "pairs")}, "seeds": seeds, "results": res,
                         "merged_from": [{"file": str(p), "seeds": part["seeds"]} for p, part in zip(args.ged_merge, parts)]}  # fmt: skip
    return _write_ged_table(args, data, names, first["image_size"], first["items"], complete=True)


def _write_ged_table(args, data: dict, names: list[str], size: int, items: int, complete: bool) -> Path:
    res = data["ged_table"]["results"]
    order = sorted(names, key=lambda nm: (res[nm]["nfe"], names.index(nm)))
    at_target = [nm for nm in order if res[nm]["nfe"] == TARGET_NFE]
    verdicts = [f"- {nm}: GED16 {'holds' if res[nm]['stats']['targets']['ged_16_within_3pct'] else 'misses'}, "
                f"HM-IoU16 {'holds' if res[nm]['stats']['targets']['hm_iou_16_not_below_ddpm_ci'] else 'misses'}"
                for nm in at_target]  # fmt: skip
    seeds = data["ged_table"]["seeds"]
    ckpt = data["ged_table"]["checkpoint"]
    ckpt = "random weights, --quick" if ckpt in (None, "None") else ckpt
    ref = data["ged_table"]["reference"]
    merged = data["ged_table"].get("merged_from")
    parts = (f"Merged from {len(merged)} runs over disjoint seeds (one process each; seconds are summed over them): "
             + "; ".join(f"`{m['file']}` (seeds {m['seeds']})" for m in merged) + ".\n\n") if merged else ""  # fmt: skip
    md = (parts + f"### GED16, HM-IoU16, MDM16 against {ref} ({ckpt}), {items} demo test items x "
          f"{len(seeds)} noise seeds {seeds}, {size}x{size}, N=16\n\n"
          f"Each sampler as the paired mean difference to {ref} with a 95 % percentile bootstrap CI "
          f"(10,000 resamples) over the {items * len(seeds)} (seed, item) pairs; every sampler starts from the "
          "same x_T for a given seed (its first draw from the seeded generator); later noise differs by sampler "
          "(and is the same for one sampler in two precisions). Rows are fp32 unless named bf16 (autocast) or "
          "bf16-true (bf16 weights). "
          "NFE / sample: network calls per sample, counted by a hook on the network's forward. Targets (issue 17 "
          "item 3, stated at 10 NFE, shown for every row): GED16 within 3 % = the upper CI bound of "
          f"GED16/GED16(reference) - 1 is <= +3 %; HM-IoU16 not below the reference's CI = the row's mean HM-IoU16 >= the "
          f"lower 95 % bound of {ref}'s mean HM-IoU16 (bootstrap over the same pairs).\n\n"
          + _table_md(res, order, data["ged_table"]["reference"])
          + (f"\n\nAt {TARGET_NFE} NFE:\n\n" + "\n".join(verdicts) if verdicts else ""))  # fmt: skip
    title = "HSRDiff few-step sampling quality" + ("" if complete else " (partial: the run is still going or was stopped)")
    data["ged_table"]["status"] = "complete" if complete else f"partial: {len(names)} sampler row(s)"
    return write_results(args.out, title, md, data)


def run(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k, size = args.num_samples, args.timed_steps, args.size
    net_kwargs = LIGHT_DEMO_NET if args.quick else {}
    model = get_preset("hsrdiff_light", in_channels=1, out_channels=1, **net_kwargs).eval()
    cond = torch.randn(1, 1, size, size)
    short = SelfRegulatedDiffusion(DiffusionSchedule(k, beta_start=1e-3, beta_end=0.2))  # k-step DDPM, same per-step work
    full = SelfRegulatedDiffusion()
    data: dict[str, Any] = {"machine": machine_info(shared=args.shared), "command": command_line(),
                            "settings": {k_: v for k_, v in vars(args).items()},
                            "parameters": model.num_parameters()}  # fmt: skip
    md: list[str] = []
    if args.ged_table:
        path = ged_table(args, data)
        print(path.read_text())
        return path

    if args.speed:
        if args.main:
            configs = pipeline_configs(model, args)
            # 1. (a) against (b) for the same noise (short run, k steps), for each way of running (b);
            # the first call of a compiled model compiles it, outside the timings below
            sa = literal_algorithm2(model, cond, n, short, torch.Generator().manual_seed(3))
            data["identity"] = {}
            lines = []
            for name, pipe in configs.items():
                t0 = time.perf_counter()
                sb = pipeline_samples(with_sampler(pipe, DDPMSampler(short)), cond, n, torch.Generator().manual_seed(3))
                first_call = time.perf_counter() - t0
                diff = float((sa - sb).abs().max())
                agree = float(((sa > 0) == (sb > 0)).float().mean())
                data["identity"][name] = {"steps": k, "max_abs_diff": diff, "mask_agreement": agree,
                                          "first_call_seconds": first_call}  # fmt: skip
                lines.append(f"- (b) {name}: max |a - b| = {diff:.2e}, masks identical for {100 * agree:.3f} % of pixels "
                             f"(first call {first_call:.0f} s)")  # fmt: skip
            md.append(f"(a) against (b), same generator, a {k}-step DDPM, N={n}, {size}x{size}:\n\n" + "\n".join(lines))

            # 2. (a), and (b), (c) run each way, per k steps, interleaved
            gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
            na = min(args.literal_samples or n, n)  # (a) is one sample at a time: its cost is exactly linear in N
            fns = {"a": lambda: literal_algorithm2(model, cond, na, short, gen()), "ec": lambda: encode_once(model, cond)}
            for name, pipe in configs.items():
                samplers = {"b": DDPMSampler(short), "c": DDIMSampler(full, num_inference_steps=k),
                            "d": DPMSolverSampler(full, sde=True, num_inference_steps=k)}  # fmt: skip
                for key, smp in samplers.items():
                    fns[f"{key}|{name}"] = lambda p=pipe, sm=smp: pipeline_samples(with_sampler(p, sm), cond, n, gen())
            # the matmul peaks in the same rounds: this machine's speed drifts between minutes
            matmuls = {dt: matmul_round(args.matmul_size, dt) for dt in PEAK_DTYPES}
            fns.update({f"peak|{dt}": run for dt, (run, _) in matmuls.items()})
            med = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup)
            peaks = {dt: flops / med.pop(f"peak|{dt}") for dt, (_, flops) in matmuls.items()}
            # (b) and (c) run E_c once per call: time = E_c + k steps; (a) runs it inside every step
            ec = med.pop("ec")
            per_step = {key: (v if key == "a" else v - ec) / k for key, v in med.items()}
            per_step["a"] *= n / na
            noisy = sorted(key for key, v in per_step.items() if v <= 0)
            if noisy:  # a call no slower than E_c alone: the machine was too busy for these timings
                data["timing_warning"] = f"per-step time <= 0 for {noisy}: timings too noisy (busy machine?); rerun idle"
                md.append(f"\n**Warning**: {data['timing_warning']}.")
                print(f"WARNING: {data['timing_warning']}", flush=True)
            ref = per_step["a"] * T
            totals = {"(a) literal Algorithm 2, 250 steps": {"fp32": ref}}
            totals["(b) DDPM pipeline, 250 steps"] = {name: ec + per_step[f"b|{name}"] * T for name in configs}
            for st in args.ddim_steps:
                totals[f"(c) DDIM pipeline, {st} steps"] = {name: ec + per_step[f"c|{name}"] * st for name in configs}
            for st in args.dpm_steps:
                totals[f"(d) DPM-Solver++(2M) SDE pipeline, {st} steps"] = {name: ec + per_step[f"d|{name}"] * st for name in configs}
            rows = [[variant] + [f"{cells[name]:.1f} s ({ref / cells[name]:.1f}x)" if name in cells else "-" for name in configs]
                    for variant, cells in totals.items()]  # fmt: skip
            md.append(f"\n### Time per image and speed-up against (a), N={n} samples, {size}x{size}, hsrdiff_light "
                      f"({model.num_parameters():,} parameters), {args.threads} thread(s)\n\nExtrapolated from {k} timed "
                      f"steps per variant (median of {args.repeats} interleaved rounds); (a) timed on {na} of the {n} "
                      f"samples and scaled by {n}/{na}; (b), (c) and (d) as E_c once ({ec:.2f} s, timed alone, fp32) + "
                      f"steps x (time per call - E_c) / {k}. (b), (c) and (d) use the pipeline's default chunking "
                      f"(max_batch_size='auto').\n\n" + markdown_table(["variant", *configs], rows))  # fmt: skip
            data["per_step_seconds"] = per_step
            data["condition_encoder_seconds"] = ec
            data["seconds_per_image"] = totals
            md.append(peak_fractions(model, cond, n, configs, per_step, peaks, args, data))
            write_results(args.out, "HSRDiff sampling speed (partial)", "\n".join(md), data)
            print(md[-1], flush=True)

        if not args.options:
            path = write_results(args.out, "HSRDiff sampling speed", "\n".join(md), data)
            print(path.read_text())
            return path
        # 3. CPU options on (b)'s per-step work: batch N with cached features
        feats = model.encode_condition(cond)
        feats_n = [f.repeat_interleave(n, 0) for f in feats]
        x = torch.randn(n, 1, size, size)
        tb = torch.full((n,), 100, dtype=torch.long)

        def step_fn(m, x_, f_, ctx=contextlib.nullcontext):
            def f():
                with ctx(), torch.inference_mode():
                    m(x_, tb, condition_features=f_)

            return f

        bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        options: dict[str, Any] = {"fp32 (baseline)": step_fn(model, x, feats_n), "bf16 autocast": step_fn(model, x, feats_n, bf16)}
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        feats_cl = [f.contiguous(memory_format=torch.channels_last) for f in feats_n]
        for c in args.chunks:  # the pipeline's max_batch_size: N/c network calls of c items per step
            def chunked(c=c):
                with torch.inference_mode():
                    for i in range(0, n, c):
                        model(x[i : i + c], tb[i : i + c], condition_features=[f[i : i + c] for f in feats_n])

            options[f"max_batch_size={c} ({-(-n // c)} calls of {min(c, n)})"] = chunked
        explicit = get_preset("hsrdiff_light", in_channels=1, out_channels=1, **net_kwargs, use_flash_attention=False).eval()
        explicit.load_state_dict(model.state_dict())
        options["explicit attention (use_flash_attention=False)"] = step_fn(explicit, x, feats_n)
        options["channels_last"] = step_fn(model_cl, x_cl, feats_cl)
        options["channels_last + bf16"] = step_fn(model_cl, x_cl, feats_cl, bf16)
        try:
            vm = VmapDecoders(model)
            options["decoders batched (vmap)"] = step_fn(lambda *a, **kw: forward_vmap_decoders(vm, *a, **kw), x, feats_n)
        except Exception as e:  # report, do not fail the benchmark
            data["vmap_error"] = repr(e)
        failed = {}
        for name in list(options):
            try:
                options[name]()  # first call outside the timing; an option that does not run is reported
            except Exception as e:  # noqa: BLE001
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                del options[name]
        data["options_failed"] = failed
        opt_t = interleaved_medians(options, repeats=args.repeats, warmup=args.warmup)
        if args.alt_threads:
            alt = 1 if args.threads != 1 else 2
            torch.set_num_threads(alt)
            alt_t = interleaved_medians({f"fp32, {alt} thread(s)": options["fp32 (baseline)"]}, repeats=args.repeats, warmup=1)
            torch.set_num_threads(args.threads)
            opt_t.update(alt_t)
        base = opt_t["fp32 (baseline)"]
        rows = [[name, f"{1e3 * sec:.0f}", f"{base / sec:.2f}x"] for name, sec in opt_t.items()]
        extra = "".join(f" Did not run: {k} ({v})." for k, v in failed.items())
        md.append(f"\n### One denoising step for N={n} (batched, E_c cached), CPU options\n\nMedian of {args.repeats} "
                  f"interleaved rounds.{extra}\n\n" + markdown_table(["option", "ms / step", "speed vs fp32"], rows))  # fmt: skip
        data["options_seconds_per_step"] = opt_t
        write_results(args.out, "HSRDiff sampling speed (partial)", "\n".join(md), data)
        print(md[-1], flush=True)

        # 4. FLOPs and the machine's matmul limit
        flops_step = count_flops(lambda: model(x[:1], tb[:1], condition_features=feats))
        flops_ec = count_flops(lambda: model.encode_condition(cond))
        mm = args.matmul_size
        peak32, peak16 = matmul_peak(mm, torch.float32), matmul_peak(mm, torch.bfloat16)
        achieved32 = flops_step * n / opt_t["fp32 (baseline)"]
        achieved16 = flops_step * n / opt_t["bf16 autocast"]
        rows = [
            ["FLOPs per image-step (network, E_c cached)", f"{flops_step / 1e9:.2f} G"],
            ["FLOPs of E_c per image (once)", f"{flops_ec / 1e9:.2f} G"],
            [f"fp32 matmul {mm}x{mm}", f"{peak32 / 1e9:.0f} GFLOP/s"],
            [f"bf16 matmul {mm}x{mm}", f"{peak16 / 1e9:.0f} GFLOP/s"],
            ["achieved fp32, one batch of N", f"{achieved32 / 1e9:.0f} GFLOP/s ({100 * achieved32 / peak32:.0f} % of fp32 matmul)"],
            ["achieved bf16-autocast step", f"{achieved16 / 1e9:.0f} GFLOP/s ({100 * achieved16 / peak16:.0f} % of bf16 matmul)"],
        ]
        data["flops"] = {"per_image_step": flops_step, "condition_encoder": flops_ec, "matmul_fp32_flops_per_s": peak32,
                         "matmul_bf16_flops_per_s": peak16, "achieved_fp32": achieved32, "achieved_bf16": achieved16}  # fmt: skip
        for key, label, peak in (("b|fp32", "achieved fp32, (b) as run above", peak32),
                                 ("b|fp32 + torch.compile", "achieved fp32 + torch.compile, (b) as run above", peak32),
                                 ("b|bf16 + channels-last", "achieved bf16 + channels-last, (b) as run above", peak16)):  # fmt: skip
            if key in data.get("per_step_seconds", {}):
                rate = flops_step * n / data["per_step_seconds"][key]
                rows.append([label, f"{rate / 1e9:.0f} GFLOP/s ({100 * rate / peak:.0f} % of the matmul)"])
                data["flops"][f"achieved {key}"] = rate
        md.append("\n### FLOPs (torch.utils.flop_counter) and achieved rate\n\n" + markdown_table(["quantity", "value"], rows))

    # 5. quality of the fast samplers on a trained checkpoint
    if args.checkpoint:
        rows = []
        ged_check(args, rows, data)
        md.append(f"\n### GED16 on a trained demo checkpoint ({args.checkpoint}), "
                  f"{data['ged_check']['items']} test items, {data['ged_check']['image_size']}x"
                  f"{data['ged_check']['image_size']}, N=16, same seed\n\n"
                  + markdown_table(["sampler", "GED16", "vs DDPM 250", "HM-IoU16", "MDM16", "seconds"], rows))  # fmt: skip

    path = write_results(args.out, "HSRDiff sampling speed", "\n".join(md), data)
    print(path.read_text())
    return path


def peak_fractions(model, cond, n: int, configs: dict, per_step: dict[str, float], peaks: dict, args, data: dict) -> str:
    """Markdown: the CPU, both matmul peaks (``peaks``: dtype -> FLOP/s, timed in the same rounds as ``per_step``),
    and each (variant, way of running)'s FLOP/s as a fraction of its precision's peak (issue 17 item 4: >= 50 %).
    Records ``data["peaks"]``."""
    with torch.inference_mode():
        feats = model.encode_condition(cond)
    x, tb = torch.randn(1, int(model.out_channels), *cond.shape[2:]), torch.full((1,), 100, dtype=torch.long)
    flops_step = count_flops(lambda: model(x, tb, condition_features=feats))
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    labels = {"a": "(a) literal Algorithm 2", "b": "(b) DDPM pipeline", "c": "(c) DDIM pipeline", "d": "(d) DPM-Solver++(2M) SDE"}
    rows, fractions = [], {}
    for key, label in labels.items():
        cells = []
        for name in configs:
            step_key = key if key == "a" else f"{key}|{name}"
            sec = per_step.get(step_key)
            if sec is None or (key == "a" and name != "fp32"):
                cells.append("-")
                continue
            rate = flops_step * n / sec  # (a) reruns E_c every step: counted as work it need not do, so not added
            frac = rate / peaks[precision_of(name)]
            fractions[step_key] = frac
            cells.append(f"{rate / 1e9:.0f} GFLOP/s ({100 * frac:.0f} %)" + ("" if frac >= 0.5 else " < 50 %"))
        rows.append([label, *cells])
    data["peaks"] = {"cpu": data["machine"].get("host_cpu"), "amx_bf16": amx, "flops_per_image_step": flops_step,
                     "matmul_fp32_flops_per_s": peaks[torch.float32], "matmul_bf16_flops_per_s": peaks[torch.bfloat16],
                     "fraction_of_peak": fractions}  # fmt: skip
    head = (f"CPU: {data['machine'].get('host_cpu')} (AMX bf16: {'yes' if amx else 'no'}), {args.threads} thread(s); "
            f"matmul {args.matmul_size}x{args.matmul_size} (median of the same {args.repeats} interleaved rounds as the timings): "
            f"fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s; "
            f"{flops_step / 1e9:.2f} GFLOP per image-step (E_c cached)")
    print(head, flush=True)
    return ("\n### Achieved FLOP/s per step against the precision's matmul peak (issue 17 item 4: >= 50 %)\n\n" + head
            + ". Each cell: the network FLOPs of N image-steps / the measured time per step above; bf16 columns "
            "against the bf16 peak, fp32 columns against the fp32 peak.\n\n" + markdown_table(["variant", *configs], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32x32, tiny widths, N=2, 2 timed steps, no compile")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--timed-steps", type=int, default=4, help="steps timed per variant (then extrapolated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--main", action=argparse.BooleanOptionalAction, default=True,
                   help="the (a)/(b)/(c) identity check and time-per-image table")
    p.add_argument("--options", action=argparse.BooleanOptionalAction, default=True,
                   help="the per-step CPU options table and the FLOPs table (after the main table)")
    p.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 4], help="max_batch_size values timed as options")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="also run (b), (c), (d) in bf16: autocast + channels-last, and bf16 weights + channels-last (compiled too with --compile)")
    p.add_argument("--alt-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the baseline step with the other thread count (1 <-> 2)")
    p.add_argument("--literal-samples", type=int, default=4,
                   help="samples actually run for (a)'s timing (it runs one at a time; scaled to N)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                   help="run the speed sections (--no-speed with --checkpoint: only the GED16 comparison)")
    p.add_argument("--ddim-steps", type=int, nargs=3, default=[25, 50, 100])
    p.add_argument("--dpm-steps", type=int, nargs="+", default=[10, 25], help="(d) step counts in the time table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="try torch.compile")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--checkpoint", default=None, help="benchmarks/quality.py checkpoint for the GED16 comparison")
    p.add_argument("--bundle-config", nargs="+", default=None,
                   help="with --checkpoint <run>/checkpoints/model.pt: the bundle configs that trained it, e.g. "
                        "bundles/lidc/train.json bundles/lidc/demo.json (data default: data/demo_lidc)")
    p.add_argument("--ged-data", default=None, help="demo data folder of the checkpoint (default from its size)")
    p.add_argument("--ged-items", type=int, default=16)
    p.add_argument("--ged-bf16-ddpm", action="store_true", help="also score DDPM-250 under bf16 autocast")
    p.add_argument("--ged-variants", nargs="+", default=None,
                   help="samplers to score instead of the default set: ddpm[:P], ddim:<steps>[:<eta>][:P], "
                        "dpmpp_2m:<steps>[:P] or dpmpp_2m_sde:<steps>[:<eta>][:P] (eta default 1); P = bf16 "
                        "(autocast) or bf16true (bf16 weights, precision bfloat16-true); fp32 without P")
    p.add_argument("--ged-baseline", default="ddpm",
                   help="--ged-table's reference row, a --ged-variants spec (default ddpm: DDPM-250, the paper's "
                        "protocol); e.g. dpmpp_2m_sde:10 to compare precisions of one sampler")
    p.add_argument("--ged-reference", default=None,
                   help="JSON of an earlier run (same checkpoint, items, seed) to take DDPM 250 from instead of rerunning it; "
                        "with --ged-table, an earlier --ged-table run of the same checkpoint, configs, datalist, items, "
                        "seeds and reference (checked), whose reference row this run reuses")
    p.add_argument("--ged-table", action="store_true",
                   help="only the quality table of issue 17: DDIM eta=1, dpmpp_2m, dpmpp_2m_sde at --ged-steps against "
                        "DDPM-250 over --ged-items x --ged-seeds, paired bootstrap CIs (--ged-variants replaces the rows)")
    p.add_argument("--ged-steps", type=int, nargs="+", default=[5, 10, 15, 25], help="step counts of the --ged-table rows")
    p.add_argument("--ged-seeds", type=int, nargs="+", default=[7, 8],
                   help="sampling-noise seeds of --ged-table (the same for every sampler)")
    p.add_argument("--ged-merge", nargs="+", default=None, metavar="PART.json",
                   help="with --ged-table: write one table from complete --ged-table runs over disjoint --ged-seeds "
                        "(same checkpoint, items, rows), e.g. one process per seed; samples nothing")
    p.add_argument("--shared", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/sampling_<size>)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.num_samples, args.timed_steps, args.repeats, args.warmup = 16, 2, 2, 1, 0
        args.compile, args.matmul_size = False, 256
        if args.ged_table:  # 2 items, one 2-step row per sampler
            args.ged_items, args.ged_steps = 2, [2]  # the seeds as given (default 7, 8)
    if args.ged_merge and not args.ged_table:
        p.error("--ged-merge merges --ged-table runs: add --ged-table")
    if args.timed_steps < 2:
        p.error(f"--timed-steps must be >= 2 (a DDPM schedule needs T >= 2), got {args.timed_steps}")
    default = "sampling_quality" if args.ged_table else f"sampling_{args.size}"
    args.out = args.out or str(REPO_ROOT / "benchmarks" / "results" / default)
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
