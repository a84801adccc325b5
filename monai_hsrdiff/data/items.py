"""The on-disk item format shared by every preprocessing path (LIDC, MS-Lesion, demo, pickle).

One item is one 2D slice with all of its annotations, stored as one ``.npz`` file:

=================  ======================  ===============================================
key                shape / dtype           meaning
=================  ======================  ===============================================
``image``          (C, H, W) float32       condition image (LIDC: HU windowed to [-1, 1];
                                           MS-Lesion: FLAIR, MPRAGE, PD, T2 z-scored)
``masks``          (A, H, W) uint8         all A annotations (binary {0, 1}, or class
                                           labels 0..M for multi-class); empty masks kept
``item_to_index``  (4, 4) float64          item pixel (row, col, 0, 1) -> continuous voxel
                                           index (i, j, k, 1) of the source volume, in
                                           SimpleITK order (i along columns, k = slice)
``item_to_physical`` (4, 4) float64        item pixel (row, col, 0, 1) -> physical point
                                           (x, y, z, 1) in mm, LPS (DICOM/ITK convention)
``meta``           0-d str (JSON)          patient, source (series UID or file), slice
                                           index, source size/origin/spacing/direction,
                                           reader ids, ``synthetic`` flag, task name
=================  ======================  ===============================================

The two affines are what lets inference write predictions back into the source scan's
space (Slicer export): ``item_to_physical = index_to_physical(source) @ item_to_index``.
Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from monai_hsrdiff.utils import atomic_path

__all__ = ["ITEM_KEYS", "ItemFormatError", "index_to_physical_matrix", "load_item", "save_item"]

ITEM_KEYS = ("image", "masks", "item_to_index", "item_to_physical", "meta")


class ItemFormatError(ValueError):
    """An item file is missing, truncated, or does not follow the item format."""


def index_to_physical_matrix(origin, spacing, direction) -> np.ndarray:
    """4×4 matrix mapping a voxel index (i, j, k, 1) to an LPS point, ITK convention.

    ``direction`` is the 9 row-major numbers SimpleITK's ``GetDirection()`` returns.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(np.asarray(spacing, dtype=np.float64))
    m[:3, 3] = np.asarray(origin, dtype=np.float64)
    return m


def save_item(
    path: str | os.PathLike,
    image: np.ndarray,
    masks: np.ndarray,
    item_to_index: np.ndarray,
    item_to_physical: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Validate and write one item atomically; return its path (``.npz`` is appended if missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    image = np.asarray(image, dtype=np.float32)
    masks = np.asarray(masks)
    if image.ndim != 3:
        raise ItemFormatError(f"{path}: image must be (C, H, W), got shape {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        raise ItemFormatError(f"{path}: masks must be (A, H, W) with H, W = {image.shape[1:]}, got {masks.shape}")
    if masks.shape[0] == 0:
        raise ItemFormatError(f"{path}: an item needs at least one annotation mask (got A=0)")
    if not np.isfinite(image).all():
        raise ItemFormatError(f"{path}: image contains NaN or inf values")
    for name, m in (("item_to_index", item_to_index), ("item_to_physical", item_to_physical)):
        if np.asarray(m).shape != (4, 4):
            raise ItemFormatError(f"{path}: {name} must be a 4x4 matrix, got shape {np.asarray(m).shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                image=image,
                masks=masks.astype(np.uint8),
                item_to_index=np.asarray(item_to_index, dtype=np.float64),
                item_to_physical=np.asarray(item_to_physical, dtype=np.float64),
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )
    return path


def load_item(path: str | os.PathLike) -> dict[str, Any]:
    """Read one item; ``meta`` comes back as a dict. Raises :class:`ItemFormatError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ItemFormatError(f"{path} is a folder, where an item file (.npz) is expected")
    if not path.is_file():
        raise ItemFormatError(f"item file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ITEM_KEYS if k not in z.files]
            if missing:
                raise ItemFormatError(f"{path}: not an HSRDiff item file, missing keys {missing}")
            out = {k: z[k] for k in ITEM_KEYS}
    except ItemFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ItemFormatError(f"{path}: cannot read item file (truncated or corrupt?): {e}") from e
    out["meta"] = json.loads(str(out["meta"]))
    return out
