"""What a task is (a data set the model is trained on) and the registry of tasks by name.

A :class:`Task` is the one definition of what the model sees for its data set: the channels
of an item, the DICOM Modality it takes, the in-plane item spacing, the HU window, how an
inference input is read and how a slice becomes the model input. ``preprocessing/`` (the
training items) and ``monai_hsrdiff.infer`` (inference) both read it from here.

Example::

    from monai_hsrdiff.tasks import get_task

    task = get_task("lidc")
    task.channels                             # ('CT',)
    pp = task.slice_preprocessing(128)        # resampled to 0.5 mm, HU window -> [-1, 1]
    source = task.read_source(["/data/LIDC-IDRI-0001/series/"], modality="CT")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from monai_hsrdiff.errors import DatalistError, InferenceInputError
from monai_hsrdiff.inference.source import SourceVolume, read_nifti_source
from monai_hsrdiff.inference.volume import SlicePreprocessing

__all__ = ["Task", "UnknownTaskError", "get_task", "register_task", "task_names"]


class UnknownTaskError(InferenceInputError):
    """No task of that name is registered; the message lists the known ones."""


class Task:
    """One data set: its item channels, input modality, spacing, and inference preprocessing.

    Subclass it, set the class attributes, override what differs, and register an instance
    with :func:`register_task` (one module under ``monai_hsrdiff/tasks/`` plus one import
    line in its ``__init__``). The defaults read NIfTI volumes (one per channel) and resample
    each slice to ``item_spacing`` (:class:`SlicePreprocessing`).

    Slices: the model sees 2D slices in DICOM display orientation (columns towards patient
    Left, rows towards Posterior, slices along the array axis closest to S;
    :func:`monai_hsrdiff.io.geometry.slice_axes`), or a DICOM series as stored
    (:data:`monai_hsrdiff.io.geometry.DICOM_AXES`).

    Attributes:
        name: the registry key and the bundles' ``task`` value (``"lidc"``).
        modality: the DICOM Modality / kind of image the model takes (``"CT"``, ``"MR"``), as
            ``metadata.json`` ``network_data_format.inputs.image.modality``.
        channels: item channel order (``("flair", "mprage", "pd", "t2")``).
        item_spacing: in-plane item spacing in mm; ``None``: native pixels (a resize).
        hu_window: CT: ``(low, high)`` HU mapped to [-1, 1]; ``None`` otherwise.
        background: model-input value outside the scan.
        num_annotations: masks per item (LIDC: 4 readers; MS-Lesion: 2 raters).
        file_patterns: per channel, the file-name token (a regular expression) that finds its
            NIfTI file in an input folder; a channel without one is found by its name.
        prepare_command: the command that prepares the real data set, ``{out}`` = its folder.
        preprocessing_class: the :class:`SlicePreprocessing` (sub)class inference uses.
    """

    name: str = ""
    modality: str = ""
    channels: tuple[str, ...] = ()
    item_spacing: float | None = None
    hu_window: tuple[float, float] | None = None
    background: float = 0.0
    num_annotations: int = 1
    file_patterns: Mapping[str, str] = MappingProxyType({})
    prepare_command: str = ""
    preprocessing_class: type[SlicePreprocessing] = SlicePreprocessing

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modality={self.modality!r}, channels={self.channels})"

    def read_source(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        series_uid: str | None = None,
        modality: str | None = None,
        allow_modality_mismatch: bool = False,
    ) -> SourceVolume:
        """Read the inference input: (C, I, J, K) raw intensities with their geometry.

        Args:
            paths: the ``--input``: a folder, a file, or files (one per channel).
            series_uid: SeriesInstanceUID, for a DICOM folder holding several series.
            modality: the DICOM Modality the model was trained on; ``None``: not checked.
            allow_modality_mismatch: read a DICOM series of another modality (a warning).

        Raises:
            InferenceInputError: no path, or input this task cannot read (names it and the fix).
        """
        paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
        if not paths:
            raise InferenceInputError("--input is empty; pass a DICOM series folder or NIfTI file(s)")
        return self._read_paths(paths, series_uid, modality, bool(allow_modality_mismatch))

    def _read_paths(
        self, paths: list[str], series_uid: str | None, modality: str | None, allow_modality_mismatch: bool
    ) -> SourceVolume:
        """The default input: one NIfTI volume per channel, in :attr:`channels` order, or their folder."""
        return read_nifti_source(paths, channel_names=self.channels, name_patterns=self.file_patterns)

    def require_datalist(self, dataset_dir: str | os.PathLike, splits: Sequence[str] = ("training",)) -> Path:
        """``<dataset_dir>/datalist.json``, each of ``splits`` checked (``data.load_datalist``: present, not
        empty, every item file there) before any long work starts.

        Raises:
            DatalistError: no datalist (the message gives the commands that prepare this task's
                data and the synthetic demo), or a split that fails the check.
        """
        from monai_hsrdiff.data import load_datalist

        path = Path(dataset_dir) / "datalist.json"
        if not path.is_file():
            raise DatalistError(
                f"no prepared {self.name} data: {path} does not exist.\n"
                f"  Prepare the real data set:  {self.prepare_command.format(out=dataset_dir)}\n"
                f"  or build the synthetic demo: python -m preprocessing.demo --task {self.name} --out {dataset_dir}\n"
                f"  (or point the run at prepared data with --dataset_dir DIR)"
            )
        for split in splits:
            load_datalist(path, split)
        return path

    def source_from_item(self, image: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
        """Source-scan intensities rebuilt from an item's model input (the demo's synthetic scan).

        The inverse of this task's intensity preprocessing, up to what inference removes again.
        Default: the item values as they are.

        Args:
            image: (C, *spatial) item image, as the model sees it.
            meta: the item's ``meta`` (may record the settings it was made with).
        """
        return np.asarray(image)

    def slice_preprocessing(
        self, image_size: int, item_spacing: float | None | Literal["default"] = "default"
    ) -> SlicePreprocessing:
        """The slice preprocessing for a model trained at ``image_size``.

        Args:
            image_size: the model's training size (sliding-window roi).
            item_spacing: in-plane spacing in mm; ``"default"``: :attr:`item_spacing`;
                ``None``: the scan's own spacing.
        """
        spacing = self.item_spacing if item_spacing == "default" else item_spacing
        window = None if self.hu_window is None else tuple(float(v) for v in self.hu_window)
        return self.preprocessing_class(self.name, int(image_size), background=float(self.background),
                                        item_spacing=spacing, hu_window=window)  # type: ignore[arg-type]  # fmt: skip


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry under ``task.name`` (a second task of that name replaces it)."""
    if not task.name or not task.channels:
        raise ValueError(f"register_task: {task!r} needs a name and at least one channel")
    _TASKS[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    """The registered task names, sorted: ``('lidc', 'ms_lesion')``."""
    return tuple(sorted(_TASKS))


def get_task(name: str) -> Task:
    """The task registered as ``name``.

    Raises:
        UnknownTaskError: no such task (an :class:`~monai_hsrdiff.errors.HSRDiffInputError`);
            the message lists the known names.
    """
    task = _TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        known = [repr(n) for n in task_names()]
        expected = " or ".join(known) if len(known) <= 2 else ", ".join(known[:-1]) + " or " + known[-1]
        raise UnknownTaskError(f"unknown task {name!r}; expected {expected}")
    return task
