"""The one place that makes pylidc 0.2.3 importable on current NumPy and setuptools.

pylidc 0.2.3 (the last release) uses the NumPy aliases ``np.int``, ``np.float`` and
``np.bool`` that NumPy 1.24 removed, and imports ``pkg_resources`` (setuptools < 81) to find
its bundled annotation database. We restore the three aliases as the builtins they always
were (what NumPy itself did for years) instead of pinning NumPy back, and silence the
deprecation warning of ``pkg_resources``. Import pylidc only through :func:`import_pylidc`.

pylidc's ``~/.pylidcrc`` (DICOM location) is never needed: this project reads the DICOM
series itself, matched by SeriesInstanceUID, and uses pylidc for annotations only.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np

__all__ = ["import_pylidc"]

_ALIASES = {"int": int, "float": float, "bool": bool}


def import_pylidc() -> ModuleType:
    """Return the ``pylidc`` module, with the NumPy aliases it needs restored.

    Raises:
        ImportError: pylidc or ``pkg_resources`` (setuptools < 81) is not installed; the
            message says what to install.
    """
    for name, value in _ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        try:
            import pylidc
        except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
            if e.name == "pkg_resources":
                raise ImportError("pylidc 0.2.3 needs pkg_resources: pip install 'setuptools<81'") from e
            raise ImportError("pylidc is not installed: pip install pylidc") from e
    return pylidc
