"""Tests of the HSRDiff network (monai_hsrdiff.networks): shapes, routing, gradients, presets, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from monai_hsrdiff.networks import (
    CONDITIONS,
    PREDICTIONS,
    HSRDiff,
    HSRDiffOutput,
    get_preset,
    hsrdiff,
    hsrdiff_light,
)
from monai_hsrdiff.networks.hsrdiff import TABLE6_ROWS
from monai_hsrdiff.networks.presets import PAPER_PARAMETERS

TINY = {"channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 4, "num_head_channels": 8}


def tiny(in_channels: int = 1, out_channels: int = 1, **kw) -> HSRDiff:
    return HSRDiff(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **{**TINY, **kw})


def inputs(batch: int = 2, in_channels: int = 1, out_channels: int = 1, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, out_channels, size, size, generator=g)
    c = torch.randn(batch, in_channels, size, size, generator=g)
    t = torch.randint(0, 250, (batch,), generator=g)
    return x, t, c


def n_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("prediction,condition", list(itertools.product(PREDICTIONS, CONDITIONS)))
@pytest.mark.parametrize("m", [1, 3])
def test_output_shapes_and_absent_heads(prediction, condition, m):
    torch.manual_seed(0)
    net = tiny(in_channels=2, out_channels=m, prediction=prediction, condition=condition)
    x, t, c = inputs(batch=3, in_channels=2, out_channels=m)
    out = net(x, t, condition=c)
    assert isinstance(out, HSRDiffOutput)
    dynamic = prediction == "dynamic"
    has_eps, has_x = prediction in ("srdiff", "dual", "eps"), prediction in ("srdiff", "dual", "x0")
    assert (out.eps is not None) == (has_eps or dynamic) and (net.eps_decoder is not None) == has_eps
    assert (out.x0 is not None) == (has_x or dynamic) and (net.x_decoder is not None) == has_x
    assert (net.dual_decoder is not None) == dynamic and (net.dual_head is not None) == dynamic
    for y in (out.eps, out.x0):
        if y is not None:
            assert y.shape == (3, m, 16, 16) and torch.isfinite(y).all()
    if prediction in ("srdiff", "dynamic"):
        # srdiff: one kappa per item; dynamic (Benny & Wolf): one weight per pixel, shared by the M channels
        assert out.kappa is not None and out.kappa.shape == ((3,) if prediction == "srdiff" else (3, 1, 16, 16))
        assert ((out.kappa > 0) & (out.kappa < 1)).all()
        assert (net.kappa_head is not None) == (prediction == "srdiff")
    else:
        assert out.kappa is None and net.kappa_head is None
    assert (net.condition_encoder is None) == (condition == "none")
    assert (net.encode_condition(c) is None) == (condition == "none")


def test_absent_parts_cost_no_parameters():
    counts = {p: tiny(prediction=p).num_parameters() for p in PREDICTIONS}
    full = tiny()
    assert counts["srdiff"] - counts["dual"] == n_params(full.kappa_head) > 0
    assert counts["dual"] - counts["eps"] == n_params(full.x_decoder) + n_params(full.x_head)
    assert counts["eps"] == counts["x0"]
    # separate weights: no parameter object shared by the two decoding paths
    eps_ids = {id(p) for p in itertools.chain(full.eps_decoder.parameters(), full.eps_head.parameters())}
    x_ids = {id(p) for p in itertools.chain(full.x_decoder.parameters(), full.x_head.parameters())}
    assert eps_ids.isdisjoint(x_ids)
    # condition="none" has no E_c, and M fuses C_L instead of 2 C_L channels
    none = tiny(condition="none")
    assert full.num_parameters() - none.num_parameters() > n_params(full.condition_encoder)


@pytest.mark.parametrize("m", [1, 2])
def test_table6_rows_build_their_parts(m):
    """Each row of the paper's Table 6 builds exactly its parts: parameter counts per mode in closed form."""
    nets = {row: tiny(out_channels=m, **switches) for row, switches in TABLE6_ROWS.items()}
    assert list(nets) == ["eps_none", "eps_global", "eps_hier", "dual_nomix", "dynamic", "srdiff"]  # the paper's order
    count = {row: net.num_parameters() for row, net in nets.items()}
    c1, c2 = TINY["channels"]
    parts = ("condition_encoder", "eps_decoder", "eps_head", "x_decoder", "x_head", "dual_decoder", "dual_head",
             "kappa_head")  # fmt: skip
    built = {row: {name for name in parts if getattr(net, name) is not None} for row, net in nets.items()}
    assert built == {
        "eps_none": {"eps_decoder", "eps_head"},
        "eps_global": {"condition_encoder", "eps_decoder", "eps_head"},
        "eps_hier": {"condition_encoder", "eps_decoder", "eps_head"},
        "dual_nomix": {"condition_encoder", "eps_decoder", "eps_head", "x_decoder", "x_head"},
        "dynamic": {"condition_encoder", "dual_decoder", "dual_head"},
        "srdiff": {"condition_encoder", "eps_decoder", "eps_head", "x_decoder", "x_head", "kappa_head"},
    }
    # 1 -> 2: E_c, and M fuses concat(E_d, f_g): its first 3x3 conv sees C_L more inputs, plus the
    # 1x1 shortcut (2 C_L -> C_L) that the wider input needs, plus GroupNorm affine over 2 C_L
    fuse_extra = c2 * c2 * 9 + (2 * c2 * c2 + c2) + 2 * c2
    assert count["eps_global"] - count["eps_none"] == n_params(nets["eps_global"].condition_encoder) + fuse_extra
    # 2 -> 3: F_h into the decoder: at each level the first resnet sees C_k more inputs
    # (3x3 conv C_k*C_k*9, the 1x1 shortcut C_k*C_k, GroupNorm affine 2 C_k)
    assert count["eps_hier"] - count["eps_global"] == sum(ck * ck * 9 + ck * ck + 2 * ck for ck in (c1, c2))
    # 3 -> 4: a second decoder and head, same size as the first
    hier = nets["eps_hier"]
    assert count["dual_nomix"] - count["eps_hier"] == n_params(hier.eps_decoder) + n_params(hier.eps_head)
    # 3 -> 5: Benny & Wolf add only output channels to the last layer: M (x0) + 1 (weight) more
    # outputs of a 3x3 conv over C_1 channels, each 9 C_1 weights and a bias
    assert count["dynamic"] - count["eps_hier"] == (m + 1) * (9 * c1 + 1)
    assert n_params(nets["dynamic"].dual_decoder) == n_params(hier.eps_decoder)
    # 4 -> 6: the self-regulation head C_1, C_2, Phi (two 3x3 convs C_1 -> C_1, Phi, Linear -> 2)
    kappa_head = nets["srdiff"].kappa_head
    assert count["srdiff"] - count["dual_nomix"] == n_params(kappa_head)
    assert n_params(kappa_head.c1) == n_params(kappa_head.c2) == c1 * c1 * 9 + c1


