"""Volume-level inference: cut a scan into the 2D model's inputs, sample, and write back into its grid.

Per slice along :attr:`SliceAxes.slice_axis` (display orientation, as the training items):

1. the training preprocessing (:class:`SlicePreprocessing`):
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

    pred = predict_volume(source, predictor, preprocessing, roi_size=128, region=Region.whole(source))
    pred.samples.shape   # (N, I, J, K) bool
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from monai_hsrdiff.inference.source import InferenceInputError, SourceVolume

__all__ = [
    "Region",
    "SlicePreprocessing",
    "VolumePrediction",
    "lidc_preprocessing",
    "ms_lesion_preprocessing",
    "predict_volume",
    "zscore_brain",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]


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


def zscore_brain(data: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """Z-score each channel over brain voxels exactly as ``preprocessing.ms_lesion`` does for training.

    Args:
        data: (C, *spatial) raw MRI intensities (skull-stripped: background exactly 0).
        names: one name per channel for the messages (the input files); default "channel c".

    Raises:
        InferenceInputError: no voxel > 0, or a channel constant over the brain.
    """
    from preprocessing.ms_lesion import MSLesionInputError
    from preprocessing.ms_lesion import zscore_brain as _zscore

    try:
        if names is None or len(names) != data.shape[0]:
            names = [f"--input channel {c}" for c in range(data.shape[0])]
        return _zscore(data, [str(n) for n in names])[0]
    except MSLesionInputError as e:
        raise InferenceInputError(str(e)) from e


@dataclass(frozen=True)
class SlicePreprocessing:
    """How one display-orientation slice becomes the model input, and how its grid maps back.

    The item grid and the slice's pixel grid are related per axis by
    ``slice_pixel = scale * item_pixel + offset`` (rows, then columns).

    Attributes:
        task: ``"lidc"`` or ``"ms_lesion"``.
        volume: (C, I, J, K) -> (C, I, J, K) intensity normalisation of the whole volume
            (MS: z-score over the brain; LIDC: identity, HU are windowed after resampling).
        background: model-input value outside the scan (padding of the sliding window).
        item_spacing: LIDC: in-plane spacing (mm) of the training items; ``None``: native.
        hu_window: LIDC: HU window mapped to [-1, 1].
        image_size: the model's training size (sliding-window roi; MS: the resize target).
    """

    task: str
    image_size: int
    background: float
    item_spacing: float | None = None
    hu_window: tuple[float, float] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"task": self.task, "image_size": self.image_size, "background": self.background,
                "item_spacing_mm": self.item_spacing, "hu_window": None if self.hu_window is None else list(self.hu_window)}  # fmt: skip


def lidc_preprocessing(image_size: int, item_spacing: float | None = None, hu_window: Sequence[float] | None = None) -> SlicePreprocessing:
    """LIDC: resample to ``item_spacing`` (default: ``preprocessing.lidc``'s), HU window (default: its window)."""
    from preprocessing.lidc import LidcOptions

    default = LidcOptions()
    window = tuple(float(v) for v in (hu_window if hu_window is not None else default.hu_window))
    return SlicePreprocessing("lidc", int(image_size), background=-1.0, item_spacing=item_spacing, hu_window=window)  # type: ignore[arg-type]


def ms_lesion_preprocessing(image_size: int) -> SlicePreprocessing:
    """MS-Lesion: z-score over the brain, whole slice resized to ``image_size``."""
    return SlicePreprocessing("ms_lesion", int(image_size), background=0.0)


def _lidc_plane(plane_hu: np.ndarray, spacing_rc: tuple[float, float], box: tuple[int, int, int, int], pp: SlicePreprocessing):
    """Resample a (C, rows, cols) HU slice to the item spacing over ``box`` (at least roi-sized)."""
    from preprocessing.demo import hu_to_unit
    from preprocessing.lidc import AIR_HU

    r_lo, r_hi, c_lo, c_hi = box
    out_shape, scale, offset = [], [], []
    for lo, hi, sp in ((r_lo, r_hi, spacing_rc[0]), (c_lo, c_hi, spacing_rc[1])):
        step = 1.0 if pp.item_spacing is None else pp.item_spacing / sp  # slice pixels per item pixel
        n = max(int(math.ceil((hi - lo) / step)) + 1, pp.image_size)
        centre = 0.5 * (lo + hi)
        out_shape.append(n)
        scale.append(step)
        offset.append(centre - 0.5 * (n - 1) * step)  # the item grid is centred on the box
    img = np.stack(
        [
            ndimage.affine_transform(ch, np.diag(scale), np.asarray(offset), output_shape=tuple(out_shape), order=1, cval=AIR_HU)
            for ch in plane_hu
        ]
    )
    return hu_to_unit(img, pp.hu_window), np.asarray(scale), np.asarray(offset)


def _ms_plane(plane: np.ndarray, pp: SlicePreprocessing):
    """Resize a whole (C, rows, cols) slice to the model size, as ``preprocessing.ms_lesion`` does."""
    from monai.transforms import Resize
    from monai.utils import convert_to_numpy

    n = np.asarray(plane.shape[1:], dtype=np.float64)
    size = pp.image_size
    img = convert_to_numpy(
        Resize((size, size), mode="bilinear", align_corners=False, anti_aliasing=True)(torch.from_numpy(np.ascontiguousarray(plane)))
    ).astype(np.float32)
    scale = n / size  # align_corners=False: slice = (item + 0.5) * n / size - 0.5
    return img, scale, 0.5 * scale - 0.5


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
    from monai.inferers import SlidingWindowInferer

    t0 = time.perf_counter()
    region = region or Region.whole(source.shape)
    axes = source.axes
    # source.files: one NIfTI per channel, so a constant modality is named by its file
    data = zscore_brain(source.data, source.files) if preprocessing.task == "ms_lesion" else source.data
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
        if preprocessing.task == "lidc":
            img, scale, offset = _lidc_plane(planes[:, s], spacing_rc, (r_lo, r_hi, c_lo, c_hi), preprocessing)
        else:
            img, scale, offset = _ms_plane(planes[:, s], preprocessing)
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
