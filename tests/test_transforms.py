"""Transforms and datalist loading on real item files written with ``save_item``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset

from monai_hsrdiff.data import (
    DatalistError,
    LoadHSRDiffItemd,
    RandAnnotationd,
    ScaleLabeld,
    eval_transforms,
    get_dataset,
    joint_augmentations,
    load_datalist,
    save_item,
    train_transforms,
)
from monai.transforms import Compose
from preprocessing.common import write_datalist

H = W = 16


def _item(tmp: Path, name: str, patient: str, a: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, H, W)).astype(np.float32)
    masks = np.zeros((a, H, W), np.uint8)
    for i in range(a):  # annotation i marks a 1-pixel-wide row i: tells the annotations apart
        masks[i, i, :] = 1
    m = np.eye(4)
    m[:2, 3] = [10.0, 20.0]
    save_item(tmp / "items" / f"{name}.npz", image, masks, m, 2 * m, {"patient": patient, "readers": list(range(a))})
    return {"item": f"items/{name}.npz", "patient": patient}


@pytest.fixture()
def datalist(tmp_path: Path) -> Path:
    items = [_item(tmp_path, f"p{p}_s{s}", f"p{p}", seed=p * 10 + s) for p in range(3) for s in range(2)]
    splits = {"training": ["p0", "p1"], "validation": [], "test": ["p2"]}
    return write_datalist(tmp_path, items, splits, name="t", synthetic=True, description="SYNTHETIC test")


def test_load_item_keys_shapes(datalist: Path) -> None:
    entries = load_datalist(datalist, "training")
    assert len(entries) == 4 and all(Path(e["item"]).is_absolute() for e in entries)
    d = LoadHSRDiffItemd(keys="item")(entries[0])
    assert d["image"].shape == (1, H, W) and d["image"].dtype == torch.float32
    assert d["masks"].shape == (4, H, W) and d["masks"].dtype == torch.uint8
    assert d["item_to_index"][0, 3] == 10.0 and d["item_to_physical"][1, 3] == 40.0
    assert json.loads(d["meta"])["patient"] == entries[0]["patient"]
    assert LoadHSRDiffItemd(keys="item", decode_meta=True)(entries[0])["meta"]["readers"] == [0, 1, 2, 3]


def test_rand_annotation_uniform_and_reproducible() -> None:
    masks = torch.zeros(4, H, W, dtype=torch.uint8)
    for i in range(4):
        masks[i, i] = 1
    pick = RandAnnotationd(keys="masks").set_random_state(123)
    picks = []
    for _ in range(2000):
        d = pick({"masks": masks})
        idx = d["annotation_index"]
        assert d["label"].shape == (1, H, W)
        assert torch.equal(d["label"][0], masks[idx])  # the label IS annotation idx
        picks.append(idx)
    counts = np.bincount(picks, minlength=4)
    # uniform: each 500 ± 4 sigma (sigma = sqrt(2000 * 1/4 * 3/4) ~ 19.4)
    assert np.all(np.abs(counts - 500) < 78), counts
    again = RandAnnotationd(keys="masks").set_random_state(123)
    assert [again({"masks": masks})["annotation_index"] for _ in range(50)] == picks[:50]
    other = RandAnnotationd(keys="masks").set_random_state(124)
    assert [other({"masks": masks})["annotation_index"] for _ in range(50)] != picks[:50]


def test_scale_label_binary_multiclass_and_errors() -> None:
    out = ScaleLabeld(keys="label")({"label": torch.tensor([[[0, 1], [1, 0]]], dtype=torch.uint8)})["label"]
    assert out.dtype == torch.float32 and out.tolist() == [[[-1.0, 1.0], [1.0, -1.0]]]
    lab = torch.tensor([[[0, 2], [1, 0]]])
    oh = ScaleLabeld(keys="label", num_classes=3)({"label": lab})["label"]
    assert oh.shape == (3, 2, 2)
    assert oh[:, 0, 1].tolist() == [-1.0, -1.0, 1.0] and oh[:, 1, 0].tolist() == [-1.0, 1.0, -1.0]
    stack = ScaleLabeld(keys="masks", num_classes=3)({"masks": torch.stack([lab[0], lab[0]])})["masks"]
    assert stack.shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"'label' values must be in \{0, \.\.\., 1\}.*\[-1"):
        ScaleLabeld(keys="label")({"label": torch.tensor([[[-1.0, 1.0]]])})  # already scaled
    with pytest.raises(ValueError, match="got \\[0, 1, 2\\]"):
        ScaleLabeld(keys="label")({"label": lab})
    with pytest.raises(ValueError, match="non-integer"):
        ScaleLabeld(keys="label")({"label": torch.tensor([[[0.5]]])})
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ScaleLabeld(keys="label", num_classes=1)


@pytest.mark.parametrize("which", ["flip0", "flip1", "rot"])
def test_joint_augmentation_moves_image_and_masks_together(which: str) -> None:
    image = torch.zeros(2, H, W)
    image[:, 2, 5] = 1.0  # marker pixel, off every symmetry axis
    masks = torch.zeros(4, H, W, dtype=torch.uint8)
    masks[:, 2, 5] = 1
    label = masks[:1].float()
    flip, rot = (1.0, 0.0) if which.startswith("flip") else (0.0, 1.0)
    xs = joint_augmentations(flip_prob=flip, rot90_prob=rot)
    if which == "flip0":
        xs = xs[:1]
    elif which == "flip1":
        xs = xs[1:2]
    seen = set()
    for seed in range(6):
        d = Compose(xs).set_random_state(seed)({"image": image, "masks": masks, "label": label})
        pos = tuple(torch.nonzero(d["image"][0]).tolist()[0])
        seen.add(pos)
        for arr in (d["image"][1], d["masks"][0], d["masks"][3], d["label"][0]):
            assert tuple(torch.nonzero(arr).tolist()[0]) == pos
    expected = {"flip0": {(13, 5)}, "flip1": {(2, 10)}, "rot": {(10, 2), (13, 10), (5, 13)}}[which]
    assert seen <= expected and len(seen) >= 1
    if which == "rot":
        assert len(seen) >= 2  # k varies with the seed


def test_train_and_eval_pipelines(datalist: Path) -> None:
    train = get_dataset(datalist, "training", train_transforms(flip_prob=0.0, rot90_prob=0.0))
    assert isinstance(train, Dataset) and len(train) == 4
    train.transform.set_random_state(0)
    d = train[0]
    assert d["label"].shape == (1, H, W) and set(d["label"].unique().tolist()) == {-1.0, 1.0}
    assert "masks" not in d
    # the label row tells which annotation was picked
    assert int(torch.nonzero(d["label"][0] > 0)[0, 0]) == d["annotation_index"]

    ev = get_dataset(datalist, "test", cache=True)
    assert isinstance(ev, CacheDataset) and len(ev) == 2
    e = ev[0]
    assert e["masks"].shape == (4, H, W)  # ALL annotations kept
    assert set(e["masks"].unique().tolist()) == {-1.0, 1.0}
    batch = next(iter(DataLoader(ev, batch_size=2)))
    assert batch["image"].shape == (2, 1, H, W) and batch["masks"].shape == (2, 4, H, W)
    assert len(batch["meta"]) == 2 and json.loads(batch["meta"][0])["patient"] == "p2"
    raw = get_dataset(datalist, "test", eval_transforms(scale_masks=False))[0]
    assert raw["masks"].dtype == torch.uint8 and raw["masks"].sum() == 4 * W


def test_load_datalist_errors(datalist: Path, tmp_path: Path) -> None:
    with pytest.raises(DatalistError, match="datalist not found: .*nope.json.*preprocessing.demo"):
        load_datalist(tmp_path / "nope.json", "training")
    with pytest.raises(DatalistError, match="no split 'train'.*'test', 'training', 'validation'"):
        load_datalist(datalist, "train")
    with pytest.raises(DatalistError, match="split 'validation' .* is empty"):
        load_datalist(datalist, "validation")
    (tmp_path / "items" / "p2_s1.npz").unlink()
    with pytest.raises(DatalistError, match="item file .*p2_s1.npz is missing"):
        load_datalist(tmp_path, "test")  # the folder works too
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatalistError, match="cannot read datalist .*bad.json"):
        load_datalist(bad, "training")
