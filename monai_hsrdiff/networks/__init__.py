"""HSRDiff networks: the denoising network and its two presets."""

from __future__ import annotations

from .hsrdiff import (
    CONDITIONS,
    PREDICTIONS,
    ConditionEncoder,
    HSRDiff,
    HSRDiffDecoder,
    HSRDiffOutput,
    SelfRegulationHead,
)
from .presets import PRESETS, get_preset, hsrdiff, hsrdiff_light

__all__ = [
    "CONDITIONS",
    "PREDICTIONS",
    "PRESETS",
    "ConditionEncoder",
    "HSRDiff",
    "HSRDiffDecoder",
    "HSRDiffOutput",
    "SelfRegulationHead",
    "get_preset",
    "hsrdiff",
    "hsrdiff_light",
]
