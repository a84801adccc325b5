"""The start-up checks in-process (fast): the command's config rebuilt by fire, its keys and
values checked, the error hook's config item found from MONAI's own exception text, the one
datalist checker, the one device check and the paths module. The same checks through the real
``python -m monai.bundle`` command line are in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from monai_hsrdiff import paths
from monai_hsrdiff.config_check import bundle_command, check_command, flatten
from monai_hsrdiff.error_hook import _failing_items
from monai_hsrdiff.errors import BundleError, DatalistError

REPO = Path(__file__).resolve().parents[1]
FILES = repr([str(REPO / "bundles" / "lidc" / n) for n in ("train.json", "demo.json")])
RUN = ["run", "training", "--config_file", FILES]


def _refusal(argv: list[str], capsys) -> str:
    with pytest.raises(BundleError) as err:
        check_command("lidc", argv)
    assert "ERROR: " in capsys.readouterr().err
    return str(err.value)


def test_command_config_is_monai_merge() -> None:
    """fire's parse, merged as ConfigWorkflow merges: the command line beats demo.json beats train.json."""
    command = bundle_command([*RUN, "--num_epochs", "3", "--network_def#channels", "[8,16,32]", "--amp"])
    assert command is not None
    cfg = command.parser
    assert cfg["num_epochs"] == 3 and cfg["network_def"]["channels"] == [8, 16, 32] and cfg["amp"] is True
    assert cfg["image_size"] == json.loads((REPO / "bundles/lidc/demo.json").read_text())["image_size"]
    assert cfg["_meta_"]["version"]  # metadata.json read as ConfigWorkflow reads it
    assert list(command.sources) == ["the command line", str(REPO / "bundles/lidc/demo.json"), str(REPO / "bundles/lidc/train.json")]
    assert bundle_command(["verify_metadata", "--meta_file", "x.json"]) is None
    assert check_command("lidc", [*RUN, "--num_epochs", "3"]) is not None


def test_values_checked_from_the_merged_config(capsys) -> None:
    msg = _refusal([*RUN, "--resume", "false"], capsys)
    assert "--resume false: 'resume' is a boolean; write True or False (capitalised)" in msg
    msg = _refusal([*RUN, "--num_epochs", "x"], capsys)
    assert "--num_epochs x: 'num_epochs' is a number (default 500); 'x' is not a number." in msg
    msg = _refusal([*RUN, "--val_precision", "bf16"], capsys)
    assert "--val_precision bf16: 'val_precision' must be one of" in msg and "'bfloat16'" in msg
    for fine in (["--resume", "True"], ["--resume"], ["--num_epochs", "2.0"], ["--val_max_items", "None"], ["--num_epochs", "$2"]):
        check_command("lidc", [*RUN, *fine])


def test_keys_and_values_of_files_and_args_file(tmp_path: Path, capsys) -> None:
    """Override files and args_file are checked too (the hand-written argv parser missed their values)."""
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"amp": "false", "val_interval": 2}))
    msg = _refusal(["run", "training", "--config_file", FILES[:-1] + f", '{mine}']"], capsys)
    assert f'amp = "false" (from {mine})' in msg and "'amp' is a boolean" in msg
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": json.loads(FILES.replace("'", '"')), "learning_rat": 0.1}))
    msg = _refusal(["run", "training", "--args_file", str(args)], capsys)
    assert f"'learning_rat' is not a key of this bundle; did you mean 'learning_rate'? (from {args})" in msg
    # an id inside a refused one is not listed again; an element of a list value is fine
    msg = _refusal([*RUN, "--trian", "{'a': 1}", "--network_def#channels", "[8,16,32,64]"], capsys)
    assert "'trian' is not a key" in msg and "trian#a" not in msg and "channels" not in msg


