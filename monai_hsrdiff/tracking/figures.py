"""The evaluator's figures handler: the κ curve (paper Figure 6) and a sample grid per evaluator epoch.

It logs into the MLflow run its :class:`TrackingRun` holds (opened by the run-lifecycle
handler :class:`~monai_hsrdiff.tracking.HSRDiffMLFlowHandler`): inside a training, into the
training run, one series and figure per validation epoch; in evaluate.json, into the
evaluation run. Each call goes through :meth:`TrackingRun.guard`, so a failing store never
stops the evaluator.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from ignite.engine import Engine, Events

from .artifacts import SampleCollector, kappa_curve_figure
from .run import TrackingRun, is_nonzero_rank

__all__ = ["FiguresHandler"]


class FiguresHandler:
    """Log the evaluator's κ-per-timestep curve and a sample grid at each of its epochs.

    Args:
        run: the bundle's :class:`TrackingRun` (``@tracking_run``).
        grid_items: images (rows) in each sample grid.
        grid_samples: samples shown per image in the grid.

    Logged: ``val_kappa_mean`` (step = trainer epoch) and the series ``kappa_t/epoch_<E>``
    (step = timestep t) into a training run, ``eval_kappa_mean`` and ``kappa_t`` into an
    evaluation run; the figures ``kappa/kappa_curve_<suffix>.png`` and
    ``samples/samples_<suffix>.png`` and ``kappa/kappa_trace_<suffix>.json``, where suffix is
    ``epoch_<E>`` or ``eval``.

    Example::

        FiguresHandler(run, grid_items=4).attach(evaluator)
    """

    def __init__(self, run: TrackingRun, grid_items: int = 4, grid_samples: int = 4) -> None:
        self.run = run
        self.collector = SampleCollector(grid_items)
        self.grid_samples = int(grid_samples)

    def attach(self, engine: Engine) -> None:
        if is_nonzero_rank():
            return
        engine.add_event_handler(Events.STARTED, lambda e: self.collector.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.collector.add(e.state.output))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_completed(self, engine: Engine) -> None:
        if self.run.run_id is None:  # no run open (tracking failed at start): nothing to log into
            return
        self.run.guard("kappa curve", self._log_kappa, engine)
        self.run.guard("sample grid", self._log_grid, engine)

    def _names(self, epoch: int) -> tuple[str, str, str]:
        """(κ series key, κ mean key, file suffix) for the run logged into."""
        if self.run.role == "training":
            return f"kappa_t/epoch_{epoch:04d}", "val_kappa_mean", f"epoch_{epoch:04d}"
        return "kappa_t", "eval_kappa_mean", "eval"

    def _title(self, suffix: str) -> str:
        # "lidc_demo validation, epoch 12" / "lidc_demo evaluation" (the suffix "eval" would repeat it)
        if self.run.role == "training":
            return f"{Path(self.run.run_dir).name} validation, epoch {int(suffix.rsplit('_', 1)[-1])}"
        return f"{Path(self.run.run_dir).name} evaluation"

    def _log_kappa(self, engine: Engine) -> None:
        trace = getattr(engine.state, "kappa_trace", None)
        if not trace:
            return
        epoch = int(engine.state.epoch)
        series, mean_key, suffix = self._names(epoch)
        ts, client, run_id = int(time.time() * 1000), self.run.client, self.run.run_id
        metrics = [mlflow.entities.Metric(series, float(k), ts, int(t)) for t, k in sorted(trace.items())]
        metrics.append(mlflow.entities.Metric(mean_key, float(sum(trace.values()) / len(trace)), ts, epoch))
        for i in range(0, len(metrics), 1000):  # MLflow accepts at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        sampler = getattr(engine, "sampler", None) or getattr(getattr(engine, "pipeline", None), "sampler", None)
        fig = kappa_curve_figure(trace, num_train_timesteps=getattr(sampler, "num_train_timesteps", None),
                                 title=rf"mean $\kappa_\phi$ per step: {self._title(suffix)}")  # fmt: skip
        client.log_figure(run_id, fig, f"kappa/kappa_curve_{suffix}.png")
        client.log_dict(run_id, {str(t): float(k) for t, k in sorted(trace.items())}, f"kappa/kappa_trace_{suffix}.json")

    def _log_grid(self, engine: Engine) -> None:
        suffix = self._names(int(engine.state.epoch))[2]
        fig = self.collector.figure(self.grid_samples, title=self._title(suffix))
        if fig is not None:
            self.run.client.log_figure(self.run.run_id, fig, f"samples/samples_{suffix}.png")
