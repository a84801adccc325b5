"""Sample-set metrics of stochastic segmentation: GED, HM-IoU, MDM, fused IoU and entropy map.

A model draws ``N`` segmentation samples ``S`` for one image; the image has ``A`` expert
annotations ``Y``. Every metric here compares the two *sets* through the distance
``d(a, b) = 1 - IoU(a, b)`` with ``IoU(∅, ∅) = 1``, following the public evaluation code of
PHiSeg (Baumgartner et al. 2019) and CCDM (Zbinden et al. 2023), which
the HSRDiff paper (AAAI 2025, §Experiments "Metrics") reports against. ``docs/metrics.md``
gives the formulae, the tie rules and where each convention comes from.

Masks are binary ``(N, *spatial)`` arrays (bool, or {0, 1} integers/floats) when
``num_classes`` is None or 2, and integer label maps with values ``0..M-1`` when
``num_classes = M > 2`` (class 0 is background). numpy arrays and torch tensors (any device)
are accepted; the computation runs on the CPU in numpy/scipy and returns Python floats or
float64 numpy arrays.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "GEDTerms",
    "entropy_map",
    "fused_iou",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "maximum_dice_matching",
    "pairwise_dice",
    "pairwise_iou",
    "sample_set_metrics",
]

MaskLike = Union[np.ndarray, torch.Tensor]

# float32 matrix products count overlaps exactly while every partial sum stays below 2**24
_FLOAT32_EXACT = 2**24


@functools.cache
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController  # ships with scikit-learn
    except ImportError:  # pragma: no cover - only without threadpoolctl
        return None
    return ThreadpoolController()


def _single_thread_blas():
    """A (36, P) @ (P, 36) product is too small to share: multi-threaded BLAS makes it ~2x slower on an
    idle machine and 10-100x slower on a busy one (evaluation runs beside data-loader workers)."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


class GEDTerms(NamedTuple):
    """GED and its three expectations: ``ged = 2 * cross - samples - annotations``."""

    ged: float
    cross: float  # E[d(S, Y)] over all N*A pairs
    samples: float  # E[d(S, S')] over all N*N ordered pairs, i = j included (sample diversity)
    annotations: float  # E[d(Y, Y')] over all A*A ordered pairs, i = j included


# ----------------------------------------------------------------------------- input checks


def _check_num_classes(num_classes: int | None) -> int | None:
    """Return None for binary masks, M for label maps with M > 2 classes."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(
            f"num_classes counts the background class: use None or 2 for binary masks and M > 2 for "
            f"label maps with values 0..M-1; got num_classes={num_classes!r}."
        )
    return None if num_classes == 2 else int(num_classes)


def _check_masks(x: MaskLike, name: str, num_classes: int | None) -> np.ndarray:
    """Validate one mask set (N, *spatial); return bool (binary) or int64 (label maps) numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        arr = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    else:
        arr = np.asarray(x)
    if arr.ndim < 3:
        raise ValueError(
            f"{name} must have shape (N, *spatial) with at least two spatial dims, e.g. (N, H, W); "
            f"got shape {tuple(arr.shape)}. For a single mask add a leading axis: {name}[None]."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is an empty set (shape {tuple(arr.shape)}): need at least one mask along axis 0.")
    if arr.size == 0:
        raise ValueError(f"{name} has an empty spatial shape {tuple(arr.shape[1:])}.")
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise ValueError(f"{name} must hold bool, integer or float values; got dtype {arr.dtype}.")
    if kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN values ({int(np.isnan(arr).sum())} of {arr.size}).")
    if num_classes is None:
        if kind == "b":
            return arr
        ok = (arr == 0) | (arr == 1)
        if not ok.all():
            bad = np.unique(arr[~ok])[:8].tolist()
            raise ValueError(
                f"{name} must be binary (bool or values in {{0, 1}}); found values {bad}. Threshold model "
                f"outputs first (e.g. x > 0 for labels scaled to [-1, 1]), or pass num_classes=M for label maps."
            )
        return arr != 0
    if kind == "f":
        non_int = arr != np.floor(arr)
        if non_int.any():
            bad = np.unique(arr[non_int])[:8].tolist()
            raise ValueError(f"{name} must be an integer label map (num_classes={num_classes}); found values {bad}.")
    out = arr.astype(np.int64) if kind != "f" else arr
    bad_mask = (out < 0) | (out >= num_classes)
    if bad_mask.any():
        bad = np.unique(out[bad_mask])[:8].tolist()
        raise ValueError(
            f"{name} label values must lie in 0..{num_classes - 1} (num_classes={num_classes}); found values {bad}."
        )
    return out.astype(np.int64)


def _check_pair(
    samples: MaskLike,
    annotations: MaskLike,
    num_classes: int | None,
    names: tuple[str, str] = ("samples", "annotations"),
) -> tuple[np.ndarray, np.ndarray, int | None]:
    m = _check_num_classes(num_classes)
    s = _check_masks(samples, names[0], m)
    y = _check_masks(annotations, names[1], m)
    if s.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{names[0]} and {names[1]} must share their spatial shape: {names[0]} have shape {tuple(s.shape)} "
            f"(N, *spatial), {names[1]} {tuple(y.shape)} (A, *spatial)."
        )
    return s, y, m


