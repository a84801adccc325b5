"""Time the sample-set metrics on a LIDC-sized case: N=32 samples, A=4 annotations, 128×128, CPU.

Run: ``python benchmarks/metrics_speed.py``. Prints milliseconds per call (median of repeats).
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import time

import numpy as np

from monai_hsrdiff.metrics import (
    entropy_map,
    fused_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    maximum_dice_matching,
    sample_set_metrics,
)


def _median_ms(fn, repeats: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(n: int = 32, a: int = 4, size: int = 128, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # blob-like masks: a random disc per mask, so the overlaps are realistic, not noise
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(0.3 * size, 0.7 * size, size=(n + a, 2))
    radii = rng.uniform(0.05 * size, 0.2 * size, size=n + a)
    dist2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    masks = dist2 < radii[:, None, None] ** 2
    samples, annotations = masks[:n], masks[n:]

    rows = {
        "GED": lambda: generalized_energy_distance(samples, annotations),
        "HM-IoU": lambda: hungarian_matched_iou(samples, annotations),
        "MDM": lambda: maximum_dice_matching(samples, annotations),
        "fused IoU": lambda: fused_iou(samples, annotations),
        "entropy map": lambda: entropy_map(samples),
        "GED+HM-IoU+MDM separately": lambda: (
            generalized_energy_distance(samples, annotations),
            hungarian_matched_iou(samples, annotations),
            maximum_dice_matching(samples, annotations),
        ),
        "sample_set_metrics N=16,32": lambda: sample_set_metrics(samples, annotations, num_samples=(16, 32)),
    }
    print(f"N={n} samples, A={a} annotations, {size}x{size}, CPU")
    for name, fn in rows.items():
        print(f"  {name:<28s} {_median_ms(fn):8.2f} ms")


if __name__ == "__main__":
    main()
