"""The HSRDiff evaluator: draws N samples per image and hands them to the metric handlers."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.utils import convert_to_tensor

from monai_hsrdiff.diffusion.pipeline import HSRDiffPipeline
from monai_hsrdiff.engines.trainer import own_error
from monai_hsrdiff.errors import fail
from monai_hsrdiff.metrics import entropy_map

__all__ = ["GED100_SAMPLES", "HSRDiffEvaluator", "check_ged100", "item_seed", "lower_is_better", "samples_to_masks"]

#: GED over this many samples (ATFM, KANResDif): the bundles' opt-in ``eval_ged100``
GED100_SAMPLES = 100


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for GED (smaller is better)."""
    return current < best


def check_ged100(eval_ged100: Any, eval_num_samples: Any) -> None:
    """Start-up check of evaluate.json's ``eval_ged100``: a bool, and with it on, enough samples.

    GED100 scores the first 100 samples of each item, so it needs ``eval_num_samples >= 100``
    (the N=16/32 metrics then use the first 16/32 of the same draw). It is opt-in because the
    sampling cost grows with the sample count: 100 instead of 32 samples per item.

    Raises:
        BundleError: (``errors.fail``: one ``ERROR:`` line) naming both keys and the fix.
    """
    if not isinstance(eval_ged100, bool):
        raise fail(f"eval_ged100 = {eval_ged100!r}: must be a boolean (True: also GED over {GED100_SAMPLES} samples)")
    if eval_ged100 and (isinstance(eval_num_samples, bool) or not isinstance(eval_num_samples, int)
                        or eval_num_samples < GED100_SAMPLES):  # fmt: skip
        raise fail(
            f"eval_ged100 is on, so eval_num_samples must be >= {GED100_SAMPLES} (GED100 scores the first "
            f"{GED100_SAMPLES} samples of each item), got eval_num_samples = {eval_num_samples!r}: add "
            f"--eval_num_samples {GED100_SAMPLES}, or leave eval_ged100 False"
        )


def item_seed(seed: int, item_id: str) -> int:
    """The sampling seed of one item: a 63-bit hash of ``(seed, item_id)``.

    It depends on nothing else (not the rank, the batch, nor the items sampled before), so a
    sharded multi-process evaluation draws, item for item, the samples of the one-process run.
    """
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{item_id}".encode()).digest()[:8], "little") >> 1


def samples_to_masks(samples: torch.Tensor) -> torch.Tensor:
    """Read continuous samples back as masks (DESIGN §1).

    Args:
        samples: (B, N, M, *spatial) in label units ({-1, +1} scale).

    Returns:
        (B, N, *spatial): bool (M=1, threshold at 0) or int64 class maps (M>1, argmax).
    """
    if samples.shape[2] == 1:
        return samples[:, :, 0] > 0
    return samples.argmax(dim=2)


