"""A benchmark-only variant of HSRDiff's step (``benchmarks/sampling.py``, CPU options): the two
decoders D_eps and D_x run as one vmapped call over their stacked weights."""

from __future__ import annotations

import copy

import torch

__all__ = ["VmapDecoders", "forward_vmap_decoders"]


class VmapDecoders(torch.nn.Module):
    """Runs D_eps and D_x as ONE batched call (``torch.func.stack_module_state`` + ``vmap``).

    A benchmark-only wrapper: replaces ``model.eps_decoder`` / ``model.x_decoder`` calls by a
    single vmapped call over the stacked weights (convolutions become grouped convolutions).
    """

    def __init__(self, model) -> None:
        super().__init__()
        from torch.func import functional_call, stack_module_state

        self.model = model
        self.params, self.buffers = stack_module_state([model.eps_decoder, model.x_decoder])
        base = copy.deepcopy(model.eps_decoder).to("meta")

        def one(p, b, h, emb, skips, feats):
            return functional_call(base, (p, b), (h, emb, skips, feats))

        self._vm = torch.func.vmap(one, in_dims=(0, 0, None, None, None, None))

    def decode(self, h, emb, skips, feats):
        f = self._vm(self.params, self.buffers, h, emb, skips, feats)
        return f[0], f[1]


def forward_vmap_decoders(wrapper: VmapDecoders, x, timesteps, condition=None, condition_features=None):
    # mirrors HSRDiff.forward steps 2-6 with the two decoders in one vmapped call
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    from monai_hsrdiff.networks.hsrdiff import HSRDiffOutput

    m = wrapper.model
    features = condition_features if condition_features is not None else m.encode_condition(condition)
    emb = m.time_embed(get_timestep_embedding(timesteps, m.channels[0]).to(dtype=x.dtype))
    h = m.label_conv_in(x)
    skips = []
    for block in m.label_encoder:
        h, states = block(h, emb)
        skips.append(states[len(block.resnets) - 1])
    h = m.middle_block(m.middle_fuse(torch.cat([h, features[-1]], dim=1), emb), emb)
    f_eps, f_x = wrapper.decode(h, emb, skips, list(features))
    return HSRDiffOutput(eps=m.eps_head(f_eps), x0=m.x_head(f_x), kappa=m.kappa_head(f_eps, f_x))