def test_dynamic_head_is_one_last_layer_with_a_sigmoid_weight():
    """eps, x0 and the weight logit are the 2M + 1 channels of one convolution; the weight is its sigmoid."""
    torch.manual_seed(0)
    m = 2
    net = tiny(out_channels=m, prediction="dynamic").eval()
    x, t, c = inputs(batch=2, out_channels=m)
    captured = {}
    net.dual_head.conv.register_forward_hook(lambda mod, inp, output: captured.update(raw=output))
    with torch.no_grad():
        out = net(x, t, condition=c)
    raw = captured["raw"]
    assert raw.shape == (2, 2 * m + 1, 16, 16)
    torch.testing.assert_close(out.eps, raw[:, :m], rtol=0, atol=0)
    torch.testing.assert_close(out.x0, raw[:, m : 2 * m], rtol=0, atol=0)
    torch.testing.assert_close(out.kappa, 1.0 / (1.0 + torch.exp(-raw[:, 2 * m :])), rtol=1e-6, atol=1e-7)
    assert out.kappa.std() > 0  # a weight per pixel, not one per item
    # the same parts in 3D
    net3d = HSRDiff(spatial_dims=3, in_channels=2, out_channels=1, prediction="dynamic", **TINY)
    out3d = net3d(torch.randn(1, 1, 8, 8, 8), torch.tensor([3]), condition=torch.randn(1, 2, 8, 8, 8))
    assert out3d.eps.shape == out3d.x0.shape == out3d.kappa.shape == (1, 1, 8, 8, 8)