class HSRDiffEvaluator(SupervisedEvaluator):
    """Ignite evaluator that samples ``num_samples`` segmentations per image.

    Args:
        device: where sampling runs.
        val_data_loader: yields dicts with ``image`` (B, C, H, W) and ``masks`` (B, A, H, W),
            ALL annotations of each item, {0, 1} (or class labels when M > 1).
        network: the trained network (unwrapped, or an EMA copy).
        pipeline: how to sample: an :class:`~monai_hsrdiff.diffusion.HSRDiffPipeline` over
            ``network`` (its sampler with steps and eta, precision, chunking); the bundles'
            ``validate#pipeline``.
        num_samples: N samples per image (the metrics' subscript; 32 covers N=16 and N=32, 100 adds
            GED100; the bundles' start-up check is :func:`check_ged100`).
        seed: seeds the sampling noise: each item's N samples draw from their own generator,
            seeded by :func:`item_seed` from ``seed`` and the item's file name (batch key
            ``item``; without it, the item's position in the run), so repeated evaluations of
            one checkpoint give identical numbers, and so do evaluations sharded over ranks.
        progress: a tqdm bar per batch of images.
        sampler, num_inference_steps, max_batch, autocast_dtype: deprecated, instead of
            ``pipeline``: the evaluator builds ``HSRDiffPipeline(network, sampler, autocast_dtype,
            max_batch)`` and samples ``num_inference_steps`` steps (``None``: the sampler's own).
        kwargs: passed to ``SupervisedEvaluator`` (key_val_metric, additional_metrics, val_handlers, ...).

    The engine output per iteration holds ``pred`` (B, N, H, W) masks, ``label`` (B, A, H, W)
    masks, ``mean`` (B, H, W) sample mean, ``entropy`` (B, H, W) in bits, and ``image``. The
    mean κ per sampling timestep, over the whole run, is in ``engine.state.kappa_trace``
    (dict timestep -> mean κ), for the paper's Figure 6.

    Example::

        pipeline = HSRDiffPipeline(net, get_sampler("ddim", process, eta=1.0, num_inference_steps=50))
        evaluator = HSRDiffEvaluator("cpu", loader, net, pipeline, num_samples=16, key_val_metric=...)
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader,
        network: torch.nn.Module,
        pipeline: HSRDiffPipeline | None = None,
        num_samples: int = 16,
        seed: int = 0,
        progress: bool = False,
        val_handlers: Sequence | None = None,
        sampler: Any = None,
        num_inference_steps: int | None = None,
        max_batch: int | str | None = "auto",
        autocast_dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"HSRDiffEvaluator: num_samples must be >= 1, got {num_samples}")
        for name, handler in {**(kwargs.get("key_val_metric") or {}), **(kwargs.get("additional_metrics") or {})}.items():
            needed = getattr(getattr(handler, "metric_fn", None), "num_samples", None)
            if needed is not None and needed > num_samples:
                raise ValueError(
                    f"HSRDiffEvaluator: metric {name!r} scores {needed} samples per image but num_samples={num_samples}; "
                    f"draw at least {needed} samples (N={needed} metrics use the first {needed} of them)"
                )
        bare = getattr(network, "module", network)
        legacy = {k: v for k, v in {"sampler": sampler, "num_inference_steps": num_inference_steps,
                                    "autocast_dtype": autocast_dtype}.items() if v is not None}  # fmt: skip
        if max_batch != "auto":
            legacy["max_batch"] = max_batch
        if legacy:  # the deprecated arguments: a pipeline built from them (over pipeline=, when given)
            warnings.warn(
                f"HSRDiffEvaluator: {', '.join(f'{k}=' for k in legacy)} deprecated: set the sampler (with its "
                "num_inference_steps), autocast_dtype and max_batch_size on pipeline=HSRDiffPipeline(...) "
                "(the bundles' validate#sampler and validate#pipeline)",
                FutureWarning,  # shown to users of a bundle run, unlike DeprecationWarning
                stacklevel=2,
            )
            if pipeline is None and sampler is None:
                raise ValueError("HSRDiffEvaluator: give pipeline=HSRDiffPipeline(network, sampler, ...)")
            base = pipeline
            pipeline = HSRDiffPipeline(
                bare if base is None else base.model,
                sampler if sampler is not None else base.sampler,
                autocast_dtype if autocast_dtype is not None or base is None else base.autocast_dtype,
                max_batch if max_batch != "auto" or base is None else base.max_batch_size,
            )
        elif pipeline is None:
            raise ValueError("HSRDiffEvaluator: give pipeline=HSRDiffPipeline(network, sampler, ...)")
        if getattr(pipeline.model, "module", pipeline.model) is not bare:
            raise ValueError(
                "HSRDiffEvaluator: pipeline.model is not the evaluator's network; give both the same network "
                "(bundles: validate#pipeline#model and validate#evaluator#network)"
            )
        self._steps = num_inference_steps  # a per-call step count: only from the deprecated argument
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            val_handlers=val_handlers,
            decollate=False,
            **kwargs,
        )
        self.pipeline = pipeline
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.progress = progress
        self._items_seen = 0
        self.add_event_handler(Events.STARTED, self._reset)

    def _handle_exception(self, e: BaseException) -> None:
        # as in HSRDiffTrainer: our own errors (a damaged item file) end with their message, no traceback
        if own_error(e) is not None:
            raise e
        super()._handle_exception(e)

    def _reset(self, engine: HSRDiffEvaluator) -> None:
        self._items_seen = 0
        engine.state.kappa_sum = {}
        engine.state.kappa_count = {}
        engine.state.kappa_trace = {}

    def _fire_event(self, event_name: Any, *event_args: Any, **event_kwargs: Any) -> None:
        # before every EPOCH_COMPLETED handler (the figures read it): the κ trace over all ranks
        if event_name == Events.EPOCH_COMPLETED:
            self._gather_kappa()
        super()._fire_event(event_name, *event_args, **event_kwargs)

    def _gather_kappa(self) -> None:
        """Sum the κ sums and counts per timestep over the ranks of a sharded evaluation."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.state.kappa_sum, self.state.kappa_count))
        total, count = {}, {}
        for k_sum, k_count in parts:  # rank order: the same sums on every rank
            for t, v in k_sum.items():
                total[t] = total.get(t, 0.0) + v
                count[t] = count.get(t, 0) + k_count[t]
        self.state.kappa_sum, self.state.kappa_count = total, count
        self.state.kappa_trace = {t: total[t] / count[t] for t in sorted(total)}

    def _item_generators(self, batchdata: dict, batch_size: int) -> list[torch.Generator]:
        """One generator per image of the batch, seeded from (seed, item file name)."""
        items = batchdata.get("item")
        if isinstance(items, (list, tuple)) and len(items) == batch_size:
            ids = [os.path.basename(str(i)) for i in items]  # not the folder: a moved data set samples alike
        else:  # a loader without item paths: the position in this run (order dependent)
            ids = [f"#{self._items_seen + j}" for j in range(batch_size)]
        self._items_seen += batch_size
        gen_device = self.state.device if self.state.device.type == "cuda" else "cpu"
        return [torch.Generator(device=gen_device).manual_seed(item_seed(self.seed, i)) for i in ids]

    def _iteration(self, engine: HSRDiffEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        for key in ("image", "masks"):
            if key not in batchdata:
                raise KeyError(f"HSRDiffEvaluator: batch has no {key!r} (keys: {sorted(batchdata)})")
        # plain tensors: MetaTensor's __torch_function__ would wrap every op of the sampling loop
        image = convert_to_tensor(batchdata["image"], track_meta=False).to(engine.state.device)
        masks = convert_to_tensor(batchdata["masks"], track_meta=False).to(engine.state.device)
        with torch.inference_mode():
            out = self.pipeline(
                image,
                num_samples=self.num_samples,
                num_inference_steps=self._steps,
                generator=self._item_generators(batchdata, image.shape[0]),
                progress=self.progress,
            )
        pred = samples_to_masks(out.samples)
        label = masks > 0 if pred.dtype == torch.bool else masks.long()
        for t, k in zip(out.timesteps.tolist(), out.kappa_trace.tolist()):
            t, k = int(t), float(k)
            engine.state.kappa_sum[t] = engine.state.kappa_sum.get(t, 0.0) + k * image.shape[0]
            engine.state.kappa_count[t] = engine.state.kappa_count.get(t, 0) + image.shape[0]
            engine.state.kappa_trace[t] = engine.state.kappa_sum[t] / engine.state.kappa_count[t]
        mean = pred.float().mean(dim=1)
        return {
            "image": image,
            "pred": pred,
            "label": label,
            "mean": mean,
            "entropy": torch.stack([torch.as_tensor(entropy_map(p)) for p in pred.cpu()]),
        }
