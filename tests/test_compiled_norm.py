"""The GroupNorm of the compiled network copy (networks/compiled_norm.py, issue 17.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

from monai_hsrdiff.networks.compiled_norm import OPAQUE_FROM_PIXELS, OpaqueGroupNorm, group_norm, opaque_group_norms


def _x(shape, channels_last: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)  # a mean far from 0: the variance must not cancel
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_registration(channels_last, dtype):
    """torch.library's own check: the fake (meta) kernel gives the real output's shape, dtype and strides."""
    x = _x((2, 8, 32, 32), channels_last, dtype)
    w, b = torch.rand(8, dtype=dtype) + 0.5, torch.randn(8, dtype=dtype)
    torch.library.opcheck(group_norm, (x, 4, w, b, 1e-5))
    y = group_norm(x, 4, w, b, 1e-5)
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, F.group_norm(x, 4, w, b, 1e-5), rtol=0, atol=0)


def test_swap_keeps_parameters_and_eager_results():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8, eps=1e-6), nn.SiLU(), nn.GroupNorm(2, 8, affine=False))
    x = torch.randn(2, 1, 40, 40)
    ref, state = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    assert opaque_group_norms(net) is net
    assert [type(m) for m in net if isinstance(m, nn.GroupNorm)] == [OpaqueGroupNorm, OpaqueGroupNorm]
    assert net[1].eps == 1e-6 and net[1].num_groups == 4 and not net[3].affine
    assert net.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert torch.equal(net(x), ref)  # the same ATen kernel: bit for bit


@pytest.mark.parametrize("size", [16, 48])
def test_compiled_equals_eager(size):
    """Under inductor the large norm is ATen's kernel (bit-identical to eager), the small one inductor's own (close)."""
    torch.manual_seed(0)
    norm = OpaqueGroupNorm(4, 16).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = _x((2, 16, size, size), channels_last=True)
    fn = torch.compile(lambda t: F.silu(norm(t) + 1.0), dynamic=False)
    with torch.inference_mode():
        got, code = run_and_get_code(fn, x)
        want = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps) + 1.0)
    assert got.is_contiguous(memory_format=torch.channels_last)
    calls_op = any("monai_hsrdiff.group_norm" in c for c in code)
    assert calls_op == (size * size >= OPAQUE_FROM_PIXELS)
    if calls_op:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # only silu(· + 1) is inductor's
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_opaque_on_cpu_only(monkeypatch):
    """Off the CPU (here the meta device, as a GPU would be) the norm stays plain ``F.group_norm`` for inductor."""
    import monai_hsrdiff.networks.compiled_norm as cn

    calls = []
    monkeypatch.setattr(cn, "group_norm", lambda *a: calls.append(a[0].device.type) or F.group_norm(*a))
    meta = OpaqueGroupNorm(2, 4, device="meta")
    assert meta(torch.randn(1, 4, 32, 32, device="meta")).device.type == "meta" and calls == []
    norm = OpaqueGroupNorm(2, 4)
    norm(torch.randn(1, 4, 32, 32))
    norm(torch.randn(1, 4, 31, 32))  # below the threshold
    assert calls == ["cpu"]
