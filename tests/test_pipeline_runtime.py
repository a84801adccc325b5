"""HSRDiffPipeline's runtime copies of the network: precision "bfloat16-true" and ``compile`` (issue 17.4)."""

from __future__ import annotations

import pytest
import torch

from monai_hsrdiff.diffusion import DPMSolverSampler, HSRDiffPipeline, SelfRegulatedDiffusion
from monai_hsrdiff.diffusion.pipeline import PRECISIONS, TRUE_PRECISIONS
from monai_hsrdiff.networks import get_preset
from monai_hsrdiff.networks.compiled_norm import OpaqueGroupNorm


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return get_preset("hsrdiff_light", channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                      norm_num_groups=4, num_head_channels=8).eval()  # fmt: skip


def wide_conv(module):
    """A convolution weight with several input channels (a 1-channel kernel is contiguous in both layouts)."""
    return next(m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)


def _draw(pipe, cond, seed=5):
    return pipe(cond, num_samples=3, generator=torch.Generator().manual_seed(seed))


def test_bfloat16_true_runs_a_bf16_copy_and_leaves_the_model(net):
    cond = torch.randn(2, 1, 16, 16)
    sampler = DPMSolverSampler(SelfRegulatedDiffusion(), num_inference_steps=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fp32 = _draw(HSRDiffPipeline(net, sampler), cond)
    auto = _draw(HSRDiffPipeline(net, sampler, autocast_dtype="bfloat16"), cond)
    pipe = HSRDiffPipeline(net, sampler, autocast_dtype="bfloat16-true")
    true = _draw(pipe, cond)

    assert pipe.precision == "bfloat16-true" and HSRDiffPipeline(net, sampler, "bfloat16").precision == "bfloat16"
    assert "bfloat16-true" in PRECISIONS and TRUE_PRECISIONS["bfloat16-true"] == torch.bfloat16
    run = pipe.runtime_model()
    assert run is not net and {p.dtype for p in run.parameters()} == {torch.bfloat16}
    conv = next(m for m in run.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.ndim == 4 and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the caller's network is untouched: fp32, the same values, and its own samples unchanged
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert torch.equal(_draw(HSRDiffPipeline(net, sampler), cond).samples, fp32.samples)
    # fp32 eager calls the model itself; bf16 autocast a channels-last fp32 copy of it
    assert HSRDiffPipeline(net, sampler).runtime_model() is net
    cl = HSRDiffPipeline(net, sampler, "bfloat16").runtime_model()
    assert cl is not net and {p.dtype for p in cl.parameters()} == {torch.float32}
    assert wide_conv(cl).is_contiguous(memory_format=torch.channels_last) and not wide_conv(net).is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, before[k]) for k, v in cl.state_dict().items())
    assert (auto.samples - fp32.samples).abs().max() < 0.05 * fp32.samples.abs().max()
    # returned in fp32, computed in bf16, close to fp32 (autocast on the channels-last copy rounds
    # the same weights to bf16 per call, so its samples may equal these; the bf16 weights show the path)
    assert true.samples.dtype == torch.float32 and true.kappa.dtype == torch.float32
    assert not torch.equal(true.samples, fp32.samples) and not torch.equal(auto.samples, fp32.samples)
    assert (true.samples - fp32.samples).abs().max() < 0.05 * fp32.samples.abs().max()
    assert (true.kappa - fp32.kappa).abs().max() < 0.02


def test_runtime_copy_follows_weight_updates(net):
    """The bf16 copy is kept between calls and made again after an in-place update (an optimizer step)."""
    model = get_preset("hsrdiff_light", channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                       norm_num_groups=4, num_head_channels=8)  # fmt: skip
    model.load_state_dict(net.state_dict())
    model.train()
    cond = torch.randn(1, 1, 16, 16)
    sampler = DPMSolverSampler(SelfRegulatedDiffusion(), num_inference_steps=2)
    pipe = HSRDiffPipeline(model, sampler, autocast_dtype="bfloat16-true")
    first = _draw(pipe, cond)
    copy1 = pipe.runtime_model()
    assert _draw(pipe, cond).samples.equal(first.samples) and pipe.runtime_model() is copy1
    assert model.training  # the pipeline restores the caller's mode
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    model(torch.randn(2, 1, 16, 16), torch.tensor([3, 100]), condition=cond.expand(2, -1, -1, -1)).eps.square().mean().backward()
    opt.step()
    after = _draw(pipe, cond)
    assert pipe.runtime_model() is not copy1 and not after.samples.equal(first.samples)
    # exactly what a new pipeline on the updated weights draws
    assert after.samples.equal(_draw(HSRDiffPipeline(model, sampler, autocast_dtype="bfloat16-true"), cond).samples)


def test_compile_matches_eager_fp32(net):
    """``compile=True`` (inductor, freezing) is compiled once and draws the fp32 samples to float tolerance."""
    cond = torch.randn(1, 1, 16, 16)
    sampler = DPMSolverSampler(SelfRegulatedDiffusion(), num_inference_steps=2)
    eager = _draw(HSRDiffPipeline(net, sampler), cond)
    pipe = HSRDiffPipeline(net, sampler, compile=True)
    compiled = _draw(pipe, cond)
    run = pipe.runtime_model()
    assert isinstance(run, torch._dynamo.eval_frame.OptimizedModule)

    assert wide_conv(run._orig_mod).dtype == torch.float32  # compiled as a channels-last copy ...
    assert wide_conv(run._orig_mod).is_contiguous(memory_format=torch.channels_last)
    assert not wide_conv(net).is_contiguous(memory_format=torch.channels_last)  # ... the caller's model untouched
    # GroupNorms made opaque to inductor in the copy only (networks/compiled_norm.py)
    assert {type(m) for m in run._orig_mod.modules() if isinstance(m, torch.nn.GroupNorm)} == {OpaqueGroupNorm}
    assert {type(m) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {torch.nn.GroupNorm}
    torch.testing.assert_close(compiled.samples, eager.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.kappa, eager.kappa, rtol=1e-4, atol=1e-5)
    assert pipe.runtime_model() is run  # fixed weights: no second compile
    with pytest.raises(ValueError, match="compile must be true or false"):
        HSRDiffPipeline(net, sampler, compile="yes")
