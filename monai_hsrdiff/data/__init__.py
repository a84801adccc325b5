"""Items, datalists, datasets and transforms.

The item format (``items``) needs only NumPy, so it is imported at once; the datasets and
transforms import MONAI (seconds), so they load on first use: a preprocessing command that
refuses its input at once does not pay for MONAI.
"""

import importlib

from monai_hsrdiff.errors import DatalistError, ItemFormatError

from .items import ItemHeader, index_to_physical_matrix, load_item, read_item_header, save_item

_LAZY = {
    **dict.fromkeys(
        ("check_items", "eval_transforms", "get_dataset", "load_datalist", "read_datalist", "train_transforms"),
        "dataset",
    ),
    **dict.fromkeys(("LoadHSRDiffItemd", "RandAnnotationd", "ScaleLabeld", "joint_augmentations", "scale_label"), "transforms"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DatalistError",
    "ItemFormatError",
    "ItemHeader",
    "LoadHSRDiffItemd",
    "RandAnnotationd",
    "ScaleLabeld",
    "check_items",
    "eval_transforms",
    "get_dataset",
    "index_to_physical_matrix",
    "joint_augmentations",
    "load_datalist",
    "load_item",
    "read_datalist",
    "read_item_header",
    "save_item",
    "scale_label",
    "train_transforms",
]