def test_kappa_strictly_inside_unit_interval_for_extreme_inputs():
    torch.manual_seed(1)
    net = tiny()
    x, t, c = inputs(batch=4)
    out = net(100.0 * x, t, condition=-50.0 * c)
    assert out.kappa.dtype == torch.float32
    assert ((out.kappa > 0) & (out.kappa < 1)).all()


@pytest.mark.parametrize("condition", ["hierarchical", "global"])
def test_precomputed_features_match_and_skip_the_encoder(condition):
    torch.manual_seed(0)
    net = tiny(condition=condition).eval()
    x, t, c = inputs(batch=2)
    calls = []
    net.condition_encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        direct = net(x, t, condition=c)
        assert len(calls) == 1
        feats = net.encode_condition(c)
        assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 16), (2, 16, 8, 8)]
        reused = net(x, t, condition_features=feats)
        assert len(calls) == 2  # encode_condition ran E_c; forward with features did not
        for a, b in ((direct.eps, reused.eps), (direct.x0, reused.x0), (direct.kappa, reused.kappa)):
            assert torch.equal(a, b)
        # N samples per image: repeat the features, as the sampler does
        n = 3
        x_n, t_n = x.repeat_interleave(n, 0), t.repeat_interleave(n, 0)
        repeated = net(x_n, t_n, condition_features=[f.repeat_interleave(n, 0) for f in feats])
        assert len(calls) == 2
        expected = net(x_n, t_n, condition=c.repeat_interleave(n, 0))
    torch.testing.assert_close(repeated.eps, expected.eps)
    torch.testing.assert_close(repeated.kappa, expected.kappa)


def test_condition_routing():
    """hierarchical uses every f_k, global only f_g, none ignores the condition."""
    torch.manual_seed(0)
    x, t, c = inputs(batch=2)
    with torch.no_grad():
        for condition, shallow_matters in (("hierarchical", True), ("global", False)):
            net = tiny(condition=condition).eval()
            feats = net.encode_condition(c)
            base = net(x, t, condition_features=feats)
            changed_shallow = net(x, t, condition_features=[feats[0] + 1.0, feats[1]])
            changed_deep = net(x, t, condition_features=[feats[0], feats[1] + 1.0])
            assert torch.equal(base.x0, changed_shallow.x0) != shallow_matters
            assert not torch.equal(base.x0, changed_deep.x0)
            assert not torch.equal(base.x0, net(x, t, condition=c + 1.0).x0)
        net = tiny(condition="none").eval()
        a = net(x, t, condition=c)
        assert torch.equal(a.x0, net(x, t, condition=c + 1.0).x0)
        assert torch.equal(a.x0, net(x, t).x0)


def test_decoder_skips_switch():
    torch.manual_seed(0)
    with_skips, without = tiny(), tiny(decoder_skips=False)
    # the first resnet of each decoder level sees C_k more input channels per skip: 3x3 conv weights
    # (C_k * C_k * 9) plus the 1x1 shortcut (C_k * C_k) plus GroupNorm affine (2 C_k), for 2 decoders
    per_level = sum(ck * ck * 9 + ck * ck + 2 * ck for ck in (8, 16))
    assert with_skips.num_parameters() - without.num_parameters() == 2 * per_level
    x, t, c = inputs()
    out = without(x, t, condition=c)
    assert out.eps.shape == (2, 1, 16, 16)


