"""Cohort inference throughput: cases per hour through ``--input-list`` (the model loaded once).

A cohort of ``--cases`` synthetic CT series (``--size`` x ``--size`` pixels, 0.7 mm, ``--slices``
slices, a nodule-like blob) is written with its CSV case list; each row's region is a
``--box`` x ``--box`` voxel box over all slices centred on the blob (the ``center``/``size``
columns: a nodule region, as a reader would run it, not the whole scan). The real command's
code path runs it in-process: :func:`monai_hsrdiff.infer.infer` with ``input_list`` ->
the bundle's ``inference`` -> ``run_cohort``, at two settings:

- ``demo``: ``train.json`` + ``inference.json`` + ``demo.json`` (64x64 ``hsrdiff_light`` demo
  network, N=16, DDIM 50 steps, 0.5 mm items); ``--demo-timed-steps`` (default all 50) are run,
  fewer are extrapolated to 50 as below;
- ``paper``: ``train.json`` + ``inference.json`` (128x128 ``hsrdiff`` preset, T=250) with the
  paper's sampling, DDPM 250 steps and N=32. Only ``--paper-timed-steps`` DDIM steps are run
  (a DDIM step and a DDPM step make the same one network call on B*N images) and each case's
  time is extrapolated: ``seconds - model_s + model_s * 250 / timed_steps`` (``model_s`` from
  its ``summary.json``; the condition encoder, run once per window, is counted in ``model_s``,
  so the extrapolation slightly overcounts).

The weights are ``--checkpoint`` (a trained demo checkpoint) or a freshly initialised network of
the setting's size: the cost of a step does not depend on the weights. Torch runs ``--threads``
threads in the timed parts only.

Run::

    OMP_NUM_THREADS=2 python benchmarks/cohort_inference.py --out benchmarks/results/cohort_inference

Quick check (tests/test_cohort_inference.py runs it)::

    python benchmarks/cohort_inference.py --quick --out /tmp/c
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import REPO_ROOT, command_line, machine_info, markdown_table, write_results  # noqa: E402
from synthetic_dicom import write_ct_series  # noqa: E402

from monai_hsrdiff.infer import infer  # noqa: E402

BUNDLE = REPO_ROOT / "bundles" / "lidc"


def write_cohort(folder: Path, cases: int, size: int, slices: int, box: int) -> Path:
    """``cases`` CT series under ``folder/scans`` and ``folder/cases.csv`` (a box region per case)."""
    rr, cc = np.mgrid[:size, :size]
    lung = ((rr - size / 2) / (0.4 * size)) ** 2 + ((cc - size / 2) / (0.45 * size)) ** 2 <= 1
    nodule = (int(0.4 * size), int(0.6 * size))  # (row, col)

    def hu(k: int) -> np.ndarray:
        a = np.full((size, size), -1000.0)
        a[lung] = -850.0
        a[(rr - nodule[0]) ** 2 + (cc - nodule[1]) ** 2 <= (0.06 * size) ** 2] = 40.0
        return a

    rows = ["id,input,center,size,units"]
    for n in range(cases):
        write_ct_series(folder / "scans" / f"ct{n:02d}", [(-180.0, -180.0, 2.5 * k) for k in range(slices)], hu,
                        pixel_spacing=(0.7, 0.7), seed=n)  # fmt: skip
        # center (i, j, k) = (column, row, slice) voxels
        rows.append(f"case{n:02d},scans/ct{n:02d},{nodule[1]} {nodule[0]} {(slices - 1) / 2},{box} {box} {slices},voxel")
    csv = folder / "cases.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def fresh_checkpoint(configs: list[Path], overrides: dict, path: Path) -> Path:
    """A freshly initialised network of the setting's size, saved as ``model.pt``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), path)
    return path


