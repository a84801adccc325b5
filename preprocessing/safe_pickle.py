"""Restricted unpickling for ``data_lidc.pickle`` (``preprocessing.lidc_pickle``): NumPy arrays and builtin containers only.

Unpickling can run arbitrary code, so :class:`RestrictedUnpickler` resolves only the globals
an array pickle needs and refuses every other one in ``find_class``, before it could be
called; the allowed ones are wrapped so that a hostile pickle cannot make them allocate
(array size and dtype, ``bytearray(n)``, a dtype's state, ``_codecs.encode``'s codec are
checked first). A refusal is an :class:`UnsafePickleError`.

Example::

    with open("data_lidc.pickle", "rb") as f:
        data = RestrictedUnpickler(f, encoding="latin1").load()
"""

from __future__ import annotations

import codecs
import math
import pickle
from typing import Any, NoReturn

import numpy as np

__all__ = ["ARRAY_KINDS", "MAX_ARRAY_BYTES", "RECORD_FIELDS", "RestrictedUnpickler", "UnsafePickleError"]

# (module, name) an array pickle needs; NumPy 2 moved numpy.core to numpy._core
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 array pickles
    ("numpy._core.numeric", "_frombuffer"),
    *(("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "complex")),
    ("builtins", "bytes"),  # protocol <= 2 writes b"" (the data of an empty array) as bytes()
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol <= 2 writes bytes as _codecs.encode(str, "latin1")
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
# One record holds a 128x128 slice (64 KiB as float32); no array of a data_lidc.pickle comes near this.
MAX_ARRAY_BYTES = 256 * 2**20
# The dtypes an image or a mask can have: bool, signed and unsigned integers, floats (NumPy kinds).
ARRAY_KINDS = "biuf"
RECORD_FIELDS = ("image", "masks", "series_uid")  # the keys of one record


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list, or for an array no data_lidc.pickle holds."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


class _DtypeRequest:
    """What the pickle asked ``numpy.dtype(...)`` for, resolved only after :meth:`__setstate__` is checked.

    A real ``np.dtype`` would take the pickle's state (subarray shape, fields, item size)
    unchecked in ``__setstate__``; this stand-in receives it instead, and :meth:`resolve`
    accepts only plain bool/integer/float dtypes whose state is the canonical one.
    """

    def __init__(self, unpickler: RestrictedUnpickler, args: tuple) -> None:
        self.unpickler, self.args, self.state, self._dtype = unpickler, args, None, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def resolve(self) -> np.dtype:
        if self._dtype is not None:
            return self._dtype
        refuse = self.unpickler.refuse
        code = self.args[0] if self.args else None
        if not isinstance(code, (str, bytes)) or len(code) > 8:
            refuse(f"numpy.dtype{self.args!r:.80}: only plain numeric dtypes (e.g. 'f4', 'u1') may be rebuilt")
        try:
            dt = np.dtype(code.decode("latin1") if isinstance(code, bytes) else code)
        except TypeError as e:
            refuse(f"numpy.dtype({code!r}): {e}")
        if dt.kind not in ARRAY_KINDS or dt.shape or dt.fields is not None:
            refuse(f"dtype {dt} ({dt.kind!r} kind): images and masks must be bool, integer or float arrays")
        if self.state is not None:
            canonical = dt.__reduce__()[2]
            st = self.state
            ok = isinstance(st, tuple) and len(st) == len(canonical) and st[1] in ("<", ">", "|", "=")
            if not ok or any(a != b for i, (a, b) in enumerate(zip(st, canonical)) if i != 1):
                refuse(f"dtype {dt}: unusual pickled state {st!r:.120} (subarray, fields or item size changed)")
            if st[1] in ("<", ">") and dt.byteorder != "|":
                dt = dt.newbyteorder(st[1])
        self._dtype = dt
        return dt


class _GuardedArray(np.ndarray):
    """``numpy.ndarray`` as the pickle sees it: sizes and dtypes are checked before NumPy allocates.

    ``np.asarray`` turns the loaded arrays back into plain ``ndarray`` views.
    """

    unpickler: RestrictedUnpickler | None = None  # set on a per-load subclass

    def __new__(cls, shape: Any, dtype: Any = "f8", buffer: Any = None, *args: Any, **kwargs: Any) -> np.ndarray:
        u = cls.unpickler
        if buffer is not None or args or kwargs:
            u.refuse("numpy.ndarray(...) over a raw buffer: array pickles never build one")
        dt = u.dtype(dtype)
        u.allocation(shape, dt)
        return super().__new__(cls, shape, dt)

    def __setstate__(self, state: Any) -> None:
        u = type(self).unpickler
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            u.refuse(f"ndarray state of type {type(state).__name__}: not a NumPy array pickle")
        shape, dtype, fortran, raw = state[-4:]
        dt = u.dtype(dtype)
        n = u.allocation(shape, dt, count=False)  # the data travels inside the pickle: check, do not count
        if isinstance(raw, str):  # a Python 2 str read with encoding="latin1", as NumPy itself accepts
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != n:
            got = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            u.refuse(f"array of shape {tuple(shape)} {dt} needs {n} bytes of data, the pickle holds {got}")
        super().__setstate__((*state[:-4], tuple(shape), dt, fortran, raw))


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals NumPy arrays and builtin containers need, guarded.

    Every other global (``os.system``, ``builtins.eval``, any class) is refused in
    :meth:`find_class`, i.e. before anything could call it. The allowed ones are wrapped so
    that a hostile pickle cannot make them allocate: an array's size and dtype, a
    ``bytearray(n)``, a dtype's pickled state and ``_codecs.encode``'s codec are checked
    before NumPy or Python acts (at most :data:`MAX_ARRAY_BYTES` per array, all allocations
    together at most that much more than the file holds, no object arrays). A refusal is an
    :class:`UnsafePickleError` naming the record being read when the pickle's memo tells it.

    Example::

        with open("data_lidc.pickle", "rb") as f:
            data = RestrictedUnpickler(f, encoding="latin1").load()
    """

    def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        self._allocated = 0
        self._array = type("ndarray", (_GuardedArray,), {"unpickler": self})

    def current_record(self) -> str | None:
        """The key of the record being rebuilt, or None.

        A pickler memoizes every str and dict in the order it writes them, so the newest dict
        (after the outer one) that follows a string other than a field name is the record
        being rebuilt, and that string is its key.
        """
        memo = [obj for _, obj in sorted(self.memo.copy().items())]
        for i in range(len(memo) - 1, 1, -1):
            key = memo[i - 1]
            if isinstance(memo[i], dict) and isinstance(key, str) and key not in RECORD_FIELDS:
                return key if len(key) <= 200 else None
        return None

    def refuse(self, problem: str) -> NoReturn:
        key = self.current_record()
        where = f"[{key!r}]: " if key is not None else ""
        raise UnsafePickleError(f"{where}{problem}; refused before NumPy acted on it (a corrupt or hostile pickle)")

    def dtype(self, dtype: Any) -> np.dtype:
        """A checked dtype from what the pickle passed: a :class:`_DtypeRequest` or a type code."""
        if isinstance(dtype, _DtypeRequest):
            return dtype.resolve()
        return _DtypeRequest(self, (dtype,)).resolve()

    def allocation(self, shape: Any, dt: np.dtype, count: bool = True) -> int:
        """Bytes of an array of ``shape`` and ``dt``; refuse it above the limits (``count``: it allocates)."""
        if isinstance(shape, int):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)) or len(shape) > 8 or not all(isinstance(d, int) and d >= 0 for d in shape):
            self.refuse(f"array shape {shape!r:.80}: expected a tuple of at most 8 non-negative integers")
        n = math.prod(shape) * dt.itemsize
        if n > MAX_ARRAY_BYTES:
            self.refuse(f"array of shape {tuple(shape)} {dt} would take {_human(n)}, more than the "
                        f"{_human(MAX_ARRAY_BYTES)} any data_lidc.pickle array needs")  # fmt: skip
        if count:
            self._allocated += n
            if self._allocated > MAX_ARRAY_BYTES:
                self.refuse(f"the pickle's constructors ask for {_human(self._allocated)} in all; array pickles "
                            "carry their data and allocate next to nothing")  # fmt: skip
        return n

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: this pickle may only contain NumPy arrays and "
                f"builtin containers (a pickle can run code; do not load files you do not trust)"
            )
        if (module, name) == ("numpy", "ndarray"):
            return self._array
        if (module, name) == ("numpy", "dtype"):
            return lambda *args: _DtypeRequest(self, args)
        real = super().find_class(module, name)
        if name == "_reconstruct":

            def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
                if subtype is not self._array:
                    self.refuse(f"_reconstruct of {getattr(subtype, '__name__', type(subtype).__name__)}: only numpy.ndarray")
                dt = self.dtype(dtype)
                self.allocation(shape, dt)
                return real(subtype, shape, dt)

            return reconstruct
        if name == "scalar":

            def checked_scalar(dtype: Any, data: Any = None) -> Any:
                if not isinstance(data, bytes):
                    self.refuse(f"numpy scalar from {type(data).__name__}: expected its bytes")
                return real(self.dtype(dtype), data)

            return checked_scalar
        if name == "_frombuffer":
            return lambda buf, dtype, shape, order: real(buf, self.dtype(dtype), shape, order)
        if name in ("bytes", "bytearray"):

            def checked_bytes(*args: Any) -> bytes | bytearray:
                if args and isinstance(args[0], int):  # bytes(n) and bytearray(n) allocate n zero bytes
                    self.allocation((args[0],), np.dtype("u1"))
                return real(*args)

            return checked_bytes
        if name == "encode":

            def latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
                # only the latin1 round trip Python 2 pickles use: codecs such as "hex" double their input
                if not isinstance(obj, str) or not isinstance(encoding, str) or codecs.lookup(encoding).name != "iso8859-1":
                    self.refuse(f"_codecs.encode(..., {encoding!r:.40}): only latin1 text is rebuilt")
                return obj.encode("latin1", errors)

            return latin1_encode
        return real