def test_timesteps_change_the_output():
    torch.manual_seed(0)
    net = tiny().eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # leave MONAI's zero-initialised residual convs
    x, t, c = inputs()
    net(x, t, condition=c).eps.sum().backward()
    opt.step()
    with torch.no_grad():
        a = net(x, torch.tensor([0, 0]), condition=c)
        b = net(x, torch.tensor([249, 249]), condition=c)
    assert not torch.allclose(a.eps, b.eps)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = tiny(out_channels=2)
    x, t, c = inputs(out_channels=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    def backward() -> dict[str, torch.Tensor | None]:
        opt.zero_grad()
        out = net(x, t, condition=c)
        (out.eps.sum() + out.x0.sum() + out.kappa.sum()).backward()
        return {n: p.grad for n, p in net.named_parameters()}

    grads = backward()
    assert all(g is not None for g in grads.values())
    dead = {n for n, g in grads.items() if not g.abs().sum() > 0}
    # step 1: the heads, C1, C2, Phi, E_c and the zero-initialised residual convs all get gradient;
    # only what sits behind a residual block's zero conv2 (MONAI's identity-at-init design) is shielded
    for prefix in ("eps_head", "x_head", "kappa_head.c1", "kappa_head.c2", "kappa_head.phi", "condition_encoder"):
        names = [n for n in grads if n.startswith(prefix)]
        assert names and not dead.intersection(names), prefix
    assert all(n.startswith("time_embed") or any(k in n for k in ("norm1", "conv1", "time_emb_proj", "norm2"))
               for n in dead)  # fmt: skip
    assert not {n for n in dead if "conv2" in n}
    # step 2: once conv2 moved off zero, every parameter receives gradient
    opt.step()
    grads = backward()
    dead = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert dead == []


def test_3d_tiny():
    torch.manual_seed(0)
    net = HSRDiff(spatial_dims=3, in_channels=2, out_channels=1, **TINY)
    x, c = torch.randn(1, 1, 8, 8, 8), torch.randn(1, 2, 8, 8, 8)
    out = net(x, torch.tensor([3]), condition=c)
    assert out.eps.shape == out.x0.shape == (1, 1, 8, 8, 8)
    assert out.kappa.shape == (1,)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fused_attention_same_weights_same_outputs(spatial_dims):
    # use_flash_attention only changes how attention is computed: the two nets share a state
    # dict (a checkpoint of one loads into the other) and agree to float rounding, also in gradients
    torch.manual_seed(0)
    kw = {**TINY, "spatial_dims": spatial_dims}
    fused, explicit = HSRDiff(**kw), HSRDiff(**kw, use_flash_attention=False)
    assert fused.use_flash_attention and not explicit.use_flash_attention
    explicit.load_state_dict(fused.state_dict())  # strict: same keys and shapes
    size = (16, 16) if spatial_dims == 2 else (8, 8, 8)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 1, *size, generator=g), torch.randn(2, 1, *size, generator=g)
    t = torch.tensor([5, 200])
    a, b = fused(x, t, condition=c), explicit(x, t, condition=c)
    for name in ("eps", "x0", "kappa"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    (a.eps.square().mean() + a.kappa.sum()).backward()
    (b.eps.square().mean() + b.kappa.sum()).backward()
    deep = fused.middle_block.attention.attn.to_q.weight  # an attention weight: its gradient goes through the fused kernel
    torch.testing.assert_close(deep.grad, explicit.middle_block.attention.attn.to_q.weight.grad, rtol=1e-4, atol=1e-6)
    assert deep.grad.abs().sum() > 0


@pytest.mark.parametrize("name,factory", [("hsrdiff", hsrdiff), ("hsrdiff_light", hsrdiff_light)])
def test_preset_parameter_counts_near_paper(name, factory):
    count = factory(in_channels=1, out_channels=1).num_parameters()
    assert abs(count - PAPER_PARAMETERS[name]) <= 0.15 * PAPER_PARAMETERS[name], count
    assert count == {"hsrdiff": 102_590_916, "hsrdiff_light": 13_600_388}[name]  # recorded in docs/network.md


def test_presets_overrides_and_get_preset():
    net = get_preset("hsrdiff_light", in_channels=4, out_channels=2, prediction="eps", condition="global")
    assert (net.in_channels, net.out_channels, net.prediction, net.condition) == (4, 2, "eps", "global")
    assert net.channels == (32, 64, 128, 160) and net.x_decoder is None
    with pytest.raises(ValueError, match="unknown preset name 'hsrdiff_huge'"):
        get_preset("hsrdiff_huge")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"prediction": "mixed"}, "HSRDiff: prediction must be one of .* got 'mixed'"),
        ({"condition": "local"}, "HSRDiff: condition must be one of .* got 'local'"),
        ({"attention_levels": (False, True, True)}, "attention_levels must have one entry per level"),
        ({"channels": (8, 18)}, r"divisible by norm_num_groups=4, got channels=\(8, 18\)"),
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3, got 1"),
        ({"phi_channels": (8, 6)}, r"phi_channels must be .* divisible by norm_num_groups=4, got \(8, 6\)"),
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ({"num_res_blocks": (1, 2, 3)}, r"num_res_blocks must be .* per level \(2\), got \(1, 2, 3\)"),
        ({"num_head_channels": (8, 8, 8)}, r"num_head_channels must be .* per level \(2\), got \(8, 8, 8\)"),
        ({"num_head_channels": 12}, r"channels\[1\]=16 has attention and must be divisible by num_head_channels"),
    ],
)
def test_init_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HSRDiff(**{"spatial_dims": 2, **TINY, **kwargs})


