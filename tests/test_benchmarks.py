"""The benchmark scripts' ``--quick`` modes, run as a user runs them (a subprocess each).

Only the structure of what they write is checked, plus quantities fixed by construction
(the no-training reference rows, the identity of the literal Algorithm 2 and the pipeline
for the same noise); never the timings or the trained models' scores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / script
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# ") and "Command: `" in md and "--quick" in md and "Machine: date=" in md
    data = json.loads(out.with_suffix(".json").read_text())
    assert "--quick" in data["command"] and data["machine"]["torch_threads"] >= 1
    return {"md": md, "data": data}


@pytest.mark.slow
def test_sampling_quick(tmp_path):
    r = _run("sampling", tmp_path)
    data, md = r["data"], r["md"]
    # (a) literal Algorithm 2 and (b) the fp32 pipeline draw the same samples from the same generator
    fp32 = data["identity"]["fp32"]
    assert fp32["max_abs_diff"] < 1e-4 and fp32["mask_agreement"] == 1.0
    # bf16 is close, not identical (--quick skips torch.compile)
    bf16 = data["identity"]["bf16 + channels-last"]
    assert 0 < bf16["max_abs_diff"] < 0.5 and bf16["mask_agreement"] > 0.9
    names = list(data["seconds_per_image"])
    assert names[0].startswith("(a)") and names[1].startswith("(b)") and sum(n.startswith("(c)") for n in names) == 3
    assert sum(n.startswith("(d) DPM-Solver++(2M) SDE") for n in names) == 2  # --dpm-steps 10 25
    assert set(data["seconds_per_image"][names[1]]) == {"fp32", "bf16 + channels-last", "bf16 weights + channels-last"}
    # issue 17.4: each way of running against its own precision's matmul peak, from the per-step times
    peaks = data["peaks"]
    assert peaks["cpu"] == data["machine"]["host_cpu"] and peaks["matmul_bf16_flops_per_s"] > 0
    for key, frac in peaks["fraction_of_peak"].items():
        peak = peaks["matmul_bf16_flops_per_s" if key.split("|")[-1].startswith("bf16") else "matmul_fp32_flops_per_s"]
        expected = peaks["flops_per_image_step"] * 2 / data["per_step_seconds"][key] / peak  # N=2
        assert math.isclose(frac, expected, rel_tol=1e-9), key
    assert "a" in peaks["fraction_of_peak"] and "d|bf16 weights + channels-last" in peaks["fraction_of_peak"]
    cells = [v for row in data["seconds_per_image"].values() for v in row.values()]
    assert all(math.isfinite(v) for v in cells)
    # on a loaded machine a short call can time no slower than E_c alone: the script must say so
    assert all(v > 0 for v in cells) or "timing_warning" in data
    for option in ("fp32 (baseline)", "bf16 autocast", "channels_last", "fp32, 1 thread(s)",
                   "explicit attention (use_flash_attention=False)"):  # fmt: skip
        assert option in data["options_seconds_per_step"]
    assert data["flops"]["per_image_step"] > data["flops"]["condition_encoder"] > 0
    for heading in ("### Time per image", "### Achieved FLOP/s per step", "### One denoising step", "### FLOPs"):
        assert heading in md
    assert "speed-up against (a)" in md and "| fp32 | bf16 + channels-last |" in md


def test_sampling_ged_table_quick(tmp_path):
    """Issue 17's quality table: counted network calls, paired CIs recomputable from the per-pair scores; one run
    per seed merged by --ged-merge gives the same table."""
    from benchmarks.common import paired_bootstrap_ci

    # one thread: two on a 2-core machine busy with other jobs made this 20x slower
    r = _run("sampling", tmp_path, "--ged-table", "--threads", "1", "--ged-data", str(tmp_path / "data"))
    table = r["data"]["ged_table"]
    assert table["status"] == "complete" and table["items"] == 2 and table["seeds"] == [7, 8]
    res = table["results"]
    ref = res[table["reference"]]
    assert table["reference"] == "DDPM 10" and ref["nfe"] == 10  # --quick's T=10 process
    assert set(res) == {"DDPM 10", "DDIM 2 eta=1", "DPM++2M 2", "DPM++2M SDE 2"}
    for name in ("DDIM 2 eta=1", "DPM++2M 2", "DPM++2M SDE 2"):
        row = res[name]
        assert row["nfe"] == 2  # counted by a hook on forward: the 2nd-order multistep solver makes 1 call per step
        assert all(len(v) == 4 for v in row["per_pair"].values())  # 2 seeds x 2 items
        for k in ("ged_16", "hm_iou_16", "mdm_16"):
            st = row["stats"][k]
            mean, lo, hi = paired_bootstrap_ci(row["per_pair"][k], ref["per_pair"][k])
            assert st["diff"] == pytest.approx(mean) and st["diff_ci95"] == pytest.approx([lo, hi])
        rel = row["stats"]["ged_16"]
        assert rel["rel_ci95"][0] <= rel["rel"] <= rel["rel_ci95"][1]
        tg = row["stats"]["targets"]
        assert tg["ged_16_within_3pct"] == (rel["rel_ci95"][1] <= 0.03)
        assert tg["hm_iou_16_not_below_ddpm_ci"] == (row["stats"]["hm_iou_16"]["mean"] >= tg["hm_iou_16_ddpm_ci_low"])
    # same x_T and noise stream: at 2 steps the SDE solver's only non-final step is first order, which
    # is DDIM eta=1, and both end on x0_hat, so the two rows score the same
    for k, v in res["DDIM 2 eta=1"]["per_pair"].items():
        assert res["DPM++2M SDE 2"]["per_pair"][k] == pytest.approx(v, abs=1e-6)
    assert "| DDPM 10 (reference) | 10 |" in r["md"] and "GED16 within 3 %" in r["md"]
    _check_merge_equals_one_run(tmp_path, str(tmp_path / "data"), table)
    _check_reference_reuse(tmp_path, str(tmp_path / "data"), str(tmp_path / "sampling.json"), table)


def _check_reference_reuse(tmp_path: Path, data: str, joint_json: str, joint: dict) -> None:
    """--ged-reference takes the reference row of an earlier run of the same table, and refuses any other."""
    again = _run("sampling", tmp_path / "again", "--ged-table", "--threads", "1", "--ged-data", data,
                 "--ged-reference", joint_json, "--ged-variants", "ddim:2:1")["data"]["ged_table"]  # fmt: skip
    assert list(again["results"]) == ["DDPM 10", "DDIM 2 eta=1"]
    assert again["results"]["DDPM 10"] == joint["results"]["DDPM 10"]
    for k, v in joint["results"]["DDIM 2 eta=1"]["per_pair"].items():
        assert again["results"]["DDIM 2 eta=1"]["per_pair"][k] == pytest.approx(v, abs=1e-6)
    for extra, why in ((["--ged-seeds", "7"], "seeds [7, 8] differ(s) from this run's [7]"),
                       (["--ged-baseline", "ddim:2:1"], "reference 'DDPM 10' differ(s)")):  # fmt: skip
        err = _refused_sampling(tmp_path / "bad_ref", "--quick", "--ged-table", "--threads", "1", "--ged-data", data,
                                "--ged-reference", joint_json, *extra)  # fmt: skip
        assert why in err, err[-2000:]


def _refused_sampling(out: Path, *args: str) -> str:
    """Run benchmarks/sampling.py --out ``out`` with ``args``; assert it fails and writes nothing; its stderr."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sampling.py"), "--out", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and not out.with_suffix(".json").exists() and not out.with_suffix(".md").exists()
    return res.stderr


