"""The tasks (data sets) by name: one definition of what the model sees, per task.

``get_task("lidc")`` / ``get_task("ms_lesion")`` give the :class:`Task` that preprocessing and
inference share (channels, modality, spacing, HU window, input reading, slice preprocessing).
A third data set is one new module here that calls :func:`register_task`, plus one import
line below.

Example::

    from monai_hsrdiff.tasks import get_task, task_names

    task_names()                      # ('lidc', 'ms_lesion')
    get_task("ms_lesion").channels    # ('flair', 'mprage', 'pd', 't2')
    get_task("brain")                 # UnknownTaskError: unknown task 'brain'; expected 'lidc' or 'ms_lesion'
"""

from .base import Task, UnknownTaskError, get_task, register_task, task_names

# each module registers its task on import
from . import lidc, ms_lesion  # noqa: E402, F401  isort: skip

__all__ = ["Task", "UnknownTaskError", "get_task", "register_task", "task_names"]
