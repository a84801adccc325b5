"""Run a trained HSRDiff bundle on a CT (DICOM) or MRI (NIfTI) scan and export the case for 3D Slicer.

``python -m monai_hsrdiff.infer --bundle bundles/lidc --checkpoint runs/lidc/checkpoints/model.pt
--input /data/LIDC-IDRI-0001/<series folder> --out runs/lidc/inference/case1``

(installed as ``hsrdiff_infer``). The network is built from the bundle's ``train.json`` with
``inference.json`` and any ``--config`` overrides merged after it (e.g. ``demo.json`` for a
model trained with the demo config), exactly as the checkpoint was trained. The case folder
holds ``mean_probability.nii.gz``, ``entropy.nii.gz`` (bits), ``samples.seg.nrrd``,
``consensus.seg.nrrd`` and ``summary.json``, all in the source scan's grid (see
``monai_hsrdiff.export.slicer``). Bad input stops with ``error: ...`` and exit code 2; nothing
is written then.

The typed functions: :func:`infer` (what the command line calls: bundle + checkpoint path)
and :func:`infer_case` (an already-built network: what ``bundles/<task>/inference.json``
calls).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from monai_hsrdiff.diffusion.pipeline import PRECISIONS
from monai_hsrdiff.utils.atomic import remove_interrupted_writes
from monai_hsrdiff.inference.source import (
    InferenceInputError,
    SourceVolume,
    is_nifti,
    read_dicom_source,
    read_nifti_source,
)
from monai_hsrdiff.inference.volume import (
    Predictor,
    Region,
    lidc_preprocessing,
    ms_lesion_preprocessing,
    predict_volume,
)

__all__ = [
    "bundle_infer_case",
    "bundle_modality",
    "case_name",
    "default_item_spacing",
    "infer",
    "infer_case",
    "main",
    "make_predictor",
    "read_source",
    "resolve_device",
]

SamplerName = Literal["ddim", "ddpm"]


def default_item_spacing(task: str) -> float | None:
    """The in-plane item spacing (mm) the task's preprocessing trains on: LIDC 0.5 (``LidcOptions``), MS None."""
    if task == "lidc":
        from preprocessing.lidc import LidcOptions

        return LidcOptions().spacing
    return None


