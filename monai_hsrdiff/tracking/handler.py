"""MONAI's ``MLFlowHandler`` made safe for long trainings and aware of HSRDiff's outputs.

One handler class serves three roles in the bundles:

- ``"training"`` (trainer): opens a new MLflow run, logs the run's settings, data set, code
  version and model size, then per iteration the loss terms and the learning rate; at the
  end the best checkpoint (the bundle's model file) and closes the run.
- ``"validation"`` (the evaluator inside a training): joins the training run of the same
  process and logs, per validation epoch, the val_* metrics, the κ-per-timestep curve and a
  sample grid.
- ``"evaluation"`` (evaluate.json): opens its own run, nested under the latest training run
  of the same run directory, and logs the metrics, the κ curve and a sample grid.

A tracking failure after start-up (server down, disk full, database locked) never stops
training: each failing call is logged as a warning, tracking pauses for ``retry_interval``
seconds (dropping the entries meanwhile) and then tries again. The checkpoint handlers do
not depend on tracking, so no checkpoint is lost. An unreachable store at start-up, in
contrast, stops the run before training (see :func:`~monai_hsrdiff.tracking.resolve_tracking_store`).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from .artifacts import SampleCollector, kappa_curve_figure
from .run_info import bundle_config, config_params, count_parameters, dataset_info, find_bundle_parser, git_commit
from .store import TrackingStore, _env, resolve_tracking_store, ui_command

__all__ = ["HSRDiffMLFlowHandler", "is_nonzero_rank", "scalar_output"]

logger = logging.getLogger("monai_hsrdiff.tracking")

Role = Literal["training", "validation", "evaluation"]
ROLES = ("training", "validation", "evaluation")
TAG = "hsrdiff."

# training runs open in this process, by (tracking URI, run directory): the validation
# handler joins them without a config reference (the evaluator is built before the trainer)
_ACTIVE_TRAINING: dict[tuple[str, str], str] = {}


def is_nonzero_rank() -> bool:
    """True on ranks > 0 of an initialised ``torch.distributed`` job (they must not log)."""
    return bool(
        torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0
    )


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
    """MLflow tracking for HSRDiff trainers and evaluators (a failure-tolerant ``MLFlowHandler``).

    Args:
        run_dir: the bundle run directory; holds the default local store and links a
            training run to its evaluations (tag ``hsrdiff.run_dir``).
        role: "training", "validation" or "evaluation" (see the module docstring).
        tracking_uri: bundle key ``tracking_uri``; None: ``MLFLOW_TRACKING_URI``, else the
            local store ``sqlite:///<run_dir>/mlflow.db``.
        fallback_local: on an unreachable store at start-up, log to the local store instead
            of stopping.
        experiment_name: MLflow experiment (default ``hsrdiff_<task>`` in the bundles).
        run_name: MLflow run name (default ``<run_dir name>-<role>``).
        task: "lidc" or "ms_lesion" (a tag).
        datalist: the data set's ``datalist.json``: name, synthetic flag and split sizes are logged.
        network: the network, for its parameter count.
        artifacts: files to log when the engine completes: a path, a list of paths (logged at
            the artifact root, as ``MLFlowHandler`` does), or {artifact folder: path(s)}.
            Folders are logged recursively; missing paths are skipped with a warning.
        grid_items: images (rows) in each sample grid (evaluator roles).
        grid_samples: samples shown per image in the grid.
        retry_interval: seconds tracking pauses after a failed call before trying again.
        check_timeout: seconds the start-up check waits for an HTTP store.
        kwargs: ``MLFlowHandler`` options: ``output_transform``, ``iteration_log``,
            ``epoch_log``, ``state_attributes``, ``experiment_param``,
            ``optimizer_param_names``, ``tag_name``, ``global_epoch_transform``.

    Logged metric keys: training: the ``output_transform`` keys per iteration (step =
    iteration); validation: ``engine.state.metrics`` (step = trainer epoch),
    ``val_kappa_mean`` and the series ``kappa_t/epoch_<E>`` (step = timestep t);
    evaluation: the metrics (step 1), ``eval_kappa_mean`` and ``kappa_t`` (step = t).

    Example::

        HSRDiffMLFlowHandler("runs/lidc_demo", role="training", task="lidc",
                             output_transform=scalar_output(["loss", "lr"])).attach(trainer)
    """

    def __init__(
        self,
        run_dir: str,
        role: Role = "training",
        tracking_uri: str | None = None,
        fallback_local: bool = False,
        experiment_name: str = "hsrdiff",
        run_name: str | None = None,
        task: str | None = None,
        datalist: str | None = None,
        network: torch.nn.Module | None = None,
        artifacts: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        grid_items: int = 4,
        grid_samples: int = 4,
        retry_interval: float = 30.0,
        check_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"HSRDiffMLFlowHandler: role must be one of {list(ROLES)}, got {role!r}")
        self.store: TrackingStore = resolve_tracking_store(run_dir, tracking_uri, fallback_local, check_timeout)
        if isinstance(artifacts, Mapping):
            self.artifact_dirs = {str(k): [str(p) for p in ([v] if isinstance(v, (str, os.PathLike)) else v or [])] for k, v in artifacts.items()}
        else:
            paths = [artifacts] if isinstance(artifacts, (str, os.PathLike)) else list(artifacts or [])
            self.artifact_dirs = {"": [str(p) for p in paths]} if paths else {}
        # MONAI's handler lets MLFLOW_TRACKING_URI override its argument; here the bundle key
        # wins (resolved above), so the variable is hidden while the client is built
        with _env(MLFLOW_TRACKING_URI=None):
            super().__init__(
                tracking_uri=self.store.uri,
                experiment_name=experiment_name,
                run_name=run_name,
                artifacts=None,
                close_on_complete=role != "validation",
                artifact_location=self.store.artifact_location,
                **kwargs,
            )
        self.run_dir = str(Path(run_dir).resolve())
        self.role = role
        self.task = task
        self.datalist = datalist
        self.network = network
        self.grid_samples = int(grid_samples)
        self.collector = SampleCollector(grid_items) if role != "training" else None
        self.retry_interval = float(retry_interval)
        self.parser = find_bundle_parser()
        self._skip_until = 0.0
        self._dropped = 0
        self._failing = False
        self._exit_hook = False

    # ---- failure tolerance -------------------------------------------------------------

    def _guard(self, what: str, fn: Callable, *args: Any, force: bool = False) -> Any:
        """Run one tracking call; on failure warn, pause tracking, and carry on."""
        if not force and time.monotonic() < self._skip_until:
            self._dropped += 1
            return None
        try:
            out = fn(*args)
        except Exception as e:
            self._skip_until = time.monotonic() + self.retry_interval
            self._failing = True
            msg = " ".join(str(e).split())[:300]
            logger.warning(
                f"MLflow tracking to {self.store.uri} failed ({self.role}, {what}): {type(e).__name__}: {msg}. "
                f"Training continues and checkpoints are unaffected; tracking retries in {self.retry_interval:.0f} s "
                "and drops log entries until then."
            )
            return None
        if self._failing:
            logger.warning(
                f"MLflow tracking to {self.store.uri} works again ({what}); {self._dropped} log call(s) were dropped."
            )
            self._failing, self._dropped = False, 0
        return out

    # ---- Ignite events -----------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        if is_nonzero_rank():
            return
        super().attach(engine)
        if self.collector is not None:
            engine.add_event_handler(Events.STARTED, lambda e: self.collector.reset())
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.collector.add(e.state.output))

    def start(self, engine: Engine) -> None:
        self._guard("start", self._ensure_run, engine, force=True)

    def iteration_completed(self, engine: Engine) -> None:
        if self._guard("start", self._ensure_run, engine) is not None:
            self._guard("iteration", super().iteration_completed, engine)

    def epoch_completed(self, engine: Engine) -> None:
        if self._guard("start", self._ensure_run, engine) is None:
            return
        self._guard("epoch metrics", super().epoch_completed, engine)
        if self.role != "training":
            self._guard("kappa curve", self._log_kappa, engine)
            self._guard("sample grid", self._log_grid, engine)

    def complete(self) -> None:
        if self.cur_run is not None:
            self._guard("artifacts", self._log_artifacts, force=True)

    def close(self) -> None:
        run = self.cur_run
        if run is None:
            return
        self._guard("close", super().close, force=True)
        _ACTIVE_TRAINING.pop((self.store.uri, self.run_dir), None)
        self.cur_run = None
        if self.store.is_local:
            print(f"[hsrdiff] MLflow run {run.info.run_id} ({self.role}) in {self.store.uri}", flush=True)
            print(f"[hsrdiff] open the MLflow UI: {ui_command(self.run_dir)}", flush=True)
        else:
            print(f"[hsrdiff] MLflow run {run.info.run_id} ({self.role}) on {self.store.uri}", flush=True)

    # ---- run creation ------------------------------------------------------------------

    def _ensure_run(self, engine: Engine) -> bool:
        """Open (or join) the run once; True when there is one."""
        if self.cur_run is not None:
            return True
        self._set_experiment()
        exp_id = self.experiment.experiment_id
        key = (self.store.uri, self.run_dir)
        if self.role == "validation" and key in _ACTIVE_TRAINING:
            self.cur_run = self.client.get_run(_ACTIVE_TRAINING[key])
            return True
        if self.role == "training" and getattr(engine, "resumed_from", None) and self._continue_run(exp_id, engine):
            return True
        tags = {
            TAG + "role": self.role,
            TAG + "run_dir": self.run_dir,
            TAG + "tracking_source": self.store.source,
        }
        if self.task:
            tags[TAG + "task"] = self.task
        if self.role == "evaluation":
            parent = self.client.search_runs(
                [exp_id],
                filter_string=f"tags.`{TAG}role` = 'training' and tags.`{TAG}run_dir` = '{self.run_dir}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if parent:
                tags["mlflow.parentRunId"] = parent[0].info.run_id
                tags[TAG + "training_run_id"] = parent[0].info.run_id
        info = dataset_info(self.datalist) if self.datalist else {}
        if info:
            tags[TAG + "dataset"] = str(info["dataset_name"])
            tags[TAG + "synthetic"] = str(info["dataset_synthetic"]).lower()
            note = info.get("dataset_description", "")
            if info["dataset_synthetic"]:
                note = "SYNTHETIC demo data: these metrics say nothing about real CT/MRI. " + note
            tags["mlflow.note.content"] = note
        commit = git_commit()
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit[0]
            tags[TAG + "git_dirty"] = str(commit[1]).lower()
        name = self.run_name or f"{Path(self.run_dir).name}-{self.role}"
        self.cur_run = self.client.create_run(experiment_id=exp_id, run_name=name, tags=tags)
        if self.role == "training":
            _ACTIVE_TRAINING[key] = self.cur_run.info.run_id
        self._register_exit_hook()
        self._log_run_info(engine, info, commit)
        return True

    def _continue_run(self, exp_id: str, engine: Engine) -> bool:
        """A resumed training (``resume_from_latest`` marks the engine) continues its run dir's last
        training run: one run per training, metrics on one step axis. Params are not logged again
        (MLflow params are immutable); the resume points are kept in a tag."""
        previous = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.`{TAG}role` = 'training' and tags.`{TAG}run_dir` = '{self.run_dir}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not previous:
            return False
        run = previous[0]
        iteration = str(engine.resumed_from.get("iteration"))
        resumed = ",".join(filter(None, [run.data.tags.get(TAG + "resumed_at_iteration"), iteration]))
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.client.set_tag(run.info.run_id, TAG + "resumed_at_iteration", resumed)
        self.cur_run = self.client.get_run(run.info.run_id)
        _ACTIVE_TRAINING[(self.store.uri, self.run_dir)] = run.info.run_id
        self._register_exit_hook()
        print(f"[hsrdiff] resumed at iteration {iteration}: continuing MLflow run {run.info.run_id}", flush=True)
        return True

    def _log_run_info(self, engine: Engine, info: dict, commit: tuple[str, bool] | None) -> None:
        params: dict[str, Any] = {}
        if self.parser is not None:
            params.update(config_params(self.parser))
        params.update({k: v for k, v in info.items() if k != "dataset_description"})
        if self.network is not None:
            params["num_parameters"] = count_parameters(self.network)
        if commit is not None:
            params["git_commit"] = commit[0] + ("+dirty" if commit[1] else "")
        if self.role == "training":
            params.update({a: getattr(engine.state, a, None) for a in self.default_tracking_params})
        params["torch_version"] = torch.__version__
        params["mlflow_version"] = mlflow.__version__
        params.update(self.experiment_param or {})
        items = [mlflow.entities.Param(str(k), str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.cur_run.info.run_id, params=items[i : i + 100])
        if self.parser is not None:
            self.client.log_dict(self.cur_run.info.run_id, bundle_config(self.parser), "config/bundle_config.json")
            self.client.log_dict(self.cur_run.info.run_id, {k: str(v) for k, v in params.items()}, "config/params.json")

    def _register_exit_hook(self) -> None:
        # a crash (exception, Ctrl-C, SystemExit) leaves no COMPLETED event: mark the run FAILED
        if not self._exit_hook:
            atexit.register(self._mark_failed_at_exit)
            self._exit_hook = True

    def _mark_failed_at_exit(self) -> None:
        if self.cur_run is not None and self.role != "validation":
            run_id = self.cur_run.info.run_id
            self.cur_run = None
            self._guard("mark failed", self.client.set_terminated, run_id, "FAILED", force=True)

    # ---- evaluator outputs -------------------------------------------------------------

    def _log_kappa(self, engine: Engine) -> None:
        trace = getattr(engine.state, "kappa_trace", None)
        if not trace:
            return
        run_id, epoch = self.cur_run.info.run_id, int(engine.state.epoch)
        ts = int(time.time() * 1000)
        if self.role == "validation":
            series, mean_key, suffix = f"kappa_t/epoch_{epoch:04d}", "val_kappa_mean", f"epoch_{epoch:04d}"
        else:
            series, mean_key, suffix = "kappa_t", "eval_kappa_mean", "eval"
        metrics = [mlflow.entities.Metric(series, float(k), ts, int(t)) for t, k in sorted(trace.items())]
        metrics.append(mlflow.entities.Metric(mean_key, float(sum(trace.values()) / len(trace)), ts, epoch))
        for i in range(0, len(metrics), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])
        horizon = getattr(getattr(engine, "sampler", None), "num_train_timesteps", None)
        title = f"{Path(self.run_dir).name} {self.role} " + (f"epoch {epoch}" if self.role == "validation" else "")
        fig = kappa_curve_figure(trace, num_train_timesteps=horizon, title=f"mean κ_φ per step: {title}")
        self.client.log_figure(run_id, fig, f"kappa/kappa_curve_{suffix}.png")
        self.client.log_dict(run_id, {str(t): float(k) for t, k in sorted(trace.items())}, f"kappa/kappa_trace_{suffix}.json")

    def _log_grid(self, engine: Engine) -> None:
        if self.collector is None:
            return
        epoch = int(engine.state.epoch)
        suffix = f"epoch_{epoch:04d}" if self.role == "validation" else "eval"
        fig = self.collector.figure(self.grid_samples, title=f"{Path(self.run_dir).name} {self.role} {suffix}")
        if fig is not None:
            self.client.log_figure(self.cur_run.info.run_id, fig, f"samples/samples_{suffix}.png")

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
