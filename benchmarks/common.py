"""Helpers shared by the benchmark scripts: machine description, timing, result files.

Timings on a shared CPU are noisy, so the scripts compare variants by RATIOS measured in one
run, with the variants interleaved (A, B, C, A, B, C, ...) and the median of the repeats
taken: a burst of load from another process then hits every variant alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_hsrdiff.utils import atomic_write_text

__all__ = [
    "RESULTS_DIR",
    "REPO_ROOT",
    "command_line",
    "flop_counter",
    "interleaved_medians",
    "light_network",
    "machine_info",
    "markdown_table",
    "paired_bootstrap_ci",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

#: The small HSRDiff used by the quality ablation and the demo bundle (1.14M parameters).
LIGHT_DEMO_NET: dict[str, Any] = {
    "channels": (16, 32, 64),
    "attention_levels": (False, False, True),
    "num_res_blocks": 1,
    "norm_num_groups": 8,
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(shared: bool | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, torch version, load, date, GPU.

    Args:
        shared: whether other jobs ran on the machine at the same time (None: unknown; the
            1-minute load average is recorded either way).
    """
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if shared is not None:
        info["machine_shared_with_other_jobs"] = shared
    return info


def light_network(quick: bool = False) -> Any:
    """``hsrdiff_light`` for 1 -> 1 channels in eval mode, the network the step benchmarks time;
    with ``quick`` the demo-size widths (:data:`LIGHT_DEMO_NET`), for the test suite."""
    from monai_hsrdiff.networks import get_preset

    return get_preset("hsrdiff_light", in_channels=1, out_channels=1, **(LIGHT_DEMO_NET if quick else {})).eval()


def flop_counter() -> Any:
    """A ``FlopCounterMode`` (no display) that also counts CPU attention.

    torch 2.13 has no FLOP formula for ``aten._scaled_dot_product_flash_attention_for_cpu``, the
    kernel SDPA runs on a CPU, and counts it as 0 (on a GPU its flash / efficient kernels are
    counted); it gets the same count as those, 4·B·H·L·S·d (QKᵀ and PV).
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash})


def command_line() -> str:
    """The command that produced a result, as a copy-pasteable shell line."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each callable, the callables run in turn ``repeats`` times.

    Args:
        fns: name -> zero-argument callable.
        repeats: rounds; in each round every callable runs once, in the given order.
        warmup: untimed rounds first (lazy initialisation, allocator warm-up).
    """
    if repeats < 1:
        raise ValueError(f"interleaved_medians: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str | os.PathLike, title: str, tables_md: str, data: dict[str, Any], notes: str = "") -> Path:
    """Write ``<stem>.md`` (human table with command, machine, date) and ``<stem>.json`` atomically.

    Args:
        stem: output path without suffix (relative paths are relative to the working directory).
        title: the markdown heading.
        tables_md: the markdown body (tables).
        data: everything measured, for ``<stem>.json``; the command and machine are added.
        notes: free text placed under the tables.

    Returns:
        The markdown path.
    """
    stem = Path(stem)
    data = {"command": data.get("command", command_line()), "machine": data.get("machine", machine_info()), **data}
    machine = "; ".join(f"{k}={v}" for k, v in data["machine"].items())
    md = (
        f"# {title}\n\n"
        f"Command: `{data['command']}`\n\n"
        f"Machine: {machine}\n\n"
        f"{tables_md}\n"
        + (f"\n{notes}\n" if notes else "")
    )
    atomic_write_text(stem.with_suffix(".json"), json.dumps(data, indent=1, default=str) + "\n")
    return atomic_write_text(stem.with_suffix(".md"), md)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], num_resamples: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """Mean of the paired differences a - b and its percentile bootstrap confidence interval.

    Pairs (the same item, seed and sampling noise scored under two settings) are resampled together,
    so the interval reflects the settings' difference, not the spread between items.

    Returns:
        (mean difference, lower bound, upper bound).
    """
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"paired_bootstrap_ci: needs two equal-length 1-D sequences of >= 2 pairs, got {d.shape}.")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(num_resamples, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)


def paired_over_seeds(a: dict[int, Sequence[float]], b: dict[int, Sequence[float]]) -> dict[str, Any] | None:
    """Setting ``a`` minus setting ``b`` over the (seed, item) pairs of the seeds both ran.

    ``a`` and ``b`` map a seed to its per-item values (the same items in the same order under
    both settings). Returns the paired mean difference with its 95 % bootstrap CI
    (:func:`paired_bootstrap_ci`), the number of pairs, the seeds, each seed's own mean
    difference and how many of those have the overall difference's sign (the pairs CI holds the
    trained weights fixed; whether every seed's training agrees is the other half); None
    without a shared seed.
    """
    import numpy as np

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    x = np.concatenate([np.asarray(a[s], dtype=float) for s in seeds])
    y = np.concatenate([np.asarray(b[s], dtype=float) for s in seeds])
    diff, lo, hi = paired_bootstrap_ci(x, y)
    per_seed = [float(np.mean(a[s]) - np.mean(b[s])) for s in seeds]
    return {"mean": diff, "ci95": [lo, hi], "pairs": int(x.size), "seeds": seeds, "per_seed": per_seed,
            "seeds_same_sign": int(sum(np.sign(d) == np.sign(diff) for d in per_seed))}  # fmt: skip
