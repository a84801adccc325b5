"""MONAI dictionary transforms for HSRDiff items: load, pick one annotation, scale, augment.

Training follows the paper's Algorithm 1: every time an item is drawn, ONE of its A
annotations is picked uniformly at random as the label ``x0`` (:class:`RandAnnotationd`).
Evaluation keeps all A annotations (``masks``) for GED / HM-IoU / MDM.

Keys produced by :class:`LoadHSRDiffItemd` (see :mod:`monai_hsrdiff.data.items`):

==================== ============================== =====================================
key                  shape / dtype                  value
==================== ============================== =====================================
``image``            (C, H, W) float32 tensor       LIDC: [-1, 1]; MS-Lesion: z-scores
``masks``            (A, H, W) uint8 tensor         {0, 1} (or class labels 0..M-1)
``item_to_index``    (4, 4) float64 tensor          item pixel -> source voxel index
``item_to_physical`` (4, 4) float64 tensor          item pixel -> LPS point (mm)
``meta``             str (JSON) or dict             patient, source, slice, synthetic flag
==================== ============================== =====================================
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, RandFlipd, RandRotate90d, Transform

from .items import load_item

__all__ = ["LoadHSRDiffItemd", "RandAnnotationd", "ScaleLabeld", "joint_augmentations", "scale_label"]


class LoadHSRDiffItemd(MapTransform):
    """Read an item ``.npz`` (path under ``keys``) into image, masks, geometry and meta.

    Args:
        keys: key(s) holding the item file path (one key; the datalist uses ``"item"``).
        image_key: output key of the (C, H, W) float32 image.
        masks_key: output key of the (A, H, W) uint8 masks (ALL annotations, empty ones kept).
        decode_meta: if False (default) ``meta`` stays a JSON string, which a DataLoader can
            batch (a list of strings); if True it becomes a dict (fine for batch size 1 or
            ``list_data_collate``-free use). ``json.loads`` turns the string into the dict.
        allow_missing_keys: don't raise if a key is missing.

    Example::

        load = LoadHSRDiffItemd(keys="item")
        d = load({"item": "demo/items/LIDC-IDRI-0001_n0_k87.npz"})
        d["image"].shape, d["masks"].shape  # (1, 128, 128), (4, 128, 128)
    """

    def __init__(
        self,
        keys: KeysCollection = "item",
        image_key: str = "image",
        masks_key: str = "masks",
        decode_meta: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LoadHSRDiffItemd: keys must name ONE key holding the item path, got {self.keys}")
        self.image_key = image_key
        self.masks_key = masks_key
        self.decode_meta = decode_meta

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            item = load_item(d[key])
            d[self.image_key] = torch.as_tensor(item["image"], dtype=torch.float32)
            d[self.masks_key] = torch.as_tensor(item["masks"], dtype=torch.uint8)
            d["item_to_index"] = torch.as_tensor(item["item_to_index"], dtype=torch.float64)
            d["item_to_physical"] = torch.as_tensor(item["item_to_physical"], dtype=torch.float64)
            d["meta"] = item["meta"] if self.decode_meta else json.dumps(item["meta"], sort_keys=True)
        return d


class RandAnnotationd(Randomizable, MapTransform):
    """Pick ONE annotation per item per call, uniformly over the A masks (Algorithm 1, step 1).

    Empty masks (a reader who did not mark the nodule) are picked like any other: that is
    the ambiguity the model has to learn (the paper: "up to three masks per image can be
    empty"). Seed with ``set_random_state(seed)`` (or MONAI's ``set_determinism`` /
    ``Compose.set_random_state``) to reproduce the picks.

    Args:
        keys: key of the (A, H, W) masks.
        label_key: output key of the picked (1, H, W) annotation, same dtype as the masks.
        index_key: output key of the picked annotation's index (int), or None for none.
        allow_missing_keys: don't raise if a key is missing.

    Example::

        pick = RandAnnotationd(keys="masks").set_random_state(0)
        pick({"masks": torch.zeros(4, 8, 8)})["label"].shape  # (1, 8, 8)
    """

    def __init__(
        self,
        keys: KeysCollection = "masks",
        label_key: str = "label",
        index_key: str | None = "annotation_index",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"RandAnnotationd: keys must name ONE masks key, got {self.keys}")
        self.label_key = label_key
        self.index_key = index_key
        self._index = 0

    def randomize(self, num_annotations: int) -> None:
        self._index = int(self.R.randint(num_annotations))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = d[key]
            if masks.ndim != 3 or masks.shape[0] < 1:
                raise ValueError(f"RandAnnotationd: {key!r} must be (A, H, W) with A >= 1, got shape {tuple(masks.shape)}")
            self.randomize(int(masks.shape[0]))
            d[self.label_key] = masks[self._index : self._index + 1]
            if self.index_key is not None:
                d[self.index_key] = self._index
        return d


def scale_label(label: torch.Tensor | np.ndarray, num_classes: int = 2, name: str = "label") -> torch.Tensor:
    """Map a label to the diffusion model's {-1, +1} space (DESIGN §1).

    Binary (``num_classes == 2``): values {0, 1} -> {-1, +1}, shape kept, so (1, H, W)
    gives M=1 channel. Multi-class (``num_classes > 2``): a label map with values
    0..num_classes-1 of shape (1, H, W) becomes one-hot (M, H, W), M = num_classes, in
    {-1, +1}; an (A, H, W) stack of maps becomes (A, M, H, W). Read back by thresholding
    at 0 (M=1) or argmax over M.

    Raises:
        ValueError: ``num_classes < 2`` or values outside {0, ..., num_classes-1}.
    """
    if num_classes < 2:
        raise ValueError(f"scale_label: num_classes must be >= 2 (2 = binary), got {num_classes}")
    t = torch.as_tensor(label)
    if t.is_floating_point():
        bad = t != torch.round(t)
        if bool(bad.any()):
            raise ValueError(
                f"scale_label: {name!r} must hold integer class labels 0..{num_classes - 1}, "
                f"got non-integer values such as {t[bad][:5].tolist()}"
            )
    values = torch.unique(t)
    if bool((values < 0).any()) or bool((values > num_classes - 1).any()):
        raise ValueError(
            f"scale_label: {name!r} values must be in {{0, ..., {num_classes - 1}}} (num_classes={num_classes}), "
            f"got {values.tolist()[:10]}; was it already scaled to {{-1, +1}}, or is num_classes wrong?"
        )
    if num_classes == 2:
        return t.to(torch.float32) * 2.0 - 1.0
    onehot = torch.nn.functional.one_hot(t.long(), num_classes).to(torch.float32)  # (..., H, W, M)
    onehot = torch.movedim(onehot, -1, -3)  # (..., M, H, W)
    if t.ndim == 3 and t.shape[0] == 1:
        onehot = onehot[0]  # (1, H, W) label map -> (M, H, W)
    return onehot * 2.0 - 1.0


class ScaleLabeld(MapTransform):
    """Dictionary wrapper of :func:`scale_label`: {0, 1} -> {-1, +1}, or one-hot for M > 2.

    Args:
        keys: keys to scale (``"label"`` for training, ``"masks"`` for evaluation).
        num_classes: 2 for binary tasks (M=1 channel), >2 for one-hot multi-class.
        allow_missing_keys: don't raise if a key is missing.

    Example::

        ScaleLabeld(keys="label")({"label": torch.tensor([[[0, 1]]])})["label"]  # [[[-1., 1.]]]
    """

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_classes < 2:
            raise ValueError(f"ScaleLabeld: num_classes must be >= 2 (2 = binary), got {num_classes}")
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = scale_label(d[key], self.num_classes, name=str(key))
        return d


def joint_augmentations(
    keys: Sequence[str] = ("image", "label", "masks"),
    flip_prob: float = 0.5,
    rot90_prob: float = 0.5,
) -> list[Transform]:
    """Flips along each in-plane axis and 90° rotations, applied to all ``keys`` together.

    Each MONAI transform draws once per call and applies the same flip/rotation to every
    key, so image, label and masks stay aligned. Missing keys are allowed (a training
    pipeline may drop ``masks``). These do NOT update ``item_to_index`` /
    ``item_to_physical``: use them for training only, never where predictions are
    written back into the source geometry.

    Args:
        keys: keys with (C, H, W) / (A, H, W) arrays to transform jointly.
        flip_prob: probability of flipping along rows, and (independently) along columns.
        rot90_prob: probability of a rotation by k·90°, k uniform in {1, 2, 3}.

    Returns:
        list of MONAI transforms (possibly empty when both probabilities are 0).
    """
    for name, p in (("flip_prob", flip_prob), ("rot90_prob", rot90_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"joint_augmentations: {name} must be in [0, 1], got {p}")
    keys = list(keys)
    out: list[Transform] = []
    if flip_prob > 0:
        out.append(RandFlipd(keys, prob=flip_prob, spatial_axis=0, allow_missing_keys=True))
        out.append(RandFlipd(keys, prob=flip_prob, spatial_axis=1, allow_missing_keys=True))
    if rot90_prob > 0:
        out.append(RandRotate90d(keys, prob=rot90_prob, max_k=3, spatial_axes=(0, 1), allow_missing_keys=True))
    return out