def _check_merge_equals_one_run(tmp_path: Path, data: str, joint: dict) -> None:
    """--ged-merge of one run per seed gives the joint run's pairs and statistics (and refuses overlaps)."""
    parts = []
    for seed in ("7", "8"):
        _run("sampling", tmp_path / seed, "--ged-table", "--threads", "1", "--ged-data", data, "--ged-seeds", seed)
        parts.append(str(tmp_path / seed / "sampling.json"))
    merged = _run("sampling", tmp_path / "merged", "--ged-table", "--ged-merge", *parts)
    table = merged["data"]["ged_table"]
    assert table["seeds"] == [7, 8] and table["status"] == "complete" and list(table["results"]) == list(joint["results"])
    for name, row in joint["results"].items():
        got = table["results"][name]
        for k, v in row["per_pair"].items():
            assert got["per_pair"][k] == pytest.approx(v, abs=1e-6), (name, k)
        if "stats" in row:
            assert got["stats"]["targets"] == row["stats"]["targets"]
            assert got["stats"]["ged_16"]["rel_ci95"] == pytest.approx(row["stats"]["ged_16"]["rel_ci95"], abs=1e-6)
    assert "Merged from 2 runs" in merged["md"] and "(seeds [8])" in merged["md"]
    assert "repeat a seed" in _refused_sampling(tmp_path / "bad", "--ged-table", "--ged-merge", parts[0], parts[0])


