"""One case, wired from objects as ``bundles/<task>/inference.json`` declares them (model-zoo style).

``case_reader`` (:class:`CaseReader`: the scan, its region and the task's slice preprocessing)
-> ``pipeline`` (:class:`~monai_hsrdiff.diffusion.HSRDiffPipeline`: sampler, steps, eta,
precision, chunking) -> ``volume_inferer`` (:class:`VolumeInferer`: N samples slice by slice,
back in the source grid) -> ``case_writer`` (``monai_hsrdiff.export.SlicerCaseWriter``: the 3D
Slicer case folder). :func:`run_case` runs them in the order that writes nothing for bad input;
:func:`run_bundle_inference` runs a bundle's ``inference`` with overrides (the command line's path);
:func:`run_inference` is that ``inference``: one case, or a cohort (:mod:`monai_hsrdiff.inference.cohort`).

Example::

    task = get_task("lidc")
    pipe = HSRDiffPipeline(net, get_sampler("ddim", process, eta=1.0, num_inference_steps=50))
    case = run_case("/data/scan1/", CaseReader(task, image_size=128, modality="CT"),
                    VolumeInferer(pipe, num_samples=16, seed=0), SlicerCaseWriter("runs/lidc/inference/scan1"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from monai_hsrdiff.errors import InferenceInputError, own_error
from monai_hsrdiff.inference.source import SourceVolume
from monai_hsrdiff.inference.volume import Predictor, Region, SlicePreprocessing, VolumePrediction, predict_volume

if TYPE_CHECKING:
    import torch

__all__ = ["CaseReader", "VolumeInferer", "load_weights", "parse_slices", "run_bundle_inference", "run_case", "run_inference"]

Log = Callable[[str], None] | None


class _Task(Protocol):  # monai_hsrdiff.tasks.Task (not imported: the tasks build on this package)
    name: str

    def read_source(self, paths: Any, series_uid: Any = None, modality: Any = None, allow_modality_mismatch: bool = False) -> SourceVolume: ...  # fmt: skip

    def slice_preprocessing(self, image_size: int, item_spacing: Any = "default") -> SlicePreprocessing: ...


def parse_slices(slices: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"a:b"`` or ``(a, b)`` -> ``(a, b)``: slices a <= s < b (0-based); ``None`` stays ``None``."""
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


class CaseReader:
    """Reads a case for ``task``: the scan, the region to predict and the model-input preprocessing.

    Args:
        task: a registered task (``monai_hsrdiff.tasks.get_task("lidc")``).
        image_size: the model's training size (the sliding-window roi).
        series_uid: SeriesInstanceUID, when the DICOM folder holds several series.
        modality: the DICOM Modality the model was trained on (``metadata.json``); ``None``: not checked.
        allow_modality_mismatch: read a DICOM series of another modality anyway (a warning).
        item_spacing: in-plane item spacing (mm); ``"default"``: the task's; ``None``: the scan's own.
        slices: ``"a:b"`` or ``(a, b)``: only slices a <= s < b along the model's slice axis.
        center, size: a box instead: centre and size along the array axes (i, j, k).
        region_units: ``"voxel"`` or ``"mm"`` (centre then an LPS point) for ``center``/``size``.
    """

    def __init__(
        self,
        task: _Task,
        image_size: int,
        series_uid: str | None = None,
        modality: str | None = None,
        allow_modality_mismatch: bool = False,
        item_spacing: float | None | Literal["default"] = "default",
        slices: str | Sequence[int] | None = None,
        center: Sequence[float] | None = None,
        size: Sequence[float] | None = None,
        region_units: Literal["voxel", "mm"] = "voxel",
    ) -> None:
        self.task, self.image_size, self.item_spacing = task, int(image_size), item_spacing
        self.series_uid, self.modality, self.allow_modality_mismatch = series_uid, modality, bool(allow_modality_mismatch)
        self.slices, self.center, self.size, self.region_units = slices, center, size, region_units

    def __call__(self, input: str | Sequence[str]) -> tuple[SourceVolume, Region, SlicePreprocessing]:  # noqa: A002
        """The (C, I, J, K) source, the region box and the slice preprocessing of ``input``."""
        source = self.task.read_source(input, self.series_uid, self.modality, self.allow_modality_mismatch)
        region = Region.from_options(source, parse_slices(self.slices), self.center, self.size, self.region_units)
        return source, region, self.task.slice_preprocessing(self.image_size, self.item_spacing)


