"""Load a trained model for evaluation/inference, with errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from ignite.engine import Engine

from monai_hsrdiff.errors import fail

__all__ = ["load_checkpoint_for", "load_network_weights"]


def load_network_weights(
    path: str | Path, network: torch.nn.Module, task: str = "", option: str = "--eval_checkpoint"
) -> None:
    """Load the network weights stored at ``path`` into ``network``.

    Accepts a bare state dict (what the best-metric ``model.pt`` holds) or a resume
    checkpoint (then its ``ema`` weights are used when present, else ``network``). A missing
    file, an unreadable file, or weights of another preset/configuration stop with a message
    naming the file and the mismatching keys. ``option`` is the caller's option for the
    checkpoint, named in the hint (``--checkpoint`` for inference).
    """
    path = Path(path)
    if path.is_dir():
        raise fail(f"checkpoint {path} is a folder; pass the checkpoint file (e.g. model.pt) with {option} PATH")
    if not path.is_file():
        raise fail(
            f"checkpoint not found: {path}\n  Train first (python -m monai.bundle run training --config_file "
            f"bundles/{task or '<task>'}/train.json) or pass {option} PATH"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any load failure with the file name
        raise fail(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "network" in obj and isinstance(obj["network"], dict):
        obj = obj.get("ema") or obj["network"]
    target = getattr(network, "module", network)
    own = target.state_dict()
    missing = sorted(set(own) - set(obj))
    unexpected = sorted(set(obj) - set(own))
    wrong = sorted(k for k in set(own) & set(obj) if tuple(own[k].shape) != tuple(obj[k].shape))
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} with other shapes (e.g. {k}: {tuple(obj[k].shape)} vs {tuple(own[k].shape)})")
        raise fail(
            f"checkpoint {path} does not match this bundle's network: " + "; ".join(detail) + ".\n"
            "  It was trained with another preset or configuration: use the same preset/overrides as for training."
        )
    target.load_state_dict(obj)


class load_checkpoint_for:  # noqa: N801 - used as a config "_target_" like a function
    """Ignite handler: load ``path`` into ``network`` when the evaluator starts.

    The file is checked at construction, so a bad checkpoint stops the run before any data
    is loaded or any sampling starts.
    """

    def __init__(self, path: str, network: torch.nn.Module, task: str = "") -> None:
        load_network_weights(path, network, task)
        self.path = path

    def attach(self, engine: Engine) -> None:  # weights are loaded already
        return None
