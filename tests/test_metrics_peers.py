"""The newest peers' evaluation protocol (issue 14 item 4): ECE of the sample mean against the reader
mean and GED over 100 samples, against hand-computed cases and brute force; their bundle wiring
(GED100 opt-in) and the metrics.json an evaluation writes. Conventions: docs/metrics.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_hsrdiff.errors import BundleError
from monai_hsrdiff.metrics import ECEMetric, GEDMetric, expected_calibration_error, generalized_energy_distance

REPO = Path(__file__).resolve().parents[1]


def masks(*rows) -> np.ndarray:
    """masks("10/00", "11/00") -> (2, 2, 2) bool; '/' separates image rows."""
    return np.array([[[c == "1" for c in r] for r in m.split("/")] for m in rows], dtype=bool)


def labels(*rows) -> np.ndarray:
    """labels("120") -> (1, 1, 3) int64 label maps."""
    return np.array([[[int(c) for c in r] for r in m.split("/")] for m in rows], dtype=np.int64)


# ----------------------------------------------------------------------------- ECE by hand


def test_ece_binary_hand_case():
    # five pixels in a row; N = 4 samples, A = 2 readers
    s = masks("11100", "11010", "10000", "10000")  # p = [1, 0.5, 0.25, 0.25, 0]
    y = masks("10100", "10000")  # q = [1, 0, 0.5, 0, 0]
    # bins of width 0.1: p=1 -> bin 9 (gap 0); p=0.5 -> bin 4 (0.4, 0.5] (gap 0.5);
    # p=0.25, 0.25 -> bin 2, mean p 0.25, mean q (0.5 + 0) / 2 = 0.25 (gap 0: they cancel); p=0 -> bin 0 (gap 0)
    # all pixels: (1*0 + 1*0.5 + 2*0 + 1*0) / 5 = 0.1 (a per-pixel |p - q| mean would give 0.2)
    assert expected_calibration_error(s, y) == pytest.approx(0.1, rel=1e-6)
    # foreground: pixel 4 is empty in every sample and annotation, 0.5 / 4
    assert expected_calibration_error(s, y, region="foreground") == pytest.approx(0.125, rel=1e-6)
    # one bin: |mean p - mean q| = |2/5 - 1.5/5|
    assert expected_calibration_error(s, y, n_bins=1) == pytest.approx(0.1, rel=1e-6)
    # torch input (any dtype) gives the same
    assert expected_calibration_error(torch.from_numpy(s).float(), torch.from_numpy(y)) == pytest.approx(0.1, rel=1e-6)


def test_ece_bin_edges_left_open():
    # N = 20 samples, A = 4 readers, three pixels: p = [2/20, 0, 3/20], q = [0, 1/4, 0]
    s = np.zeros((20, 1, 3), dtype=bool)
    s[:2, 0, 0] = True
    s[:3, 0, 2] = True
    y = np.zeros((4, 1, 3), dtype=bool)
    y[0, 0, 1] = True
    # p = 0.1 falls in bin 0 = [0, 0.1] with p = 0: |0.1 + 0 - 0 - 0.25| = 0.15; bin 1 (0.1, 0.2]: |0.15 - 0| = 0.15
    # -> (0.15 + 0.15) / 3 = 0.1 (were 0.1 in bin 1: (0.25 + |0.25 - 0|) / 3 = 1/6)
    assert expected_calibration_error(s, y) == pytest.approx(0.1, rel=1e-6)
    assert expected_calibration_error(s, y, region="foreground") == pytest.approx(0.1, rel=1e-6)  # every pixel marked
    # one bin: sum p = 0.25 = sum q -> 0
    assert expected_calibration_error(s, y, n_bins=1) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_every_sample_fraction_lands_in_its_bin(n_bins):
    """p = k/N in float32 (as the ECE computes it) reaches MONAI's binning in the bin of the exact
    rule max(ceil(n_bins * k / N) - 1, 0): edges right-closed, no float32 edge lands a bin off."""
    from monai.metrics import calibration_binning

    for n in [*range(1, 257), 1000, 4096]:
        k = np.arange(n + 1)
        p = torch.from_numpy(k.astype(np.float32) / np.float32(n)).reshape(1, 1, -1)
        counts = calibration_binning(p, p, num_bins=n_bins)[2].flatten().numpy()
        exact = np.bincount(np.maximum(-((-n_bins * k) // n) - 1, 0), minlength=n_bins)
        np.testing.assert_array_equal(counts, exact, err_msg=f"N={n}")


def test_ece_multiclass_hand_case():
    s = labels("120", "100")  # N = 2
    y = labels("020")  # A = 1
    # class 1: p = [1, 0, 0], q = [0, 0, 0]: bin 9 gap 1 -> all 1/3, foreground (pixel 0 only) 1
    # class 2: p = [0, 0.5, 0], q = [0, 1, 0]: bin 4 gap 0.5 -> all 0.5/3, foreground (pixel 1 only) 0.5
    assert expected_calibration_error(s, y, num_classes=3) == pytest.approx((1 / 3 + 1 / 6) / 2, rel=1e-6)
    assert expected_calibration_error(s, y, num_classes=3, region="foreground") == pytest.approx(0.75, rel=1e-6)
    # a fourth class absent from every mask scores 0 in the foreground-class mean
    assert expected_calibration_error(s, y, num_classes=4) == pytest.approx(0.5 / 3, rel=1e-6)
    assert expected_calibration_error(s, y, num_classes=4, region="foreground") == pytest.approx(0.5, rel=1e-6)


def test_ece_empty_and_calibrated_sets_score_zero():
    empty_s, empty_y = masks("00/00", "00/00"), masks("00/00")
    for region in ("all", "foreground"):
        assert expected_calibration_error(empty_s, empty_y, region=region) == 0.0
    # samples = the readers repeated: p = q at every pixel
    y = masks("10/01", "11/00", "00/00", "01/11")
    assert expected_calibration_error(np.concatenate([y] * 3), y) == 0.0
    assert expected_calibration_error(np.concatenate([y] * 3), y, region="foreground") == 0.0


def _ece_brute_force(s: np.ndarray, y: np.ndarray, n_bins: int, foreground: bool) -> float:
    """Exact rational ECE: bin b of p = k/N holds b/n_bins < p <= (b+1)/n_bins (bin 0 also holds 0)."""
    n, a = s.shape[0], y.shape[0]
    k, j = s.reshape(n, -1).sum(0), y.reshape(a, -1).sum(0)
    keep = (k > 0) | (j > 0) if foreground else np.ones_like(k, dtype=bool)
    if not keep.any():
        return 0.0
    k, j = k[keep], j[keep]
    bins = np.maximum(-((-n_bins * k) // n) - 1, 0)  # ceil(n_bins * k / N) - 1, in integers
    total = sum(abs(int((a * k[bins == b] - n * j[bins == b]).sum())) for b in range(n_bins))
    return total / (n * a * k.size)


@pytest.mark.parametrize("n, a, n_bins", [(32, 4, 10), (16, 2, 10), (100, 4, 15), (7, 3, 4)])
def test_ece_equals_exact_brute_force(n, a, n_bins):
    rng = np.random.default_rng(n * a)
    # a blob with ragged borders, so that p spreads over many bins
    base = np.zeros((12, 12), dtype=bool)
    base[3:9, 2:10] = True
    s = base[None] & (rng.random((n, 12, 12)) > 0.3) | (rng.random((n, 12, 12)) > 0.97)
    y = base[None] & (rng.random((a, 12, 12)) > 0.4)
    for foreground in (False, True):
        region = "foreground" if foreground else "all"
        expected = _ece_brute_force(s, y, n_bins, foreground)
        assert expected > 0.01
        assert expected_calibration_error(s, y, n_bins=n_bins, region=region) == pytest.approx(expected, rel=1e-5)


def test_ece_metric_first_n_samples_and_errors():
    s = torch.from_numpy(masks("11100", "11010", "10000", "10000", "00000", "00000"))[None]  # (1, 6, 1, 5)
    y = torch.from_numpy(masks("10100", "10000"))[None]
    metric = ECEMetric(num_samples=4)
    assert metric(s, y).flatten().tolist() == pytest.approx([0.1], rel=1e-6)  # the hand case above
    assert float(metric.aggregate()) == pytest.approx(0.1, rel=1e-6)
    # all 6 samples: p = [4/6, 2/6, 1/6, 1/6, 0]: bins 6, 3, 1, 1, 0 -> (|4/6 - 1| + 2/6 + |2/6 - 0.5| + 0) / 5
    assert float(ECEMetric()(s, y)) == pytest.approx((1 / 3 + 1 / 3 + 1 / 6) / 5, rel=1e-6)
    with pytest.raises(ValueError, match="ECEMetric: region must be one of"):
        ECEMetric(region="fg")
    with pytest.raises(ValueError, match="ECEMetric: n_bins must be an integer >= 1"):
        ECEMetric(n_bins=0)
    with pytest.raises(ValueError, match="region must be one of"):
        expected_calibration_error(s[0], y[0], region="union")
    with pytest.raises(ValueError, match="samples and annotations must share their spatial shape"):
        expected_calibration_error(s[0], y[0, :, :, :4])


# ----------------------------------------------------------------------------- GED over 100 samples


def test_ged100_closed_form_uses_the_first_100_samples():
    a, b = masks("1100/0000"), masks("0000/0011")  # disjoint, non-empty
    s = np.concatenate([np.repeat(a, 50, 0), np.repeat(b, 54, 0)])  # 104 samples: 50 a, then 54 b
    y = np.repeat(a, 4, 0)
    # first 100: E d(S,Y) = 50/100; E d(S,S') = (2 * 50 * 50) / 100**2 = 0.5 (i = j pairs included); E d(Y,Y') = 0
    # GED100 = 2 * 0.5 - 0.5 - 0 = 0.5 (an unbiased U-statistic would give 2*0.5 - 5000/9900)
    ged100 = GEDMetric(num_samples=100)(torch.from_numpy(s)[None], torch.from_numpy(y)[None])
    assert float(ged100) == 0.5
    # all 104: 2 * 54/104 - 2 * 50 * 54 / 104**2
    assert float(GEDMetric()(torch.from_numpy(s)[None], torch.from_numpy(y)[None])) == pytest.approx(
        2 * 54 / 104 - 2 * 50 * 54 / 104**2, rel=1e-6
    )
    # the readers repeated 25 times: the same distribution, GED 0
    readers = masks("1100/0000", "1000/0000", "0000/0000", "0110/0110")
    assert generalized_energy_distance(np.concatenate([readers] * 25), readers) == pytest.approx(0.0, abs=1e-12)


def _ged_brute_force(s: np.ndarray, y: np.ndarray) -> float:
    def d(u: np.ndarray, v: np.ndarray) -> float:
        union = np.logical_or(u, v).sum()
        return 0.0 if union == 0 else 1.0 - np.logical_and(u, v).sum() / union

    cross = np.mean([d(u, v) for u in s for v in y])
    div_s = np.mean([d(u, v) for u in s for v in s])
    div_y = np.mean([d(u, v) for u in y for v in y])
    return 2 * cross - div_s - div_y


def test_ged100_equals_brute_force():
    rng = np.random.default_rng(100)
    s = rng.random((2, 104, 6, 6)) > 0.6
    s[0, 3] = False  # an empty sample among them
    y = rng.random((2, 4, 6, 6)) > 0.5
    y[1, 2] = False  # an empty reader
    values = GEDMetric(num_samples=100)(torch.from_numpy(s), torch.from_numpy(y)).flatten().tolist()
    for b in range(2):
        expected = _ged_brute_force(s[b, :100], y[b])
        assert values[b] == pytest.approx(expected, rel=1e-6)
        assert generalized_energy_distance(s[b, :100], y[b]) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- the bundles


def _parser(task: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / task / "train.json"), str(REPO / "bundles" / task / "evaluate.json")])
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("task", ["lidc", "ms_lesion"])
def test_bundle_evaluation_metrics_and_ged100_opt_in(task):
    parser = _parser(task)
    # default cost unchanged: 32 samples per item, no GED100
    assert parser["eval_ged100"] is False and parser["eval_num_samples"] == 32
    off = parser.get_parsed_content("validate#evaluator#additional_metrics")
    on = _parser(task, eval_ged100=True).get_parsed_content("validate#evaluator#additional_metrics")
    assert set(on) - set(off) == {"val_ged100"} and set(off) <= set(on)
    assert {"val_ged32", "val_hm_iou32", "val_mdm32", "val_ece32", "val_ece_fg32"} <= set(off)
    assert on["val_ged100"].metric_fn.num_samples == 100 and isinstance(on["val_ged100"].metric_fn, GEDMetric)
    ece, ece_fg = off["val_ece32"].metric_fn, off["val_ece_fg32"].metric_fn
    assert (ece.num_samples, ece.region, ece.n_bins) == (32, "all", 10)
    assert (ece_fg.num_samples, ece_fg.region, ece_fg.n_bins) == (32, "foreground", 10)
    # the start-up check runs in initialize, before the long work
    assert any("check_ged100(@eval_ged100, @eval_num_samples)" in step for step in parser["initialize"])


def test_check_ged100_names_both_keys(capsys):
    from monai_hsrdiff.engines.evaluator import check_ged100

    check_ged100(False, 32)
    check_ged100(True, 100)
    with pytest.raises(BundleError) as err:
        check_ged100(True, 32)
    assert "eval_ged100 is on, so eval_num_samples must be >= 100" in err.value.message
    assert "got eval_num_samples = 32" in err.value.message and "--eval_num_samples 100" in err.value.message
    assert "ERROR: eval_ged100" in capsys.readouterr().err
    with pytest.raises(BundleError) as err:
        check_ged100("yes", 100)
    assert "eval_ged100 = 'yes': must be a boolean" in err.value.message


def test_evaluation_writes_the_peer_metrics(tmp_path):
    """An HSRDiffEvaluator with the LIDC bundle's evaluation metrics (GED100 on) over a tiny network:
    metrics.json holds GED16/32/100, HM-IoU16/32, MDM16/32, ECE32 (all pixels and foreground) under
    test_* and the deprecated val_* names, each the functional's value on the evaluator's own samples."""
    from monai_hsrdiff.bundle import report_metrics
    from monai_hsrdiff.diffusion import DDIMSampler, DiffusionSchedule, HSRDiffPipeline, SelfRegulatedDiffusion
    from monai_hsrdiff.engines import HSRDiffEvaluator
    from monai_hsrdiff.metrics import hungarian_matched_iou, maximum_dice_matching
    from monai_hsrdiff.networks import HSRDiff

    torch.manual_seed(0)
    net = HSRDiff(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                  norm_num_groups=4, num_head_channels=8, num_res_blocks=1, prediction="srdiff")  # fmt: skip
    pipe = HSRDiffPipeline(net, DDIMSampler(SelfRegulatedDiffusion(DiffusionSchedule(250)), eta=1.0, num_inference_steps=2))
    readers = torch.zeros(1, 4, 8, 8)
    readers[0, :3, 2:6, 2:6] = 1.0  # three readers mark a square, the fourth none
    readers[0, 0, 2:6, 6] = 1.0
    batch = {"image": torch.randn(1, 1, 8, 8), "masks": readers}
    parser = _parser("lidc", eval_ged100=True)
    metrics = {
        "key_val_metric": parser.get_parsed_content("validate#evaluator#key_val_metric"),
        "additional_metrics": parser.get_parsed_content("validate#evaluator#additional_metrics"),
    }
    with pytest.raises(ValueError, match="metric 'val_ged100' scores 100 samples per image but num_samples=32"):
        HSRDiffEvaluator("cpu", [batch], net, pipe, num_samples=32, **metrics)
    metrics = {  # fresh handlers: a handler attaches to one engine
        "key_val_metric": parser.get_parsed_content("validate#evaluator#key_val_metric", lazy=False),
        "additional_metrics": parser.get_parsed_content("validate#evaluator#additional_metrics", lazy=False),
    }
    evaluator = HSRDiffEvaluator("cpu", [batch], net, pipe, num_samples=100, seed=3, **metrics)
    evaluator.run()
    written = report_metrics(evaluator, str(tmp_path), "test")
    assert json.loads((tmp_path / "metrics.json").read_text()) == written
    pred, label = evaluator.state.output["pred"][0], evaluator.state.output["label"][0]
    assert pred.shape == (100, 8, 8)
    expected = {"ged16": generalized_energy_distance(pred[:16], label), "ged32": generalized_energy_distance(pred[:32], label),
                "ged100": generalized_energy_distance(pred, label), "hm_iou16": hungarian_matched_iou(pred[:16], label),
                "hm_iou32": hungarian_matched_iou(pred[:32], label), "mdm16": maximum_dice_matching(pred[:16], label),
                "mdm32": maximum_dice_matching(pred[:32], label), "ece32": expected_calibration_error(pred[:32], label),
                "ece_fg32": expected_calibration_error(pred[:32], label, region="foreground")}  # fmt: skip
    for name, value in expected.items():
        for prefix in ("test_", "val_"):
            assert written[prefix + name] == pytest.approx(value, rel=1e-6, abs=1e-7), prefix + name
    assert {"test_fused_iou16", "test_entropy16", "val_fused_iou16", "val_entropy16"} <= set(written)
    assert all(math.isfinite(v) for v in written.values())