class VolumeInferer:
    """N samples of a whole scan: the pipeline on every slice (sliding window), in the source grid.

    Args:
        pipeline: the sampling pipeline (its model, sampler, steps, eta, precision, chunking).
        num_samples: N samples per slice, >= 1.
        seed: seeds every sample (a CPU generator, so CPU and GPU runs draw the same noise).
        sw_batch_size, overlap: sliding-window batch and overlap.
        predictor: instead of ``pipeline``: (B, C, roi, roi) -> (B, N, roi, roi) values, mask =
            value > 0 (deterministic predictors make the geometry testable).

    After a call, ``kappa_trace`` holds the mean κ per step of each pipeline call.
    """

    def __init__(
        self,
        pipeline: Any = None,
        num_samples: int = 16,
        seed: int = 0,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        predictor: Predictor | None = None,
    ) -> None:
        if pipeline is None and predictor is None:
            raise ValueError("VolumeInferer: give a pipeline (HSRDiffPipeline) or a predictor")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise InferenceInputError(f"--num-samples must be an integer >= 1, got {num_samples!r}")
        eta = getattr(getattr(pipeline, "sampler", None), "eta", None)
        if eta is not None and not 0.0 <= eta <= 1.0:  # DDIM's noise level; the evaluator allows more
            raise InferenceInputError(f"--eta must be a number in [0, 1], got {eta!r}")
        self.pipeline, self.predictor = pipeline, predictor
        self.num_samples, self.seed = num_samples, int(seed)
        self.sw_batch_size, self.overlap = int(sw_batch_size), float(overlap)
        self.kappa_trace: list[list[float]] = []

    @property
    def network(self) -> torch.nn.Module | None:
        """The pipeline's model (``None`` with a ``predictor``)."""
        return None if self.pipeline is None else self.pipeline.model

    def check(self, source: SourceVolume) -> None:
        """Refuse a scan whose channels are not the network's, and a non-binary network."""
        net = self.network
        if net is None:
            return
        expected = int(getattr(net, "in_channels", source.data.shape[0]))
        if source.data.shape[0] != expected:
            raise InferenceInputError(
                f"--input gives {source.data.shape[0]} channel(s) {list(source.channel_names)} but the network expects "
                f"in_channels={expected}; use the bundle made for this kind of scan"
            )
        if int(getattr(net, "out_channels", 1)) != 1:
            raise InferenceInputError(
                f"export supports binary models (out_channels=1); this network has out_channels={net.out_channels}"
            )

    def _pipeline_predictor(self) -> Predictor:
        import torch

        generator = torch.Generator().manual_seed(self.seed)  # CPU generator: same samples on any device

        def predict(x: torch.Tensor) -> torch.Tensor:
            out = self.pipeline(x, num_samples=self.num_samples, generator=generator)
            self.kappa_trace.append(out.kappa_trace.tolist())
            return out.samples[:, :, 0]

        return predict

    def __call__(
        self, source: SourceVolume, preprocessing: SlicePreprocessing, region: Region | None = None, log: Log = None
    ) -> VolumePrediction:
        """(N, I, J, K) bool samples of ``source`` in ``region`` (:func:`predict_volume`)."""
        self.kappa_trace = []
        net = self.network
        device = next(net.parameters()).device if net is not None else "cpu"
        predictor = self.predictor if self.predictor is not None else self._pipeline_predictor()
        return predict_volume(source, predictor, preprocessing, region, self.num_samples, self.sw_batch_size,
                              self.overlap, device, log)  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """The sampling fields of ``summary.json``: sampler, num_inference_steps and eta (``None``
        where the sampler has none), precision, compile, seed, and the κ trace of the last call."""
        settings = {"sampler": None, "num_inference_steps": None, "eta": None, "precision": "float32", "compile": False}
        if self.pipeline is not None:
            settings = {**self.pipeline.sampler.settings, "precision": self.pipeline.precision,
                        "compile": bool(getattr(self.pipeline, "compile", False))}  # fmt: skip
        doc: dict[str, Any] = {**settings, "seed": self.seed}
        if self.kappa_trace:
            doc["kappa_trace_mean"] = np.mean(np.asarray(self.kappa_trace), axis=0).round(4).tolist()
        return doc


