from .dataset import DatalistError, check_items, eval_transforms, get_dataset, load_datalist, read_datalist, train_transforms
from .items import ItemFormatError, ItemHeader, index_to_physical_matrix, load_item, read_item_header, save_item
from .transforms import LoadHSRDiffItemd, RandAnnotationd, ScaleLabeld, joint_augmentations, scale_label

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
