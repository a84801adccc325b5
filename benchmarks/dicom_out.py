"""What ``--dicom-out`` costs: writing the four DICOM files against sampling, for a 16-sample case.

One synthetic CT series (``--size`` x ``--size`` pixels, ``--slices`` slices, 0.7 mm, a nodule-like
blob on every slice, so no mask is empty) goes through the real inference objects of
``inference.json``: ``CaseReader`` (LIDC) -> ``VolumeInferer`` (``HSRDiffPipeline``, DDIM, N
samples, random weights: the cost of a step does not depend on them) -> the case writer. Then,
interleaved (``--repeats`` rounds, median), the case is written without and with the DICOM files,
so ``dicom_s`` = the difference, and the DICOM writer alone is timed on the same prediction.

Sampling is timed over ``--timed-steps`` DDIM steps and extrapolated linearly to ``--steps``
(the per-step work is the same at every t; E_c and the preprocessing are counted once per
timed run, so the extrapolation overcounts them slightly). The network is the demo's small
HSRDiff (``LIGHT_DEMO_NET``, 1.14M parameters) at ``--image-size``: a bigger network samples more
slowly, so the DICOM share measured here is an upper bound for ``hsrdiff_light``.

Run::

    python benchmarks/dicom_out.py --out benchmarks/results/dicom_out

Quick check (tests/test_dicom_out.py runs this)::

    python benchmarks/dicom_out.py --quick --out /tmp/d
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import LIGHT_DEMO_NET, command_line, machine_info, markdown_table, write_results  # noqa: E402
from synthetic_dicom import write_ct_series  # noqa: E402

from monai_hsrdiff.diffusion import DDIMSampler, HSRDiffPipeline, SelfRegulatedDiffusion  # noqa: E402
from monai_hsrdiff.export.dicom_out import read_source_instances, write_dicom_case  # noqa: E402
from monai_hsrdiff.export.slicer import sample_colors, write_case  # noqa: E402
from monai_hsrdiff.inference import CaseReader, VolumeInferer  # noqa: E402
from monai_hsrdiff.networks import get_preset  # noqa: E402
from monai_hsrdiff.tasks import get_task  # noqa: E402


def write_series(folder: Path, size: int, slices: int) -> None:
    """A CT series with the tags a DICOM SEG needs (write_ct_series leaves out the Frame of Reference)."""
    rr, cc = np.mgrid[:size, :size]
    lung = ((rr - size / 2) / (0.4 * size)) ** 2 + ((cc - size / 2) / (0.45 * size)) ** 2 <= 1

    def hu(k: int) -> np.ndarray:
        a = np.full((size, size), -1000.0)
        a[lung] = -850.0
        a[(rr - 0.4 * size) ** 2 + (cc - 0.6 * size) ** 2 <= (0.06 * size) ** 2] = 40.0  # the "nodule"
        return a

    paths = write_ct_series(folder, [(-180.0, -180.0, 2.5 * k) for k in range(slices)], hu, pixel_spacing=(0.7, 0.7))
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "SYNTHETIC^CT", "", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20000101", "120000", "1", ""
        ds.save_as(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="slice size in pixels (LIDC: 512)")
    p.add_argument("--slices", type=int, default=4, help="slices in the region")
    p.add_argument("--image-size", type=int, default=128, help="the model's window")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--timed-steps", type=int, default=1, help="DDIM steps actually run")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps extrapolated to (inference.json's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine: benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="a small case: structure only, the figures mean nothing")
    p.add_argument("--out", default="benchmarks/results/dicom_out")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.slices, a.image_size, a.num_samples, a.repeats = 48, 2, 32, 4, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = get_preset("hsrdiff_light", in_channels=1, out_channels=1, **LIGHT_DEMO_NET).eval()
    pipe = HSRDiffPipeline(net, DDIMSampler(SelfRegulatedDiffusion(), eta=1.0, num_inference_steps=a.timed_steps))
    tmp = Path(tempfile.mkdtemp(prefix="hsrdiff_dicom_bench_"))
    try:
        write_series(tmp / "ct", a.size, a.slices)
        reader = CaseReader(get_task("lidc"), a.image_size, item_spacing=None)  # native 0.7 mm: fewer windows
        source, region, pp = reader(str(tmp / "ct"))
        inferer = VolumeInferer(pipe, num_samples=a.num_samples, seed=0)
        t0 = time.perf_counter()
        prediction = inferer(source, pp, region)
        sampling_s = time.perf_counter() - t0
        sampling_full_s = sampling_s * a.steps / a.timed_steps
        instances = read_source_instances(source)
        t_slicer, t_both, t_dicom = [], [], []
        summary = {"task": "lidc", **inferer.summary()}
        for r in range(a.repeats + 1):  # round 0: warm-up (imports, code dictionaries)
            for name, times, dicom in (("plain", t_slicer, None), ("both", t_both, instances)):
                t1 = time.perf_counter()
                write_case(tmp / f"{name}{r}", prediction, source, summary, dicom_instances=dicom)
                if r:
                    times.append(time.perf_counter() - t1)
            (tmp / f"only{r}").mkdir()
            t1 = time.perf_counter()
            write_dicom_case(tmp / f"only{r}", prediction, source, instances, summary, sample_colors(a.num_samples))
            if r:
                t_dicom.append(time.perf_counter() - t1)
        sizes = {f.name: f.stat().st_size for f in sorted((tmp / f"only{a.repeats}").iterdir())}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in (("slicer_s", t_slicer), ("slicer_and_dicom_s", t_both), ("dicom_only_s", t_dicom))}
    dicom_s = med["dicom_only_s"]
    share_full, share_timed = dicom_s / sampling_full_s, dicom_s / sampling_s
    data = {
        "command": command_line(), "machine": machine_info(),
        "case": {"size": a.size, "slices": a.slices, "image_size": a.image_size, "num_samples": a.num_samples,
                 "network": "hsrdiff_light + LIGHT_DEMO_NET", "timed_steps": a.timed_steps, "steps": a.steps},
        "sampling_s_timed": sampling_s, "sampling_s_extrapolated": sampling_full_s, **med,
        "dicom_share_of_sampling": share_full, "dicom_share_of_timed_sampling": share_timed, "dicom_bytes": sizes,
        "quick": a.quick,
    }  # fmt: skip
    rows = [
        [f"sampling, {a.timed_steps} DDIM step(s), measured", f"{sampling_s:.2f} s", ""],
        [f"sampling, {a.steps} DDIM steps, extrapolated", f"{sampling_full_s:.1f} s", "100 %"],
        ["write the Slicer files (NIfTI, .seg.nrrd, summary)", f"{med['slicer_s']:.2f} s", f"{100 * med['slicer_s'] / sampling_full_s:.2f} %"],
        ["write the Slicer + DICOM files", f"{med['slicer_and_dicom_s']:.2f} s", f"{100 * med['slicer_and_dicom_s'] / sampling_full_s:.2f} %"],
        ["write the 4 DICOM files alone", f"{dicom_s:.2f} s", f"{100 * share_full:.2f} %"],
    ]
    md = markdown_table(["step", "time", "share of sampling"], rows)
    notes = (f"Case: {a.size}x{a.size}x{a.slices} CT, N={a.num_samples}, window {a.image_size}, "
             f"{sum(sizes.values()) / 1e6:.2f} MB of DICOM ({', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in sizes.items())}). "
             f"Against the {a.timed_steps}-step sampling actually run, the DICOM files cost {100 * share_timed:.1f} %.")  # fmt: skip
    out = write_results(a.out, "DICOM output cost (--dicom-out)", md, data, notes)
    print(md)
    print(notes)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
