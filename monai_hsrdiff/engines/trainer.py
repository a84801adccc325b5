"""The HSRDiff trainer: a MONAI ``SupervisedTrainer`` whose iteration is Algorithm 1.

One iteration: the batch already carries ONE annotation per item, picked at random by
``RandAnnotationd`` (Algorithm 1, step 1); the diffusion process draws t and ε, noises the
label and computes L = λ1·L_d + λ2·L_u (steps 2-4); the optimizer takes one step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.engines import SupervisedTrainer
from monai.utils import convert_to_tensor
from torch.optim import Optimizer

from monai_hsrdiff.errors import own_error  # re-exported: the engines' old home of it

__all__ = ["HSRDiffTrainer", "NonFiniteLossError", "own_error"]


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
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping). Off in
            the paper's setting; 1.0 is a common choice when a run diverges.
        checkpoint_dir: folder of the run's resume checkpoints; a non-finite loss or gradient
            stops training with a message naming the newest complete checkpoint in it.
        amp: mixed precision; honoured on CUDA only (CPU autocast changes numerics and is
            slower for this network's fp32 group norms).
        kwargs: passed to ``SupervisedTrainer`` (handlers, epoch_length, ...).

    The engine output is a dict with ``loss`` and each term (``loss_eps``, ``loss_x0``,
    ``loss_u``, ``kappa``), the learning rate ``lr`` and the gradient norm before clipping
    ``grad_norm`` (not on the AMP path) as Python floats, for ``StatsHandler``/``MLFlowHandler``.

    A NaN/inf loss, or (without AMP) a NaN/inf gradient norm, raises :class:`NonFiniteLossError`
    BEFORE the optimizer steps, so the weights (and any checkpoint written later) stay those of
    the last finite iteration. With AMP, inf gradients are the GradScaler's business (it skips the step).

    Example::

        trainer = HSRDiffTrainer("cpu", max_epochs=1, train_data_loader=loader, network=net,
                                 optimizer=torch.optim.AdamW(net.parameters(), 1e-4), diffusion=process)
        trainer.run()
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
        checkpoint_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if grad_clip_norm is not None and not float(grad_clip_norm) > 0:
            raise ValueError(f"HSRDiffTrainer: grad_clip_norm must be > 0 or None, got {grad_clip_norm!r}")
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
        self.grad_clip_norm = None if grad_clip_norm is None else float(grad_clip_norm)
        self.checkpoint_dir = checkpoint_dir

    def _handle_exception(self, e: BaseException) -> None:
        # our own errors (a non-finite loss, a damaged item file) are explained by their message:
        # skip the EXCEPTION_RAISED handlers (StatsHandler logs a full traceback there), so the
        # command line ends with the message
        if own_error(e) is not None:
            raise e
        super()._handle_exception(e)

    def _non_finite(self, engine: HSRDiffTrainer, what: str, terms: dict[str, float]) -> NonFiniteLossError:
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        last = "no checkpoint was written yet"
        if self.checkpoint_dir:
            from monai_hsrdiff.handlers.checkpoint import latest_checkpoint

            found = latest_checkpoint(self.checkpoint_dir)
            last = f"the last good checkpoint is {found[0]}" if found else f"no checkpoint in {self.checkpoint_dir} yet"
        return NonFiniteLossError(
            f"non-finite {what} at {where} ({values}). Training stopped before the optimizer step; {last}. "
            "Lower the learning rate (--learning_rate) or clip gradients (--grad_clip_norm 1.0), "
            "then continue from the checkpoint with --resume True."
        )

    @staticmethod
    def _all_finite(value: float, device: torch.device) -> bool:
        # under DDP every process must stop together: a process that stopped alone would leave
        # the others waiting in the gradient all-reduce (the gradient check needs no vote: DDP
        # has averaged the gradients, so every process sees the same norm)
        finite = math.isfinite(value)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if finite else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item() > 0)
        return finite

    def _iteration(self, engine: HSRDiffTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("HSRDiffTrainer: the data loader yielded None")
        for key in ("image", "label"):
            if key not in batchdata:
                raise KeyError(f"HSRDiffTrainer: batch has no {key!r} (keys: {sorted(batchdata)})")
        # plain tensors: MetaTensor's __torch_function__ would wrap every op of the network
        image = convert_to_tensor(batchdata["image"], track_meta=False)
        label = convert_to_tensor(batchdata["label"], track_meta=False)
        image = image.to(engine.state.device, non_blocking=engine.non_blocking)
        label = label.to(engine.state.device, non_blocking=engine.non_blocking)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast("cuda", enabled=engine.amp):
            terms = engine.diffusion.training_losses(engine.network, label, image)
        loss = terms.loss
        out = terms.as_dict()
        if not self._all_finite(out["loss"], loss.device):
            raise self._non_finite(engine, "loss" if not math.isfinite(out["loss"]) else "loss in another process", out)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.unscale_(engine.optimizer)
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            # the total norm before clipping (max_norm=inf only measures it)
            norm = float(
                torch.nn.utils.clip_grad_norm_(
                    engine.network.parameters(), math.inf if self.grad_clip_norm is None else self.grad_clip_norm
                )
            )
            if not math.isfinite(norm):
                raise self._non_finite(engine, "gradient", {**out, "grad_norm": norm})
            engine.optimizer.step()
            out["grad_norm"] = norm
        out["lr"] = engine.optimizer.param_groups[0]["lr"]
        return out
