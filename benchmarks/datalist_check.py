"""Time the start-up check of every datalist item (``monai_hsrdiff.data.check_items``).

Run: ``python benchmarks/datalist_check.py`` (10,000 synthetic 128x128 items, 4 masks each,
written with ``save_item`` into a temporary folder) or ``--quick`` (200 items of 32x32). Prints
items/s and the seconds per 10,000 items (median of the repeats; the files are in the page
cache after the first pass, as on a machine that just wrote or read them). The budget of
issue 12 is 2 s per 10,000 items. Writes ``benchmarks/results/datalist_check.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, markdown_table, write_results  # noqa: E402

from monai_hsrdiff.data import check_items, save_item  # noqa: E402

BUDGET_S_PER_10K = 2.0


def make_items(folder: Path, n: int, size: int, annotations: int = 4, seed: int = 0) -> list[dict]:
    """``n`` synthetic items under ``folder`` (random image, disc masks); datalist-style entries."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    eye = np.eye(4)
    entries = []
    for i in range(n):
        image = rng.normal(size=(1, size, size)).astype(np.float32)
        r = rng.uniform(0.05, 0.2, size=annotations) * size
        masks = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2)[None] < (r**2)[:, None, None]
        path = save_item(folder / f"item_{i:05d}.npz", image, masks, eye, eye, {"patient": f"P{i}", "synthetic": True})
        entries.append({"item": str(path)})
    return entries


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200 items of 32x32, 2 repeats (a smoke test)")
    p.add_argument("--num-items", type=int, default=None, help="items to make (default 10000; --quick: 200)")
    p.add_argument("--size", type=int, default=None, help="image size (default 128; --quick: 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default 5; --quick: 2)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "datalist_check", help="result stem (.md and .json)")
    a = p.parse_args(argv)
    n = a.num_items or (200 if a.quick else 10_000)
    size = a.size or (32 if a.quick else 128)
    repeats = a.repeats or (2 if a.quick else 5)
    with tempfile.TemporaryDirectory(prefix="hsrdiff_datalist_check_") as tmp:
        t0 = time.perf_counter()
        entries = make_items(Path(tmp), n, size)
        write_s = time.perf_counter() - t0
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            check_items(entries, "training", in_channels=1, image_size=size)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    median, cpu_median = statistics.median(times), statistics.median(cpu)
    per_10k, cpu_per_10k = median * 10_000 / n, cpu_median * 10_000 / n
    # on a shared machine the wall time includes waiting for a core; the CPU time is what an idle one needs
    print(f"checked {n} items ({size}x{size}) in {median:.3f} s ({cpu_median:.3f} s CPU): {n / median:,.0f} items/s, "
          f"{per_10k:.2f} s per 10,000 items ({cpu_per_10k:.2f} s CPU; budget {BUDGET_S_PER_10K} s)", flush=True)  # fmt: skip
    data = {
        "num_items": n,
        "image_size": size,
        "repeats_s": times,
        "median_s": median,
        "items_per_s": n / median,
        "s_per_10k_items": per_10k,
        "cpu_repeats_s": cpu,
        "cpu_s_per_10k_items": cpu_per_10k,
        "budget_s_per_10k_items": BUDGET_S_PER_10K,
        "write_s": write_s,
        "machine": machine_info(),
    }
    table = markdown_table(
        ["items", "size", "median check (s)", "items/s", "s per 10,000 items", "CPU s per 10,000 items", "budget"],
        [[n, f"{size}x{size}", f"{median:.3f}", f"{n / median:,.0f}", f"{per_10k:.2f}", f"{cpu_per_10k:.2f}",
          f"{BUDGET_S_PER_10K} s"]],
    )
    notes = ("Headers only: the zip directory and the `.npy` headers of `image` and `masks` "
             "(`data.read_item_header`); files in the page cache (written just before). "
             "Wall time includes waiting for a core when other jobs share the machine (see the load average); "
             "CPU time is what the check costs on an idle core.")  # fmt: skip
    write_results(a.out, "Start-up check of every datalist item", table, data, notes)


if __name__ == "__main__":
    main()