# ----------------------------------------------------------------------------- overlap counts


def _class_planes(x: np.ndarray, num_classes: int | None, dtype: type) -> np.ndarray:
    """(N, *spatial) masks -> (K, N, P) float indicator planes of the K foreground classes."""
    flat = x.reshape(x.shape[0], -1)
    if num_classes is None:
        return flat.astype(dtype)[None]
    return np.stack([flat == c for c in range(1, num_classes)]).astype(dtype)


def _overlaps(
    a: np.ndarray, b: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class intersections (K, N, A) and areas (K, N), (K, A), one batched matrix product."""
    n_pix = int(np.prod(a.shape[1:]))
    dtype = np.float32 if n_pix < _FLOAT32_EXACT else np.float64
    pa = _class_planes(a, num_classes, dtype)
    pb = pa if b is a else _class_planes(b, num_classes, dtype)
    with _single_thread_blas():
        inter = np.matmul(pa, pb.transpose(0, 2, 1)).astype(np.float64)
    area_a = pa.sum(-1, dtype=np.float64)
    area_b = area_a if b is a else pb.sum(-1, dtype=np.float64)
    return inter, area_a, area_b


def _iou_from_counts(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """IoU averaged over foreground classes; a class absent from both masks counts 1."""
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)
    return iou.mean(0)


def _dice_from_counts(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """Dice averaged over foreground classes; a class absent from both masks counts 1."""
    total = area_a[:, :, None] + area_b[:, None, :]
    dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1.0), 1.0)
    return dice.mean(0)


def _mean(x: np.ndarray) -> float:
    # correctly rounded sum: the expectation does not depend on the order of samples/annotations,
    # so a set compared with any permutation of itself gives GED exactly 0
    return math.fsum(x.ravel().tolist()) / x.size


def _ged_from_iou(iou_ss: np.ndarray, iou_sy: np.ndarray, iou_yy: np.ndarray) -> GEDTerms:
    cross, div_s, div_y = _mean(1.0 - iou_sy), _mean(1.0 - iou_ss), _mean(1.0 - iou_yy)
    return GEDTerms(ged=2.0 * cross - div_s - div_y, cross=cross, samples=div_s, annotations=div_y)


def _hungarian_from_iou(iou_sy: np.ndarray) -> float:
    n, a = iou_sy.shape
    big = math.lcm(n, a)
    # tiling the sets to lcm(N, A) items each only tiles the N x A matrix: row i is sample i % N
    iou = np.tile(iou_sy, (big // n, big // a))
    rows, cols = linear_sum_assignment(1.0 - iou)
    return _mean(iou[rows, cols])


def _vote(x: np.ndarray, num_classes: int | None, tie_is_foreground: bool) -> np.ndarray:
    """Per-pixel plurality vote over axis 0 -> (1, *spatial)."""
    n = x.shape[0]
    if num_classes is None:
        votes = x.sum(0, dtype=np.int64)
        fused = (2 * votes >= n) if tie_is_foreground else (2 * votes > n)
        return fused[None]
    counts = np.stack([(x == c).sum(0) for c in range(num_classes)]).astype(np.float64)
    if tie_is_foreground:
        counts[0] -= 0.5  # background loses its ties; ties among foreground classes go to the lowest index
    return counts.argmax(0)[None]


# ----------------------------------------------------------------------------- public API


def pairwise_iou(a: MaskLike, b: MaskLike, num_classes: int | None = None) -> np.ndarray:
    """IoU of every mask of ``a`` with every mask of ``b``.

    Intersections come from one matrix product of the flattened masks, ``(N, P) @ (P, A)``.
    Label maps (``num_classes = M > 2``) give the mean over foreground classes 1..M-1 of the
    per-class IoU, a class absent from both masks counting 1 (CCDM's convention).

    Args:
        a: masks (N, *spatial), binary or label map.
        b: masks (A, *spatial), same spatial shape as ``a``.
        num_classes: None or 2 for binary masks; M > 2 for label maps with values 0..M-1.

    Returns:
        float64 array (N, A), values in [0, 1]; ``IoU(∅, ∅) = 1``.

    Example:
        >>> a = np.array([[[1, 1], [0, 0]]], dtype=bool)
        >>> b = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=bool)
        >>> pairwise_iou(a, b)
        array([[0.5, 0. ]])
    """
    s, y, m = _check_pair(a, b, num_classes, names=("a", "b"))
    return _iou_from_counts(*_overlaps(s, y, m))


def pairwise_dice(a: MaskLike, b: MaskLike, num_classes: int | None = None) -> np.ndarray:
    """Dice of every mask of ``a`` with every mask of ``b``: (N, A) float64, ``Dice(∅, ∅) = 1``.

    Same arguments and class convention as :func:`pairwise_iou`.
    """
    s, y, m = _check_pair(a, b, num_classes, names=("a", "b"))
    return _dice_from_counts(*_overlaps(s, y, m))


def generalized_energy_distance(
    samples: MaskLike, annotations: MaskLike, num_classes: int | None = None, return_terms: bool = False
) -> float | GEDTerms:
    """Generalised energy distance ``D²_GED`` between a sample set and an annotation set.

    ``D² = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d = 1 - IoU`` (Kohl et al. 2018,
    Eq. 4; reported as D², without square root). Each expectation runs over ALL ordered pairs,
    i = j included (divide by N·A, N², A²), as in the PHiSeg and CCDM code, so the GED of a
    set against itself is exactly 0.

    Args:
        samples: model samples (N, *spatial), binary or label map.
        annotations: expert annotations (A, *spatial), same spatial shape.
        num_classes: None or 2 for binary masks; M > 2 for label maps.
        return_terms: also return the three expectations, as a :class:`GEDTerms`.

    Returns:
        GED as a float in [0, 2] (lower is better), or :class:`GEDTerms` when ``return_terms``.

    Example:
        >>> s = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=bool)
        >>> generalized_energy_distance(s, s)
        0.0
    """
    s, y, m = _check_pair(samples, annotations, num_classes)
    n = s.shape[0]
    # one product over the joined set gives the S-S, S-Y and Y-Y blocks together
    joined = np.concatenate([s, y])
    iou = _iou_from_counts(*_overlaps(joined, joined, m))
    terms = _ged_from_iou(iou[:n, :n], iou[:n, n:], iou[n:, n:])
    return terms if return_terms else terms.ged


def hungarian_matched_iou(samples: MaskLike, annotations: MaskLike, num_classes: int | None = None) -> float:
    """Hungarian-matched IoU (HM-IoU) of a sample set and an annotation set.

    Both sets are repeated to ``L = lcm(N, A)`` items, matched one-to-one by
    ``scipy.optimize.linear_sum_assignment`` on the cost ``d = 1 - IoU``, and the IoU of the L
    matched pairs is averaged (Kohl et al. 2019 §4; for LIDC, A = 4 divides N = 16 or 32, so
    this is "annotations repeated to N").

    Args:
        samples: model samples (N, *spatial), binary or label map.
        annotations: expert annotations (A, *spatial), same spatial shape.
        num_classes: None or 2 for binary masks; M > 2 for label maps.

    Returns:
        HM-IoU in [0, 1] (higher is better).

    Example:
        >>> s = np.array([[[1, 0], [0, 0]], [[0, 1], [0, 0]]], dtype=bool)
        >>> hungarian_matched_iou(s, s[::-1])
        1.0
    """
    s, y, m = _check_pair(samples, annotations, num_classes)
    return _hungarian_from_iou(_iou_from_counts(*_overlaps(s, y, m)))


def maximum_dice_matching(samples: MaskLike, annotations: MaskLike, num_classes: int | None = None) -> float:
    """Maximum Dice matching (MDM): mean over annotations of the best Dice among the samples.

    ``MDM = (1/A) Σ_j max_i Dice(S_i, Y_j)``, ``Dice(∅, ∅) = 1``. The HSRDiff paper cites no
    formula; this is the usual definition (cf. ``D_max`` of Rahman et al. 2023, CIMD).

    Args:
        samples: model samples (N, *spatial), binary or label map.
        annotations: expert annotations (A, *spatial), same spatial shape.
        num_classes: None or 2 for binary masks; M > 2 for label maps.

    Returns:
        MDM in [0, 1] (higher is better).

    Example:
        >>> s = np.array([[[1, 1], [0, 0]]], dtype=bool)
        >>> y = np.array([[[1, 0], [0, 0]]], dtype=bool)
        >>> round(maximum_dice_matching(s, y), 4)
        0.6667
    """
    s, y, m = _check_pair(samples, annotations, num_classes)
    return _mean(_dice_from_counts(*_overlaps(s, y, m)).max(0))


def fused_iou(
    samples: MaskLike, annotations: MaskLike, num_classes: int | None = None, tie_is_foreground: bool = False
) -> float:
    """IoU of the fused prediction (the mean of the samples) against the annotators' majority vote.

    Binary: the fused prediction is ``mean(S) > 0.5`` and the consensus is ``mean(Y) > 0.5``
    (strictly more than half of the samples / annotators, so 2 of 4 annotators is background);
    ``tie_is_foreground=True`` uses ``>= 0.5`` for both (2 of 4 is foreground, the LIDC "50 %
    consensus"). Label maps: per-pixel plurality vote (argmax of the class frequencies, which is
    the argmax of the averaged one-hot samples); ties go to the lowest class index, and
    background loses its ties when ``tie_is_foreground``. ``IoU(∅, ∅) = 1``; label maps use the
    foreground-class mean of :func:`pairwise_iou`.

    Args:
        samples: model samples (N, *spatial), binary or label map.
        annotations: expert annotations (A, *spatial), same spatial shape.
        num_classes: None or 2 for binary masks; M > 2 for label maps.
        tie_is_foreground: how an exact half-half vote is decided (see above). Default False.

    Returns:
        IoU in [0, 1] (higher is better).

    Example:
        >>> s = np.array([[[1, 1]], [[1, 0]], [[0, 0]]], dtype=bool)  # (3, 1, 2)
        >>> y = np.array([[[1, 0]], [[1, 1]]], dtype=bool)  # (2, 1, 2)
        >>> fused_iou(s, y)  # fused [1, 0]; consensus (2 of 2 / 1 of 2) [1, 0]
        1.0
    """
    s, y, m = _check_pair(samples, annotations, num_classes)
    fused, consensus = _vote(s, m, tie_is_foreground), _vote(y, m, tie_is_foreground)
    return float(_iou_from_counts(*_overlaps(fused, consensus, m))[0, 0])


def entropy_map(samples: MaskLike, num_classes: int | None = None) -> np.ndarray:
    """Per-pixel entropy of the sample mean, in bits (log base 2).

    Binary: ``H = -p log2 p - (1-p) log2(1-p)`` with ``p`` the fraction of samples marking the
    pixel; 0 where all samples agree, 1 bit where they split evenly. Label maps: ``H = -Σ_c f_c
    log2 f_c`` over the per-class frequencies, at most ``log2(M)`` bits. ``0 log 0 = 0``.

    Args:
        samples: model samples (N, *spatial), binary or label map.
        num_classes: None or 2 for binary masks; M > 2 for label maps.

    Returns:
        float64 array (*spatial), values in [0, log2(max(M, 2))].

    Example:
        >>> s = np.array([[[1, 1]], [[1, 0]]], dtype=bool)  # (2, 1, 2)
        >>> entropy_map(s)
        array([[0., 1.]])
    """
    m = _check_num_classes(num_classes)
    x = _check_masks(samples, "samples", m)
    if m is None:
        p = x.mean(0, dtype=np.float64)
        freqs = np.stack([p, 1.0 - p])
    else:
        freqs = np.stack([(x == c).mean(0, dtype=np.float64) for c in range(m)])
    safe = np.where(freqs > 0, freqs, 1.0)
    return -(freqs * np.log2(safe)).sum(0) + 0.0  # + 0.0 turns -0.0 into 0.0


def sample_set_metrics(
    samples: MaskLike,
    annotations: MaskLike,
    num_samples: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    tie_is_foreground: bool = False,
) -> dict[str, float]:
    """GED, HM-IoU, MDM and fused IoU for the first n samples, for each n in ``num_samples``.

    The pairwise matrices of the full sample set are computed once; the metrics for n < N use
    their leading n×n / n×A blocks, so GED_16 and GED_32 cost one overlap computation.

    Args:
        samples: model samples (N, *spatial), binary or label map.
        annotations: expert annotations (A, *spatial), same spatial shape.
        num_samples: sample-set sizes n (each 1 <= n <= N) or None for n = N.
        num_classes: None or 2 for binary masks; M > 2 for label maps.
        tie_is_foreground: tie rule of :func:`fused_iou`.

    Returns:
        dict with keys ``ged_{n}``, ``hm_iou_{n}``, ``mdm_{n}``, ``fused_iou_{n}``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s, y = rng.random((32, 8, 8)) > 0.5, rng.random((4, 8, 8)) > 0.5
        >>> sorted(sample_set_metrics(s, y, num_samples=(16, 32)))[:2]
        ['fused_iou_16', 'fused_iou_32']
    """
    s, y, m = _check_pair(samples, annotations, num_classes)
    n_all = s.shape[0]
    sizes = [n_all] if num_samples is None else [num_samples] if isinstance(num_samples, int) else list(num_samples)
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= n_all:
            raise ValueError(
                f"num_samples must be integers in 1..{n_all} (the number of samples); got {num_samples!r}."
            )
    joined = np.concatenate([s, y])
    counts = _overlaps(joined, joined, m)
    iou, dice = _iou_from_counts(*counts), _dice_from_counts(*counts)
    out: dict[str, float] = {}
    for n in sizes:
        n = int(n)
        out[f"ged_{n}"] = _ged_from_iou(iou[:n, :n], iou[:n, n_all:], iou[n_all:, n_all:]).ged
        out[f"hm_iou_{n}"] = _hungarian_from_iou(iou[:n, n_all:])
        out[f"mdm_{n}"] = _mean(dice[:n, n_all:].max(0))
        fused, consensus = _vote(s[:n], m, tie_is_foreground), _vote(y, m, tie_is_foreground)
        out[f"fused_iou_{n}"] = float(_iou_from_counts(*_overlaps(fused, consensus, m))[0, 0])
    return out
