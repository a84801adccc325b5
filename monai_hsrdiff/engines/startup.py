"""Start-up check of a bundle's resolved values, before the run folder, its lock or the MLflow
store exist: a value the engines would only refuse later (``--val_sampling_steps 0`` at the
first validation, after a whole epoch) stops the run at once, naming the key.

The rules are those of the objects that use the values: the sampler itself is built and its
timesteps set (DDPM runs all T steps, DDIM takes 1..T), the pipeline's precision names are
resolved by the pipeline, and ``torch.device`` parses the device; only counts and sizes
(integers >= 1) are checked here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from monai_hsrdiff.errors import fail
from monai_hsrdiff.utils.device import device_problem

__all__ = ["check_run_values"]

#: keys that count something: integers >= 1 (None allowed for the ``*_max_items`` ones)
_COUNTS = (
    "num_train_timesteps", "image_size", "in_channels", "out_channels", "batch_size", "num_epochs", "val_interval",
    "val_num_samples", "eval_num_samples", "num_samples", "val_max_items", "eval_max_items",
)  # fmt: skip
_MAY_BE_NONE = ("val_max_items", "eval_max_items")
#: the prefixes of the sampling settings: validation (train.json), evaluation, inference
_SAMPLING = ("val_", "eval_", "")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sampling_problems(prefix: str, values: dict[str, Any], num_train_timesteps: int) -> list[str]:
    from monai_hsrdiff.diffusion import DiffusionSchedule, SelfRegulatedDiffusion, get_sampler
    from monai_hsrdiff.diffusion.pipeline import resolve_autocast_dtype

    problems = []
    name_key, steps_key, eta_key, prec_key = (f"{prefix}{k}" for k in ("sampler", "sampling_steps", "sampler_eta", "precision"))
    if prec_key in values:
        try:
            resolve_autocast_dtype(values[prec_key])
        except ValueError as e:
            problems.append(f"{prec_key} = {values[prec_key]!r}: {e}")
    if name_key not in values:
        return problems
    eta = values.get(eta_key, 0.0)
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta):
        problems.append(f"{eta_key} = {eta!r}: must be a finite number (0: deterministic DDIM, 1: as diverse as DDPM)")
        return problems
    steps = values.get(steps_key)
    try:  # the sampler checks its own step count (get_sampler: DDPM ignores one)
        get_sampler(values[name_key], SelfRegulatedDiffusion(DiffusionSchedule(num_train_timesteps)), eta=eta,
                    num_inference_steps=steps)  # fmt: skip
    except (TypeError, ValueError) as e:
        if "num_inference_steps" in str(e):
            return [*problems, f"{steps_key} = {steps!r}: {e} (num_train_timesteps = {num_train_timesteps})"]
        key = eta_key if "eta" in str(e) else name_key
        return [*problems, f"{key} = {values[key]!r}: {e}"]
    return problems


def check_run_values(network: torch.nn.Module | None = None, **values: Any) -> None:
    """Stop (``errors.fail``, exit code 2) when a resolved bundle value cannot work, naming every such key.

    Args:
        network: the network definition, to check ``image_size`` against its depth (each of the
            L levels halves the image: the size must be a multiple of 2**(L-1)).
        values: bundle key -> resolved value. Known keys: the counts (``batch_size``,
            ``num_epochs``, ``val_interval``, ``image_size``, ``num_train_timesteps``,
            ``*num_samples``, ``*_max_items``, ...), ``ckpt_every_n_iterations`` and ``log_every_n_iterations`` (>= 0),
            ``device``, and per prefix ``val_`` / ``eval_`` / none (inference) the sampling
            settings ``sampler``, ``sampling_steps``, ``sampler_eta``, ``precision``.
            Unknown keys are refused (a typo in a config's call would skip a check).

    Example::

        check_run_values(num_train_timesteps=250, val_sampler="ddim", val_sampling_steps=0)
        # ERROR: val_sampling_steps = 0: DDIMSampler: num_inference_steps must be an integer in [1, 250], got 0. ...
    """
    known = {*_COUNTS, "ckpt_every_n_iterations", "log_every_n_iterations", "device"}
    known |= {f"{p}{k}" for p in _SAMPLING for k in ("sampler", "sampling_steps", "sampler_eta", "precision")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"check_run_values: unknown key(s) {unknown}; known: {sorted(known)}")
    problems = []
    for key in _COUNTS:
        if key in values and not (values[key] is None and key in _MAY_BE_NONE):
            if not _is_int(values[key]) or values[key] < 1:
                problems.append(f"{key} = {values[key]!r}: must be an integer >= 1")
    every = values.get("ckpt_every_n_iterations", 0)
    if not _is_int(every) or every < 0:
        problems.append(f"ckpt_every_n_iterations = {every!r}: must be an integer >= 0 (0: only at epoch ends)")
    every = values.get("log_every_n_iterations", 0)
    if not _is_int(every) or every < 0:
        problems.append(f"log_every_n_iterations = {every!r}: must be an integer >= 0 (0: one line of epoch means per epoch)")
    if "device" in values:
        why = device_problem(values["device"])
        if why:
            problems.append(f"device = {str(values['device'])!r}: {why}")
    big_t = values.get("num_train_timesteps", 1000)
    if _is_int(big_t) and big_t >= 1:
        for prefix in _SAMPLING:
            problems += _sampling_problems(prefix, values, big_t)
    size, levels = values.get("image_size"), len(getattr(network, "channels", ()) or ())
    if _is_int(size) and size >= 1 and levels > 1 and size % 2 ** (levels - 1):
        problems.append(
            f"image_size = {size}: the network has {levels} levels, each halving the image, so the size must be a "
            f"multiple of {2 ** (levels - 1)}"
        )
    if problems:
        raise fail("bundle value(s) that cannot work:\n" + "\n".join(f"  {p}" for p in problems))