def run_case(
    input: str | Sequence[str],  # noqa: A002 - the bundle key is "input"
    reader: CaseReader,
    inferer: VolumeInferer,
    writer: Any,
    checkpoint: str | os.PathLike | None = None,
    summary: dict[str, Any] | None = None,
    log: Log = print,
) -> Path:
    """Predict one scan and write its case folder; return the folder.

    The order writes nothing for bad input: the output folder is checked first (``writer.prepare``:
    before the checkpoint is read and any sampling), then the checkpoint is loaded into the
    inferer's network, the scan read and checked, and only then sampled and written.

    Args:
        input: the scan: a folder, a file, or a list of files.
        reader, inferer: see :class:`CaseReader`, :class:`VolumeInferer`.
        writer: ``prepare(inputs, log) -> Path`` and ``__call__(prediction, source, summary) -> Path``
            (``monai_hsrdiff.export.SlicerCaseWriter``); an optional ``check_source(source)`` runs
            after the scan is read and before sampling.
        checkpoint: weights to load into the inferer's network first (``model.pt`` or a resume checkpoint).
        summary: extra fields for ``summary.json``.
        log: progress sink or ``None``.

    Raises:
        InferenceInputError: bad input, option, region or output folder (nothing is written).
        DicomSeriesError: a bad DICOM series.
        BundleError: the checkpoint is missing or does not match the network.
    """
    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    inputs = [str(input)] if isinstance(input, (str, os.PathLike)) else [str(p) for p in input or []]
    writer.prepare(inputs, say)
    if checkpoint is not None:
        load_weights(checkpoint, inferer, reader.task.name, say)
    source, region, pp = reader(input)
    inferer.check(source)
    if hasattr(writer, "check_source"):  # e.g. the DICOM headers --dicom-out references, before any sampling
        writer.check_source(source)
    t_read = time.perf_counter() - t0
    sampling = inferer.summary()
    steps = "all" if sampling["num_inference_steps"] is None else sampling["num_inference_steps"]
    say(f"[hsrdiff] {reader.task.name}: {list(source.channel_names)} volume {source.shape}, region {region.lo}..{region.hi}, "
        f"N={inferer.num_samples} samples, {sampling['sampler']} {steps} steps")  # fmt: skip
    pred = inferer(source, pp, region, log)
    doc = {
        "task": reader.task.name,
        "input": inputs,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        **inferer.summary(),
        "preprocessing": pp.as_json(),
        "sliding_window": {"roi_size": [pp.image_size] * 2, "overlap": inferer.overlap, "mode": "constant"},
        "synthetic": bool(source.info.get("synthetic", False)),
        "timings": {"read_s": t_read},
        **(summary or {}),
    }
    case = writer(pred, source, doc)
    say(f"[hsrdiff] wrote {case} — open it in 3D Slicer (drag the files onto the window; see docs/slicer.md)")
    return case