@pytest.mark.slow
def test_training_quick(tmp_path):
    r = _run("training", tmp_path)
    summary = r["data"]["summary"]
    assert list(summary) == ["hsrdiff_light", "ddpm_light"]
    for s in summary.values():
        assert s["iterations_per_s"] > 0 and s["peak_mib"] >= 0 and s["parameters"] > 0
    assert "| hsrdiff_light |" in r["md"] and "| ddpm_light |" in r["md"] and "1.00x" in r["md"]


@pytest.mark.slow
def test_quality_quick(tmp_path):
    import numpy as np

    from benchmarks.common import paired_bootstrap_ci

    r = _run("quality", tmp_path, "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
             "--reference", "eps_none")  # fmt: skip
    data, md = r["data"], r["md"]
    assert data["status"].startswith("complete")
    rows = {rec["row"] for rec in data["rows"]}
    # the no-mixing row is sampled from its eps head and, as an extra row, from its x0 head
    assert rows == {"eps_none", "dual_nomix", "dual_nomix_x0head"}
    for rec in data["rows"]:
        assert set(rec) >= {"ged_16", "hm_iou_16", "mdm_16", "seeds"}
        assert 0.0 <= rec["hm_iou_16"]["mean"] <= 1.0
    # the annotations scored against themselves: GED 0, perfect matching, by construction
    ref = data["references"]["ref_annotations"]
    assert ref == pytest.approx({"ged_16": 0.0, "hm_iou_16": 1.0, "mdm_16": 1.0})
    assert data["references"]["ref_one_reader"]["mdm_16"] <= 1.0
    # one line per evaluation in the incremental log, and a checkpoint per trained row
    lines = (tmp_path / "quality.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"] for line in lines] == ["eps_none", "dual_nomix", "dual_nomix_x0head"]
    assert sorted(p.name for p in (tmp_path / "work").glob("*.pt")) == ["dual_nomix_s0.pt", "eps_none_s0.pt"]
    assert "| eps, no condition | 1 |" in md and "reference: the 4 annotations" in md
    # paired against --reference over the (seed, item) pairs, recomputed here from the logged per-item values
    runs = {run["row"]: run for run in data["runs"]}
    recs = {rec["row"]: rec for rec in data["rows"]}
    assert "ged_16_minus_eps_none" not in recs["eps_none"]
    for row in ("dual_nomix", "dual_nomix_x0head"):
        a, b = runs[row]["per_item"]["hm_iou_16"], runs["eps_none"]["per_item"]["hm_iou_16"]
        assert len(a) == 2 and runs[row]["hm_iou_16"] == pytest.approx(float(np.mean(a)))
        diff = recs[row]["hm_iou_16_minus_eps_none"]
        assert diff["mean"] == pytest.approx(float(np.mean(a) - np.mean(b))) and diff["pairs"] == 2
        assert diff["ci95"] == pytest.approx(list(paired_bootstrap_ci(a, b)[1:]))
        assert f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]" in md
        assert diff["per_seed"] == pytest.approx([diff["mean"]]) and diff["seeds_same_sign"] == 1  # one seed
    # and the ladder: each Table 6 row run against the one above it (the x0-head extra row is not a step)
    assert "| eps & x0 + f_g + F_h, no learned mix − eps, no condition | 2 |" in md and md.count(" − ") == 1


