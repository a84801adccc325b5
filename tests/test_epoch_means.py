"""EpochMeans: the per-epoch console/MLflow values are the means of the iteration outputs."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events

from monai_hsrdiff.handlers import EpochMeans


def test_epoch_means_are_the_iteration_means_and_missing_terms_are_nan() -> None:
    losses = [[1.0, 2.0, 6.0], [0.5, 0.5, 2.0]]  # two epochs of three iterations

    def step(engine: Engine, i: int) -> dict:
        return {"loss": torch.tensor(losses[engine.state.epoch - 1][i]), "kappa": 0.25}

    engine = Engine(step)
    EpochMeans(["loss", "kappa", "loss_u"]).attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(dict(e.state.metrics)))
    engine.run([0, 1, 2], max_epochs=2)
    assert [m["train_loss"] for m in seen] == [3.0, 1.0]
    assert seen[0]["train_kappa"] == 0.25
    assert math.isnan(seen[1]["train_loss_u"])  # a term this prediction mode does not have


def test_epoch_means_attach_after_the_progress_bar_closes() -> None:
    """Attached after the bar (as in train#handlers), the means are computed after the bar's close."""
    from ignite.handlers import ProgressBar

    order = []
    engine = Engine(lambda e, b: {"loss": 1.0})
    bar = ProgressBar(persist=False)
    bar.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: order.append("bar closed" if bar.pbar is None else "bar open"))
    EpochMeans(["loss"]).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: order.append(("metric", e.state.metrics["train_loss"])))
    engine.run([0, 1], max_epochs=1)
    assert order == ["bar closed", ("metric", 1.0)]


def test_every_n_iterations_filter_and_an_epoch_without_iterations() -> None:
    from monai_hsrdiff.handlers import every_n_iterations

    assert every_n_iterations(0) is False
    logged = [it for it in range(1, 11) if every_n_iterations(4)(None, it)]
    assert logged == [4, 8]
    try:
        every_n_iterations(-1)
    except ValueError as e:
        assert "log_every_n_iterations must be >= 0" in str(e)
    else:
        raise AssertionError("a negative interval was accepted")
    # a run resumed at an epoch's end completes that epoch without iterations: the means are nan, not an error
    engine = Engine(lambda e, b: {"loss": 1.0})
    EpochMeans(["loss"]).attach(engine)
    engine.state.max_epochs = 1
    engine.fire_event(Events.EPOCH_STARTED)
    engine.fire_event(Events.EPOCH_COMPLETED)
    assert math.isnan(engine.state.metrics["train_loss"])
