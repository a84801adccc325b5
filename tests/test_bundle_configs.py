"""The bundle configs as written: the lidc and ms_lesion bundles differ only where the data
sets differ, ``network_def`` is the network the presets build, and shared blocks are written once.

These read the JSON files (and build networks on the ``meta`` device where only shapes
matter), so they run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser

from monai_hsrdiff.networks import HSRDiff, get_preset

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
FILES = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "demo.json")

#: Config ids in which lidc and ms_lesion may differ, per file, and why.
ALLOWED_DIFFERENCES: dict[str, set[str]] = {
    # the data set: its name, and 1 CT channel against 4 MRI channels (FLAIR, MPRAGE, PD, T2)
    "train.json": {"task", "in_channels"},
    # LIDC items are resampled to a fixed in-plane spacing; the MS-Lesion items keep the scan's grid
    "inference.json": {"inference_item_spacing"},
    # the lidc demo switches that resampling off (its synthetic items have no spacing); ms_lesion's is off already
    "demo.json": {"inference_item_spacing"},
    "evaluate.json": set(),
    "multi_gpu_train.json": set(),
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Config id (``a#b#0``) -> leaf value; a top-level key written as ``a#b`` is that id."""
    if isinstance(node, dict) and node or isinstance(node, list) and node:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        out: dict[str, Any] = {}
        for k, v in items:
            out.update(_flatten(v, f"{prefix}#{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _load(task: str, name: str) -> dict[str, Any]:
    return _flatten(json.loads((BUNDLES / task / name).read_text()))


def _differing(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    """The top-level keys under which two flattened configs differ (a key of one only counts too)."""
    return {cid.split("#")[0] for cid in set(a) | set(b) if a.get(cid, ...) != b.get(cid, ...)}


@pytest.mark.parametrize("name", FILES)
def test_lidc_and_ms_lesion_differ_only_where_they_must(name: str) -> None:
    differing = _differing(_load("lidc", name), _load("ms_lesion", name))
    assert differing == ALLOWED_DIFFERENCES[name], (
        f"{name}: lidc and ms_lesion differ in {sorted(differing)}; allowed: {sorted(ALLOWED_DIFFERENCES[name])}"
    )


def test_the_comparison_can_fail() -> None:
    a = _load("lidc", "train.json")
    b = {**a, "validate#evaluator#seed": 1, "learning_rate": 0.1}
    del b["num_epochs"]
    assert _differing(a, b) == {"validate", "learning_rate", "num_epochs"}


def _network_def(task: str, *extra: str, **overrides: Any) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / task / "train.json"), *(str(BUNDLES / task / f) for f in extra)])
    parser.update(overrides)
    return parser.get_parsed_content("network_def")


def _shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("task,in_channels", [("lidc", 1), ("ms_lesion", 4)])
def test_network_def_is_the_hsrdiff_preset(task: str, in_channels: int, capfd) -> None:
    """network_def (HSRDiff with every argument written out) builds the network get_preset built
    before: the same state-dict keys and shapes, so the same parameter count and checkpoints."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / task / "train.json"))
    assert parser["network_def"]["_target_"] == "monai_hsrdiff.networks.HSRDiff"
    with torch.device("meta"):
        net = _network_def(task)
        ref = get_preset("hsrdiff", in_channels=in_channels, out_channels=1)
        assert type(net) is HSRDiff and _shapes(net) == _shapes(ref)
        assert net.num_parameters() == ref.num_parameters() > 100e6
        # the light scale: the documented override, and the deprecated key preset
        light = get_preset("hsrdiff_light", in_channels=in_channels, out_channels=1)
        assert _shapes(_network_def(task, **{"network_def#channels": [32, 64, 128, 160]})) == _shapes(light)
        capfd.readouterr()
        assert _shapes(_network_def(task, preset="hsrdiff_light")) == _shapes(light)
    err = capfd.readouterr().err
    assert "DEPRECATED: the bundle key preset='hsrdiff_light'" in err and '--network_def#channels "[32, 64, 128, 160]"' in err
    assert _shapes(light) != _shapes(ref)
    for widths in ({}, {"network_def#channels": [8, 16]}):  # a misspelt preset stops the run, set widths or not
        with pytest.raises(RuntimeError) as e:  # MONAI wraps the error of a config item
            _network_def(task, preset="hsrdif", **widths)
        assert "get_preset: unknown preset name 'hsrdif'" in repr(e.value.__cause__ or e.value)


@pytest.mark.parametrize("task,in_channels", [("lidc", 1), ("ms_lesion", 4)])
def test_demo_network_unchanged(task: str, in_channels: int) -> None:
    """The demo network is the one demo.json built before network_def was written out (the light
    preset with demo widths): the same weights under the same seed, so the demo's metrics stay."""
    torch.manual_seed(0)
    net = _network_def(task, "demo.json")
    torch.manual_seed(0)
    ref = get_preset("hsrdiff_light", in_channels=in_channels, out_channels=1, channels=[16, 32, 64],
                     attention_levels=[False, False, True], num_res_blocks=1, norm_num_groups=8)  # fmt: skip
    assert net.num_parameters() == ref.num_parameters()
    mine, theirs = net.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    torch.manual_seed(1)
    assert not torch.equal(net.state_dict()[k], _network_def(task, "demo.json").state_dict()[k])  # seed matters


@pytest.mark.parametrize("task", ["lidc", "ms_lesion"])
def test_tracking_settings_written_once(task: str) -> None:
    """The MLflow settings live in the one ``tracking_run`` object; every tracking handler of the
    training, validation and evaluation lists refers to it instead of repeating them."""
    text = "".join((BUNDLES / task / f).read_text() for f in ("train.json", "evaluate.json"))
    for ref in ("@tracking_uri", "@tracking_fallback_local", "@experiment_name", "@tracking_parent_run"):
        assert text.count(f'"{ref}"') == 1, ref
    configs = {f: _load(task, f) for f in ("train.json", "evaluate.json")}
    handlers = {
        (f, cid[: -len("#_target_")]): v
        for f, config in configs.items()
        for cid, v in config.items()
        if cid.endswith("#_target_") and str(v).startswith("monai_hsrdiff.tracking.") and cid != "tracking_run#_target_"
        and "#served_model#" not in cid  # the training handler's model to register, not a handler
    }
    assert sorted(set(handlers.values())) == ["monai_hsrdiff.tracking.FiguresHandler", "monai_hsrdiff.tracking.HSRDiffMLFlowHandler"]
    assert len(handlers) == 5  # training, validation (+ figures), evaluation (+ figures)
    for f, item in handlers:
        assert configs[f][item + "#run"] == "@tracking_run" and configs[f][item + "#_disabled_"] == "@tracking_disabled"


@pytest.mark.parametrize("task", ["lidc", "ms_lesion"])
@pytest.mark.parametrize("name", ["train", "evaluate", "inference", "multi_gpu_train"])
def test_seed_set_before_the_network_is_built(task: str, name: str) -> None:
    """torch's start-up seed is random per process: the network (built by the first initialize
    entry that references it) must be initialised after set_determinism, or the demo's weights,
    and so its metrics, differ from run to run for the same seed."""
    steps = json.loads((REPO / "bundles" / task / f"{name}.json").read_text())["initialize"]
    seeded = next(i for i, s in enumerate(steps) if "set_determinism" in s)
    builds = [i for i, s in enumerate(steps) if "@network" in s]
    assert builds and seeded < min(builds), steps
