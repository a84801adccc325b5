"""The HSRDiff trainer: a MONAI ``SupervisedTrainer`` whose iteration is Algorithm 1.

One iteration: the batch already carries ONE annotation per item, picked at random by
``RandAnnotationd`` (Algorithm 1, step 1); the diffusion process draws t and ε, noises the
label and computes L = λ1·L_d + λ2·L_u (steps 2-4); the optimizer takes one step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from torch.optim import Optimizer

__all__ = ["HSRDiffTrainer", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; training stops instead of stepping on garbage."""


class HSRDiffTrainer(SupervisedTrainer):
    """Ignite trainer for HSRDiff.

    Args:
        device: where the network and batches live.
        max_epochs: epochs to train.
        train_data_loader: yields dicts with ``image`` (B, C, H, W) and ``label`` (B, M, H, W)
            in {-1, +1}.
        network: an :class:`~monai_hsrdiff.networks.HSRDiff` (possibly DDP-wrapped).
        optimizer: e.g. AdamW(lr=1e-4) as in the paper.
        diffusion: the process (:class:`~monai_hsrdiff.diffusion.SelfRegulatedDiffusion`);
            ``diffusion.training_losses(network, x0, condition)`` returns the loss terms.
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping).
        amp: mixed precision; honoured on CUDA only (CPU autocast changes numerics and is
            slower for this network's fp32 group norms).
        kwargs: passed to ``SupervisedTrainer`` (handlers, epoch_length, ...).

    The engine output is a dict with ``loss`` and each term (``loss_eps``, ``loss_x0``,
    ``loss_u``, ``kappa``) as Python floats, for ``StatsHandler``/``MLFlowHandler``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        diffusion: Any,
        grad_clip_norm: float | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        device = torch.device(device)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=diffusion.training_losses,
            train_handlers=train_handlers,
            amp=bool(amp) and device.type == "cuda",
            decollate=False,
            **kwargs,
        )
        self.diffusion = diffusion
        self.grad_clip_norm = grad_clip_norm

    def _iteration(self, engine: HSRDiffTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("HSRDiffTrainer: the data loader yielded None")
        for key in ("image", "label"):
            if key not in batchdata:
                raise KeyError(f"HSRDiffTrainer: batch has no {key!r} (keys: {sorted(batchdata)})")
        image = torch.as_tensor(batchdata["image"]).to(engine.state.device, non_blocking=engine.non_blocking)
        label = torch.as_tensor(batchdata["label"]).to(engine.state.device, non_blocking=engine.non_blocking)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast("cuda", enabled=engine.amp):
            terms = engine.diffusion.training_losses(engine.network, label, image)
        loss = terms.loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in terms.as_dict().items())
                + ". Training stopped; the last complete checkpoint is left as it was. "
                "Lower the learning rate or enable gradient clipping (grad_clip_norm)."
            )
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.unscale_(engine.optimizer)
            self._clip(engine)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            self._clip(engine)
            engine.optimizer.step()
        out = terms.as_dict()
        out["lr"] = engine.optimizer.param_groups[0]["lr"]
        return out

    def _clip(self, engine: HSRDiffTrainer) -> None:
        if self.grad_clip_norm is not None and math.isfinite(self.grad_clip_norm):
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
