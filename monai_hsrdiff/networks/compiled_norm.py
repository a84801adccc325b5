"""GroupNorm for the network copy that ``torch.compile`` (inductor, CPU) runs.

Inductor lowers ``GroupNorm`` to a Welford reduction that, on channels-last CPU tensors, is 1.1-4x
slower than ATen's own kernel once an image has 32x32 pixels or more (1.04 against 0.24 ms for
2x64x64x64 in bf16 on a 2-core EPYC, benchmarks/group_norm.py; only at 16x16 and below does
inductor win, by fusing the norm with its neighbours). :func:`opaque_group_norms` therefore makes the large GroupNorms an
opaque custom op that inductor calls as it is, and leaves the small ones to inductor. The output
is ATen's ``group_norm``, the same numbers eager mode gives; only the compiled copy is changed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Pixels (voxels) per channel from which a GroupNorm runs as ATen's kernel inside a compiled graph.
OPAQUE_FROM_PIXELS = 32 * 32


@torch.library.custom_op("monai_hsrdiff::group_norm", mutates_args=())
def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm`` as one op that inductor does not trace into; output in ``x``'s memory format."""
    return F.group_norm(x, num_groups, weight, bias, eps).contiguous(memory_format=_format_of(x))


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps):
    return torch.empty_like(x, memory_format=_format_of(x))


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def runs_aten_kernel(x: torch.Tensor) -> bool:
    """Whether :class:`OpaqueGroupNorm` runs ``x`` through :func:`group_norm`: a CPU input of at least
    ``OPAQUE_FROM_PIXELS`` pixels per channel (on a GPU inductor's Triton GroupNorm is the one to keep)."""
    return x.device.type == "cpu" and math.prod(x.shape[2:]) >= OPAQUE_FROM_PIXELS


class OpaqueGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same state dict) that runs as :func:`group_norm` where
    :func:`runs_aten_kernel` says so, and as plain ``F.group_norm`` otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine and runs_aten_kernel(x):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def opaque_group_norms(net: nn.Module) -> nn.Module:
    """Turn every ``nn.GroupNorm`` of ``net`` into an :class:`OpaqueGroupNorm`, in place; returns ``net``.

    Meant for a copy about to be compiled: eager results do not change (the same ATen kernel
    runs), but the modules' class does.
    """
    for module in net.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = OpaqueGroupNorm
    return net