def test_kappa_quick(tmp_path):
    """The kappa study: per-item metrics, kappa(t) beside the closed-form optimum, paired CIs, the figure."""
    import numpy as np

    from benchmarks.common import paired_bootstrap_ci

    r = _run("kappa", tmp_path, "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"))
    data = r["data"]
    assert data["status"].startswith("complete")
    assert [v["variant"] for v in data["variants"]] == ["paper", "normalized_detach"]
    for run in data["runs"]:
        d = run["diagnostics"]
        assert d["t"][0] == 0 and d["t"][-1] == 249 and len(d["kappa_mean"]) == len(d["t"])
        assert all(0.0 <= k <= 1.0 for k in d["kappa_mean"] + d["kappa_opt_mean"])
        assert all(g > 0 for g in d["grad_kappa_head"])  # L_u reaches the kappa head at every t
        assert len(run["ged_16"]) == 2  # per item, for the paired comparison
    # the bracket is the paired difference to the paper variant, recomputed here from the per-item values
    paper, other = data["runs"]
    diff = data["variants"][1]["ged_16_minus_paper"]
    assert diff["mean"] == pytest.approx(float(np.mean(other["ged_16"]) - np.mean(paper["ged_16"])))
    assert diff["ci95"] == pytest.approx(list(paired_bootstrap_ci(other["ged_16"], paper["ged_16"])[1:]))
    assert (tmp_path / "kappa.png").read_bytes()[:4] == b"\x89PNG"
    assert "| t | L_u (paper) |" in r["md"]


def test_paired_bootstrap_ci_closed_cases():
    from benchmarks.common import paired_bootstrap_ci

    # a constant difference has a zero-width interval at that difference
    assert paired_bootstrap_ci([3.0, 4.0, 5.0], [1.0, 2.0, 3.0]) == pytest.approx((2.0, 2.0, 2.0))
    mean, lo, hi = paired_bootstrap_ci([0.0, 1.0] * 50, [0.0] * 100)
    assert mean == 0.5 and lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, rel=0.15)
    with pytest.raises(ValueError, match="2 pairs"):
        paired_bootstrap_ci([1.0], [2.0])


def test_pipeline_autocast_dtype():
    """The opt-in bf16 autocast of HSRDiffPipeline (added for the sampling benchmark)."""
    import torch

    from monai_hsrdiff.diffusion import DDIMSampler, HSRDiffPipeline, SelfRegulatedDiffusion
    from monai_hsrdiff.networks import get_preset

    torch.manual_seed(0)
    net = get_preset("hsrdiff_light", channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                     norm_num_groups=4, num_head_channels=8).eval()  # fmt: skip
    cond = torch.randn(2, 1, 16, 16)
    sampler = DDIMSampler(SelfRegulatedDiffusion())

    def draw(dtype):
        gen = torch.Generator().manual_seed(5)
        return HSRDiffPipeline(net, sampler, autocast_dtype=dtype)(cond, num_samples=3, num_inference_steps=3,
                                                                   generator=gen)  # fmt: skip

    ref = HSRDiffPipeline(net, sampler)(cond, num_samples=3, num_inference_steps=3, generator=torch.Generator().manual_seed(5))
    fp32, bf16 = draw(None), draw(torch.bfloat16)
    assert torch.equal(fp32.samples, ref.samples)  # None is the reference path, bit for bit
    assert bf16.samples.dtype == torch.float32 and bf16.kappa.dtype == torch.float32
    assert not torch.equal(bf16.samples, fp32.samples)  # the network really ran in bf16
    # bf16 keeps ~3 significant digits: a few per cent of the (untrained, large) sample range
    assert (bf16.samples - fp32.samples).abs().max() < 0.05 * fp32.samples.abs().max()
    assert (bf16.kappa - fp32.kappa).abs().max() < 0.02
    # the names bundle configs and --precision give
    assert torch.equal(draw("float32").samples, ref.samples)
    assert torch.equal(draw("bfloat16").samples, bf16.samples)
    for bad in (torch.int8, "bf16", 16):
        with pytest.raises(ValueError, match="autocast_dtype"):
            HSRDiffPipeline(net, sampler, autocast_dtype=bad)


