"""Where one eager denoising step's time goes: per op class, its FLOPs, its share and its rate.

One ``hsrdiff_light`` denoising call (E_c cached, 2 items as ``max_batch_size="auto"`` at 128x128)
as ``HSRDiffPipeline`` runs it in ``--precision`` (its runtime copy: the model itself in float32,
the channels-last copy under bf16 autocast for "bfloat16"), profiled with ``torch.profiler``
(self CPU time per ATen op) and counted with ``FlopCounterMode`` (attention included,
``common.flop_counter``); ops are grouped into
convolution, attention (SDPA), linear, GroupNorm + SiLU and the rest, each class's FLOP/s set
against the precision's 2048² matmul peak timed in the same process. Then the attention calls
alone, at the network's own shapes: SDPA's default kernel (flash on CPU), SDPA's math backend and
an explicit matmul-softmax-matmul, in interleaved rounds (issue 17 item 4: what keeps a bf16 step
near half the peak).

Example::

    python benchmarks/step_profile.py --precision bfloat16
    python benchmarks/step_profile.py --precision float32
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, flop_counter, interleaved_medians, light_network, markdown_table, write_results  # noqa: E402
from benchmarks.sampling import matmul_peak  # noqa: E402
from monai_hsrdiff.diffusion import HSRDiffPipeline  # noqa: E402

#: ATen op name (without "aten::") -> class; FLOP-free ops not named here are "other"
OP_CLASSES = {
    "mkldnn_convolution": "convolution", "convolution": "convolution", "_convolution": "convolution",
    "_scaled_dot_product_flash_attention_for_cpu": "attention", "_scaled_dot_product_flash_attention": "attention",
    "addmm": "linear", "mm": "linear", "bmm": "linear",
    "native_group_norm": "GroupNorm + SiLU", "silu": "GroupNorm + SiLU", "silu_": "GroupNorm + SiLU",
}  # fmt: skip
CLASSES = ("convolution", "attention", "linear", "GroupNorm + SiLU", "other")


def op_class(name: str) -> str:
    return OP_CLASSES.get(name.removeprefix("aten::"), "other")


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.matmul(torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).softmax(-1), v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="items per network call (2: the CPU 'auto' at 128x128)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--calls", type=int, default=4, help="profiled network calls")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the attention kernels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a small network at 32x32, for the test suite")
    p.add_argument("--out", default=None, help="result stem (.md, .json); default results/step_profile_<precision>")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    size, dtype = (32 if a.quick else a.size), getattr(torch, a.precision)
    model = light_network(a.quick)
    pipe = HSRDiffPipeline(model, None, None if a.precision == "float32" else a.precision)
    net = pipe.runtime_model()
    autocast = torch.autocast("cpu", dtype=dtype, enabled=a.precision != "float32")
    shapes: collections.Counter = collections.Counter()
    with torch.inference_mode(), autocast:
        feats = net.encode_condition(torch.randn(1, 1, size, size))
        hooks = [m.register_forward_pre_hook(lambda m, args: shapes.update([(*args[0].shape[:2], m.num_heads, args[0].shape[2])]))
                 for m in net.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]  # fmt: skip  (MONAI's SABlock)
        feats = [f.expand(a.batch, *f.shape[1:]).contiguous(memory_format=torch.channels_last) for f in feats]
        x = torch.randn(a.batch, 1, size, size).contiguous(memory_format=torch.channels_last)
        t = torch.full((a.batch,), 100)

        def call():
            net(x, t, condition=None, condition_features=feats)

        call()
        for h in hooks:
            h.remove()
        with flop_counter() as counter:
            call()
        flops = collections.Counter()
        for op, n in counter.get_flop_counts()["Global"].items():
            flops[op_class(str(op).removeprefix("aten.").split(".")[0])] += n
        call()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(a.calls):
                call()
    times = collections.Counter()
    for ev in prof.key_averages():
        times[op_class(ev.key)] += ev.self_cpu_time_total / 1e6 / a.calls  # s per call
    peak = matmul_peak(2048, dtype, repeats=5)
    total_t, total_f = sum(times.values()), sum(flops.values())
    rows, data = [], {"settings": vars(a), "peak_flops": peak, "classes": {}, "attention": []}
    for c in CLASSES:
        rate = flops[c] / times[c] if times[c] and flops[c] else None
        data["classes"][c] = {"seconds_per_call": times[c], "flops_per_call": flops[c], "flops_per_s": rate}
        rows.append([c, f"{1000 * times[c]:.1f}", f"{100 * times[c] / total_t:.0f} %", f"{flops[c] / 1e9:.2f}",
                     f"{100 * flops[c] / total_f:.0f} %",
                     f"{rate / 1e9:.0f} GFLOP/s ({100 * rate / peak:.0f} %)" if rate else "-"])  # fmt: skip
    rows.append(["total", f"{1000 * total_t:.1f}", "100 %", f"{total_f / 1e9:.2f}", "100 %",
                 f"{total_f / total_t / 1e9:.0f} GFLOP/s ({100 * total_f / total_t / peak:.0f} %)"])  # fmt: skip
    tables = [f"### One {a.precision} denoising call, {a.batch} items of {size}x{size} (E_c cached), {a.calls} profiled calls\n\n"
              f"Self CPU time per op class against the {a.precision} 2048² matmul peak of this process ({peak / 1e9:.0f} GFLOP/s).\n\n"
              + markdown_table(["op class", "ms / call", "time", "GFLOP / call", "FLOPs", "rate (of the peak)"], rows)]  # fmt: skip
    att_rows = []
    for (b, length, heads, ch), calls in sorted(shapes.items()):
        q, k, v = (torch.randn(b, heads, length, ch // heads, dtype=dtype) for _ in range(3))
        fl = 4.0 * b * heads * length * length * (ch // heads)

        def math_backend():
            with sdpa_kernel(SDPBackend.MATH):
                F.scaled_dot_product_attention(q, k, v)

        with torch.inference_mode():
            med = interleaved_medians({"SDPA default": lambda: F.scaled_dot_product_attention(q, k, v),
                                       "SDPA math": math_backend, "explicit": lambda: explicit_attention(q, k, v)},
                                      repeats=a.rounds)  # fmt: skip
        data["attention"].append({"q_shape": [b, heads, length, ch // heads], "calls": calls, "flops": fl, "seconds": med})
        att_rows.append([f"{b}×{heads}×{length}×{ch // heads}", calls]
                        + [f"{1000 * s:.2f} ms ({fl / s / 1e9:.0f} GFLOP/s)" for s in med.values()])  # fmt: skip
    tables.append("### Attention alone at the network's shapes (q: batch × heads × tokens × head dim), median of "
                  f"{a.rounds} interleaved rounds\n\n"
                  + markdown_table(["q shape", "calls per network call", "SDPA default (flash)", "SDPA math", "explicit matmul-softmax-matmul"], att_rows))  # fmt: skip
    out = a.out or str(RESULTS_DIR / f"step_profile_{a.precision}")
    write_results(out, "Where an eager denoising step's time goes", "\n\n".join(tables), data)
    print("\n\n".join(tables))
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