def bundle_modality(bundle: str | os.PathLike) -> str | None:
    """The DICOM ``Modality`` the bundle's model takes: ``metadata.json`` ->
    ``network_data_format.inputs.image.modality`` (LIDC ``"CT"``); ``None`` without a metadata.json.

    Example::

        bundle_modality("bundles/lidc")   # 'CT'
    """
    import json

    meta = Path(bundle) / "metadata.json"
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text())["network_data_format"]["inputs"]["image"].get("modality")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InferenceInputError(
            f"{meta}: cannot read network_data_format.inputs.image.modality ({type(e).__name__}: {e})"
        ) from e
    return None if value is None else str(value)


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``None`` stays ``None``).

    Checked before the network is built or a checkpoint read, so a typo or a missing GPU is one
    message instead of a traceback from deep inside torch.

    Raises:
        InferenceInputError: not a device name, CUDA/MPS not available, or a GPU index beyond
            the GPUs present (names the option, the value and what this machine has).

    Example::

        resolve_device("cpu")      # device(type='cpu')
        resolve_device("banana")   # InferenceInputError: --device 'banana' is not a device ...
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return None
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise InferenceInputError(
            f"{option} {device!r} is not a device; use cpu, cuda or cuda:N (N = GPU index)"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise InferenceInputError(
                f"{option} {device!r}: CUDA is not available on this machine (torch {torch.__version__}, {built}); "
                f"use {option} cpu"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InferenceInputError(f"{option} {device!r}: this machine has {n} GPU(s): cuda:0..cuda:{n - 1}")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise InferenceInputError(f"{option} {device!r}: device type {dev.type!r} is not available here; use cpu or cuda[:N]")


def case_name(input: str | Sequence[str]) -> str:  # noqa: A002 - the bundle key is "input"
    """A folder name for the case: the series folder's name, or the first NIfTI file's name."""
    if not input:
        from monai_hsrdiff.bundle import fail

        raise fail("no input scan: pass --input PATH (a DICOM series folder, or NIfTI file(s)) to the inference run")
    first = Path(input if isinstance(input, (str, os.PathLike)) else list(input)[0])
    name = first.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "case"


def read_source(
    task: str,
    input: str | Sequence[str],  # noqa: A002
    series_uid: str | None = None,
    modality: str | None = None,
    allow_modality_mismatch: bool = False,
) -> SourceVolume:
    """Read the scan for ``task``: LIDC a DICOM series folder (or one NIfTI CT volume in HU);
    MS-Lesion the 4 NIfTI modalities (files in the order FLAIR, MPRAGE, PD, T2, or one folder).
    A DICOM series must have ``Modality`` ``modality`` unless ``allow_modality_mismatch``."""
    paths = [str(input)] if isinstance(input, (str, os.PathLike)) else [str(p) for p in input]
    if not paths:
        raise InferenceInputError("--input is empty; pass a DICOM series folder or NIfTI file(s)")
    if task == "lidc":
        if len(paths) == 1 and is_nifti(paths[0]):
            return read_nifti_source(paths, channel_names=("CT",))
        if len(paths) != 1:
            raise InferenceInputError(f"--input: LIDC takes one DICOM series folder (or one NIfTI CT volume), got {len(paths)} paths")
        return read_dicom_source(paths[0], series_uid, modality, allow_modality_mismatch)
    if task == "ms_lesion":
        from preprocessing.ms_lesion import MODALITIES

        if len(paths) == 1 and not Path(paths[0]).is_dir() and not is_nifti(paths[0]):
            raise InferenceInputError(
                f"--input {paths[0]}: MS-Lesion needs the 4 NIfTI volumes {', '.join(m.upper() for m in MODALITIES)} "
                "(4 files in that order, or a folder holding them)"
            )
        return read_nifti_source(paths, channel_names=MODALITIES)
    raise InferenceInputError(f"unknown task {task!r}; expected 'lidc' or 'ms_lesion'")


def make_predictor(
    network: nn.Module,
    diffusion,
    num_samples: int,
    sampler: SamplerName = "ddim",
    num_inference_steps: int | None = 50,
    seed: int = 0,
    max_batch_size: int | str | None = "auto",
    kappa_log: list | None = None,
    precision: str | None = None,
    eta: float = 1.0,
) -> Predictor:
    """A sliding-window predictor: (B, C, H, W) -> (B, N, H, W) continuous HSRDiff samples.

    ``num_inference_steps`` is ignored for DDPM (it always runs all T steps). Each call appends
    the mean κ per step to ``kappa_log`` when given. ``precision``: the pipeline's
    ``autocast_dtype`` ("float32"/None, "bfloat16", "float16"); ``eta``: DDIM's noise level.
    """
    from monai_hsrdiff.diffusion import HSRDiffPipeline, get_sampler

    if int(getattr(network, "out_channels", 1)) != 1:
        raise InferenceInputError(
            f"export supports binary models (out_channels=1); this network has out_channels={network.out_channels}"
        )
    pipe = HSRDiffPipeline(network, get_sampler(sampler, diffusion, eta=eta), autocast_dtype=precision)
    generator = torch.Generator().manual_seed(int(seed))  # CPU generator: same samples on any device
    steps = None if sampler == "ddpm" else num_inference_steps

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = pipe(x, num_samples=num_samples, num_inference_steps=steps, max_batch_size=max_batch_size, generator=generator)
        if kappa_log is not None:
            kappa_log.append(out.kappa_trace.tolist())
        return out.samples[:, :, 0]

    return predict


def _parse_slices(slices) -> tuple[int, int] | None:
    if slices is None:
        return None
    if isinstance(slices, str):
        parts = slices.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            return int(parts[0]), int(parts[1])
        except ValueError:
            raise InferenceInputError(f"--slices {slices!r}: expected a:b (first slice, one past the last; 0-based)") from None
    a, b = slices
    return int(a), int(b)


def infer_case(
    network: nn.Module | None,
    diffusion,
    task: str,
    input: str | Sequence[str],  # noqa: A002
    out: str | os.PathLike,
    image_size: int,
    num_samples: int = 16,
    sampler: SamplerName = "ddim",
    num_inference_steps: int | None = 50,
    eta: float = 1.0,
    series_uid: str | None = None,
    modality: str | None = None,
    allow_modality_mismatch: bool = False,
    slices: str | Sequence[int] | None = None,
    center: Sequence[float] | None = None,
    size: Sequence[float] | None = None,
    region_units: Literal["voxel", "mm"] = "voxel",
    item_spacing: float | None | Literal["default"] = "default",
    overwrite: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    max_batch_size: int | str | None = "auto",
    precision: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    predictor: Predictor | None = None,
    summary: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Predict one scan with N samples and write the 3D Slicer case folder ``out``.

    Args:
        network: the HSRDiff network (weights loaded, or loaded here from ``checkpoint``);
            may be ``None`` when ``predictor`` is given.
        diffusion: its ``SelfRegulatedDiffusion`` (for the sampler).
        task: ``"lidc"`` (CT: DICOM series folder or a NIfTI in HU) or ``"ms_lesion"``
            (4 NIfTI modalities, or their folder).
        input: the scan: a folder, a file, or a list of files.
        out: case folder to create (must not hold results unless ``overwrite``).
        image_size: the model's training size (the sliding-window roi; MS resize target).
        num_samples: N samples per slice, >= 1.
        sampler: ``"ddim"`` (strided, ``num_inference_steps``) or ``"ddpm"`` (all T steps).
        num_inference_steps: DDIM steps.
        eta: DDIM's noise level, 0 (deterministic) .. 1 (default: as diverse as DDPM; see
            benchmarks/README.md, "Recommended sampler").
        series_uid: SeriesInstanceUID, needed when the DICOM folder holds several series.
        modality: the DICOM ``Modality`` the model was trained on (:func:`bundle_modality`);
            a DICOM series of another modality is refused. ``None``: not checked.
        allow_modality_mismatch: run on a DICOM series of another modality anyway (a warning).
        slices: ``"a:b"`` or ``(a, b)``: only slices a <= s < b along the model's slice axis.
        center, size: a box instead: centre and size along the array axes (i, j, k).
        region_units: ``"voxel"`` or ``"mm"`` (centre then an LPS point) for ``center``/``size``.
        item_spacing: LIDC in-plane spacing (mm) of the training items; ``None`` = the scan's
            own spacing (the demo data); ``"default"`` = ``preprocessing.lidc``'s 0.5 mm.
        overwrite: replace an ``out`` that holds an earlier case of this command (only that:
            a folder holding anything else is refused, naming the entries; nothing is deleted).
        seed: seeds the samples (a CPU generator, so CPU and GPU runs draw the same noise).
        device: model device; default the network's device.
        sw_batch_size, overlap: sliding-window batch and overlap.
        max_batch_size: largest number of samples the network denoises at once (``"auto"``: by
            device and image size, see ``HSRDiffPipeline``; it changes speed, not the samples).
        precision: "float32" (default, None), or "bfloat16" / "float16" to sample under autocast
            (~1.7-1.9x per step on CPUs with bf16 units, GED16 within ~5 %; benchmarks/README.md).
        checkpoint: weights to load into ``network`` first (``model.pt`` or a resume checkpoint).
        predictor: replaces the HSRDiff sampler: (B, C, roi, roi) -> (B, N, roi, roi) values,
            mask = value > 0 (deterministic predictors make the geometry testable).
        summary: extra fields for ``summary.json``.
        log: progress sink or ``None``.

    Returns:
        the case folder.

    Raises:
        InferenceInputError: bad input, option, region or output folder (nothing is written).
        DicomSeriesError: a bad DICOM series.
        BundleError: the checkpoint is missing or does not match the network.
    """
    from monai_hsrdiff.export.slicer import check_output_folder, write_case

    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InferenceInputError(f"--num-samples must be an integer >= 1, got {num_samples!r}")
    if sampler not in ("ddim", "ddpm"):
        raise InferenceInputError(f"--sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= float(eta) <= 1.0:
        raise InferenceInputError(f"--eta must be a number in [0, 1], got {eta!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InferenceInputError(f"--precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    # fail before the checkpoint is read and any sampling: an --out that overlaps the input or a
    # protected folder, or holds anything but an earlier case (--overwrite replaces only that);
    # a symbolic link is written through (``out`` becomes its target)
    inputs = [input] if isinstance(input, (str, os.PathLike)) else list(input or [])
    out = check_output_folder(out, overwrite, inputs)
    # a killed earlier write leaves the case under .<name>.*.partial and a replaced one under .old
    remove_interrupted_writes(out, ("partial", "old"), say)
    if network is None and predictor is None:
        raise ValueError("infer_case: give a network (and diffusion) or a predictor")
    if checkpoint is not None and network is not None:
        from monai_hsrdiff.handlers import load_network_weights

        load_network_weights(checkpoint, network, task, option="--checkpoint")
    source = read_source(task, input, series_uid, modality, bool(allow_modality_mismatch))
    if network is not None:
        expected = int(getattr(network, "in_channels", source.data.shape[0]))
        if source.data.shape[0] != expected:
            raise InferenceInputError(
                f"--input gives {source.data.shape[0]} channel(s) {list(source.channel_names)} but the network expects "
                f"in_channels={expected}; use the bundle made for this kind of scan"
            )
    region = Region.from_options(source, _parse_slices(slices), center, size, region_units)
    if task == "lidc":
        spacing = default_item_spacing(task) if item_spacing == "default" else item_spacing
        pp = lidc_preprocessing(image_size, spacing)
    else:
        pp = ms_lesion_preprocessing(image_size)
    if device is None:
        device = next(network.parameters()).device if network is not None else torch.device("cpu")
    kappa: list = []
    if predictor is None:
        network.eval()
        predictor = make_predictor(
            network, diffusion, num_samples, sampler, num_inference_steps, seed, max_batch_size, kappa, precision,
            float(eta),
        )
    t_read = time.perf_counter() - t0
    say(f"[hsrdiff] {task}: {list(source.channel_names)} volume {source.shape}, region {region.lo}..{region.hi}, "
        f"N={num_samples} samples, {sampler} {'all' if sampler == 'ddpm' else num_inference_steps} steps")  # fmt: skip
    pred = predict_volume(source, predictor, pp, region, num_samples, sw_batch_size, overlap, device, log)
    doc = {
        "task": task,
        "input": [str(p) for p in ([input] if isinstance(input, (str, os.PathLike)) else input)],
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "sampler": sampler,
        "num_inference_steps": None if sampler == "ddpm" else num_inference_steps,
        "eta": None if sampler == "ddpm" else float(eta),
        "precision": precision or "float32",
        "seed": int(seed),
        "preprocessing": pp.as_json(),
        "sliding_window": {"roi_size": [pp.image_size] * 2, "overlap": overlap, "mode": "constant"},
        "synthetic": bool(source.info.get("synthetic", False)),
        "timings": {"read_s": t_read},
        **(summary or {}),
    }
    if kappa:
        doc["kappa_trace_mean"] = np.mean(np.asarray(kappa), axis=0).round(4).tolist()
    case = write_case(out, pred, source, doc, overwrite)
    say(f"[hsrdiff] wrote {case} — open it in 3D Slicer (drag the files onto the window; see docs/slicer.md)")
    return case


def bundle_infer_case(**kwargs: Any) -> Path:
    """:func:`infer_case` for ``inference.json``: bad input stops the bundle run with a message, no traceback."""
    from monai_hsrdiff.bundle import fail
    from monai_hsrdiff.io.dicom import DicomSeriesError

    try:
        return infer_case(**kwargs)
    except (InferenceInputError, DicomSeriesError) as e:
        raise fail(str(e)) from e


def _check_override_keys(bundle: Path, configs: Sequence[Path]) -> None:
    """Stop (``BundleError``) on a ``--config`` file that is not JSON or sets a key the bundle does not
    define: MONAI would silently add a misspelt key and the model would not be the one trained."""
    from monai_hsrdiff.bundle import _NOT_DEFINITIONS, _load_json, check_config_keys

    definitions = sorted(p for p in bundle.glob("*.json") if p.name not in _NOT_DEFINITIONS)
    overrides: dict[str, str] = {}
    for c in configs:
        overrides.update({k: str(c) for k in _load_json(c) if k not in overrides})
    check_config_keys(overrides, definitions)


def _bundle_parser(bundle: str | os.PathLike, configs: Sequence[str | os.PathLike] = ()):
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    files = [bundle / "train.json", bundle / "inference.json", *[Path(c) for c in configs]]
    for f in files:
        if not f.is_file():
            raise InferenceInputError(f"config file {f} does not exist (--bundle {bundle}, --config {list(configs)})")
    _check_override_keys(bundle, [Path(c) for c in configs])
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser


def infer(
    bundle: str | os.PathLike,
    input: str | Sequence[str],  # noqa: A002
    out: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    configs: Sequence[str | os.PathLike] = (),
    num_samples: int | None = None,
    sampler: SamplerName | None = None,
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
    log: Callable[[str], None] | None = print,
) -> Path:
    """Build the bundle's network, load ``checkpoint`` and run :func:`infer_case` on ``input``.

    Args:
        bundle: ``bundles/lidc`` or ``bundles/ms_lesion``.
        configs: override files merged after ``train.json`` and ``inference.json`` (e.g.
            ``bundles/lidc/demo.json`` for a demo-trained model).
        checkpoint: default the config's ``checkpoint`` (``<run_dir>/checkpoints/model.pt``).
        out: default the config's ``output_dir`` (``<run_dir>/inference/<case>``).
        num_samples, sampler, steps, eta, precision, seed: default the config's ``num_samples``,
            ``sampler``, ``sampling_steps``, ``sampler_eta``, ``precision``, ``seed``.
        device: ``cpu``, ``cuda``, ``cuda:N``; checked first (:func:`resolve_device`).
        allow_modality_mismatch: run on a DICOM series whose Modality is not the bundle's
            (``metadata.json``); default the config's ``allow_modality_mismatch``.
        Other arguments: as :func:`infer_case`.

    Example::

        infer("bundles/lidc", "/data/scan1/", out="runs/lidc/inference/scan1", num_samples=16)
    """
    checked_device = resolve_device(device)  # before the bundle is parsed and the checkpoint read
    parser = _bundle_parser(bundle, configs)
    parser["input"] = str(input) if isinstance(input, (str, os.PathLike)) else [str(p) for p in input]
    task = parser.get_parsed_content("task")
    dev = checked_device if checked_device is not None else parser.get_parsed_content("device")
    network = parser.get_parsed_content("network_def", instantiate=True).to(dev)
    diffusion = parser.get_parsed_content("diffusion", instantiate=True)
    return infer_case(
        network,
        diffusion,
        task=task,
        input=input,
        out=out if out is not None else parser.get_parsed_content("output_dir"),
        image_size=int(parser.get_parsed_content("image_size")),
        num_samples=int(num_samples if num_samples is not None else parser.get_parsed_content("num_samples")),
        sampler=sampler or parser.get_parsed_content("sampler"),
        num_inference_steps=steps if steps is not None else parser.get_parsed_content("sampling_steps"),
        eta=eta if eta is not None else parser.get_parsed_content("sampler_eta"),
        precision=precision or parser.get_parsed_content("precision"),
        series_uid=series_uid,
        modality=bundle_modality(bundle),
        allow_modality_mismatch=bool(allow_modality_mismatch or parser.get_parsed_content("allow_modality_mismatch")),
        slices=slices,
        center=center,
        size=size,
        region_units=region_units,
        item_spacing=parser.get_parsed_content("inference_item_spacing"),
        overwrite=overwrite,
        seed=int(seed if seed is not None else parser.get_parsed_content("seed")),
        device=dev,
        checkpoint=checkpoint if checkpoint is not None else parser.get_parsed_content("checkpoint"),
        log=log,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monai_hsrdiff.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/lidc or bundles/ms_lesion")
    p.add_argument("--config", nargs="+", default=[], help="override config files merged after train.json and inference.json (e.g. bundles/lidc/demo.json)")
    p.add_argument("--checkpoint", default=None, help="model.pt or resume checkpoint (default <run_dir>/checkpoints/model.pt)")
    p.add_argument("--input", nargs="+", required=True, help="LIDC: DICOM series folder; MS-Lesion: FLAIR MPRAGE PD T2 NIfTI files or their folder")
    p.add_argument("--out", default=None, help="case folder to create (default <run_dir>/inference/<case>)")
    p.add_argument("--num-samples", type=int, default=None, help="N samples (default from inference.json)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (DDPM always runs all T)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM noise level in [0, 1] (default from inference.json: 1.0; 0 = deterministic DDIM)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="sampling precision (default from inference.json: float32); bfloat16 is ~1.7-1.9x faster per step on "
                        "CPUs with bf16 units; GED16 moved by up to ~5 %% in benchmarks/README.md")
    p.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--allow-modality-mismatch", action="store_true",
                   help="run on a DICOM series whose Modality (0008,0060) is not the one in the bundle's metadata.json "
                        "(LIDC: CT); the predictions on such images are not validated")
    region = p.add_mutually_exclusive_group()
    region.add_argument("--slices", default=None, help="a:b, slices a <= s < b along the model's slice axis (0-based)")
    region.add_argument("--center", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="region centre (with --size)")
    p.add_argument("--size", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"), help="region size along the array axes i, j, k")
    p.add_argument("--units", choices=("voxel", "mm"), default="voxel", help="units of --center/--size: voxel index or LPS mm")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier case in --out (only a case this command wrote: other files are refused, never deleted)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from monai_hsrdiff.bundle import BundleError
    from monai_hsrdiff.io.dicom import DicomSeriesError

    args = _parser().parse_args(argv)
    if args.size is not None and args.center is None:
        print("error: --size needs --center", file=sys.stderr)
        return 2
    try:
        infer(
            args.bundle,
            args.input[0] if len(args.input) == 1 else args.input,
            out=args.out,
            checkpoint=args.checkpoint,
            configs=args.config,
            num_samples=args.num_samples,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            precision=args.precision,
            series_uid=args.series_uid,
            slices=args.slices,
            center=args.center,
            size=args.size,
            region_units=args.units,
            overwrite=args.overwrite,
            seed=args.seed,
            device=args.device,
            allow_modality_mismatch=args.allow_modality_mismatch,
        )
    except BundleError as e:  # already printed by monai_hsrdiff.bundle.fail
        return int(e.code or 2)
    except (InferenceInputError, DicomSeriesError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
