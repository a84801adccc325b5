"""Run a trained HSRDiff bundle on a CT (DICOM) or MRI (NIfTI) scan and export the case for 3D Slicer.

``python -m monai_hsrdiff.infer --bundle bundles/lidc --checkpoint runs/lidc/checkpoints/model.pt
--input /data/LIDC-IDRI-0001/<series folder> --out runs/lidc/inference/case1``

(installed as ``hsrdiff_infer``). The command line is a thin layer over the bundle: the flags
become config keys (``--num-samples`` -> ``num_samples``, ``--out`` -> ``output_dir``, ...) of
``train.json`` + ``inference.json`` + any ``--config`` overrides (e.g. ``demo.json`` for a model
trained with the demo config), and the bundle's ``inference`` runs: reader -> pipeline ->
volume inferer -> writer (:mod:`monai_hsrdiff.inference.inferer`). The case folder holds
``mean_probability.nii.gz``, ``entropy.nii.gz`` (bits), ``samples.seg.nrrd``,
``consensus.seg.nrrd`` and ``summary.json``, all in the source scan's grid (see
``monai_hsrdiff.export.slicer``); ``--dicom-out`` adds DICOM SEGs and a Parametric Map
(``monai_hsrdiff.export.dicom_out``). Bad input stops with ``error: ...`` and exit code 2; nothing
is written then.

Many cases, the model loaded once: ``--input-list cases.csv`` or ``--input-root ROOT``, ``--out`` the
cohort folder (:mod:`monai_hsrdiff.inference.cohort`; bundle keys ``input_list`` / ``input_root``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from monai_hsrdiff.bundle import bundle_modality, default_item_spacing  # bundle keys name them here
from monai_hsrdiff.config_check import bundle_config_files
from monai_hsrdiff.errors import BundleError, InferenceInputError, fail
from monai_hsrdiff.utils.device import resolve_device

__all__ = ["bundle_modality", "case_name", "default_item_spacing", "infer", "main", "resolve_device"]

# the names of monai_hsrdiff.diffusion's SAMPLERS and PRECISIONS (tests/test_inference.py checks
# they agree), written here so that a bad --out is refused before torch and MONAI are imported
SAMPLER_NAMES = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde")
PRECISION_NAMES = ("bfloat16", "bfloat16-true", "float16", "float32")


def case_name(input: str | Sequence[str] | None, input_list: str | None = None, input_root: str | None = None) -> str:  # noqa: A002
    """A folder name for the case: the series folder's name, or the first NIfTI file's name (``output_dir``);
    ``""`` for a cohort (``input_list``/``input_root``: ``output_dir`` is then the cohort folder)."""
    if not input and (input_list or input_root):
        return ""
    if not input:
        raise fail("no input scan: pass --input PATH (a DICOM series folder, or NIfTI file(s)) to the inference run")
    name = Path(input if isinstance(input, (str, os.PathLike)) else list(input)[0]).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "case"


def infer(
    bundle: str | os.PathLike,
    input: str | Sequence[str] | None = None,  # noqa: A002
    out: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    configs: Sequence[str | os.PathLike] = (),
    num_samples: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    precision: str | None = None,
    series_uid: str | None = None,
    slices: str | Sequence[int] | None = None,
    center: Sequence[float] | None = None,
    size: Sequence[float] | None = None,
    region_units: Literal["voxel", "mm"] = "voxel",
    overwrite: bool = False,
    seed: int | None = None,
    device: str | None = None,
    allow_modality_mismatch: bool = False,
    dicom_out: bool = False,
    input_list: str | os.PathLike | None = None,
    input_root: str | os.PathLike | None = None,
    compile: bool = False,  # noqa: A002
) -> Path:
    """Run the bundle's inference on ``input`` (or a cohort); ``None`` arguments keep the config's value.

    Args map to config keys: ``out`` -> ``output_dir`` (default ``<run_dir>/inference/<case>``),
    ``checkpoint`` (default ``<run_dir>/checkpoints/model.pt``), ``num_samples``, ``sampler``,
    ``steps`` -> ``sampling_steps`` (not DDPM), ``eta`` -> ``sampler_eta``, ``precision``,
    ``seed``, ``series_uid``, ``slices``, ``center``/``size``/``region_units`` -> ``region_*``,
    ``overwrite``, ``allow_modality_mismatch``, ``dicom_out``, ``compile`` (or the config's). ``configs``: override files
    merged after ``train.json`` and ``inference.json`` (e.g. ``bundles/lidc/demo.json``).
    ``device``: ``cpu``, ``cuda``, ``cuda:N``; checked first, then the override keys and ``out``,
    all before MONAI loads. ``input_list`` (a CSV) or ``input_root`` (one case per sub-folder) instead
    of ``input``: a cohort (:mod:`monai_hsrdiff.inference.cohort`), one sub-folder of ``out`` (default
    ``<run_dir>/inference``) per case; returns ``<out>/cohort.json``, and raises
    :class:`~monai_hsrdiff.inference.cohort.CohortFailedError` (exit code 1) when a case failed.

    Example::

        infer("bundles/lidc", "/data/scan1/", out="runs/lidc/inference/scan1", num_samples=16)
        infer("bundles/lidc", input_list="cases.csv", out="runs/lidc/cohort")   # runs/lidc/cohort/<id>/
    """
    from monai_hsrdiff.export.dicom_out import refuse_nifti_inputs
    from monai_hsrdiff.export.slicer import check_output_folder

    checked_device = resolve_device(device)
    bundle = Path(bundle)
    files = bundle_config_files(bundle, configs)
    cohort = input_list is not None or input_root is not None
    if cohort and input is not None:
        raise InferenceInputError("give --input, --input-list or --input-root, not several")
    inputs = [] if input is None else [input] if isinstance(input, (str, os.PathLike)) else list(input)
    if dicom_out:  # NIfTI files are refused before anything loads (a folder is checked once read)
        refuse_nifti_inputs(inputs)
    if out is not None and not cohort:  # refused again, with the leftovers of killed writes removed, when the case is written
        check_output_folder(out, overwrite, inputs)
    if cohort:  # the case list itself is read (and refused) before MONAI loads, and a live run's lock on --out
        from monai_hsrdiff.inference.cohort import cases_under_root, read_case_list, refuse_live_lock

        read_case_list(input_list) if input_list is not None else cases_under_root(input_root)  # type: ignore[arg-type]
        refuse_live_lock(out) if out is not None else None
    from monai_hsrdiff.inference.inferer import run_bundle_inference

    keys = {
        "input": None if input is None else str(input) if isinstance(input, (str, os.PathLike)) else [str(p) for p in input],
        "input_list": None if input_list is None else str(input_list), "input_root": None if input_root is None else str(input_root),
        "output_dir": None if out is None else str(out), "checkpoint": None if checkpoint is None else str(checkpoint),
        "num_samples": num_samples, "sampler": sampler, "sampling_steps": steps, "sampler_eta": eta,
        "precision": precision, "seed": seed, "device": checked_device, "series_uid": series_uid, "slices": slices,
        "region_center": center, "region_size": size, "region_units": region_units, "overwrite": bool(overwrite),
        "allow_modality_mismatch": True if allow_modality_mismatch else None, "input_modality": bundle_modality(bundle),
        "dicom_out": True if dicom_out else None, "compile": True if compile else None,
    }  # fmt: skip
    result = run_bundle_inference(files, {k: v for k, v in keys.items() if v is not None or k == "input_modality"})
    return Path(result["cohort_dir"]) / "cohort.json" if cohort else result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monai_hsrdiff.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/lidc or bundles/ms_lesion")
    p.add_argument("--config", nargs="+", default=[], help="override config files merged after train.json and inference.json (e.g. bundles/lidc/demo.json)")
    p.add_argument("--checkpoint", default=None, help="model.pt or resume checkpoint (default <run_dir>/checkpoints/model.pt)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="LIDC: DICOM series folder; MS-Lesion: FLAIR MPRAGE PD T2 NIfTI files or their folder")
    source.add_argument("--input-list", default=None, metavar="CSV",
                        help="many cases, the model loaded once: a CSV with the columns id,input[,slices,center,size,units,series_uid] "
                             "(docs/inference.md); each case goes to <out>/<id>/, finished cases are skipped on a rerun")
    source.add_argument("--input-root", default=None, metavar="ROOT", help="many cases: one series/case per sub-folder of ROOT (id = its name)")
    p.add_argument("--out", default=None, help="case folder to create (default <run_dir>/inference/<case>); with --input-list/--input-root "
                   "the cohort folder: <out>/<id>/ per case and <out>/cohort.json (default <run_dir>/inference)")
    p.add_argument("--num-samples", type=int, default=None, help="N samples (default from inference.json)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None)
    p.add_argument("--steps", type=int, default=None, help="DDIM / DPM-Solver++ steps (DDPM always runs all T)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise level in [0, 1] of ddim and dpmpp_2m_sde (default from inference.json: 1.0; 0 = deterministic)")
    p.add_argument("--precision", choices=PRECISION_NAMES, default=None, help="sampling precision (default from inference.json: "
                   "float32); bfloat16(-true) is ~2.5-3x faster on CPUs with bf16 units, at a GED16 cost in benchmarks/README.md")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for this run (compiles first, ~1 min)")
    p.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--allow-modality-mismatch", action="store_true",
                   help="run on a DICOM series whose Modality (0008,0060) is not the one in the bundle's metadata.json "
                        "(LIDC: CT); the predictions on such images are not validated")
    region = p.add_mutually_exclusive_group()
    region.add_argument("--slices", default=None, help="a:b, slices a <= s < b along the model's slice axis (0-based)")
    region.add_argument("--center", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="region centre (with --size)")
    p.add_argument("--size", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"), help="region size along the array axes i, j, k")
    p.add_argument("--units", choices=("voxel", "mm"), default="voxel", help="units of --center/--size: voxel index or LPS mm")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier case in --out (only a case this command wrote: other files are refused, never deleted); "
                   "for a cohort: redo the finished cases too")
    p.add_argument("--dicom-out", action="store_true", help="also write DICOM SEGs and an entropy Parametric Map "
                   "referencing the source series, for a PACS/OHIF (DICOM input only; docs/slicer.md)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.size is not None and a.center is None:
        print("error: --size needs --center", file=sys.stderr)
        return 2
    from monai_hsrdiff.inference.cohort import CohortFailedError

    inp = None if a.input is None else a.input[0] if len(a.input) == 1 else a.input
    try:
        infer(a.bundle, inp, input_list=a.input_list, input_root=a.input_root, out=a.out, checkpoint=a.checkpoint,
              configs=a.config, num_samples=a.num_samples, sampler=a.sampler, steps=a.steps, eta=a.eta,
              precision=a.precision, series_uid=a.series_uid, slices=a.slices, center=a.center, size=a.size,
              region_units=a.units, overwrite=a.overwrite, seed=a.seed, device=a.device,
              allow_modality_mismatch=a.allow_modality_mismatch, dicom_out=a.dicom_out, compile=a.compile)  # fmt: skip
    except CohortFailedError as e:  # each failed case was reported on stderr
        return int(e.code)
    except BundleError as e:  # already printed by monai_hsrdiff.errors.fail
        return int(e.code or 2)
    except (ValueError, OSError) as e:  # our HSRDiffInputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
