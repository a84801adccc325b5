"""fp32 or bf16 weights under ``torch.compile``: items per network call × memory layout, against the matmul peak.

Issue 17 item 4 asks for >= 50 % of the precision's matmul peak. ``sampling.py`` times the
pipeline as shipped (its ``max_batch_size="auto"`` chunks, contiguous fp32); this script times one
denoising step of ``hsrdiff_light`` (E_c cached, random weights: the cost does not depend on
them) for ``--batch`` items per call in contiguous and channels-last layout, eager and compiled
(inductor, ``freezing=True``, as ``HSRDiffPipeline(compile=True)``), with the 2048² matmul of the
same precision in the same interleaved rounds, since this machine's speed drifts between minutes.
``--precision bfloat16-true`` times the pipeline's bf16-weights copy instead (channels-last only,
under bf16 autocast, as the pipeline runs it): where AMX is present, larger calls may fill its tiles.

Example::

    python benchmarks/compiled_layouts.py --size 128 --batch 2 4 8 --rounds 5
    python benchmarks/compiled_layouts.py --size 128 --batch 2 4 8 16 --rounds 5 --precision bfloat16-true
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, interleaved_medians, light_network, markdown_table, write_results  # noqa: E402
from benchmarks.sampling import count_flops, matmul_round  # noqa: E402
from monai_hsrdiff.networks.compiled_norm import opaque_group_norms  # noqa: E402

MATMUL = 2048


def _runner(net, feats, batch: int, items: int, size: int, channels_last: bool, bf16: bool):
    """``items`` image-steps as ``items // batch`` calls of ``batch`` items (under bf16 autocast when ``bf16``)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f_b = [f.expand(batch, *f.shape[1:]).contiguous(memory_format=fmt) for f in feats]
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
    t = torch.full((batch,), 100, dtype=torch.long)

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(items // batch):
                net(x, t, condition_features=f_b)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="image size (default 128)")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8], help="items per network call")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("float32", "bfloat16-true"), default="float32",
                   help="fp32, or the pipeline's bf16-weights copy (channels-last)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only (fast)")
    p.add_argument("--quick", action="store_true", help="a small network at 32x32, for the test suite")
    p.add_argument("--out", default=None, help="result stem (.md, .json); default results/compiled_layouts[_bf16]")
    a = p.parse_args(argv)
    if a.rounds < 1 or min(a.batch) < 1:
        p.error("--rounds and --batch must be >= 1")
    a.out = a.out or str(RESULTS_DIR / ("compiled_layouts_bf16" if a.precision == "bfloat16-true" else "compiled_layouts"))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    size = 32 if a.quick else a.size
    model = light_network(a.quick)
    items = max(a.batch)  # every variant does the same work per round
    with torch.inference_mode():
        cond = torch.randn(1, 1, size, size)
        feats = model.encode_condition(cond)
    one = torch.randn(1, 1, size, size), torch.full((1,), 100, dtype=torch.long)
    flops = count_flops(lambda: model(*one, condition_features=feats))
    bf16 = a.precision == "bfloat16-true"
    dtype, label = (torch.bfloat16, "bf16") if bf16 else (torch.float32, "fp32")
    matmul, matmul_flops = matmul_round(MATMUL, dtype)
    fns = {"matmul": matmul}
    first: dict[str, float] = {}
    for channels_last in (True,) if bf16 else (False, True):
        eager = copy.deepcopy(model)
        if channels_last:
            eager = eager.to(dtype if bf16 else None, memory_format=torch.channels_last)
        nets = {"eager": eager}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats_run = eager.encode_condition(cond)  # as the pipeline: E_c by the network it runs (bf16 features)
        if a.compile:
            # as HSRDiffPipeline(compile=True): large GroupNorms left to ATen (a copy: `eager` stays as it is)
            nets["compiled"] = torch.compile(opaque_group_norms(copy.deepcopy(eager)), options={"freezing": True}, dynamic=False)
        for mode, net in nets.items():
            for batch in a.batch:
                name = f"{mode}, {'channels-last' if channels_last else 'contiguous'}, {batch} per call"
                fns[name] = _runner(net, feats_run, batch, items, size, channels_last, bf16)
                t0 = time.perf_counter()
                fns[name]()  # a compiled one compiles here, outside the timings
                first[name] = time.perf_counter() - t0
                print(f"{name}: first run {first[name]:.1f} s", flush=True)
    med = interleaved_medians(fns, repeats=a.rounds, warmup=0)
    peak = matmul_flops / med.pop("matmul")
    rows, data = [], {"settings": vars(a), "flops_per_image_step": flops, f"matmul_{label}_flops_per_s": peak,
                      "seconds_per_image_step": {}, "fraction_of_peak": {}, "first_run_seconds": first}  # fmt: skip
    for name, sec in med.items():
        rate = flops * items / sec
        data["seconds_per_image_step"][name] = sec / items
        data["fraction_of_peak"][name] = rate / peak
        rows.append([name, f"{1e3 * sec / items:.0f}", f"{rate / 1e9:.0f}", f"{100 * rate / peak:.0f} %", f"{first[name]:.0f} s"])
    table = markdown_table([f"{a.precision} variant", "ms / image-step", "GFLOP/s", f"of the {label} matmul", "first run"], rows)
    notes = (f"{size}x{size}, hsrdiff_light, {a.threads} thread(s), {flops / 1e9:.2f} GFLOP per image-step (E_c cached); "
             f"{label} matmul {MATMUL}x{MATMUL} {peak / 1e9:.0f} GFLOP/s, timed in the same {a.rounds} interleaved rounds "
             f"(medians); each variant runs {items} image-steps per round.")  # fmt: skip
    write_results(a.out, f"{a.precision} under torch.compile: items per call and memory layout", table, data, notes)
    print(table + "\n\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
