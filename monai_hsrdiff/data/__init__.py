from .dataset import DatalistError, eval_transforms, get_dataset, load_datalist, read_datalist, train_transforms
from .items import ItemFormatError, index_to_physical_matrix, load_item, save_item
from .transforms import LoadHSRDiffItemd, RandAnnotationd, ScaleLabeld, joint_augmentations, scale_label

__all__ = [
    "DatalistError",
    "ItemFormatError",
    "LoadHSRDiffItemd",
    "RandAnnotationd",
    "ScaleLabeld",
    "eval_transforms",
    "get_dataset",
    "index_to_physical_matrix",
    "joint_augmentations",
    "load_datalist",
    "load_item",
    "read_datalist",
    "save_item",
    "scale_label",
    "train_transforms",
]
