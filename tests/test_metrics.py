"""Sample-set metrics against hand-computed cases (expected numbers worked out from the definitions
in docs/metrics.md, written out below; never produced by the code under test)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler

from monai_hsrdiff.metrics import (
    FusedIoUMetric,
    GEDMetric,
    HMIoUMetric,
    MDMMetric,
    entropy_map,
    fused_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    maximum_dice_matching,
    pairwise_dice,
    pairwise_iou,
    sample_set_metrics,
)


def masks(*rows) -> np.ndarray:
    """masks("10/00", "11/00") -> (2, 2, 2) bool; '/' separates image rows."""
    return np.array([[[c == "1" for c in r] for r in m.split("/")] for m in rows], dtype=bool)


def labels(*rows) -> np.ndarray:
    """labels("12/00") -> (1, 2, 2) int64 label maps."""
    return np.array([[[int(c) for c in r] for r in m.split("/")] for m in rows], dtype=np.int64)


# ----------------------------------------------------------------------------- hand cases


def test_identical_sets_ged_exactly_zero():
    s = masks("10/00", "11/00", "00/00", "01/11")
    assert generalized_energy_distance(s, s) == 0.0
    # a permuted copy too: the expectations are order-free sums
    assert generalized_energy_distance(s, s[[2, 0, 3, 1]]) == 0.0
    assert hungarian_matched_iou(s, s[::-1]) == pytest.approx(1.0)
    assert maximum_dice_matching(s, s) == 1.0


def test_disjoint_masks():
    s, y = masks("10/00"), masks("01/00")
    # d(S,Y)=1, d(S,S)=d(Y,Y)=0 -> GED = 2*1 - 0 - 0
    assert generalized_energy_distance(s, y) == 2.0
    assert hungarian_matched_iou(s, y) == 0.0
    assert maximum_dice_matching(s, y) == 0.0
    assert fused_iou(s, y) == 0.0
    np.testing.assert_array_equal(pairwise_iou(s, y), [[0.0]])


def test_all_empty_samples_and_annotations():
    s, y = np.zeros((3, 2, 2), bool), np.zeros((2, 2, 2), bool)
    assert generalized_energy_distance(s, y) == 0.0
    assert hungarian_matched_iou(s, y) == 1.0
    assert maximum_dice_matching(s, y) == 1.0
    assert fused_iou(s, y) == 1.0
    np.testing.assert_array_equal(pairwise_iou(s, y), np.ones((3, 2)))
    np.testing.assert_array_equal(pairwise_dice(s, y), np.ones((3, 2)))
    np.testing.assert_array_equal(entropy_map(s), np.zeros((2, 2)))


def test_one_empty_annotation_among_four():
    s = masks("11/00", "00/00")  # s1 = {a,b}, s2 = ∅
    y = masks("11/00", "11/00", "10/00", "00/00")  # y1 = y2 = {a,b}, y3 = {a}, y4 = ∅
    # IoU(s1, y) = [1, 1, 1/2, 0]; IoU(∅, y) = [0, 0, 0, 1]
    np.testing.assert_allclose(pairwise_iou(s, y), [[1, 1, 0.5, 0], [0, 0, 0, 1]])
    # E d(S,Y) = (0+0+.5+1 + 1+1+1+0)/8 = 0.5625; E d(S,S') = 2/4; E d(Y,Y') = 8/16
    terms = generalized_energy_distance(s, y, return_terms=True)
    assert terms.cross == pytest.approx(0.5625)
    assert terms.samples == pytest.approx(0.5)
    assert terms.annotations == pytest.approx(0.5)
    assert terms.ged == pytest.approx(0.125)
    # L = lcm(2,4) = 4: s1,s1 -> y1,y2 (1+1), s2,s2 -> y4,y3 (1+0) -> 3/4
    assert hungarian_matched_iou(s, y) == pytest.approx(0.75)
    # max Dice per annotation: y1 1, y2 1, y3 2/3 (s1), y4 1 (∅ vs ∅) -> 11/12
    assert maximum_dice_matching(s, y) == pytest.approx(11 / 12)
    # fused: mean(S) = 1/2 on a and b. consensus: a 3/4, b 2/4.
    # strict (> 0.5): fused ∅, consensus {a} -> 0; ties foreground: {a,b} vs {a,b} -> 1
    assert fused_iou(s, y) == 0.0
    assert fused_iou(s, y, tie_is_foreground=True) == 1.0


def test_unequal_set_sizes_lcm_six():
    s = masks("10/00", "11/00", "00/11")  # {a}, {a,b}, {c,d}
    y = masks("10/00", "00/10")  # {a}, {c}
    np.testing.assert_allclose(pairwise_iou(s, y), [[1, 0], [0.5, 0], [0, 0.5]])
    # E d(S,Y) = (0+1 + .5+1 + 1+.5)/6 = 2/3; E d(S,S') = 2*(.5+1+1)/9 = 5/9; E d(Y,Y') = 2/4
    # GED = 4/3 - 5/9 - 1/2 = 5/18
    assert generalized_energy_distance(s, y) == pytest.approx(5 / 18)
    # L = 6, each sample twice, each annotation three times: s1,s1,s2 -> y1 (1+1+.5), s2,s3,s3 -> y2 (0+.5+.5)
    assert hungarian_matched_iou(s, y) == pytest.approx(3.5 / 6)
    # MDM: y1 best Dice 1 (s1); y2 best Dice 2*1/(2+1) (s3) -> (1 + 2/3)/2
    assert maximum_dice_matching(s, y) == pytest.approx(5 / 6)
    # fused: a 2/3 -> {a}; consensus: a 1/2, c 1/2 -> ∅ (strict) or {a, c} (ties foreground)
    assert fused_iou(s, y) == 0.0
    assert fused_iou(s, y, tie_is_foreground=True) == pytest.approx(0.5)


def _naive_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter, union = int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else inter / union


@pytest.mark.parametrize("n,a", [(3, 2), (4, 2), (2, 3)])
def test_hm_iou_equals_brute_force_over_permutations(n, a):
    rng = np.random.default_rng(10 * n + a)
    for _ in range(3):
        s, y = rng.random((n, 3, 3)) > 0.5, rng.random((a, 3, 3)) > 0.6
        big = math.lcm(n, a)
        s_t, y_t = [s[i % n] for i in range(big)], [y[j % a] for j in range(big)]
        best = max(
            sum(_naive_iou(s_t[i], y_t[p]) for i, p in enumerate(perm)) / big
            for perm in itertools.permutations(range(big))
        )
        assert hungarian_matched_iou(s, y) == pytest.approx(best, abs=1e-12)


def test_invariant_to_sample_order():
    rng = np.random.default_rng(0)
    s, y = rng.random((8, 6, 6)) > 0.5, rng.random((4, 6, 6)) > 0.5
    perm = rng.permutation(8)
    assert generalized_energy_distance(s[perm], y) == generalized_energy_distance(s, y)
    assert maximum_dice_matching(s[perm], y) == maximum_dice_matching(s, y)
    assert fused_iou(s[perm], y) == fused_iou(s, y)
    assert hungarian_matched_iou(s[perm], y) == pytest.approx(hungarian_matched_iou(s, y), abs=1e-12)
    # ... and to annotation order
    assert generalized_energy_distance(s, y[::-1]) == generalized_energy_distance(s, y)


def test_mdm_hand_case():
    s = masks("11/00", "01/11")  # {a,b}, {b,c,d}
    y = masks("10/00", "01/01", "00/00")  # {a}, {b,d}, ∅
    # Dice(s1,·) = [2/3, 2/4, 0]; Dice(s2,·) = [0, 4/5, 0]
    np.testing.assert_allclose(pairwise_dice(s, y), [[2 / 3, 0.5, 0], [0, 0.8, 0]])
    assert maximum_dice_matching(s, y) == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_entropy_map_bits():
    s = masks("10/11", "10/10", "10/00", "10/00")  # fractions: a 1, b 0, c 2/4, d 1/4
    h = entropy_map(s)
    assert h.shape == (2, 2)
    assert h[0, 0] == 0.0 and h[0, 1] == 0.0  # all agree
    assert h[1, 0] == 1.0  # even split: exactly one bit
    assert h[1, 1] == pytest.approx(0.8112781244591328)  # H(1/4) = 1/4·2 + 3/4·log2(4/3)
    # label maps: one sample per class of 3 -> log2 3; classes {0,0,1,2} -> 1.5 bits
    lab = np.array([[[0, 0]], [[1, 0]], [[2, 1]], [[2, 2]]])  # (4, 1, 2)
    np.testing.assert_allclose(entropy_map(lab[:3, :, :1], num_classes=3), [[math.log2(3)]])
    np.testing.assert_allclose(entropy_map(lab[:, :, 1:], num_classes=3), [[1.5]])
    # torch input and (N, D, H, W) volumes
    vol = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    vol[0, 1, 1, 1] = True
    h3 = entropy_map(vol)
    assert h3.shape == (2, 2, 2) and h3[1, 1, 1] == 1.0 and h3.sum() == 1.0


def test_multiclass_iou_absent_class_counts_one():
    a = labels("11/00", "12/00", "22/00", "00/00")
    b = labels("10/00", "11/00", "00/00")
    # per-class IoU (class 1, class 2), absent from both = 1, averaged over the two foreground classes
    expected = [
        [(1 / 2 + 1) / 2, (1 + 1) / 2, (0 + 1) / 2],  # a1 = {1: ab}
        [(1 + 0) / 2, (1 / 2 + 0) / 2, (0 + 0) / 2],  # a2 = {1: a, 2: b}
        [(0 + 0) / 2, (0 + 0) / 2, (1 + 0) / 2],  # a3 = {2: ab}
        [(0 + 1) / 2, (0 + 1) / 2, (1 + 1) / 2],  # a4 = all background
    ]
    np.testing.assert_allclose(pairwise_iou(a, b, num_classes=3), expected)
    assert generalized_energy_distance(a, a, num_classes=3) == 0.0
    # num_classes=2 on {0,1} label maps is the binary metric
    bin_a, bin_b = masks("11/00", "01/10"), masks("10/00", "11/11")
    np.testing.assert_allclose(
        pairwise_iou(bin_a.astype(np.int64), bin_b.astype(np.int64), num_classes=2), pairwise_iou(bin_a, bin_b)
    )


def test_multiclass_fused_iou():
    s = labels("12/00", "12/20", "20/00")  # plurality: [[1, 2], [0, 0]]
    y = labels("12/00", "10/00")  # pixel b: 2 vs 0, a tie
    # strict: consensus [[1, 0], [0, 0]] -> class 1: 1, class 2: {b} vs ∅ -> 0 -> 0.5
    assert fused_iou(s, y, num_classes=3) == pytest.approx(0.5)
    # background loses ties: consensus [[1, 2], [0, 0]] -> 1
    assert fused_iou(s, y, num_classes=3, tie_is_foreground=True) == 1.0


def test_numpy_torch_and_int_inputs_agree():
    rng = np.random.default_rng(3)
    s, y = rng.random((5, 4, 4)) > 0.5, rng.random((3, 4, 4)) > 0.5
    ref = generalized_energy_distance(s, y)
    assert generalized_energy_distance(torch.from_numpy(s), torch.from_numpy(y)) == ref
    assert generalized_energy_distance(s.astype(np.uint8), y.astype(np.int32)) == ref
    assert generalized_energy_distance(torch.from_numpy(s).float(), y.astype(np.float64)) == ref


def test_sample_set_metrics_uses_first_n_samples():
    rng = np.random.default_rng(1)
    s, y = rng.random((8, 5, 5)) > 0.5, rng.random((4, 5, 5)) > 0.5
    out = sample_set_metrics(s, y, num_samples=(4, 8))
    for n in (4, 8):
        assert out[f"ged_{n}"] == pytest.approx(generalized_energy_distance(s[:n], y), abs=1e-12)
        assert out[f"hm_iou_{n}"] == pytest.approx(hungarian_matched_iou(s[:n], y), abs=1e-12)
        assert out[f"mdm_{n}"] == pytest.approx(maximum_dice_matching(s[:n], y), abs=1e-12)
        assert out[f"fused_iou_{n}"] == pytest.approx(fused_iou(s[:n], y), abs=1e-12)
    assert out["ged_4"] != out["ged_8"]
    with pytest.raises(ValueError, match=r"1\.\.8"):
        sample_set_metrics(s, y, num_samples=9)


# ----------------------------------------------------------------------------- bad input

GOOD = masks("10/00", "11/00")


@pytest.mark.parametrize(
    "samples,annotations,match",
    [
        (GOOD, np.zeros((2, 3, 3), bool), r"samples have shape \(2, 2, 2\).*annotations \(2, 3, 3\)"),
        (np.zeros((0, 2, 2), bool), GOOD, "samples is an empty set"),
        (GOOD, np.zeros((0, 2, 2), bool), "annotations is an empty set"),
        (GOOD[0], GOOD, r"samples must have shape \(N, \*spatial\).*got shape \(2, 2\)"),
        (GOOD, np.array([[[0, 0.5], [1, 0]]]), r"annotations must be binary.*found values \[0\.5\]"),
        (np.array([[[0, 2], [1, 0]]]), GOOD, r"samples must be binary.*found values \[2\]"),
        (np.array([[[-1, 1], [1, -1]]]), GOOD, r"found values \[-1\].*x > 0"),
        (np.array([[[np.nan, 1], [1, 0]]]), GOOD, "samples contains NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(samples, annotations, match):
    for fn in (generalized_energy_distance, hungarian_matched_iou, maximum_dice_matching, fused_iou):
        with pytest.raises(ValueError, match=match):
            fn(samples, annotations)
    # pairwise_iou names its own arguments
    with pytest.raises(ValueError, match=match.replace("samples", "a").replace("annotations", "b")):
        pairwise_iou(samples, annotations)


def test_bad_label_maps_and_num_classes():
    with pytest.raises(ValueError, match=r"a label values must lie in 0\.\.2.*found values \[3\]"):
        pairwise_iou(labels("13/00"), labels("12/00"), num_classes=3)
    with pytest.raises(ValueError, match=r"integer label map.*\[1\.5\]"):
        pairwise_iou(np.array([[[1.5, 0.0]]]), labels("10"), num_classes=3)
    with pytest.raises(ValueError, match="num_classes=1"):
        generalized_energy_distance(GOOD, GOOD, num_classes=1)
    with pytest.raises(ValueError, match="samples contains NaN"):
        entropy_map(np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        entropy_map(np.zeros(4, bool))


# ----------------------------------------------------------------------------- MONAI / Ignite


def _batches(seed: int = 0, n_batches: int = 3, b: int = 2, n: int = 6, a: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pred": torch.rand(b, n, size, size, generator=g) > 0.5,
            "label": torch.rand(b, a, size, size, generator=g) > 0.6,
        }
        for _ in range(n_batches)
    ]


def test_ignite_metric_handler_aggregates_per_image_mean():
    data = _batches()
    engine = Engine(lambda eng, batch: batch)
    transform = lambda out: (out["pred"], out["label"])  # noqa: E731
    IgniteMetricHandler(metric_fn=GEDMetric(), output_transform=transform).attach(engine, "ged")
    IgniteMetricHandler(metric_fn=HMIoUMetric(num_samples=4), output_transform=transform).attach(engine, "hm_iou_4")
    IgniteMetricHandler(metric_fn=MDMMetric(), output_transform=transform).attach(engine, "mdm")
    IgniteMetricHandler(metric_fn=FusedIoUMetric(), output_transform=transform).attach(engine, "fused_iou")
    engine.run(data, max_epochs=1)

    pairs = [(p, y) for batch in data for p, y in zip(batch["pred"], batch["label"])]
    expected = {
        "ged": np.mean([generalized_energy_distance(p, y) for p, y in pairs]),
        "hm_iou_4": np.mean([hungarian_matched_iou(p[:4], y) for p, y in pairs]),
        "mdm": np.mean([maximum_dice_matching(p, y) for p, y in pairs]),
        "fused_iou": np.mean([fused_iou(p, y) for p, y in pairs]),
    }
    for key, value in expected.items():
        assert engine.state.metrics[key] == pytest.approx(value, rel=1e-6), key
    assert engine.state.metric_details["ged"].shape == (6, 1)
    # the N=16-style subset really differs from scoring all samples
    assert expected["hm_iou_4"] != pytest.approx(np.mean([hungarian_matched_iou(p, y) for p, y in pairs]))


def test_cumulative_metric_lists_reductions_and_errors():
    batch = _batches(seed=1, n_batches=1, b=3)[0]
    metric = MDMMetric(reduction="none")
    per_image = metric(list(batch["pred"]), list(batch["label"]))  # decollated channel-first items
    assert per_image.shape == (3, 1)
    np.testing.assert_allclose(
        metric.aggregate().numpy()[:, 0],
        [maximum_dice_matching(p, y) for p, y in zip(batch["pred"], batch["label"])],
        rtol=1e-6,
    )
    assert metric.aggregate("sum").item() == pytest.approx(per_image.sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"GEDMetric: num_samples=7 but y_pred holds only N=6"):
        GEDMetric(num_samples=7)(batch["pred"], batch["label"])
    with pytest.raises(ValueError, match="GEDMetric: the annotations y"):
        GEDMetric()(batch["pred"])
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        GEDMetric(num_samples=0)
    with pytest.raises(ValueError, match=r"expected y_pred \(B, N, \*spatial\)"):
        GEDMetric()(batch["pred"][0], batch["label"][0])


def test_mean_entropy_metric_is_the_mean_of_the_entropy_map():
    from monai_hsrdiff.metrics import MeanEntropyMetric

    # image 0: 4 samples, pixel (0,0) split 2/2 (1 bit), the other 3 pixels agree (0 bits) -> 0.25
    # image 1: all samples agree everywhere -> 0
    s = torch.zeros(2, 4, 2, 2, dtype=torch.bool)
    s[0, :2, 0, 0] = True
    s[1, :, 1, 1] = True
    metric = MeanEntropyMetric()
    per_image = metric(s, torch.zeros(2, 1, 2, 2, dtype=torch.bool))
    assert per_image.flatten().tolist() == pytest.approx([0.25, 0.0])
    assert float(metric.aggregate()) == pytest.approx(0.125)
    # num_samples=2 keeps the first two samples, which agree -> 0
    assert float(MeanEntropyMetric(num_samples=2)(s, torch.zeros(2, 1, 2, 2)).sum()) == 0.0
