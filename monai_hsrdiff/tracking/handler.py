"""The run-lifecycle handler: MONAI's ``MLFlowHandler`` made failure-tolerant, over a shared :class:`TrackingRun`.

One handler class serves three roles in the bundles, all holding the config's one
``tracking_run`` object:

- ``"training"`` (trainer): opens the MLflow run, logs the run's settings, data set, code
  version and model size, then per iteration the loss terms and the learning rate; at the
  end the best checkpoint (the bundle's model file) and closes the run.
- ``"validation"`` (the evaluator inside a training): logs, per validation epoch, the val_*
  metrics into the training run, which it finds on the shared ``tracking_run``.
- ``"evaluation"`` (evaluate.json): opens its own run, nested under ``tracking_run.parent``
  (default: the latest training run of the same run directory), and logs the metrics.

The κ curve and sample grids of the evaluator roles are logged by
:class:`~monai_hsrdiff.tracking.FiguresHandler`, into the same run.

A tracking failure after start-up never stops training (:meth:`TrackingRun.guard`); the
checkpoint handlers do not depend on tracking, so no checkpoint is lost. An unreachable store
at start-up, in contrast, stops the run before training (see
:func:`~monai_hsrdiff.tracking.resolve_tracking_store`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from .run import TAG, TrackingRun, is_nonzero_rank, logger
from .run_info import bundle_config, config_params, count_parameters, dataset_info, dataset_input, git_commit, source_tags
from .runs_view import ensure_runs_view
from .store import _env, runs_url, ui_command

__all__ = ["HSRDiffMLFlowHandler", "is_nonzero_rank", "scalar_output", "split_metric_names"]

Role = Literal["training", "validation", "evaluation"]
ROLES = ("training", "validation", "evaluation")
#: :class:`TrackingRun` arguments accepted here when ``run`` is given as a run directory
_RUN_ARGS = ("tracking_uri", "fallback_local", "experiment_name", "task", "datalist", "network", "config", "parent",
             "retry_interval", "check_timeout")  # fmt: skip


def split_metric_names(metrics: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The evaluator's ``val_<metric>`` keys renamed ``<split>_<metric>`` (other keys unchanged).

    The evaluator inside a training and evaluate.json share the metric handlers (named
    ``val_*``); an evaluation on the split ``test`` logs ``test_ged16``, ``test_hm_iou16``, ...

    Example::

        split_metric_names({"val_ged16": 0.3, "best_metric": 0.3}, "test")  # {'test_ged16': 0.3, 'best_metric': 0.3}
    """
    return {(f"{split}_{k[4:]}" if k.startswith("val_") else k): v for k, v in metrics.items()}


def scalar_output(keys: Sequence[str]) -> Callable[[Any], dict[str, float]]:
    """An ``output_transform`` picking the scalar ``keys`` of an engine's output dict.

    Missing keys and None values (e.g. ``kappa`` for prediction modes without a κ head) are
    left out.

    Example::

        MLFlowHandler(output_transform=scalar_output(["loss", "loss_u", "lr"]))
    """
    keys = list(keys)

    def transform(output: Any) -> dict[str, float]:
        out = output[0] if isinstance(output, (list, tuple)) and output else output
        if not isinstance(out, Mapping):
            return {}
        return {k: float(torch.as_tensor(out[k]).item()) for k in keys if out.get(k) is not None}

    return transform


