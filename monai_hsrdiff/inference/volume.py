"""Volume-level inference: cut a scan into the 2D model's inputs, sample, and write back into its grid.

Per slice along :attr:`SliceAxes.slice_axis` (display orientation, as the training items):

1. the task's training preprocessing (a :class:`SlicePreprocessing` from
   ``monai_hsrdiff.tasks``: :meth:`~SlicePreprocessing.normalize_volume` once, then
   :meth:`~SlicePreprocessing.plane_to_input` per slice), e.g.
   - LIDC: Hounsfield units resampled in-plane to the training item spacing (linear,
     air outside the scan, as ``preprocessing.lidc``), then the HU window -> [-1, 1];
   - MS-Lesion: the whole slice of the z-scored volume (z-score over brain voxels, as
     ``preprocessing.ms_lesion``) resized to the model size (bilinear, anti-aliased);
2. MONAI's :class:`~monai.inferers.SlidingWindowInferer` over the slice (window = the
   model's training size); its predictor draws N samples per window (continuous x_0,
   (B, N, H, W)); overlapping windows are averaged before thresholding;
3. every sample is interpolated (linear) back onto the slice's source voxels and
   thresholded at 0: (N, I, J, K) binary masks in the source grid, zero outside the region.

The mean over samples is the probability; its entropy (bits) the uncertainty.

Example::

    pp = get_task("lidc").slice_preprocessing(image_size=128)
    pred = predict_volume(source, predictor, pp, region=Region.whole(source.shape), num_samples=16)
    pred.samples.shape   # (N, I, J, K) bool
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage

from monai_hsrdiff.errors import InferenceInputError
from monai_hsrdiff.inference.source import SourceVolume

if TYPE_CHECKING:
    import torch

__all__ = [
    "Region",
    "SlicePreprocessing",
    "VolumePrediction",
    "predict_volume",
    "resample_plane",
    "resize_plane",
]

Predictor = Callable[["torch.Tensor"], "torch.Tensor"]


# ----------------------------------------------------------------------------- region


@dataclass(frozen=True)
class Region:
    """A box of voxels, inclusive index bounds per array axis: ``lo[a] <= index[a] <= hi[a]``."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Region:
        return cls((0, 0, 0), tuple(int(s) - 1 for s in shape))  # type: ignore[arg-type]

    @classmethod
    def from_options(
        cls,
        source: SourceVolume,
        slices: tuple[int, int] | None = None,
        center: Sequence[float] | None = None,
        size: Sequence[float] | None = None,
        units: Literal["voxel", "mm"] = "voxel",
    ) -> Region:
        """The region from the user's options; the whole volume when none is given.

        Args:
            source: the scan.
            slices: ``(a, b)``: slices ``a <= s < b`` along the model's slice axis (0-based).
            center: box centre: voxel index ``(i, j, k)`` (``units="voxel"``) or an LPS point
                ``(x, y, z)`` in mm (``units="mm"``).
            size: box size along the array axes ``(i, j, k)``: voxels or mm.
            units: how ``center`` and ``size`` are given.

        Raises:
            InferenceInputError: both or malformed options, or a region that does not
                intersect the volume (names the option, the value and the volume's extent).
        """
        shape = source.shape
        whole = cls.whole(shape)
        if slices is not None and (center is not None or size is not None):
            raise InferenceInputError("give either --slices or --center/--size, not both")
        if slices is not None:
            a, b = (int(v) for v in slices)
            n = shape[source.axes.slice_axis]
            if not (0 <= a < b <= n):
                raise InferenceInputError(
                    f"--slices {a}:{b} is outside the volume: it has {n} slices along the model's slice axis "
                    f"(array axis {source.axes.slice_axis}); use a:b with 0 <= a < b <= {n}"
                )
            lo, hi = list(whole.lo), list(whole.hi)
            lo[source.axes.slice_axis], hi[source.axes.slice_axis] = a, b - 1
            return cls(tuple(lo), tuple(hi))  # type: ignore[arg-type]
        if center is None and size is None:
            return whole
        if center is None or size is None or len(center) != 3 or len(size) != 3:
            raise InferenceInputError(f"--center and --size need 3 numbers each, got --center {center} --size {size}")
        if units not in ("voxel", "mm"):
            raise InferenceInputError(f"region units must be 'voxel' or 'mm', got {units!r}")
        if any(float(s) <= 0 for s in size):
            raise InferenceInputError(f"--size must be > 0 along every axis, got {list(size)}")
        c = np.asarray(center, dtype=np.float64)
        s = np.asarray(size, dtype=np.float64)
        if units == "mm":
            c = (np.linalg.inv(source.index_to_physical) @ np.append(c, 1.0))[:3]
            s = s / source.spacing
        lo = np.ceil(c - s / 2.0 - 1e-6).astype(int)
        hi = np.floor(c + s / 2.0 + 1e-6).astype(int)
        hi = np.maximum(hi, lo)  # a size below one voxel still covers the centre voxel
        lo_c, hi_c = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape) - 1)
        if np.any(lo_c > hi_c):
            extent = (
                f"index 0..{[n - 1 for n in shape]}" if units == "voxel" else
                f"index 0..{[n - 1 for n in shape]} (centre maps to index {np.round(c, 2).tolist()})"
            )  # fmt: skip
            raise InferenceInputError(
                f"--center {list(center)} --size {list(size)} ({units}) lies outside the volume ({extent}); "
                "choose a centre inside the scan"
            )
        if np.any(lo_c != lo) or np.any(hi_c != hi):
            warnings.warn(f"region {lo.tolist()}..{hi.tolist()} clipped to the volume: {lo_c.tolist()}..{hi_c.tolist()}")
        return cls(tuple(int(v) for v in lo_c), tuple(int(v) for v in hi_c))  # type: ignore[arg-type]

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        m = np.zeros(tuple(shape), dtype=bool)
        m[self.lo[0] : self.hi[0] + 1, self.lo[1] : self.hi[1] + 1, self.lo[2] : self.hi[2] + 1] = True
        return m

    def as_json(self) -> dict[str, list[int]]:
        return {"index_lo": list(self.lo), "index_hi": list(self.hi)}


