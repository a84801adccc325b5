"""FLOPs of the paper's evaluation protocol and the GPU time it implies (issue 16, item 3).

Counts, with ``torch.utils.flop_counter.FlopCounterMode`` on CPU (attention included:
``benchmarks.common.flop_counter``), the FLOPs of one condition
encoding (E_c, run once per image by the pipeline) and one denoising forward with cached
features (run T x N times per image) of a preset at ``--size`` x ``--size``, then

    FLOPs per item = F_enc + steps * samples * F_step

and the time per item and for ``--items`` test items at a stated fraction (``--utilisation``)
of each listed GPU peak. The peaks are the vendor's dense figures (no sparsity).

    python benchmarks/eval_flops.py                     # hsrdiff, 128x128, DDPM 250 x N=32
    python benchmarks/eval_flops.py --out benchmarks/results/eval_flops.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import flop_counter  # noqa: E402
from monai_hsrdiff.networks import get_preset  # noqa: E402

#: dense peak TFLOP/s (NVIDIA H100 SXM5 / H200 datasheets; A100 SXM4): the number formats the
#: bundles' eval_precision float32 (cuDNN convs in TF32 by default) and bfloat16 run in
GPU_PEAKS = {
    "H100/H200 SXM bf16 (tensor cores)": 989.0,
    "H100/H200 SXM tf32 (tensor cores)": 494.7,
    "H100/H200 SXM fp32 (no tensor cores)": 66.9,
    "A100 SXM bf16 (tensor cores)": 312.0,
    "A100 SXM tf32 (tensor cores)": 156.0,
}


def count(preset: str, size: int, in_channels: int, out_channels: int) -> tuple[int, int, int]:
    """(parameters, FLOPs of E_c on one image, FLOPs of one denoising forward with cached features)."""
    torch.manual_seed(0)
    net = get_preset(preset, in_channels=in_channels, out_channels=out_channels).eval()
    image = torch.randn(1, in_channels, size, size)
    x = torch.randn(1, out_channels, size, size)
    t = torch.tensor([100])
    with torch.inference_mode():
        with flop_counter() as enc:  # attention included (FlopCounterMode alone counts CPU SDPA as 0)
            feats = net.encode_condition(image)
        with flop_counter() as step:
            net(x, t, condition=None, condition_features=feats)
    return sum(p.numel() for p in net.parameters()), enc.get_total_flops(), step.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="hsrdiff")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--in-channels", type=int, default=1, help="1: LIDC, 4: MS-Lesion")
    ap.add_argument("--out-channels", type=int, default=1)
    ap.add_argument("--steps", type=int, default=250, help="DDPM steps (the paper's protocol)")
    ap.add_argument("--samples", type=int, default=32, help="N samples per item")
    ap.add_argument("--items", type=int, default=1000, help="test items for the total time")
    ap.add_argument("--utilisation", type=float, default=0.4, help="fraction of the peak reached")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON (atomically)")
    args = ap.parse_args(argv)

    params, f_enc, f_step = count(args.preset, args.size, args.in_channels, args.out_channels)
    per_item = f_enc + args.steps * args.samples * f_step
    gpus = {}
    for name, peak in GPU_PEAKS.items():
        rate = peak * 1e12 * args.utilisation
        hours = per_item * args.items / rate / 3600
        gpus[name] = {"peak_tflops": peak, "s_per_item": per_item / rate, "h_total": hours}
    result = {
        "preset": args.preset, "parameters": params, "size": args.size, "in_channels": args.in_channels,
        "steps": args.steps, "samples": args.samples, "items": args.items, "utilisation": args.utilisation,
        "gflops_encode": f_enc / 1e9, "gflops_step": f_step / 1e9, "tflops_per_item": per_item / 1e12,
        "gpus": gpus, "counted_on": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }  # fmt: skip
    print(f"{args.preset} ({params / 1e6:.2f}M parameters) at {args.size}x{args.size}, {args.in_channels} channel(s):")
    print(f"  E_c once per item: {f_enc / 1e9:.1f} GFLOP; one denoising forward: {f_step / 1e9:.1f} GFLOP")
    print(f"  per item ({args.steps} steps x N={args.samples}): {per_item / 1e12:.1f} TFLOP")
    for name, g in gpus.items():
        print(f"  {name}: {g['peak_tflops']:.0f} TFLOP/s peak, at {args.utilisation:.0%}: "
              f"{g['s_per_item']:.1f} s/item, {g['h_total']:.1f} h for {args.items} items per GPU")  # fmt: skip
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()
