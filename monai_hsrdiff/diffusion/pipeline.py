"""The sampling loop: N segmentation hypotheses per image, with the condition encoded once.

E_c does not see x_t or t, so :class:`HSRDiffPipeline` runs ``model.encode_condition`` once
per image and feeds the cached features F_h to every denoising step of every sample
(``condition_features=``), instead of re-encoding the image T·N times.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from monai_hsrdiff.diffusion.process import ModelOutput, randn
from monai_hsrdiff.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from monai_hsrdiff.networks.compiled_norm import opaque_group_norms

__all__ = ["CPU_PIXELS_PER_CALL", "PRECISIONS", "TRUE_PRECISIONS", "HSRDiffPipeline", "SamplingOutput", "auto_batch_size", "resolve_autocast_dtype"]


class _PipelineDefault:
    def __repr__(self) -> str:
        return "<the pipeline's own>"


#: ``HSRDiffPipeline.__call__``'s default ``max_batch_size``: the pipeline's own setting.
PIPELINE_DEFAULT: Any = _PipelineDefault()


@dataclass
class SamplingOutput:
    """Samples and the κ trace of one pipeline call.

    Attributes:
        samples: (B, N, M, *spatial) continuous x_0 samples (≈ [-1, 1]); read a mask by
            ``samples > 0`` (M=1) or ``samples.argmax(2)`` (M>1).
        timesteps: (S,) long, the timesteps visited, in order.
        kappa: (S, B, N) κ used at each step for each sample (CPU float32).
        kappa_trace: (S,) mean κ per timestep over all B·N samples (the paper's Figure 6).
    """

    samples: torch.Tensor
    timesteps: torch.Tensor
    kappa: torch.Tensor
    kappa_trace: torch.Tensor


class HSRDiffPipeline:
    """Draw ``num_samples`` label hypotheses per condition image with a DDPM, DDIM or DPM-Solver++ sampler.

    Like a diffusers pipeline it owns the model and the sampler, and with them every sampling
    setting: the step count and η (on the sampler, :func:`~monai_hsrdiff.diffusion.get_sampler`),
    the precision and the chunking. The bundles declare it as one config object
    (``validate#pipeline``, inference.json's ``pipeline``); the evaluator, the volume inferer
    and the benchmarks take it.

    Args:
        model: an HSRDiff network (``monai_hsrdiff.networks.HSRDiff``): ``encode_condition`` and
            ``forward(x, timesteps, condition_features=...)``, ``out_channels`` = M.
        sampler: a :class:`DDPMSampler`, :class:`DDIMSampler` or :class:`DPMSolverSampler`, with its
            own step count; it is stepped once per timestep on all B·N items (so a multistep solver
            sees one trajectory and every step draws one noise tensor, whatever the chunking).
        autocast_dtype: run the network (E_c and every denoising step) under ``torch.autocast``
            with this dtype, e.g. ``torch.bfloat16`` on CPUs with bf16 matrix units or
            ``torch.float16`` on GPUs (names "bfloat16" / "float16" work too, as in bundle
            configs); the sampler arithmetic, x_t and the returned samples stay in the
            condition's dtype; the network runs as a channels-last copy of the model (oneDNN's
            bf16 convolutions are faster in it), the model passed in is left as it is.
            ``None`` or "float32" (default): no autocast, the reference numerics, on the model
            itself. "bfloat16-true" (as Lightning's "bf16-true"): the network runs as a
            channels-last copy whose weights are bf16, so nothing is cast per call and
            GroupNorm/SiLU run in bf16 too (the fastest CPU setting); the model passed in is
            left as it is. Measured speed and GED16 cost: ``benchmarks/README.md``.
        compile: run the denoising steps through ``torch.compile`` (inductor with
            ``freezing``: weights become constants that oneDNN pre-packs), on a channels-last
            copy of the model; for inference with fixed weights. The first call compiles (tens of
            seconds); a call after the weights changed (training) copies and compiles again.
        max_batch_size: largest number of items the network sees in one call; each step runs
            the network on chunks of this size (E_c still runs once per image). ``"auto"``
            (default): :func:`auto_batch_size` (small chunks on CPU, one chunk on GPU);
            ``None``: one chunk. It changes speed only, never the samples.

    Example::

        pipe = HSRDiffPipeline(model, DDIMSampler(process, eta=0.0, num_inference_steps=50))
        out = pipe(images, num_samples=16, generator=torch.Generator().manual_seed(0))
        masks = out.samples > 0        # (B, 16, 1, H, W)
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: DDPMSampler | DDIMSampler | DPMSolverSampler,
        autocast_dtype: torch.dtype | str | None = None,
        max_batch_size: int | str | None = "auto",
        compile: bool = False,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.cast_weights = isinstance(autocast_dtype, str) and autocast_dtype in TRUE_PRECISIONS
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype)
        self.max_batch_size = _check_max_batch_size(max_batch_size)
        if not isinstance(compile, bool):
            raise ValueError(f"HSRDiffPipeline: compile must be true or false, got {compile!r}.")
        self.compile = compile
        self._runtime: tuple[tuple, nn.Module] | None = None

    @property
    def precision(self) -> str:
        """The precision's name, as bundle configs give it: "float32", "bfloat16", "bfloat16-true" or "float16"."""
        if self.cast_weights:
            return next(name for name, dtype in TRUE_PRECISIONS.items() if dtype == self.autocast_dtype)
        names = {dtype: name for name, dtype in PRECISIONS.items() if name not in TRUE_PRECISIONS}
        return names.get(self.autocast_dtype, str(self.autocast_dtype).replace("torch.", ""))

    def runtime_model(self) -> nn.Module:
        """The network the denoising steps call: ``model`` itself (fp32 eager), or its channels-last
        copy (autocast), bf16 copy ("bfloat16-true") or compiled copy.

        The copy is kept while the model's parameters and buffers are the same tensors at the
        same version (``Tensor._version`` counts in-place updates: an optimizer step, a
        ``load_state_dict``), and made again after they change.
        """
        if not (self.cast_weights or self.compile or self.autocast_dtype is not None):
            return self.model  # fp32 eager: the reference numerics, on the caller's own model
        key = tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))
        if self._runtime is None or self._runtime[0] != key:
            # channels-last: oneDNN's preferred conv layout (fp32 under inductor +4 %, benchmarks/compiled_layouts.py;
            # a bf16 autocast step 10-14 % faster than on the contiguous model, benchmarks/README.md)
            dtype = self.autocast_dtype if self.cast_weights else None
            net = copy.deepcopy(self.model).eval().to(dtype, memory_format=torch.channels_last)
            if self.compile:
                # large GroupNorms as ATen's kernel: inductor's is 1.1-4x slower there (networks/compiled_norm.py)
                net = torch.compile(opaque_group_norms(net), options={"freezing": True})
            self._runtime = (key, net)
        return self._runtime[1]

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def __call__(
        self,
        condition: torch.Tensor,
        num_samples: int = 1,
        num_inference_steps: int | None = None,
        max_batch_size: int | str | None = PIPELINE_DEFAULT,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = False,
    ) -> SamplingOutput:
        """Sample.

        Args:
            condition: (B, C, *spatial) condition images on the model's device.
            num_samples: N ≥ 1 hypotheses per image (B·N items denoised together, step by step).
            num_inference_steps: this call's step count instead of the sampler's own
                (``sampler.num_inference_steps``, the default; DDPM accepts only T).
            max_batch_size: this call's chunking instead of the pipeline's ``max_batch_size``
                (the default): an int, ``"auto"`` or ``None``.
            generator: random generator for x_T and every step's noise; a fixed seed reproduces
                every sample, whatever ``max_batch_size``. A sequence of B generators: image b's
                N samples draw all their noise from ``generator[b]`` alone, so they depend only on
                that generator's seed, not on the other images of the batch (per-item seeding: the
                evaluator's, so a sharded multi-process evaluation draws the same samples).
            progress: show a tqdm progress bar (one tick per step).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"HSRDiffPipeline: num_samples must be an integer >= 1, got {num_samples!r}.")
        if max_batch_size is PIPELINE_DEFAULT:
            max_batch_size = self.max_batch_size
        _check_max_batch_size(max_batch_size)
        if condition.ndim < 3:
            raise ValueError(
                f"HSRDiffPipeline: condition must be (B, C, *spatial), got shape {tuple(condition.shape)}."
            )
        if isinstance(generator, Sequence) and len(generator) != condition.shape[0]:
            raise ValueError(
                f"HSRDiffPipeline: {len(generator)} generators for {condition.shape[0]} condition images; "
                "give one generator, or one per image."
            )
        total = condition.shape[0] * num_samples
        if max_batch_size == "auto":
            chunk = auto_batch_size(condition.device, condition.shape[2:], total)
        else:
            chunk = total if max_batch_size is None else max_batch_size
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._sample(condition, num_samples, num_inference_steps, chunk, generator, progress)
        finally:
            model.train(was_training)

    def _sample(self, condition, num_samples, num_inference_steps, chunk, generator, progress):
        model, sampler = self.runtime_model(), self.sampler
        b, n = condition.shape[0], num_samples
        m = int(model.out_channels)
        spatial = tuple(condition.shape[2:])
        device = condition.device
        dtype = condition.dtype if condition.is_floating_point() else torch.float32
        total = b * n

        # 1. E_c once per image (in chunks of at most `chunk` images)
        feats: list[torch.Tensor] | None = None
        if getattr(model, "condition", "hierarchical") != "none":
            with self._autocast(device):
                parts = [model.encode_condition(condition[i : i + chunk]) for i in range(0, b, chunk)]
            if parts[0] is not None:
                feats = [torch.cat(level, dim=0) for level in zip(*parts)]
        # sample k of the flat B·N batch belongs to image k // N; the features of each chunk are
        # gathered once, not at every step
        owner = torch.arange(total, device=device) // n
        starts = range(0, total, chunk)
        chunk_feats = [[f[owner[i : i + chunk]] for f in feats] if feats is not None else None for i in starts]

        sampler.set_timesteps(num_inference_steps, device=device)
        timesteps = sampler.timesteps
        s = len(timesteps)
        kappa = torch.empty(s, total, dtype=torch.float32, device=device)
        per_item = isinstance(generator, Sequence)
        draw = _draw if per_item else randn
        x = draw((total, m, *spatial), generator, device, dtype)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=s, desc=f"{type(sampler).__name__}", unit="step")
        try:
            # 2. step by step; the network runs chunk by chunk, the sampler once on all B·N items,
            # so every step draws one (B·N, ...) noise tensor whatever the chunk size
            for i, t in enumerate(timesteps):
                outs = []
                for start, feats_k in zip(starts, chunk_feats):
                    x_k = x[start : start + chunk]
                    t_batch = torch.full((x_k.shape[0],), int(t), dtype=torch.long, device=device)
                    with self._autocast(device):
                        outs.append(model(x_k, t_batch, condition=None, condition_features=feats_k))
                if per_item:  # every step's noise from the images' own generators (unused at a deterministic step)
                    step = sampler.step(_cat_outputs(outs), int(t), x, noise=_draw(x.shape, generator, device, x.dtype))
                else:
                    step = sampler.step(_cat_outputs(outs), int(t), x, generator=generator)
                x = step.prev_sample
                kappa[i] = step.kappa.detach().float()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

        kappa = kappa.reshape(s, b, n).cpu()
        return SamplingOutput(
            samples=x.reshape(b, n, m, *spatial),
            timesteps=timesteps.detach().cpu(),
            kappa=kappa,
            kappa_trace=kappa.mean(dim=(1, 2)),
        )


def _draw(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device, dtype) -> torch.Tensor:
    """(B·N, ...) standard normal noise, the b-th block of N rows drawn from ``generators[b]``."""
    per = int(shape[0]) // len(generators)
    return torch.cat([randn((per, *shape[1:]), g, device, dtype) for g in generators])


def _check_max_batch_size(value: int | str | None) -> int | str | None:
    if value != "auto" and value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"HSRDiffPipeline: max_batch_size must be an integer >= 1, 'auto' or None, got {value!r}.")
    return value


#: Pixels (voxels) per network call that ``auto_batch_size`` aims for on CPU: the measured sweet
#: spot of hsrdiff_light on a 2-core AVX-512 CPU (benchmarks/README.md, "chunk size"): 2 items at
#: 128x128, 8 at 64x64; larger chunks leave the caches and get slower per item.
CPU_PIXELS_PER_CALL = 32768


def auto_batch_size(device: torch.device, spatial: Sequence[int], total: int) -> int:
    """The chunk size ``max_batch_size="auto"`` uses for ``total`` items of size ``spatial``.

    On CPU, ``max(1, CPU_PIXELS_PER_CALL // prod(spatial))`` items per call (one image per call
    for 3D volumes); elsewhere (CUDA, MPS) all items in one call, since batching is what fills
    an accelerator.
    """
    if torch.device(device).type != "cpu":
        return total
    return max(1, min(total, CPU_PIXELS_PER_CALL // max(1, math.prod(int(v) for v in spatial))))


#: Precisions whose network runs with its weights in that dtype (a channels-last copy), not cast per call.
TRUE_PRECISIONS = {"bfloat16-true": torch.bfloat16}
#: Names accepted for ``autocast_dtype`` (bundle configs and command lines give strings).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16, **TRUE_PRECISIONS}


def resolve_autocast_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` / "float32" -> None (no autocast); "bfloat16" / "float16" / "bfloat16-true" or a
    floating dtype -> that dtype."""
    if value is None or isinstance(value, torch.dtype) and value == torch.float32:
        return None
    if isinstance(value, str) and value in PRECISIONS:
        return PRECISIONS[value]
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise ValueError(
        f"HSRDiffPipeline: autocast_dtype must be one of {sorted(PRECISIONS)}, a floating torch.dtype or None, "
        f"got {value!r}."
    )


def _cat_outputs(parts: list[ModelOutput]) -> ModelOutput:
    """The network outputs of one step's chunks, concatenated along the batch dimension."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor | None:
        return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

    return SimpleNamespace(eps=cat("eps"), x0=cat("x0"), kappa=cat("kappa"))