def test_error_hook_finds_the_item_from_monai_text() -> None:
    """MONAI's wrapper text (component target + keywords, or the expression) names the config item."""
    config = ConfigParser(
        {
            "net": {"_target_": "torch.nn.Linear", "in_features": "two", "out_features": "@image_size"},
            "other": {"_target_": "torch.nn.Linear", "in_features": 2},
            "k": "$int(@image_size) // 0",
            "image_size": 4,
        }
    )
    for item, wrapper in (("net", "Failed to instantiate component 'torch.nn.Linear' with keywords: in_features,out_features"),
                          ("k", "Failed to evaluate ConfigExpression: \n\"$int(__local_refs['image_size']) // 0\"")):  # fmt: skip
        with pytest.raises(RuntimeError) as err:
            config.get_parsed_content(item)
        chain_text = [str(e) for e in (err.value, err.value.__cause__) if e is not None]
        assert any(t.startswith(wrapper.split("\n")[0]) for t in chain_text), chain_text
        assert _failing_items(err.value, flatten(config.get())) == [item]


def test_datalist_checked_in_one_place(tmp_path: Path, capsys) -> None:
    """require_datalist is data.load_datalist's check with the prepare commands around it."""
    from monai_hsrdiff.bundle import require_datalist
    from monai_hsrdiff.data import load_datalist

    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "a.npz").write_bytes(b"")
    doc = {"training": [{"item": "items/a.npz"}, {"item": "items/b.npz"}, {"item": "items/c.npz"}], "validation": []}
    (tmp_path / "datalist.json").write_text(json.dumps(doc))
    with pytest.raises(DatalistError) as lib:
        load_datalist(tmp_path, "training")
    with pytest.raises(BundleError) as bundle:
        require_datalist(str(tmp_path), "lidc", ["training"])
    assert str(bundle.value) == str(lib.value)
    assert "2 item file(s) of split 'training' are missing" in str(lib.value) and "items/b.npz is missing, and 1 more" in str(lib.value)
    with pytest.raises(BundleError, match="split 'validation' is missing or empty"):
        require_datalist(str(tmp_path), "lidc", ["validation"])
    with pytest.raises(BundleError, match="python -m preprocessing.ms_lesion --root /path/to/ISBI2015 --out"):
        require_datalist(str(tmp_path / "none"), "ms_lesion")
    capsys.readouterr()


def test_paths_and_device(monkeypatch, tmp_path: Path, capsys) -> None:
    import monai_hsrdiff.bundle as bundle
    from monai_hsrdiff.utils import device_problem, repo_root, resolve_device
    from monai_hsrdiff.errors import InferenceInputError

    assert bundle.bundle_root is paths.bundle_root and repo_root is paths.repo_root
    monkeypatch.setenv("HSRDIFF_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("HSRDIFF_DATA_ROOT", str(tmp_path / "data"))
    assert paths.default_run_dir("lidc", "demo") == str(tmp_path / "runs" / "lidc_demo")
    assert paths.default_dataset_dir("ms_lesion", demo=True) == str(tmp_path / "data" / "demo_ms_lesion")
    assert paths.bundle_root("lidc") == str(REPO / "bundles" / "lidc")
    with pytest.raises(BundleError, match=r"unknown task 'brain'; expected one of \['lidc', 'ms_lesion'\]"):
        paths.default_run_dir("brain")
    capsys.readouterr()
    assert device_problem("cpu") is None and str(resolve_device(" cpu ")) == "cpu" and resolve_device("") is None
    with pytest.raises(InferenceInputError, match="--device 'banana': that is not a device"):
        resolve_device("banana")


def test_error_hook_names_the_component_of_a_reserved_entry() -> None:
    from monai_hsrdiff.error_hook import _describe

    assert _describe("network_def#_requires_") == "'network_def', its '_requires_'"
    assert _describe("train#dataloader") == "'train#dataloader'"


def test_paths_tasks_are_the_registered_tasks() -> None:
    """paths.TASKS (paths sits below tasks, so it cannot ask the registry) names the tasks/ modules and the bundles."""
    from monai_hsrdiff.tasks import task_names

    assert tuple(sorted(paths.TASKS)) == tuple(sorted(task_names()))
    assert all((REPO / "bundles" / t / "train.json").is_file() for t in paths.TASKS)