# ---------------------------------------------------------------------- preprocessing


def resample_plane(
    plane: np.ndarray, spacing_rc: tuple[float, float], box: tuple[int, int, int, int], image_size: int,
    item_spacing: float | None, cval: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample a (C, rows, cols) slice (linear) onto an item grid over ``box``, at least roi-sized.

    Args:
        plane: (C, rows, cols) slice in display orientation.
        spacing_rc: its (row, column) spacing in mm.
        box: ``(r_lo, r_hi, c_lo, c_hi)`` inclusive pixel bounds of the region in the slice.
        image_size: the model's roi; the item grid has at least this many pixels per axis.
        item_spacing: item pixel spacing in mm; ``None``: the slice's own pixels.
        cval: value outside the slice (e.g. air, -1000 HU).

    Returns:
        ``(image (C, H, W) float, scale (2,), offset (2,))`` with
        ``slice_pixel = scale * item_pixel + offset`` per axis (the item grid centred on the box).
    """
    r_lo, r_hi, c_lo, c_hi = box
    out_shape, scale, offset = [], [], []
    for lo, hi, sp in ((r_lo, r_hi, spacing_rc[0]), (c_lo, c_hi, spacing_rc[1])):
        step = 1.0 if item_spacing is None else item_spacing / sp  # slice pixels per item pixel
        n = max(int(math.ceil((hi - lo) / step)) + 1, image_size)
        centre = 0.5 * (lo + hi)
        out_shape.append(n)
        scale.append(step)
        offset.append(centre - 0.5 * (n - 1) * step)  # the item grid is centred on the box
    img = np.stack(
        [
            ndimage.affine_transform(ch, np.diag(scale), np.asarray(offset), output_shape=tuple(out_shape), order=1, cval=cval)
            for ch in plane
        ]
    )
    return img, np.asarray(scale), np.asarray(offset)


def resize_plane(plane: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize a whole (C, rows, cols) slice to ``image_size``² (MONAI ``Resize``: bilinear, anti-aliased).

    Returns:
        ``(image (C, size, size) float32, scale (2,), offset (2,))``; with align_corners=False
        ``slice_pixel = (item_pixel + 0.5) * n / size - 0.5``.
    """
    import torch
    from monai.transforms import Resize
    from monai.utils import convert_to_numpy

    n = np.asarray(plane.shape[1:], dtype=np.float64)
    size = int(image_size)
    img = convert_to_numpy(
        Resize((size, size), mode="bilinear", align_corners=False, anti_aliasing=True)(torch.from_numpy(np.ascontiguousarray(plane)))
    ).astype(np.float32)
    scale = n / size
    return img, scale, 0.5 * scale - 0.5


@dataclass(frozen=True)
class SlicePreprocessing:
    """How one display-orientation slice becomes the model input, and how its grid maps back.

    The item grid and the slice's pixel grid are related per axis by
    ``slice_pixel = scale * item_pixel + offset`` (rows, then columns). A task
    (``monai_hsrdiff.tasks``) subclasses it to give its training preprocessing: this base
    keeps the volume as it is and resamples each slice to ``item_spacing`` (``None``: native)
    with ``background`` outside the scan.

    Attributes:
        task: the task name (``"lidc"``, ``"ms_lesion"``, ...).
        image_size: the model's training size (sliding-window roi; MS: the resize target).
        background: model-input value outside the scan (padding of the sliding window).
        item_spacing: in-plane spacing (mm) of the training items; ``None``: native.
        hu_window: CT: the HU window mapped to [-1, 1]; ``None`` otherwise.

    Example::

        pp = get_task("lidc").slice_preprocessing(128)
        pp.as_json()   # {'task': 'lidc', 'image_size': 128, 'background': -1.0, 'item_spacing_mm': 0.5, ...}
    """

    task: str
    image_size: int
    background: float
    item_spacing: float | None = None
    hu_window: tuple[float, float] | None = None

    def normalize_volume(self, data: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        """(C, I, J, K) raw intensities -> (C, I, J, K) as the slices are cut from (here: unchanged).

        ``names``: one per channel (the input files), for the messages.
        """
        return data

    def plane_to_input(
        self, plane: np.ndarray, spacing_rc: tuple[float, float], box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One (C, rows, cols) slice -> ``(model input (C, H, W) float32, scale, offset)`` (:func:`resample_plane`)."""
        img, scale, offset = resample_plane(plane, spacing_rc, box, self.image_size, self.item_spacing, self.background)
        return img.astype(np.float32), scale, offset

    def as_json(self) -> dict[str, Any]:
        return {"task": self.task, "image_size": self.image_size, "background": self.background,
                "item_spacing_mm": self.item_spacing, "hu_window": None if self.hu_window is None else list(self.hu_window)}  # fmt: skip


# -------------------------------------------------------------------------- prediction


@dataclass
class VolumePrediction:
    """Samples in the source grid.

    Attributes:
        samples: (N, I, J, K) bool, one binary mask per sample, False outside the region.
        region: the box that was predicted.
        timings: seconds per stage.
    """

    samples: np.ndarray
    region: Region
    timings: dict[str, float]

    @property
    def mean_probability(self) -> np.ndarray:
        """(I, J, K) float32 in [0, 1]: fraction of samples marking each voxel."""
        return self.samples.mean(axis=0, dtype=np.float64).astype(np.float32)

    @property
    def entropy(self) -> np.ndarray:
        """(I, J, K) float32 in [0, 1] bits: entropy of the sample mean (0: samples agree; 1: 50/50)."""
        from monai_hsrdiff.metrics.functional import entropy_map

        return entropy_map(self.samples).astype(np.float32)

    @property
    def consensus(self) -> np.ndarray:
        """(I, J, K) bool: the fused prediction, mean of the samples >= 0.5 (DESIGN.md §4)."""
        return self.mean_probability >= 0.5


def predict_volume(
    source: SourceVolume,
    predictor: Predictor,
    preprocessing: SlicePreprocessing,
    region: Region | None = None,
    num_samples: int = 1,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> VolumePrediction:
    """Run the 2D model slice by slice over ``region`` and return its samples in the source grid.

    Args:
        source: the scan (raw intensities, geometry, slicing axes).
        predictor: ``predictor(x)`` with x (B, C, roi, roi) float32 model input -> (B, N, roi, roi)
            continuous samples (mask = value > 0), e.g. an :class:`HSRDiffPipeline` wrapper.
        preprocessing: the task's slice preprocessing (roi size, spacing, window).
        region: box to predict; default the whole volume.
        num_samples: N, the channel count ``predictor`` returns.
        sw_batch_size: windows per predictor call.
        overlap: sliding-window overlap (windows are averaged where they overlap).
        device: where the model inputs go.
        log: progress sink (one line per slice), or None.

    Returns:
        :class:`VolumePrediction` with (N, I, J, K) bool samples.
    """
    import torch
    from monai.inferers import SlidingWindowInferer

    t0 = time.perf_counter()
    region = region or Region.whole(source.shape)
    axes = source.axes
    # source.files: one NIfTI per channel, so a constant modality is named by its file
    data = preprocessing.normalize_volume(source.data, source.files)
    planes = axes.to_plane(data)  # (C, slices, rows, cols)
    # the region box in display coordinates (rows/cols may be flipped relative to the array)
    def _span(axis: int, flip: bool) -> tuple[int, int]:
        lo, hi, n = region.lo[axis], region.hi[axis], source.shape[axis]
        return (n - 1 - hi, n - 1 - lo) if flip else (lo, hi)

    s_lo, s_hi = region.lo[axes.slice_axis], region.hi[axes.slice_axis]
    r_lo, r_hi = _span(axes.row_axis, axes.flip_rows)
    c_lo, c_hi = _span(axes.col_axis, axes.flip_cols)
    spacing = source.spacing
    spacing_rc = (float(spacing[axes.row_axis]), float(spacing[axes.col_axis]))

    roi = (preprocessing.image_size, preprocessing.image_size)
    inferer = SlidingWindowInferer(
        roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode="constant",
        padding_mode="constant", cval=preprocessing.background,
    )  # fmt: skip
    out_planes = np.zeros((num_samples, *planes.shape[1:]), dtype=bool)
    rows = np.arange(r_lo, r_hi + 1, dtype=np.float64)
    cols = np.arange(c_lo, c_hi + 1, dtype=np.float64)
    t_model = 0.0
    for s in range(s_lo, s_hi + 1):
        img, scale, offset = preprocessing.plane_to_input(planes[:, s], spacing_rc, (r_lo, r_hi, c_lo, c_hi))
        t1 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(img))[None].to(device)
        with torch.no_grad():
            y = inferer(x, predictor)
        y = y[0].detach().float().cpu().numpy()  # (N, H, W) continuous samples on the item grid
        t_model += time.perf_counter() - t1
        if y.shape[0] != num_samples:
            raise ValueError(f"predict_volume: the predictor returned {y.shape[0]} channels, expected num_samples={num_samples}")
        # source pixel (row, col) of this slice -> item coordinates (inverse of slice = scale * item + offset)
        ir = (rows - offset[0]) / scale[0]
        ic = (cols - offset[1]) / scale[1]
        grid = np.stack(np.meshgrid(ir, ic, indexing="ij"))
        for n in range(num_samples):
            val = ndimage.map_coordinates(y[n], grid, order=1, mode="nearest")
            out_planes[n, s, r_lo : r_hi + 1, c_lo : c_hi + 1] = val > 0
        if log is not None:
            log(f"[hsrdiff] slice {s - s_lo + 1}/{s_hi - s_lo + 1} (index {s} along axis {axes.slice_axis})")
    samples = np.ascontiguousarray(axes.from_plane(out_planes))
    total = time.perf_counter() - t0
    return VolumePrediction(samples, region, {"model_s": t_model, "predict_total_s": total})
