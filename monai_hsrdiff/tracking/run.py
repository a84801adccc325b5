"""One bundle run's MLflow tracking state, declared once in the config and shared by its handlers.

A bundle process opens at most one MLflow run: a training (whose validations log into it) or an
evaluation (nested under a training run). :class:`TrackingRun` holds what its handlers share, so
nothing lives in module globals: the checked store, the experiment, the open run, the run's
config and the failure tolerance. The bundles declare it as ``tracking_run`` and pass it to
every tracking handler with ``@tracking_run``:

.. code-block:: json

    "tracking_run": {
        "_target_": "monai_hsrdiff.tracking.TrackingRun",
        "_disabled_": "@tracking_disabled",
        "run_dir": "@run_dir", "tracking_uri": "@tracking_uri", "fallback_local": "@tracking_fallback_local",
        "experiment_name": "@experiment_name", "task": "@task", "datalist": "@datalist",
        "network": "@network", "config": "$...command_config()", "parent": "@tracking_parent_run"
    }

A tracking failure after start-up (server down, disk full, database locked) never stops a
training: :meth:`TrackingRun.guard` logs a warning, pauses tracking for ``retry_interval``
seconds (dropping the entries meanwhile) and then tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch

from .store import TrackingStore, _env, resolve_tracking_store

__all__ = ["TrackingRun", "is_nonzero_rank"]

logger = logging.getLogger("monai_hsrdiff.tracking")

TAG = "hsrdiff."
#: ``parent`` value: nest an evaluation under the newest training run of the same run directory
LATEST_TRAINING = "latest_training"


def is_nonzero_rank() -> bool:
    """True on ranks > 0 of an initialised ``torch.distributed`` job (they must not log)."""
    return bool(
        torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0
    )


class TrackingRun:
    """The MLflow run of one bundle run: its store, experiment, run id and what it logs about itself.

    Args:
        run_dir: the bundle run directory; holds the default local store and links a training
            run to its evaluations (tag ``hsrdiff.run_dir``).
        tracking_uri: bundle key ``tracking_uri``; None: ``MLFLOW_TRACKING_URI``, else the local
            store ``sqlite:///<run_dir>/mlflow.db`` (:func:`~monai_hsrdiff.tracking.resolve_tracking_store`).
        fallback_local: on an unreachable store at start-up, log to the local store instead of stopping.
        experiment_name: MLflow experiment (``hsrdiff_<task>`` in the bundles).
        task: "lidc" or "ms_lesion" (a tag).
        datalist: the data set's ``datalist.json``: name, synthetic flag and split sizes are logged.
        network: the network, for its parameter count.
        config: the run's merged config (a ``ConfigParser`` or its dict), logged as params and as
            ``config/bundle_config.json``; None logs neither.
        parent: the run an evaluation nests under: ``"latest_training"`` (the newest training run
            of ``run_dir``), an MLflow run id, or None.
        resolved: {config id: its resolved value} for keys the config writes as expressions
            (``device``, ``dataset_dir``, ...): logged as params with their values (the bundles
            pass them with ``@key``; nothing is evaluated for logging).
        retry_interval: seconds tracking pauses after a failed call before trying again.
        check_timeout: seconds the start-up check waits for an HTTP store.

    Raises:
        BundleError: (at construction) the store is unreachable and ``fallback_local`` is false.

    Example::

        run = TrackingRun("runs/lidc_demo", task="lidc", experiment_name="hsrdiff_lidc")
        HSRDiffMLFlowHandler(run, role="training").attach(trainer)
        HSRDiffMLFlowHandler(run, role="validation").attach(evaluator)  # logs into the same run
    """

    def __init__(
        self,
        run_dir: str,
        tracking_uri: str | None = None,
        fallback_local: bool = False,
        experiment_name: str = "hsrdiff",
        task: str | None = None,
        datalist: str | None = None,
        network: torch.nn.Module | None = None,
        config: Any | None = None,
        parent: str | None = LATEST_TRAINING,
        resolved: Mapping[str, Any] | None = None,
        retry_interval: float = 30.0,
        check_timeout: float = 10.0,
    ) -> None:
        self.store: TrackingStore = resolve_tracking_store(run_dir, tracking_uri, fallback_local, check_timeout)
        self.run_dir = str(Path(run_dir).resolve())
        self.experiment_name = experiment_name
        self.task = task
        self.datalist = datalist
        self.network = network
        self.config = config
        self.parent = parent
        self.resolved = dict(resolved or {})
        self.retry_interval = float(retry_interval)
        # MONAI's handler lets MLFLOW_TRACKING_URI override its argument; here the bundle key
        # wins (resolved above), so the variable is hidden while the client is built
        with _env(MLFLOW_TRACKING_URI=None):
            self.client = mlflow.MlflowClient(tracking_uri=self.store.uri)
        #: the open MLflow run's id and role ("training" or "evaluation"); None before it opens
        self.run_id: str | None = None
        self.role: str | None = None
        self._skip_until = 0.0
        self._dropped = 0
        self._failing = False

    def guard(self, what: str, fn: Callable, *args: Any, force: bool = False) -> Any:
        """Run one tracking call; on failure warn, pause tracking, and return None.

        Args:
            what: the call, for the warning (e.g. "iteration", "kappa curve").
            fn, args: the call.
            force: run it even while tracking is paused (start, artifacts, close).
        """
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
                f"MLflow tracking to {self.store.uri} failed ({self.role or 'start'}, {what}): {type(e).__name__}: "
                f"{msg}. Training continues and checkpoints are unaffected; tracking retries in "
                f"{self.retry_interval:.0f} s and drops log entries until then."
            )
            return None
        if self._failing:
            logger.warning(f"MLflow tracking to {self.store.uri} works again ({what}); {self._dropped} log call(s) were dropped.")
            self._failing, self._dropped = False, 0
        return out

    def opened(self, run_id: str, role: str) -> None:
        """Record the MLflow run this bundle run logs into (called by the lifecycle handler)."""
        self.run_id, self.role = run_id, role

    def latest_training_run(self, experiment_id: str) -> Any | None:
        """The newest training run of this run directory in ``experiment_id``, or None."""
        found = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG}role` = 'training' and tags.`{TAG}run_dir` = '{self.run_dir}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0] if found else None

    def parent_run_id(self, experiment_id: str) -> str | None:
        """The run id an evaluation nests under (see ``parent``), or None."""
        if self.parent == LATEST_TRAINING:
            run = self.latest_training_run(experiment_id)
            return run.info.run_id if run is not None else None
        return self.parent or None

    def config_dict(self) -> dict | None:
        """The run's merged config as a dict (expressions as written), or None."""
        if self.config is None:
            return None
        return dict(self.config) if isinstance(self.config, Mapping) else self.config.get()

    def known_values(self) -> dict[str, Any]:
        """Config keys whose value this object holds resolved (logged as params even when the
        config writes them as expressions)."""
        return {**self.resolved, "run_dir": self.run_dir, "experiment_name": self.experiment_name, "task": self.task}