def run_setting(name: str, csv: Path, work: Path, configs: list[Path], net_overrides: dict, sampling: dict,
                threads: int, checkpoint: Path | None, full_steps: int | None) -> dict:
    """Run the cohort once; per-case seconds (extrapolated to ``full_steps`` when given) and cases/hour."""
    tiny = work / f"{name}_overrides.json"
    tiny.write_text(json.dumps(net_overrides))
    files = [*configs[2:], tiny]
    ckpt = checkpoint or fresh_checkpoint([BUNDLE / "train.json", BUNDLE / "inference.json", *files], {}, work / f"{name}_model.pt")
    out = work / f"{name}_out"
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        infer(BUNDLE, input_list=csv, out=out, checkpoint=ckpt, configs=files, device="cpu", seed=0, **sampling)
    finally:
        wall = time.perf_counter() - t0
        torch.set_num_threads(prev)
    doc = json.loads((out / "cohort.json").read_text())
    cases = []
    for row in doc["cases"]:
        if row["status"] != "ok":
            raise RuntimeError(f"{name}: case {row['id']} {row['status']}: {row['error']}")
        s = json.loads((Path(row["output"]) / "summary.json").read_text())
        model_s = s["timings"]["model_s"]
        steps = s["num_inference_steps"]
        full = row["seconds"] if full_steps is None else row["seconds"] - model_s + model_s * full_steps / steps
        cases.append({"id": row["id"], "seconds": row["seconds"], "model_s": model_s, "timed_steps": steps,
                      "seconds_full": full, "region": s["region"]})  # fmt: skip
    per_case = float(np.mean([c["seconds_full"] for c in cases]))
    setup = wall - sum(c["seconds"] for c in cases)  # config, network build, the one checkpoint load, cohort.json
    return {"setting": name, "settings": doc["settings"], "cases": cases, "wall_s": wall, "setup_s": setup,
            "seconds_per_case": per_case, "cases_per_hour": 3600.0 / per_case,
            "extrapolated_to_steps": full_steps, "checkpoint": str(checkpoint) if checkpoint else "fresh"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--size", type=int, default=512, help="slice size in pixels (LIDC: 512)")
    p.add_argument("--slices", type=int, default=4, help="slices per series (all in the region)")
    p.add_argument("--box", type=int, default=64, help="region box in voxels (i, j) around the nodule")
    p.add_argument("--demo-timed-steps", type=int, default=50, help="DDIM steps run at the demo setting (fewer: extrapolated to 50)")
    p.add_argument("--paper-timed-steps", type=int, default=2, help="DDIM steps run at the paper setting (extrapolated to 250)")
    p.add_argument("--settings", nargs="+", default=["demo", "paper"], choices=["demo", "paper"])
    p.add_argument("--checkpoint", default=None, help="a trained demo model.pt for the demo setting (default: fresh weights)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the timed parts")
    p.add_argument("--shared", action="store_true", help="record that other jobs ran on the machine meanwhile")
    p.add_argument("--quick", action="store_true", help="tiny cases and networks: structure only, the figures mean nothing")
    p.add_argument("--out", default="benchmarks/results/cohort_inference")
    a = p.parse_args(argv)
    demo_net, paper_net = {}, {}
    demo_sampling = {"num_samples": 16, "sampler": "ddim", "steps": a.demo_timed_steps}
    paper_sampling = {"num_samples": 32, "sampler": "ddim", "steps": a.paper_timed_steps}
    if a.quick:
        a.cases, a.size, a.slices, a.box = 2, 48, 2, 24
        demo_net = paper_net = {"image_size": 32, "preset": "hsrdiff_light", "network_def#channels": [8, 16, 32],
                                "network_def#attention_levels": [False, False, True], "network_def#num_res_blocks": 1,
                                "network_def#norm_num_groups": 4}  # fmt: skip
        demo_sampling, paper_sampling = {"num_samples": 2, "sampler": "ddim", "steps": 2}, {"num_samples": 2, "sampler": "ddim", "steps": 1}
    work = Path(tempfile.mkdtemp(prefix="hsrdiff_cohort_bench_"))
    results = []
    try:
        csv = write_cohort(work, a.cases, a.size, a.slices, a.box)
        for name in a.settings:
            if name == "demo":
                configs = [BUNDLE / "train.json", BUNDLE / "inference.json", BUNDLE / "demo.json"]
                results.append(run_setting("demo", csv, work, configs, demo_net, demo_sampling, a.threads,
                                           Path(a.checkpoint) if a.checkpoint else None,
                                           None if a.demo_timed_steps == 50 or a.quick else 50))  # fmt: skip
            else:
                configs = [BUNDLE / "train.json", BUNDLE / "inference.json"]
                results.append(run_setting("paper", csv, work, configs, paper_net, paper_sampling, a.threads, None, 250))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for r in results:
        s = r["settings"]
        full = r["extrapolated_to_steps"]
        target = "ddim 50" if r["setting"] == "demo" else "ddpm 250"
        how = "measured" if full is None else f"{s['num_inference_steps']} DDIM steps measured, extrapolated to {target}"
        net = "demo 64x64 hsrdiff_light" if r["setting"] == "demo" else "paper 128x128 hsrdiff"
        rows.append([r["setting"], net, s["num_samples"], f"{s['sampler']} {s['num_inference_steps']}" if full is None else target,
                     how, f"{r['seconds_per_case']:.1f} s", f"{r['cases_per_hour']:.1f}", f"{r['setup_s']:.1f} s"])  # fmt: skip
    md = markdown_table(["setting", "network", "N", "sampler", "how", "s / case", "cases / hour", "once per cohort"], rows)
    notes = (f"A case: {a.size}x{a.size}x{a.slices} synthetic CT at 0.7 mm, region {a.box}x{a.box}x{a.slices} voxels around the nodule "
             f"(CSV center/size columns), {a.cases} cases per cohort, CPU only, torch threads {a.threads} in the timed parts. "
             "'once per cohort' = config, network build, the one checkpoint load and cohort.json (what a process per case "
             "would pay per case, on top of Python/torch start-up). Weights: "
             + ", ".join(f"{r['setting']} {r['checkpoint']}" for r in results) + " (the cost does not depend on them).")  # fmt: skip
    data = {"command": command_line(), "machine": machine_info(shared=True if a.shared else None),
            "case": {"size": a.size, "slices": a.slices, "box": a.box, "cases": a.cases}, "results": results, "quick": a.quick}  # fmt: skip
    out = write_results(a.out, "Cohort inference throughput (--input-list)", md, data, notes)
    print(md)
    print(notes)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