def test_forward_errors():
    net = tiny(in_channels=2, out_channels=1)
    x, t, c = inputs(in_channels=2)
    with pytest.raises(ValueError, match="x has 3 channels but the network was built with out_channels=1"):
        net(torch.randn(2, 3, 16, 16), t, condition=c)
    with pytest.raises(ValueError, match="condition has 1 channels but the network was built with in_channels=2"):
        net(x, t, condition=c[:, :1])
    with pytest.raises(ValueError, match=r"divisible by 2\^\(L-1\)=2 .* got \(15, 16\)"):
        net(x[..., :15, :], t, condition=c[..., :15, :])
    with pytest.raises(ValueError, match=r"timesteps must have shape \(B,\) = \(2,\) .* got \(2, 1\)"):
        net(x, t[:, None], condition=c)
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        net(x, torch.tensor([1, 2, 3]), condition=c)
    with pytest.raises(ValueError, match="needs the condition image .* got neither"):
        net(x, t)
    feats = net.encode_condition(c)
    with pytest.raises(ValueError, match="list F_h of 2 tensors .* got 1"):
        net(x, t, condition_features=feats[:1])
    wrong_batch = r"condition_features\[0\] must have shape \(4, 8, 16, 16\) .* got \(2, 8, 16, 16\)"
    with pytest.raises(ValueError, match=wrong_batch):
        net(torch.cat([x, x]), torch.cat([t, t]), condition_features=feats)
    with pytest.raises(ValueError, match="either condition or condition_features, not both"):
        net(x, t, condition=c, condition_features=feats)
    with pytest.raises(ValueError, match="batch size and spatial size of x"):
        net(x, t, condition=c[:1])
    with pytest.raises(ValueError, match=r"shape \(B, C, \*spatial\) with 2 spatial dims"):
        net(x[0], t, condition=c)


def test_preset_value_is_the_deprecated_preset_key(capsys):
    from monai_hsrdiff.networks import preset_value

    # the bundle's own preset: the value network_def writes (or its override) is kept, silently
    assert preset_value("hsrdiff", "channels", [8, 16]) == [8, 16]
    assert capsys.readouterr().err == ""
    # another preset: its value, with a note naming the override to use instead
    assert preset_value("hsrdiff_light", "channels", [64, 128, 256, 512]) == [32, 64, 128, 160]
    assert "DEPRECATED" in capsys.readouterr().err
    assert preset_value("hsrdiff_light", "num_res_blocks", 2) == 2  # the presets agree there
    with pytest.raises(ValueError, match="unknown preset name 'hsrdif'"):
        preset_value("hsrdif", "channels", [64])
