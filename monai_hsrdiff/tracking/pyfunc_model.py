"""The trained HSRDiff as an MLflow model: a ``pyfunc`` over the sampling pipeline, logged and registered.

:class:`HSRDiffPyfunc` wraps :class:`~monai_hsrdiff.diffusion.HSRDiffPipeline` (network + sampler),
so ``mlflow models serve -m models:/<name>/<version>`` answers with N segmentation hypotheses per
image. The logged model carries everything it needs besides the installed ``monai_hsrdiff``
package: the weights (artifact ``weights`` = the best ``model.pt``) and the network, diffusion and
sampler settings (artifact ``settings`` = ``settings.json``, see :func:`model_settings`), so it
loads without the bundle files.

Input: one tensor (N_images, C, H, W) float32, each image exactly as the ``image`` of a
datalist item (``monai_hsrdiff.data.load_item(path)["image"]``: LIDC CT in [-1, 1] through the
task's HU window, MS-Lesion z-scored channels), H = W = the training ``image_size``.
Params (optional per request): ``num_samples`` N, ``seed``.
Output: ``samples`` (N_images, N, H, W) uint8 (binary masks {0, 1}; class labels for M > 1),
``mean`` (N_images, H, W) float32 (fraction of samples marking the pixel as foreground) and
``entropy`` (N_images, H, W) float32 (bits, :func:`~monai_hsrdiff.metrics.entropy_map`).

The serving environment must import ``monai_hsrdiff`` (``--env-manager local`` from the
project's venv, where the package is installed in editable mode); the package is not copied
into the model (no ``code_paths``), so a served model runs the installed code version.

Example::

    served = ServedModel(net, process, sampler="ddim", num_inference_steps=10, eta=1.0,
                         num_samples=16, seed=0, image_size=64, registered_model_name="hsrdiff_lidc")
    version = served.log("sqlite:////abs/runs/lidc_demo/mlflow.db", run_id, "checkpoints/model.pt",
                         tags={"val_ged16": "0.41"})
    model = mlflow.pyfunc.load_model(f"models:/hsrdiff_lidc/{version.version}")
    out = model.predict(images, params={"num_samples": 8, "seed": 1})   # {"samples", "mean", "entropy"}
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from monai_hsrdiff.diffusion import DiffusionSchedule, HSRDiffPipeline, SelfRegulatedDiffusion, get_sampler
from monai_hsrdiff.engines.evaluator import samples_to_masks
from monai_hsrdiff.metrics import entropy_map

from .store import mlflow_command

__all__ = ["MODEL_NAME", "HSRDiffPyfunc", "ServedModel", "build_pipeline", "model_settings", "network_arguments", "predict_outputs", "serve_command"]

#: name of the logged model (MLflow 3 "Logged models"; its files: <artifact root>/models/<model id>/artifacts)
MODEL_NAME = "hsrdiff_model"
SETTINGS_VERSION = 1


def network_arguments(network: torch.nn.Module) -> dict[str, Any]:
    """The ``HSRDiff(...)`` keyword arguments that rebuild ``network`` (read from the object itself).

    GroupNorm's groups and eps are not kept as attributes: they are read from the first
    ``nn.GroupNorm`` (the network uses one setting for all of them).
    """
    net = getattr(network, "module", network)
    norm = next((m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)), None)
    if norm is None:
        raise ValueError(f"network_arguments: {type(net).__name__} has no GroupNorm; is it an HSRDiff network?")
    names = ("spatial_dims", "in_channels", "out_channels", "channels", "num_res_blocks", "attention_levels",
             "num_head_channels", "prediction", "condition", "decoder_skips", "phi_channels", "use_flash_attention")  # fmt: skip
    missing = [n for n in names if not hasattr(net, n)]
    if missing:
        raise ValueError(f"network_arguments: {type(net).__name__} lacks {missing}; is it an HSRDiff network?")
    args = {n: getattr(net, n) for n in names}
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    return {**args, "norm_num_groups": int(norm.num_groups), "norm_eps": float(norm.eps)}


def _diffusion_arguments(process: SelfRegulatedDiffusion) -> dict[str, Any]:
    schedule = process.schedule  # schedule_args holds beta_start/beta_end of the linear schedules
    return {
        "num_train_timesteps": int(schedule.num_train_timesteps),
        "schedule": schedule.schedule,
        "schedule_args": {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                          for k, v in schedule.schedule_args.items()},  # fmt: skip
        "dual_weight": float(process.dual_weight),
        "clip_x0": bool(process.clip_x0),
    }


def _build_process(d: Mapping[str, Any]) -> SelfRegulatedDiffusion:
    schedule = DiffusionSchedule(d["num_train_timesteps"], d["schedule"], **d["schedule_args"])
    return SelfRegulatedDiffusion(schedule, dual_weight=d["dual_weight"], clip_x0=d["clip_x0"])


def model_settings(
    network: torch.nn.Module,
    process: SelfRegulatedDiffusion,
    sampler: str,
    num_inference_steps: int | None,
    eta: float,
    num_samples: int,
    seed: int,
    image_size: int,
    precision: str = "float32",
) -> dict[str, Any]:
    """The logged model's ``settings.json``: how to rebuild the network, the process and the sampler.

    Keys: ``network`` (``HSRDiff`` arguments), ``diffusion`` (schedule and process settings),
    ``sampler``, ``num_inference_steps``, ``eta``, ``precision``, ``num_samples`` and ``seed``
    (the defaults of the request params), ``image_size``, ``version``.
    Raises ``ValueError`` when the rebuilt schedule would differ from ``process``'s.
    """
    settings = {
        "version": SETTINGS_VERSION,
        "network": network_arguments(network),
        "diffusion": _diffusion_arguments(process),
        "sampler": str(sampler),
        "num_inference_steps": None if num_inference_steps is None else int(num_inference_steps),
        "eta": float(eta),
        "precision": str(precision),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "image_size": int(image_size),
    }
    if not torch.equal(_build_process(settings["diffusion"]).schedule.betas, process.schedule.betas):
        raise ValueError("model_settings: the noise schedule cannot be rebuilt from its settings; not logging the model")
    return settings


def build_pipeline(settings: Mapping[str, Any], weights: str | os.PathLike, device: str | torch.device = "cpu") -> HSRDiffPipeline:
    """The pipeline of a logged model: ``HSRDiff(**settings["network"])`` with ``weights`` (a bare
    state dict, or a resume checkpoint whose ``ema``/``network`` is used) and its sampler."""
    from monai_hsrdiff.networks import HSRDiff

    net = HSRDiff(**settings["network"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state.get("ema") or state["network"]
    net.load_state_dict(state)
    net.to(device).eval()
    sampler = get_sampler(settings["sampler"], _build_process(settings["diffusion"]), eta=settings["eta"],
                          num_inference_steps=settings["num_inference_steps"])  # fmt: skip
    return HSRDiffPipeline(net, sampler, autocast_dtype=settings["precision"])


def predict_outputs(pipeline: HSRDiffPipeline, images: torch.Tensor, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """``samples`` (B, N, H, W) uint8, ``mean`` and ``entropy`` (B, H, W) float32 for (B, C, H, W) ``images``.

    One pipeline call with ``torch.Generator(device).manual_seed(seed)``, as the evaluator draws them.
    """
    device = next(pipeline.model.parameters()).device
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(int(seed))
    with torch.inference_mode():
        out = pipeline(images.to(device), num_samples=int(num_samples), generator=generator)
    masks = samples_to_masks(out.samples).cpu()  # (B, N, H, W) bool, or class labels for M > 1
    m = int(pipeline.model.out_channels)
    num_classes = m if m > 1 else None
    return {
        "samples": masks.numpy().astype(np.uint8),
        "mean": (masks > 0).float().mean(dim=1).numpy(),
        "entropy": np.stack([entropy_map(s.numpy(), num_classes) for s in masks]).astype(np.float32),
    }


class HSRDiffPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` model of a trained HSRDiff: images in, N samples, mean and entropy out (module docstring)."""

    def load_context(self, context: Any) -> None:
        self.settings = json.loads(Path(context.artifacts["settings"]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = build_pipeline(self.settings, context.artifacts["weights"], device)

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        # np.ndarray: a hint MLflow infers no schema from (the signature is explicit); others warn or convert
        images = np.asarray(model_input, dtype=np.float32)
        c, s = self.settings["network"]["in_channels"], self.settings["image_size"]
        if images.ndim != 4 or images.shape[1:] != (c, s, s):
            raise ValueError(
                f"HSRDiffPyfunc: expected images (N_images, {c}, {s}, {s}) float32 (datalist items' 'image'), "
                f"got shape {images.shape}"
            )
        params = dict(params or {})
        num_samples = int(params.get("num_samples") or self.settings["num_samples"])
        seed = int(self.settings["seed"] if params.get("seed") is None else params["seed"])
        return predict_outputs(self.pipeline, torch.from_numpy(np.ascontiguousarray(images)), num_samples, seed)


def model_signature(settings: Mapping[str, Any]) -> mlflow.models.ModelSignature:
    """Tensor-spec signature: (-1, C, S, S) float32 in; samples/mean/entropy out; params num_samples, seed."""
    c, s = settings["network"]["in_channels"], settings["image_size"]
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, c, s, s))])
    outputs = Schema([
        TensorSpec(np.dtype(np.uint8), (-1, -1, s, s), "samples"),
        TensorSpec(np.dtype(np.float32), (-1, s, s), "mean"),
        TensorSpec(np.dtype(np.float32), (-1, s, s), "entropy"),
    ])  # fmt: skip
    params = ParamSchema([ParamSpec("num_samples", "long", settings["num_samples"]), ParamSpec("seed", "long", settings["seed"])])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs, params=params)


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging uses the global tracking URI: MLflow's own context manager sets it for
    the block; it also sets (and on leaving unsets) ``MLFLOW_TRACKING_URI``, which is restored here."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


