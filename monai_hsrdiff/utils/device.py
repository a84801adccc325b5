"""The one device check: a bundle's ``device`` key and the inference ``--device`` option.

Checked before a network is built or a checkpoint read, so a typo or a missing GPU is one
message naming the option and the value, instead of a traceback from deep inside torch.
"""

from __future__ import annotations

from typing import Any

from monai_hsrdiff.errors import InferenceInputError

__all__ = ["device_problem", "resolve_device"]


def device_problem(device: Any, option: str = "--device") -> str | None:
    """None when ``device`` exists on this machine, else why not (to follow ``"<value>: "``).

    ``cpu`` always exists; ``cuda[:N]`` when CUDA is available and N < the GPU count; ``mps``
    when PyTorch reports it available. ``option`` is the flag named in the fix.

    Example::

        device_problem("cpu")     # None
        device_problem("banana")  # "that is not a device; use cpu, cuda or cuda:N (N = GPU index)"
    """
    import torch  # here, not at the top: utils is imported by commands that never touch torch

    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        return "that is not a device; use cpu, cuda or cuda:N (N = GPU index)"
    if dev.type == "cpu" or (dev.type == "mps" and torch.backends.mps.is_available()):
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            return f"CUDA is not available on this machine (torch {torch.__version__}, {built}); use {option} cpu"
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            return f"this machine has {n} CUDA device(s), i.e. GPU(s) cuda:0 .. cuda:{n - 1}"
        return None
    return f"device type {dev.type!r} is not available here; use cpu or cuda[:N]"


def resolve_device(device: Any, option: str = "--device") -> Any:
    """``device`` as a ``torch.device`` that exists on this machine (None or "" stays None).

    Raises:
        InferenceInputError: ``"<option> <value>: <why>"`` (:func:`device_problem`).

    Example::

        resolve_device("cpu")     # device(type='cpu')
        resolve_device("banana")  # InferenceInputError: --device 'banana': that is not a device; ...
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return None
    why = device_problem(device, option)
    if why:
        raise InferenceInputError(f"{option} {device!r}: {why}")
    import torch

    return torch.device(device.strip() if isinstance(device, str) else device)