def load_weights(checkpoint: str | os.PathLike, inferer: VolumeInferer, task: str, log: Log = print) -> None:
    """Load ``checkpoint`` (``model.pt`` or a resume checkpoint) into the inferer's network, saying so.

    Raises:
        BundleError: the checkpoint is missing or does not match the network.
    """
    if inferer.network is None:
        return
    from monai_hsrdiff.handlers import load_network_weights

    (log or (lambda _m: None))(f"[hsrdiff] loading network weights from {checkpoint}")
    load_network_weights(checkpoint, inferer.network, task, option="--checkpoint")


def run_inference(
    input: str | Sequence[str] | None,  # noqa: A002 - the bundle key is "input"
    reader: CaseReader,
    inferer: VolumeInferer,
    writer: Any,
    checkpoint: str | os.PathLike | None = None,
    input_list: str | os.PathLike | None = None,
    input_root: str | os.PathLike | None = None,
    log: Log = print,
) -> Any:
    """``inference.json``'s ``inference``: one case (``input``: :func:`run_case`, returns its folder) or a
    cohort (``input_list`` CSV or ``input_root`` folder: :func:`~monai_hsrdiff.inference.cohort.run_cohort`
    into the writer's ``output_dir``, one sub-folder per case; returns ``cohort.json``'s document and
    stops with exit code 1 when a case failed).

    Raises:
        InferenceInputError: none or several of ``input``/``input_list``/``input_root``, a bad case list.
    """
    given = [k for k, v in (("input", input), ("input_list", input_list), ("input_root", input_root)) if v]
    if len(given) > 1:
        raise InferenceInputError(f"give one of input, input_list, input_root (--input, --input-list, --input-root); got {', '.join(given)}")
    if not input_list and not input_root:
        return run_case(input, reader, inferer, writer, checkpoint=checkpoint, log=log)
    from monai_hsrdiff.inference.cohort import CohortFailedError, cases_under_root, read_case_list, run_cohort

    cases = read_case_list(input_list) if input_list else cases_under_root(input_root)  # type: ignore[arg-type]
    if input_root:  # an output inside ROOT would be read as a case on the next run
        from monai_hsrdiff.utils.outputs import OutputFolderError, guard_output_path

        try:
            guard_output_path(writer.output_dir, [input_root], input_option="--input-root")
        except OutputFolderError as e:
            raise InferenceInputError(str(e)) from None
    doc = run_cohort(cases, writer.output_dir, reader, inferer, writer, checkpoint=checkpoint, log=log)
    if doc["totals"]["failed"]:
        raise CohortFailedError(doc)  # each failure is reported: monai.bundle and the command line exit with 1
    return doc


def run_bundle_inference(config_files: Sequence[str | os.PathLike], overrides: dict[str, Any] | None = None) -> Any:
    """Run a bundle's ``inference`` expressions in order, with ``overrides`` set as config keys.

    ``config_files`` are merged in order (``train.json``, ``inference.json``, overrides such as
    ``demo.json``); returns the last expression's result (the case folder of :func:`run_case`).

    Example::

        run_bundle_inference(["bundles/lidc/train.json", "bundles/lidc/inference.json"],
                             {"input": "/data/scan1/", "num_samples": 4})
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    result = None
    for i in range(len(parser["inference"])):
        try:
            result = parser.get_parsed_content(f"inference#{i}")
        except Exception as e:  # noqa: BLE001 - re-raised, unwrapped where it is a user error
            inner = _user_error(e)
            if inner is None or inner is e:
                raise
            raise inner from None
    return result


def _user_error(exc: BaseException) -> BaseException | None:
    """MONAI's config resolution wraps an item's error in ``RuntimeError("Failed to ...")``: the error
    inside it to report instead, ours first, else a ``ValueError``/``OSError``; ``None`` for a bug."""
    own = own_error(exc)
    if own is not None:
        return own
    while exc is not None and not isinstance(exc, (ValueError, OSError)):
        exc = exc.__cause__ or exc.__context__
    return exc