class ServedModel:
    """What the training run logs as its MLflow model and registers (train.json ``served_model``).

    Args:
        network: the trained network's module (for its architecture; the weights come from the file).
        process: the run's ``SelfRegulatedDiffusion`` (schedule).
        sampler, num_inference_steps, eta, precision: the sampling settings served (the
            bundles pass the validation's, under which ``val_ged16`` was measured).
        num_samples, seed: the defaults of the request params.
        image_size: the training size (H = W of the input).
        registered_model_name: Model Registry name; None: :meth:`log` only logs the model, and
            :meth:`log_training_run` registers it under the training's experiment name (the
            bundles: ``experiment_name``, e.g. ``hsrdiff_lidc``).
        weights: the checkpoint :meth:`log_training_run` logs (the bundles: the best ``model.pt``).
        key_metric: the validation metric ``weights`` is the best of (lower is better); its best
            value and epoch become the model version's tags ``val_ged16`` and ``val_epoch``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        process: SelfRegulatedDiffusion,
        sampler: str = "ddim",
        num_inference_steps: int | None = 50,
        eta: float = 1.0,
        num_samples: int = 16,
        seed: int = 0,
        image_size: int = 128,
        precision: str = "float32",
        registered_model_name: str | None = None,
        weights: str | os.PathLike | None = None,
        key_metric: str = "val_ged16",
    ) -> None:
        self.settings = model_settings(network, process, sampler, num_inference_steps, eta, num_samples, seed, image_size, precision)
        self.registered_model_name = registered_model_name
        self.weights = None if weights is None else str(weights)
        self.key_metric = key_metric

    def log_training_run(self, tracking_uri: str, run_id: str, experiment_name: str) -> Any:
        """:meth:`log` ``weights`` into the training run ``run_id`` and register it (as
        ``registered_model_name``, else ``experiment_name``), tagged with the best ``key_metric`` of
        the run's history (the validation that saved ``model.pt``) and its epoch."""
        if self.weights is None:
            raise ValueError("ServedModel.log_training_run: no weights given (train.json: served_model#weights)")
        history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, self.key_metric)
        tags = {}
        if history:
            best = min(history, key=lambda m: (m.value, m.step))
            tags = {self.key_metric: f"{best.value:.6g}", "val_epoch": str(best.step)}
        return self.log(tracking_uri, run_id, self.weights, tags, self.registered_model_name or experiment_name)

    def describe(self, version: Any, tracking_uri: str) -> str:
        """The line a training prints: the registered version and the command that serves it."""
        if not hasattr(version, "version"):
            return f"MLflow model logged: {version.model_uri}"
        tag = version.tags.get(self.key_metric)
        score = f" ({self.key_metric} {tag})" if tag else ""
        return f"registered MLflow model {version.name} version {version.version}{score}; serve it with:\n  " + serve_command(
            f"models:/{version.name}/{version.version}", tracking_uri
        )

    def log(
        self,
        tracking_uri: str,
        run_id: str,
        weights: str | os.PathLike,
        tags: Mapping[str, Any] | None = None,
        registered_model_name: str | None = None,
    ) -> Any:
        """Log the model into run ``run_id`` of ``tracking_uri`` and register it as
        ``registered_model_name`` (default: the constructor's), both with ``tags``.

        Returns the registered ``ModelVersion``, or the ``ModelInfo`` when nothing is registered.
        """
        name = registered_model_name or self.registered_model_name
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"ServedModel.log: weights {weights} do not exist")
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        client = mlflow.MlflowClient(tracking_uri)
        # the LoggedModel in the run's experiment (MLflow's Model.log would use the active experiment)
        logged = client.create_logged_model(
            client.get_run(run_id).info.experiment_id, name=MODEL_NAME, source_run_id=run_id, tags=tags,
            params={k: str(self.settings[k]) for k in ("sampler", "num_inference_steps", "eta", "precision", "num_samples", "image_size")},
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            settings_file = Path(tmp) / "settings.json"
            settings_file.write_text(json.dumps(self.settings, indent=2))
            c, s = self.settings["network"]["in_channels"], self.settings["image_size"]
            example = (np.zeros((1, c, s, s), dtype=np.float32), {"num_samples": 2, "seed": self.settings["seed"]})
            with _tracking_uri(tracking_uri):
                info = mlflow.models.Model.log(
                    artifact_path=None,
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=run_id,
                    model_id=logged.model_id,
                    python_model=HSRDiffPyfunc(),
                    artifacts={"weights": str(weights), "settings": str(settings_file)},
                    signature=model_signature(self.settings),
                    input_example=example,
                    pip_requirements=_requirements(),
                    metadata={"monai_hsrdiff": _package_version(), "input": "datalist items' image, (N_images, C, H, W) float32"},
                )
                if not name:
                    return info
                return mlflow.register_model(info.model_uri, name, tags=tags)


def serve_command(model_uri: str, tracking_uri: str, port: int = 5001) -> str:
    """The shell command that serves ``model_uri`` on 127.0.0.1:``port`` with this environment's MLflow.

    ``--env-manager local`` uses this Python (where ``monai_hsrdiff`` is installed); MLflow starts
    ``uvicorn`` by name, so the environment's ``bin`` goes first on ``PATH`` (no activated venv needed).
    """
    import shlex

    mlflow_exe = " ".join(shlex.quote(a) for a in mlflow_command())  # this venv's mlflow, by absolute path
    return (
        f"PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} "
        f"{mlflow_exe} models serve -m {shlex.quote(model_uri)} --env-manager local --host 127.0.0.1 --port {int(port)}"
    )


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("monai-hsrdiff")
    except PackageNotFoundError:
        return "unknown"


def _requirements() -> list[str]:
    """Pinned requirements (no inference by loading the model in a subprocess); ``monai_hsrdiff``
    itself is not on PyPI: serve with ``--env-manager local`` from an environment that has it."""
    import monai

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}",
            f"numpy=={np.__version__}"]  # fmt: skip
