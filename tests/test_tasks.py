"""monai_hsrdiff.tasks: the registry, one copy of each task's constants, and a third task as one small class."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_hsrdiff.errors import HSRDiffInputError, InferenceInputError
from monai_hsrdiff.inference import Region, SlicePreprocessing, predict_volume
from monai_hsrdiff.tasks import Task, UnknownTaskError, get_task, register_task, task_names
from monai_hsrdiff.tasks import base as tasks_base

REPO = Path(__file__).resolve().parents[1]


def test_registry_names_and_unknown_name():
    assert {"lidc", "ms_lesion"} <= set(task_names())
    assert task_names() == tuple(sorted(task_names()))
    assert get_task("lidc").name == "lidc" and get_task("ms_lesion").name == "ms_lesion"
    with pytest.raises(UnknownTaskError, match=r"unknown task 'brats'; expected 'lidc' or 'ms_lesion'") as e:
        get_task("brats")
    assert isinstance(e.value, HSRDiffInputError) and isinstance(e.value, InferenceInputError)
    with pytest.raises(ValueError, match="needs a name"):
        register_task(Task())


def test_lidc_window_and_spacing_have_one_source():
    from preprocessing import demo, lidc

    task = get_task("lidc")
    assert task.hu_window == (-1000.0, 400.0) and task.item_spacing == 0.5
    # the same objects, not equal copies: preprocessing.lidc, the demo and inference read one definition
    assert lidc.LidcOptions().hu_window is demo.LIDC_HU_WINDOW is task.hu_window
    assert lidc.LidcOptions().spacing == task.item_spacing
    assert demo.hu_to_unit is lidc.hu_to_unit
    assert lidc.AIR_HU == -1000.0
    np.testing.assert_array_equal(demo.hu_to_unit(np.array([-1500.0, -300.0, 400.0])), [-1.0, 0.0, 1.0])


def test_ms_constants_have_one_source():
    from preprocessing import ms_lesion

    from monai_hsrdiff.io import geometry
    from monai_hsrdiff.tasks import ms_lesion as ms_task

    assert get_task("ms_lesion").channels == ms_lesion.MODALITIES == ("flair", "mprage", "pd", "t2")
    assert ms_lesion.zscore_brain is ms_task.zscore_brain
    assert ms_lesion.MSLesionInputError is ms_task.MSLesionInputError and issubclass(ms_task.MSLesionInputError, HSRDiffInputError)
    assert ms_lesion.slice_axes is geometry.slice_axes and ms_lesion.LPS_FROM_RAS is geometry.LPS_FROM_RAS


@pytest.mark.parametrize("name", ["lidc", "ms_lesion"])
def test_task_matches_bundle_metadata(name):
    """The task's modality and channels are the ones metadata.json promises the bundle's users."""
    image = json.loads((REPO / "bundles" / name / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    task = get_task(name)
    assert task.modality == image["modality"]
    assert [c.upper() for c in task.channels] == [image["channel_def"][str(i)].split(" ")[0].upper() for i in range(image["num_channels"])]
    assert "{out}" in task.prepare_command and task.prepare_command.startswith(f"python -m preprocessing.{name} ")


def test_slice_preprocessing_summary_fields_unchanged():
    """summary.json's "preprocessing" is a contract: the same dicts as before the tasks package."""
    lidc = get_task("lidc")
    assert lidc.slice_preprocessing(64).as_json() == {
        "task": "lidc", "image_size": 64, "background": -1.0, "item_spacing_mm": 0.5, "hu_window": [-1000.0, 400.0],
    }  # fmt: skip
    assert lidc.slice_preprocessing(64, None).as_json()["item_spacing_mm"] is None  # the demo: native spacing
    assert lidc.slice_preprocessing(64, 0.7).as_json()["item_spacing_mm"] == 0.7
    ms = get_task("ms_lesion")
    expected_ms = {"task": "ms_lesion", "image_size": 32, "background": 0.0, "item_spacing_mm": None, "hu_window": None}
    assert ms.slice_preprocessing(32).as_json() == expected_ms
    assert ms.slice_preprocessing(32, 0.7).as_json() == expected_ms  # whole slices are resized: no spacing


def test_lidc_plane_is_windowed_hu_with_air_outside():
    pp = get_task("lidc").slice_preprocessing(5, None)
    plane = np.full((1, 3, 3), 400.0, dtype=np.float32)
    plane[0, 1, 1] = -300.0
    img, scale, offset = pp.plane_to_input(plane, (0.8, 0.8), (0, 2, 0, 2))
    assert img.shape == (1, 5, 5) and img.dtype == np.float32
    np.testing.assert_array_equal(scale, [1.0, 1.0])
    np.testing.assert_array_equal(offset, [-1.0, -1.0])
    assert img[0, 2, 2] == 0.0 and img[0, 1, 1] == 1.0  # -300 HU -> 0; 400 HU -> 1
    assert img[0, 0, 0] == -1.0  # outside the scan: air, -1000 HU -> -1