class HSRDiffMLFlowHandler(MLFlowHandler):
    """MLflow run lifecycle for HSRDiff trainers and evaluators (a failure-tolerant ``MLFlowHandler``).

    Args:
        run: the bundle's :class:`TrackingRun` (``@tracking_run``). A run directory is also
            accepted (the earlier API) for the training and evaluation roles: a
            :class:`TrackingRun` is then built from it and the ``TrackingRun`` arguments among
            ``kwargs`` (``tracking_uri``, ``experiment_name``, ``task``, ...).
        role: "training", "validation" or "evaluation" (see the module docstring).
        run_name: MLflow run name (default ``<run_dir name>-<role>``).
        artifacts: files to log when the engine completes: a path, a list of paths (logged at
            the artifact root, as ``MLFlowHandler`` does), or {artifact folder: path(s)}.
            Folders are logged recursively; missing paths are skipped with a warning.
        served_model: training role: a :class:`~monai_hsrdiff.tracking.pyfunc_model.ServedModel`
            (train.json ``served_model``): at the end it logs the best checkpoint as an MLflow
            model and registers it with its validation GED as a tag; a failure only warns.
        split: evaluation role: the data split evaluated (``@eval_split``); the evaluator's
            ``val_<metric>`` keys are logged as ``<split>_<metric>`` (:func:`split_metric_names`).
        kwargs: ``MLFlowHandler`` options: ``output_transform``, ``iteration_log``,
            ``epoch_log``, ``state_attributes``, ``experiment_param``,
            ``optimizer_param_names``, ``tag_name``, ``global_epoch_transform``.

    Logged metric keys: training: the ``output_transform`` keys per iteration (step =
    iteration); validation: ``engine.state.metrics`` (step = trainer epoch); evaluation: the
    metrics named by ``split`` (step 1).

    Example::

        run = TrackingRun("runs/lidc_demo", task="lidc")
        HSRDiffMLFlowHandler(run, role="training", output_transform=scalar_output(["loss", "lr"])).attach(trainer)
    """

    def __init__(
        self,
        run: TrackingRun | str | os.PathLike,
        role: Role = "training",
        run_name: str | None = None,
        artifacts: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        served_model: Any = None,
        split: str | None = None,
        **kwargs: Any,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"HSRDiffMLFlowHandler: role must be one of {list(ROLES)}, got {role!r}")
        settings = {k: kwargs.pop(k) for k in _RUN_ARGS if k in kwargs}
        if not isinstance(run, TrackingRun):
            if role == "validation":
                raise ValueError(
                    "HSRDiffMLFlowHandler: role='validation' logs into the training run, so it needs the training "
                    "handler's TrackingRun as `run` (in a bundle: \"run\": \"@tracking_run\"), not a run directory"
                )
            run = TrackingRun(str(run), **settings)
        elif settings:
            raise ValueError(f"HSRDiffMLFlowHandler: {sorted(settings)} are settings of the TrackingRun `run`, not of the handler")
        self.run = run
        if isinstance(artifacts, Mapping):
            self.artifact_dirs = {str(k): [str(p) for p in ([v] if isinstance(v, (str, os.PathLike)) else v or [])] for k, v in artifacts.items()}
        else:
            paths = [artifacts] if isinstance(artifacts, (str, os.PathLike)) else list(artifacts or [])
            self.artifact_dirs = {"": [str(p) for p in paths]} if paths else {}
        with _env(MLFLOW_TRACKING_URI=None):  # the TrackingRun's store wins over the variable
            super().__init__(
                tracking_uri=run.store.uri,
                experiment_name=run.experiment_name,
                run_name=run_name,
                artifacts=None,
                close_on_complete=role != "validation",
                artifact_location=run.store.artifact_location,
                **kwargs,
            )
        self.client = run.client
        self.served_model = served_model
        self.role = role
        self.split = split
        self._exit_hook = False
        self._has_view = False

    # ---- Ignite events (each tracking call through TrackingRun.guard) ---------------------

    def attach(self, engine: Engine) -> None:
        if not is_nonzero_rank():
            super().attach(engine)

    def start(self, engine: Engine) -> None:
        self.run.guard("start", self._ensure_run, engine, force=True)

    def iteration_completed(self, engine: Engine) -> None:
        if self.run.guard("start", self._ensure_run, engine):
            self.run.guard("iteration", super().iteration_completed, engine)

    def epoch_completed(self, engine: Engine) -> None:
        if self.run.guard("start", self._ensure_run, engine):
            self.run.guard("epoch metrics", super().epoch_completed, engine)

    def complete(self) -> None:
        if self.cur_run is not None:
            self.run.guard("artifacts", self._log_artifacts, force=True)

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.role == "evaluation" and self.split:
            metrics = split_metric_names(metrics, self.split)
        super()._log_metrics(metrics, step)

    def close(self) -> None:
        run = self.cur_run
        if run is None:
            return
        self.run.guard("close", super().close, force=True)
        self.cur_run = None
        where = "in" if self.run.store.is_local else "on"
        print(f"[hsrdiff] MLflow run {run.info.run_id} ({self.role}) {where} {self.run.store.uri}", flush=True)
        if self.run.store.is_local:
            print(f"[hsrdiff] open the MLflow UI: {ui_command(self.run.run_dir)}", flush=True)
            print(f"[hsrdiff] then browse the runs: {runs_url(run.info.experiment_id, view=self._has_view)}", flush=True)

    # ---- run creation ------------------------------------------------------------------

    def _ensure_run(self, engine: Engine) -> bool:
        """Open (or join) the run once; True when there is one."""
        if self.cur_run is not None:
            return True
        if self.role == "validation":  # the training handler opened it (STARTED of the trainer)
            if self.run.run_id is not None:
                self.cur_run = self.client.get_run(self.run.run_id)
            return self.cur_run is not None
        self._set_experiment()
        exp_id = self.experiment.experiment_id
        self._has_view = ensure_runs_view(self.client, exp_id, self.split if self.role == "evaluation" else None)
        if self.role == "training" and getattr(engine, "resumed_from", None) and self._continue_run(exp_id, engine):
            return True
        tags = source_tags()  # user and command: the UI's "Created by" and "Source"
        tags.update({TAG + "role": self.role, TAG + "run_dir": self.run.run_dir, TAG + "tracking_source": self.run.store.source})
        if self.run.task:
            tags[TAG + "task"] = self.run.task
        parent = self.run.parent_run_id(exp_id) if self.role == "evaluation" else None
        if parent:
            tags["mlflow.parentRunId"] = tags[TAG + "training_run_id"] = parent
        info = dataset_info(self.run.datalist) if self.run.datalist else {}
        if info:
            tags[TAG + "dataset"] = str(info["dataset_name"])
            tags[TAG + "synthetic"] = str(info["dataset_synthetic"]).lower()
            note = info.get("dataset_description", "")
            if info["dataset_synthetic"] and "SYNTHETIC" not in note:  # the demo's description says it already
                note = "SYNTHETIC demo data: these metrics say nothing about real CT/MRI. " + note
            tags["mlflow.note.content"] = note
        commit = git_commit()
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit[0]
            tags[TAG + "git_dirty"] = str(commit[1]).lower()
        name = self.run_name or f"{Path(self.run.run_dir).name}-{self.role}"
        self.cur_run = self.client.create_run(experiment_id=exp_id, run_name=name, tags=tags)
        self.run.opened(self.cur_run.info.run_id, self.role)
        self._register_exit_hook()
        self._log_run_info(engine, info, commit)
        return True

    def _continue_run(self, exp_id: str, engine: Engine) -> bool:
        """A resumed training (``resume_from_latest`` marks the engine) continues its run dir's last
        training run: one run per training, metrics on one step axis. Params are not logged again
        (MLflow params are immutable); the resume points are kept in a tag."""
        run = self.run.latest_training_run(exp_id)
        if run is None:
            return False
        iteration = str(engine.resumed_from.get("iteration"))
        resumed = ",".join(filter(None, [run.data.tags.get(TAG + "resumed_at_iteration"), iteration]))
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.client.set_tag(run.info.run_id, TAG + "resumed_at_iteration", resumed)
        self.cur_run = self.client.get_run(run.info.run_id)
        self.run.opened(run.info.run_id, self.role)
        self._register_exit_hook()
        print(f"[hsrdiff] resumed at iteration {iteration}: continuing MLflow run {run.info.run_id}", flush=True)
        return True

    def _log_run_info(self, engine: Engine, info: dict, commit: tuple[str, bool] | None) -> None:
        config = self.run.config_dict()
        params: dict[str, Any] = config_params(config, self.run.known_values()) if config is not None else {}
        params.update({k: v for k, v in info.items() if k != "dataset_description"})
        if self.run.network is not None:
            params["num_parameters"] = count_parameters(self.run.network)
        if commit is not None:
            params["git_commit"] = commit[0] + ("+dirty" if commit[1] else "")
        if self.role == "training":
            params.update({a: getattr(engine.state, a, None) for a in self.default_tracking_params})
        params["torch_version"] = torch.__version__
        params["mlflow_version"] = mlflow.__version__
        params.update(self.experiment_param or {})
        items = [mlflow.entities.Param(str(k), str(v)) for k, v in params.items()]
        run_id = self.cur_run.info.run_id
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])
        if info:
            context = "training" if self.role == "training" else self.split or self.role
            self.client.log_inputs(run_id, datasets=[dataset_input(self.run.datalist, context, info)])
        if config is not None:
            self.client.log_dict(run_id, bundle_config(config), "config/bundle_config.json")
            self.client.log_dict(run_id, {k: str(v) for k, v in params.items()}, "config/params.json")

    def _register_exit_hook(self) -> None:
        # a crash (exception, Ctrl-C, SystemExit) leaves no COMPLETED event: mark the run FAILED
        if not self._exit_hook:
            atexit.register(self._mark_failed_at_exit)
            self._exit_hook = True

    def _mark_failed_at_exit(self) -> None:
        if self.cur_run is not None and self.role != "validation":
            run_id = self.cur_run.info.run_id
            self.cur_run = None
            self.run.guard("mark failed", self.client.set_terminated, run_id, "FAILED", force=True)

    def _log_artifacts(self) -> None:
        run_id = self.cur_run.info.run_id
        for folder, paths in self.artifact_dirs.items():
            for p in paths:
                if os.path.isdir(p):
                    self.client.log_artifacts(run_id, p, folder or None)
                elif os.path.isfile(p):
                    self.client.log_artifact(run_id, p, folder or None)
                else:
                    logger.warning(f"MLflow tracking: artifact {p} does not exist; not logged")
        if self.served_model is not None:  # the best checkpoint as a registered MLflow model (pyfunc_model.py)
            version = self.run.guard("registered model", self.served_model.log_training_run,
                                     self.run.store.uri, run_id, self.run.experiment_name, force=True)  # fmt: skip
            if version is not None:
                print(f"[hsrdiff] {self.served_model.describe(version, self.run.store.uri)}", flush=True)
