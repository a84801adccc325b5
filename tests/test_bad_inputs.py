"""Broken input to the bundles' command line stops at once with a short message that names the
key or file and the problem: exit code != 0, no Python traceback, nothing written.

Each case runs the real ``python -m monai.bundle run ...`` in a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_NET, bundle_files

from monai_hsrdiff.handlers import load_network_weights
from monai_hsrdiff.networks import get_preset

TRAIN = ["run", "training", "--config_file", bundle_files("lidc", "train", "demo"), *TINY]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def _refused(res, *needles: str) -> str:
    """The run failed with a short message holding every needle, and no traceback."""
    out = res.output
    assert res.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    assert "ERROR: " in res.stderr, out[-3000:]
    message = res.stderr[res.stderr.index("ERROR: ") :]
    for n in needles:
        assert n in message, (n, message)
    return message


@pytest.fixture
def runs(bundle_env) -> Path:
    return Path(bundle_env["HSRDIFF_RUN_ROOT"])


@pytest.fixture
def data_copy(demo_data: Path, tmp_path: Path) -> Path:
    """A private copy of the LIDC demo data set, to break."""
    out = tmp_path / "data" / "demo_lidc"
    shutil.copytree(demo_data / "demo_lidc", out)
    return out


def test_misspelt_keys_command_line_and_file(run_bundle, runs: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my_override.json"
    mine.write_text(json.dumps({"learning_rat": 0.01, "val_interval": 2}))
    cfg = bundle_files("lidc", "train", "demo")[:-1] + f", '{mine}']"
    res = run_bundle(
        [
            "run", "training", "--config_file", cfg, *TINY,
            "--num_epoch", "5", "--network_def#chanels", "[8,16]", "--train#dataloader#batchsize", "3",
        ]
    )  # fmt: skip
    msg = _refused(res, "unknown config key")
    assert "'num_epoch' is not a key of this bundle; did you mean 'num_epochs'? (from the command line)" in msg
    assert "'chanels' is not an argument of monai_hsrdiff.networks.get_preset" in msg
    assert "did you mean 'network_def#channels'" in msg
    assert "'batchsize' is not an argument of DataLoader" in msg and "'train#dataloader#batch_size'" in msg
    assert f"'learning_rat' is not a key of this bundle; did you mean 'learning_rate'? (from {mine})" in msg
    assert "val_interval" not in msg  # a valid key of the same file is fine
    assert not runs.exists()


def test_boolean_written_lowercase(run_bundle, runs: Path) -> None:
    # fire passes "false" on as a string, which `if @resume` would take as true
    res = run_bundle([*TRAIN, "--resume", "false"])
    _refused(res, "--resume false", "'resume' is a boolean", "True or False")
    assert not runs.exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--preset", "hsrdif"], ["get_preset: unknown preset name 'hsrdif'", "'hsrdiff'", "config item 'network_def'"]),
        (["--val_sampler", "dpm"], ["get_sampler: unknown sampler 'dpm'", "'ddim'", "config item 'validate#sampler'"]),
    ],
)
def test_wrong_values(run_bundle, runs: Path, args: list[str], needles: list[str]) -> None:
    res = run_bundle([*TRAIN, *args])
    _refused(res, *needles)
    assert _snapshot(runs) == {}


def test_no_prepared_data(run_bundle, bundle_env, tmp_path: Path, runs: Path) -> None:
    env = {**bundle_env, "HSRDIFF_DATA_ROOT": str(tmp_path / "empty")}
    res = run_bundle(TRAIN, env=env)
    d = tmp_path / "empty" / "demo_lidc"
    _refused(
        res,
        f"no prepared lidc data: {d / 'datalist.json'} does not exist",
        f"python -m preprocessing.lidc --dicom-root /path/to/LIDC-IDRI --out {d}",
        f"python -m preprocessing.demo --task lidc --out {d}",
    )
    assert not runs.exists() and not (tmp_path / "empty").exists()


def test_datalist_with_missing_item(run_bundle, data_copy: Path, runs: Path) -> None:
    doc = json.loads((data_copy / "datalist.json").read_text())
    gone = data_copy / doc["training"][3]["item"]
    gone.unlink()
    before = _snapshot(data_copy)
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    missing = doc["training"][3]["item"]
    _refused(res, str(data_copy / "datalist.json"), "item file(s) of split 'training' are missing", missing)
    assert _snapshot(data_copy) == before and not runs.exists()


def test_empty_split(run_bundle, data_copy: Path, runs: Path) -> None:
    doc = json.loads((data_copy / "datalist.json").read_text())
    doc["validation"] = []
    (data_copy / "datalist.json").write_text(json.dumps(doc))
    res = run_bundle([*TRAIN, "--dataset_dir", str(data_copy)])
    _refused(res, "split 'validation' is missing or empty")
    assert not runs.exists()


def test_channels_disagree_with_network(run_bundle, demo_data: Path, runs: Path) -> None:
    """LIDC data (1 channel) given to the MS-Lesion bundle (4 channels)."""
    res = run_bundle(
        ["run", "training", "--config_file", bundle_files("ms_lesion", "train", "demo"), *TINY,
         "--dataset_dir", str(demo_data / "demo_lidc")]
    )  # fmt: skip
    _refused(res, "image has 1 channel(s) but the network expects in_channels=4", "demo_lidc/items/")
    assert _snapshot(runs) == {}


def test_unwritable_run_folder(run_bundle, bundle_env, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = {**bundle_env, "HSRDIFF_RUN_ROOT": str(blocker / "runs")}
    res = run_bundle(TRAIN, env=env)
    _refused(res, f"cannot write the run_dir {blocker / 'runs' / 'lidc_demo'}", f"{blocker} is a file")
    assert blocker.read_text() == "not a folder"


def test_checkpoint_of_another_preset(run_bundle, runs: Path, tmp_path: Path) -> None:
    """Evaluating with weights of another width: refused before any sampling, naming the file."""
    other = get_preset(
        "hsrdiff_light", channels=[8, 16, 64], attention_levels=[False, False, True], norm_num_groups=8, num_res_blocks=1
    )
    ckpt = tmp_path / "other.pt"
    torch.save(other.state_dict(), ckpt)
    res = run_bundle(
        ["run", "evaluating", "--config_file", bundle_files("lidc", "train", "evaluate", "demo"), *TINY_NET,
         "--eval_checkpoint", str(ckpt)]
    )  # fmt: skip
    _refused(res, f"checkpoint {ckpt} does not match this bundle's network", "with other shapes", "another preset")
    assert not runs.exists()


def _tiny_net():
    return get_preset("hsrdiff_light", channels=[8, 16, 32], attention_levels=[False, False, True], norm_num_groups=8)


def test_checkpoint_missing_keys_and_damaged(tmp_path: Path, capsys) -> None:
    """The loader behind evaluation: missing keys, unreadable file, missing file each stop with the file named."""
    net = _tiny_net()
    state = net.state_dict()
    dropped = sorted(state)[0]
    del state[dropped]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(SystemExit):
        load_network_weights(tmp_path / "missing.pt", _tiny_net(), "lidc")
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'missing.pt'} does not match" in err and f"1 missing (e.g. {dropped})" in err

    torch.save(net.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit):
        load_network_weights(tmp_path / "cut.pt", _tiny_net(), "lidc")
    assert f"cannot read checkpoint {tmp_path / 'cut.pt'}" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        load_network_weights(tmp_path / "absent.pt", _tiny_net(), "lidc")
    err = capsys.readouterr().err
    assert f"checkpoint not found: {tmp_path / 'absent.pt'}" in err and "bundles/lidc/train.json" in err

    # the full one loads, and the weights are those saved
    target = _tiny_net()
    load_network_weights(tmp_path / "full.pt", target, "lidc")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), net.state_dict().values()))