def test_read_source_refuses_with_the_old_messages(tmp_path):
    lidc, ms = get_task("lidc"), get_task("ms_lesion")
    with pytest.raises(InferenceInputError, match=r"^--input is empty; pass a DICOM series folder or NIfTI file\(s\)$"):
        lidc.read_source([])
    with pytest.raises(InferenceInputError, match=r"LIDC takes one DICOM series folder \(or one NIfTI CT volume\), got 2 paths"):
        lidc.read_source([str(tmp_path), str(tmp_path)])
    with pytest.raises(InferenceInputError, match=r"is not a folder; for a CT pass the folder holding the DICOM series"):
        lidc.read_source(str(tmp_path / "missing"))
    with pytest.raises(InferenceInputError, match=r"no DICOM file found in this folder or below"):
        lidc.read_source(tmp_path)
    scan = tmp_path / "scan.mha"
    scan.write_bytes(b"x")
    with pytest.raises(InferenceInputError, match=r"MS-Lesion needs the 4 NIfTI volumes FLAIR, MPRAGE, PD, T2 \(4 files in that order"):
        ms.read_source([str(scan)])
    with pytest.raises(InferenceInputError, match=r"missing FLAIR: no file named like \*_flair\*"):
        ms.read_source(tmp_path)


class ToyTask(Task):
    """A third data set: a 1-channel NIfTI scan, native pixels, background 0 — no code beyond the attributes."""

    name = "toy"
    modality = "OT"
    channels = ("toy",)
    prepare_command = "python -m preprocessing.toy --out {out}"


@pytest.fixture()
def toy():
    task = register_task(ToyTask())
    yield task
    tasks_base._TASKS.pop("toy")


def test_a_third_task_is_one_class(toy, tmp_path):
    assert "toy" in task_names() and get_task("toy") is toy
    rng = np.random.default_rng(0)
    vol = rng.random((5, 5, 3)).astype(np.float32)  # (I, J, K): rows and columns odd, so the item grid is the pixel grid
    path = tmp_path / "toy.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.0, 1.0])), path)
    source = toy.read_source([str(path)])
    assert source.channel_names == ("toy",) and source.shape == (5, 5, 3)
    pp = toy.slice_preprocessing(7)
    assert type(pp) is SlicePreprocessing
    assert pp.as_json() == {"task": "toy", "image_size": 7, "background": 0.0, "item_spacing_mm": None, "hu_window": None}

    def predictor(x: torch.Tensor) -> torch.Tensor:  # sample 0 marks > 0.5, sample 1 marks < 0.5
        return torch.cat([x - 0.5, 0.5 - x], dim=1)

    pred = predict_volume(source, predictor, pp, Region.whole(source.shape), num_samples=2)
    assert pred.samples.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(pred.samples[0], vol > 0.5)
    np.testing.assert_array_equal(pred.samples[1], vol < 0.5)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


@pytest.mark.parametrize("package", ["inference", "io", "tasks"])
def test_layers_below_preprocessing(package):
    """inference and io know no task, and nothing here reads the preprocessing scripts (deferred imports too)."""
    for path in sorted((REPO / "monai_hsrdiff" / package).glob("*.py")):
        mods = _imports(path)
        assert not [m for m in mods if m.split(".")[0] == "preprocessing"], path
        if package != "tasks":
            assert not [m for m in mods if m.startswith("monai_hsrdiff.tasks")], path


def test_ms_folder_input_uses_the_task_file_tokens(tmp_path):
    """A folder is searched with the task's tokens: *_T1w.nii.gz is the MPRAGE; plain names are exact."""
    from monai_hsrdiff.inference import find_modalities

    vol = np.random.default_rng(1).random((4, 4, 3)).astype(np.float32) + 1.0
    for token in ("FLAIR", "T1w", "pd", "t2"):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"case_{token}.nii.gz")
    source = get_task("ms_lesion").read_source(tmp_path)
    assert source.channel_names == ("flair", "mprage", "pd", "t2")
    assert Path(source.info["files"]["mprage"]).name == "case_T1w.nii.gz"
    with pytest.raises(InferenceInputError, match=r"missing MPRAGE: no file named like \*_mprage\*"):
        find_modalities(tmp_path, ("flair", "mprage"))  # no task tokens: the channel's own name


def test_source_from_item_inverts_the_item_intensities() -> None:
    """The demo's synthetic scan: LIDC HU back through the window (closed form), MS shifted > 0 in the brain."""
    import numpy as np

    from monai_hsrdiff.tasks import get_task
    from monai_hsrdiff.tasks.lidc import hu_to_unit

    hu = np.array([[-1000.0, -500.0, 0.0, 400.0]], dtype=np.float32)
    back = get_task("lidc").source_from_item(hu_to_unit(hu), {})
    np.testing.assert_allclose(back, hu, atol=1e-3)
    # an item made with another window is mapped back with that window: 0 -> the window's centre
    assert float(get_task("lidc").source_from_item(np.zeros((1, 1)), {"hu_window": [-100.0, 100.0]})[0, 0]) == 0.0
    z = np.array([[[0.0, -1.5, 2.0]], [[0.0, 0.5, -0.5]]])  # (C=2, 1, 3): first voxel outside the brain
    ms = get_task("ms_lesion").source_from_item(z, {})
    assert (ms[:, 0, 0] == 0).all() and ms[:, 0, 1:].min() == 1.0
    np.testing.assert_allclose(ms[:, 0, 2] - ms[:, 0, 1], z[:, 0, 2] - z[:, 0, 1])  # a shift: z-scoring removes it