def test_datalist_check_quick(tmp_path):
    """The start-up item check's benchmark (issue 12, point 4): runs and reports a finite rate."""
    data = _run("datalist_check", tmp_path)["data"]
    assert data["num_items"] == 200 and data["items_per_s"] > 0 and math.isfinite(data["s_per_10k_items"])
    assert 0 < data["cpu_s_per_10k_items"] and data["budget_s_per_10k_items"] == 2.0


def test_compiled_layouts_quick(tmp_path):
    """benchmarks/compiled_layouts.py: every (layout, items per call) variant, each against the
    fp32 matmul peak timed in the same rounds, and the same work per variant."""
    r = _run("compiled_layouts", tmp_path, "--no-compile", "--batch", "1", "2", "--rounds", "2", "--threads", "1")
    data = r["data"]
    names = set(data["fraction_of_peak"])
    assert names == {f"eager, {lay}, {b} per call" for lay in ("contiguous", "channels-last") for b in (1, 2)}
    for name, frac in data["fraction_of_peak"].items():
        rate = data["flops_per_image_step"] / data["seconds_per_image_step"][name]
        assert math.isclose(frac, rate / data["matmul_fp32_flops_per_s"], rel_tol=1e-9) and 0 < frac < 2
    assert "of the fp32 matmul" in r["md"] and "interleaved rounds" in r["md"]


def test_group_norm_quick(tmp_path):
    """benchmarks/group_norm.py: one row per GroupNorm shape of a denoising call, both sides of the
    threshold (ATen's kernel from it up, inductor's below), and the per-call total of the compiled copy."""
    r = _run("group_norm", tmp_path, "--rounds", "1", "--calls", "2", "--threads", "1")
    data = r["data"]
    rows = data["shapes"]
    pixels = [row["shape"][2] * row["shape"][3] for row in rows]
    assert min(pixels) < data["threshold_pixels"] <= max(pixels)  # 32x32 quick net: both sides of the threshold
    assert len({(tuple(row["shape"]), row["groups"]) for row in rows}) == len(rows) and all(row["calls"] >= 1 for row in rows)
    assert [row["compiled_copy_runs"] for row in rows] == ["aten" if n >= data["threshold_pixels"] else "inductor" for n in pixels]
    shipped = sum(row["calls"] * row["ms"]["compiled copy"] for row in rows)
    assert math.isclose(data["per_call_ms"]["compiled copy"], shipped, rel_tol=1e-9)
    assert all(row["ms"][k] > 0 for row in rows for k in ("eager", "inductor", "compiled copy", "tensor copy"))
    assert "compiled copy's GroupNorm" in r["md"]


def test_flop_counter_counts_cpu_attention():
    """CPU SDPA runs _scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode alone counts as 0:
    flop_counter gives it the closed form 4·B·H·L·S·d (QKᵀ and PV), as torch counts its GPU kernels."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import flop_counter

    q, k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 24, 8), torch.randn(2, 3, 24, 8)
    with flop_counter() as ours, torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False) as plain, torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v)
    assert ours.get_total_flops() == 4 * 2 * 3 * 40 * 24 * 8 and plain.get_total_flops() == 0
    lin = torch.nn.Linear(8, 5)
    with flop_counter() as both, torch.inference_mode():  # the rest is counted as before
        lin(torch.randn(7, 8))
    assert both.get_total_flops() == 2 * 7 * 8 * 5


def test_step_profile_quick(tmp_path):
    """benchmarks/step_profile.py: every op class, FLOPs that add up (attention counted), one row per attention shape."""
    data = _run("step_profile", tmp_path, "--threads", "1", "--rounds", "1", "--calls", "1")["data"]
    classes = data["classes"]
    assert set(classes) == {"convolution", "attention", "linear", "GroupNorm + SiLU", "other"}
    assert classes["convolution"]["flops_per_call"] > classes["attention"]["flops_per_call"] > 0
    assert classes["GroupNorm + SiLU"]["flops_per_call"] == 0 and classes["GroupNorm + SiLU"]["seconds_per_call"] > 0
    att = data["attention"]
    assert att and sum(a["flops"] * a["calls"] for a in att) == classes["attention"]["flops_per_call"]
    assert all(set(a["seconds"]) == {"SDPA default", "SDPA math", "explicit"} for a in att)
