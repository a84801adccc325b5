"""GroupNorm + SiLU under inductor: its own lowering against ATen's kernel, at hsrdiff_light's norm shapes.

The evidence for ``networks/compiled_norm.py``'s threshold: every GroupNorm input shape of one
``hsrdiff_light`` denoising call (2 items, as ``max_batch_size="auto"`` at 128x128), channels-last,
timed as eager ATen, as inductor compiles ``F.group_norm`` + SiLU, and as the compiled copy runs
it (``OpaqueGroupNorm`` compiled: ATen's kernel as an opaque op where ``runs_aten_kernel`` says so,
inductor's below), in interleaved rounds, with a copy of the tensor as the memory-bound floor.

Example::

    python benchmarks/group_norm.py --precision bfloat16
    python benchmarks/group_norm.py --precision float32
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, interleaved_medians, light_network, markdown_table, write_results  # noqa: E402
from monai_hsrdiff.networks.compiled_norm import OPAQUE_FROM_PIXELS, OpaqueGroupNorm, runs_aten_kernel  # noqa: E402


def norm_shapes(size: int, batch: int, quick: bool) -> collections.Counter:
    """(input shape, groups, eps) -> calls, of every GroupNorm in one denoising call."""
    model = light_network(quick)
    seen: collections.Counter = collections.Counter()
    with torch.inference_mode():
        feats = model.encode_condition(torch.randn(1, 1, size, size))
        hooks = [m.register_forward_hook(lambda m, i, o: seen.update([(tuple(i[0].shape), m.num_groups, m.eps)]))
                 for m in model.modules() if isinstance(m, nn.GroupNorm)]  # fmt: skip
        model(torch.randn(batch, 1, size, size), torch.full((batch,), 100), condition_features=[f.expand(batch, *f.shape[1:]) for f in feats])
    for h in hooks:
        h.remove()
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="items per network call (default 2, the CPU 'auto' at 128x128)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="calls of each variant per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a small network at 32x32, for the test suite")
    p.add_argument("--out", default=None, help="result stem (.md, .json); default results/group_norm_<precision>")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = 32 if a.quick else a.size
    dtype = getattr(torch, a.precision)
    out = a.out or str(RESULTS_DIR / f"group_norm_{a.precision}")
    shapes = norm_shapes(size, a.batch, a.quick)
    rows, data = [], {"settings": vars(a), "threshold_pixels": OPAQUE_FROM_PIXELS, "shapes": []}
    totals = collections.Counter()
    for (shape, groups, eps), calls in sorted(shapes.items(), key=lambda kv: kv[0][0][1:]):
        torch._dynamo.reset()  # each shape compiles afresh (not against dynamo's recompile limit)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
        norm = nn.GroupNorm(groups, shape[1], eps=eps).to(dtype)
        opaque = OpaqueGroupNorm(groups, shape[1], eps=eps).to(dtype)
        opaque.load_state_dict(norm.state_dict())
        ways = {"eager": lambda t: F.silu(norm(t)),
                "inductor": torch.compile(lambda t: F.silu(norm(t)), dynamic=False),
                "compiled copy": torch.compile(lambda t: F.silu(opaque(t)), dynamic=False),
                "tensor copy": torch.clone}  # fmt: skip

        def repeat(fn, n=a.calls):
            def run():
                for _ in range(n):
                    fn(x)

            return run

        with torch.inference_mode():
            for fn in ways.values():
                fn(x)  # compile outside the timings
            med = interleaved_medians({k: repeat(fn) for k, fn in ways.items()}, repeats=a.rounds, warmup=1)
        ms = {k: 1e3 * v / a.calls for k, v in med.items()}
        runs = "aten" if runs_aten_kernel(x) else "inductor"
        for k in ("eager", "inductor", "compiled copy"):
            totals[k] += calls * ms[k]
        data["shapes"].append({"shape": shape, "groups": groups, "calls": calls, "ms": ms, "compiled_copy_runs": runs})
        rows.append([f"{tuple(shape)}", calls, *(f"{ms[k]:.2f}" for k in ways), runs])
        print(*rows[-1], sep=" | ", flush=True)
    rows.append(["**per network call**", sum(shapes.values()), *(f"{totals[k]:.1f}" for k in ("eager", "inductor", "compiled copy")), "-", "-"])
    data["per_call_ms"] = dict(totals)
    table = markdown_table(["input (channels-last)", "calls", "eager ms", "inductor ms", "compiled copy ms", "tensor copy ms",
                           "compiled copy's GroupNorm"], rows)  # fmt: skip
    notes = (f"{a.precision}, {size}x{size}, {a.batch} items per call, {a.threads} thread(s); GroupNorm + SiLU per call, "
             f"median of {a.rounds} interleaved rounds of {a.calls} calls; the compiled copy (OpaqueGroupNorm under inductor) "
             f"runs ATen's kernel from {OPAQUE_FROM_PIXELS} pixels per channel, inductor's below (networks/compiled_norm.py); "
             "last row: the sum over one network call's GroupNorms.")  # fmt: skip
    write_results(out, "GroupNorm + SiLU: eager, inductor and the compiled copy", table, data, notes)
    print(table + "\n\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
