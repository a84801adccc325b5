"""The two HSRDiff model scales of the paper: ``hsrdiff`` (96.14M parameters) and ``hsrdiff_light`` (12.89M).

The paper (§Implementation Details, Table 1) only says the two scales differ in the widths "C1, C2"
and reports their parameter counts; its Appendix B.2 with the exact configuration is not public.
Both presets here share one design (4 levels, 2 residual blocks per level, self-attention at the
two lowest resolutions, GroupNorm with 32 groups, 32-channel attention heads) and differ only in the
widths, chosen so that the parameter counts for ``in_channels=1, out_channels=1`` land near the
paper's (the count depends on neither the image size nor, beyond a few hundred weights, on the
channel numbers):

==================  ======================  ==================  ================
preset              channels                parameters          paper
==================  ======================  ==================  ================
``hsrdiff``         (64, 128, 256, 512)     102,590,916         96.14M (+6.7%)
``hsrdiff_light``   (32, 64, 128, 160)      13,600,388          12.89M (+5.5%)
==================  ======================  ==================  ================

The bundles' ``network_def`` writes every :class:`HSRDiff` argument out with the ``hsrdiff``
values; ``hsrdiff_light`` is the override ``--network_def#channels "[32,64,128,160]"``. The
older bundle key ``preset`` still works through :func:`preset_value` (deprecated).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from .hsrdiff import HSRDiff

__all__ = [
    "BUNDLE_PRESET",
    "PAPER_PARAMETERS",
    "PRESETS",
    "PRESET_CONFIGS",
    "check_preset",
    "get_preset",
    "hsrdiff",
    "hsrdiff_light",
    "preset_value",
]

_COMMON: dict[str, Any] = {
    "spatial_dims": 2,
    "num_res_blocks": 2,
    "attention_levels": (False, False, True, True),
    "norm_num_groups": 32,
    "num_head_channels": 32,
    "prediction": "srdiff",
    "condition": "hierarchical",
    "decoder_skips": True,
}

#: Keyword arguments of :class:`HSRDiff` for each preset (before the caller's overrides).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "hsrdiff": {**_COMMON, "channels": (64, 128, 256, 512)},
    "hsrdiff_light": {**_COMMON, "channels": (32, 64, 128, 160)},
}

#: The preset whose values the bundles' ``network_def`` writes out.
BUNDLE_PRESET = "hsrdiff"

#: Parameter counts the paper reports (Table 1).
PAPER_PARAMETERS: dict[str, int] = {"hsrdiff": 96_140_000, "hsrdiff_light": 12_890_000}


def hsrdiff(in_channels: int = 1, out_channels: int = 1, **overrides: Any) -> HSRDiff:
    """HSRDiff at the paper's full scale (~96M parameters; 102.6M here for 1 -> 1 channels).

    Args:
        in_channels: channels C of the condition image (LIDC 1, MS-Lesion 4).
        out_channels: channels M of the label (1 for binary tasks).
        overrides: any other :class:`HSRDiff` argument, replacing the preset's value
            (e.g. ``prediction="eps"`` for an ablation).

    Example::

        net = hsrdiff(in_channels=4, out_channels=1)
    """
    return HSRDiff(**{**PRESET_CONFIGS["hsrdiff"], "in_channels": in_channels, "out_channels": out_channels,
                      **overrides})  # fmt: skip


def hsrdiff_light(in_channels: int = 1, out_channels: int = 1, **overrides: Any) -> HSRDiff:
    """HSRDiff-light (~12.9M parameters in the paper; 13.6M here for 1 -> 1 channels).

    Args:
        in_channels: channels C of the condition image (LIDC 1, MS-Lesion 4).
        out_channels: channels M of the label (1 for binary tasks).
        overrides: any other :class:`HSRDiff` argument, replacing the preset's value.

    Example::

        net = hsrdiff_light(in_channels=1, out_channels=1, condition="global")
    """
    return HSRDiff(**{**PRESET_CONFIGS["hsrdiff_light"], "in_channels": in_channels, "out_channels": out_channels,
                      **overrides})  # fmt: skip


#: Preset name -> factory.
PRESETS: dict[str, Callable[..., HSRDiff]] = {"hsrdiff": hsrdiff, "hsrdiff_light": hsrdiff_light}


def _preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"get_preset: unknown preset name {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESET_CONFIGS[name]


def check_preset(name: str) -> str:
    """``name`` when it is a preset name, else ``ValueError`` naming the presets.

    The bundles' ``network_def`` requires it (``_requires_``), so a misspelt ``--preset`` stops
    the run even when every argument it would set is overridden.
    """
    _preset_config(name)
    return name


def get_preset(name: str, **kwargs: Any) -> HSRDiff:
    """Build a preset by name (for configs that name the scale as a string).

    Args:
        name: "hsrdiff" or "hsrdiff_light".
        kwargs: passed to the preset factory (``in_channels``, ``out_channels``, overrides).

    Raises:
        ValueError: ``name`` is not a preset.

    Example::

        net = get_preset("hsrdiff_light", in_channels=4)
    """
    _preset_config(name)
    return PRESETS[name](**kwargs)


def preset_value(preset: str, key: str, value: Any) -> Any:
    """The bundle key ``preset`` (deprecated) applied to one ``network_def`` argument.

    ``network_def`` writes every argument out with the ``hsrdiff`` values; for ``preset`` =
    :data:`BUNDLE_PRESET` this returns ``value`` (what the config shows, or its override). For
    another preset it returns that preset's value and prints a deprecation note naming the
    override to use instead.

    Args:
        preset: the bundle key ``preset``.
        key: an :class:`HSRDiff` argument, e.g. ``"channels"``.
        value: the value ``network_def`` writes for ``key``.

    Raises:
        ValueError: ``preset`` is not a preset name.

    Example::

        preset_value("hsrdiff_light", "channels", [64, 128, 256, 512])  # -> [32, 64, 128, 160], with a note
    """
    config = _preset_config(preset)
    if preset == BUNDLE_PRESET or config[key] == PRESET_CONFIGS[BUNDLE_PRESET][key]:
        return value
    shown = list(config[key]) if isinstance(config[key], tuple) else config[key]
    print(
        f"[hsrdiff] DEPRECATED: the bundle key preset={preset!r} sets network_def#{key} to {shown}; "
        f"write --network_def#{key} \"{shown}\" instead (preset will be removed).",
        file=sys.stderr,
        flush=True,
    )
    return shown
