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

import functools
import io
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from monai_hsrdiff.errors import ItemFormatError
from monai_hsrdiff.utils import atomic_path

__all__ = ["ITEM_KEYS", "ItemFormatError", "ItemHeader", "index_to_physical_matrix", "load_item", "read_item_header", "save_item"]

ITEM_KEYS = ("image", "masks", "item_to_index", "item_to_physical", "meta")


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


def _item_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or :class:`ItemFormatError` when it is a folder or absent."""
    path = Path(path)
    if path.is_dir():
        raise ItemFormatError(f"{path} is a folder, where an item file (.npz) is expected")
    if not path.is_file():
        raise ItemFormatError(f"item file not found: {path}")
    return path


def load_item(path: str | os.PathLike) -> dict[str, Any]:
    """Read one item; ``meta`` comes back as a dict. Raises :class:`ItemFormatError` naming the file."""
    path = _item_file(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ITEM_KEYS if k not in z.files]
            if missing:
                raise ItemFormatError(f"{path}: not an HSRDiff item file, missing keys {missing}")
            out = {k: z[k] for k in ITEM_KEYS}
    except ItemFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # zlib: a damaged deflate stream
        raise ItemFormatError(f"{path}: cannot read item file (truncated or corrupt?): {e}") from e
    out["meta"] = json.loads(str(out["meta"]))
    return out


class ItemHeader(NamedTuple):
    """Shapes and dtypes of an item's arrays, read without their pixels (:func:`read_item_header`)."""

    image_shape: tuple[int, ...]
    image_dtype: np.dtype
    masks_shape: tuple[int, ...]
    masks_dtype: np.dtype


@functools.lru_cache(maxsize=256)
def _parse_npy_header(raw: bytes) -> tuple[tuple[int, ...], np.dtype]:
    # NumPy's own parser (a literal_eval, the slowest step); the items of one data set share
    # a handful of distinct headers, so each is parsed once
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def _member_header(z: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    # the .npy header is the member's first bytes (magic, length, dict): only they are decompressed
    with z.open(f"{key}.npy") as f:
        start = f.read(8)
        if len(start) < 8 or start[:6] != b"\x93NUMPY":
            raise ValueError(f"{key}.npy is not a .npy array")
        size = 2 if start[6] == 1 else 4
        length = f.read(size)
        raw = start + length + f.read(int.from_bytes(length, "little"))
    return _parse_npy_header(raw)


def read_item_header(path: str | os.PathLike) -> ItemHeader:
    """Check an item file's structure and return its arrays' shapes and dtypes, cheaply.

    Reads the zip directory and the ``.npy`` headers of ``image`` and ``masks`` only (about
    0.1 ms per item), so every item of a data set can be checked before a run starts.
    Truncation is caught (the zip directory sits at the end of the file); a damaged byte
    inside the pixel data is only found when :func:`load_item` reads it.

    Raises:
        ItemFormatError: naming the file, when it is missing, not a readable ``.npz``, lacks
            an item key, or its image/masks do not have the item format's shapes and dtypes.

    Example::

        read_item_header("data/demo_lidc/items/LIDC-IDRI-0001/n0_k87.npz").image_shape  # (1, 128, 128)
    """
    path = _item_file(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [k for k in ITEM_KEYS if f"{k}.npy" not in names]
            if missing:
                raise ItemFormatError(f"{path}: not an HSRDiff item file, missing keys {missing}")
            image_shape, image_dtype = _member_header(z, "image")
            masks_shape, masks_dtype = _member_header(z, "masks")
    except ItemFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ItemFormatError(f"{path}: cannot read item file (truncated or corrupt?): {e}") from e
    if len(image_shape) != 3 or image_dtype != np.float32:
        raise ItemFormatError(f"{path}: image must be (C, H, W) float32, got shape {image_shape} {image_dtype}")
    if len(masks_shape) != 3 or masks_shape[1:] != image_shape[1:] or masks_shape[0] < 1 or masks_dtype != np.uint8:
        raise ItemFormatError(
            f"{path}: masks must be (A>=1, H, W) uint8 with H, W = {image_shape[1:]}, got shape {masks_shape} {masks_dtype}"
        )
    return ItemHeader(image_shape, image_dtype, masks_shape, masks_dtype)
