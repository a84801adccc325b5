"""Epoch means of the trainer's losses, as ignite metrics: what the console and MLflow show per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Average

__all__ = ["EpochMeans", "every_n_iterations"]


def _value(key: str, output: Any) -> float:
    # a term the chosen prediction has not (e.g. loss_u of prediction="eps") shows as nan
    value = output.get(key, float("nan")) if isinstance(output, dict) else float("nan")
    return float(value.detach().mean()) if isinstance(value, torch.Tensor) else float(value)


class _Mean(Average):
    """ignite's Average, nan for an epoch without iterations (a run resumed at an epoch's end)."""

    def compute(self) -> Any:
        try:
            return super().compute()
        except NotComputableError:
            return float("nan")


def every_n_iterations(n: int) -> bool | Any:
    """``StatsHandler(iteration_log=...)`` for the bundle key ``log_every_n_iterations``: ``False``
    for 0 (only the epoch line), else an ignite event filter logging every ``n``-th iteration.

    Example::

        every_n_iterations(0)             # False
        every_n_iterations(10)(None, 20)  # True
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"log_every_n_iterations must be >= 0 (0: one line per epoch), got {n}")
    return False if n == 0 else (lambda engine, iteration: iteration % n == 0)


class EpochMeans:
    """Attach ``<prefix><key>`` = the mean of ``engine.state.output[key]`` over each epoch, for every key.

    A handler rather than the trainer's ``key_train_metric``, so that it attaches where it sits
    in ``train#handlers``: after the progress bar, whose bar then closes before the epoch's
    summary line is logged (MONAI logs the key metric's "new best" while the bar is still open).
    Under ``torch.distributed`` every rank must attach it (ignite all-reduces the means).

    Args:
        keys: engine-output keys, e.g. ``["loss", "loss_x0", "loss_eps", "loss_u", "kappa"]``.
        prefix: metric-name prefix (``train_loss``, ...).
        device: where ignite accumulates (the trainer's device).

    Example::

        EpochMeans(["loss", "kappa"]).attach(trainer)  # trainer.state.metrics["train_loss"] after each epoch
    """

    def __init__(self, keys: Sequence[str], prefix: str = "train_", device: str | torch.device = "cpu") -> None:
        self.keys = list(keys)
        self.prefix = prefix
        self.device = device

    def attach(self, engine: Engine) -> None:
        for key in self.keys:
            _Mean(output_transform=partial(_value, key), device=self.device).attach(engine, f"{self.prefix}{key}")
