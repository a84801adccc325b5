"""HSRDiff networks: the denoising network and its two presets (the bundles write the network out in ``network_def``)."""

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
from .presets import PRESETS, check_preset, get_preset, hsrdiff, hsrdiff_light, preset_value

__all__ = [
    "CONDITIONS",
    "PREDICTIONS",
    "PRESETS",
    "ConditionEncoder",
    "HSRDiff",
    "HSRDiffDecoder",
    "HSRDiffOutput",
    "SelfRegulationHead",
    "check_preset",
    "get_preset",
    "hsrdiff",
    "hsrdiff_light",
    "preset_value",
]
