"""The HSRDiff denoising network (Hierarchical Self-Regulation Diffusion, AAAI 2025).

Paper: "Hierarchical Self-Regulation Diffusion for Stochastic Medical Image Segmentation"
(AAAI 2025), §Method, Figure 2, Eq. 5-7. Symbols used in this file:

=================  =====================================================================
code               paper
=================  =====================================================================
condition_encoder  E_c: condition encoder, no time input; its per-level features are F_h
label_encoder      E_d: encoder over the noisy label x_t, with time embedding
middle_block       M: fuses the deepest E_d feature with f_g (the deepest f_k) into f_m
eps_decoder        D_eps: decoder of the noise-prediction path, output feature f_eps
x_decoder          D_x: decoder of the label-prediction path, output feature f_x
eps_head, x_head   C_eps, C_x: convolutional heads giving eps_theta and x_theta
kappa_head         C_1, C_2 and Phi of Eq. 7: kappa = softmax(Phi(C_1(f_eps) + C_2(f_x)))[0]
dual_decoder       prediction="dynamic" only: the ONE decoder of Benny & Wolf's dual output
dual_head          its last layer, 2M + 1 channels: eps, x0 and the logit of a per-pixel weight
=================  =====================================================================

Everything is built from MONAI blocks: ``DiffusionUNetResnetBlock``, ``DownBlock`` /
``AttnDownBlock``, ``AttnMidBlock``, ``SpatialAttentionBlock``, ``DiffusionUnetDownsample``,
``WrappedUpsample`` and ``get_timestep_embedding`` from
``monai.networks.nets.diffusion_model_unet``; ``UnetResBlock`` and ``Convolution`` from
``monai.networks.blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution, SpatialAttentionBlock, UnetResBlock
from monai.networks.layers.factories import Pool
from monai.networks.nets.diffusion_model_unet import (
    AttnDownBlock,
    AttnMidBlock,
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    DownBlock,
    WrappedUpsample,
    get_timestep_embedding,
)
from torch import nn

__all__ = [
    "CONDITIONS",
    "PREDICTIONS",
    "TABLE6_ROWS",
    "ConditionEncoder",
    "DualOutputHead",
    "HSRDiff",
    "HSRDiffDecoder",
    "HSRDiffOutput",
    "SelfRegulationHead",
]

#: ``prediction`` modes (paper Table 6): both paths + kappa; both paths, no learned mix; one path
#: only; Benny & Wolf's dynamic dual output (one decoder, eps / x0 / per-pixel weight heads).
PREDICTIONS = ("srdiff", "dual", "eps", "x0", "dynamic")
#: ``condition`` modes (paper Table 6): F_h into the decoders, f_g only, no condition.
CONDITIONS = ("hierarchical", "global", "none")
#: The six rows of the paper's Table 6 as network switches, in the paper's order (docs/network.md).
#: How each row is trained and sampled (L_u, the mix) is set in ``benchmarks/quality.py``.
TABLE6_ROWS: dict[str, dict[str, str]] = {
    "eps_none": {"prediction": "eps", "condition": "none"},  # 1: eps
    "eps_global": {"prediction": "eps", "condition": "global"},  # 2: eps + f_g
    "eps_hier": {"prediction": "eps", "condition": "hierarchical"},  # 3: eps + f_g + F_h
    "dual_nomix": {"prediction": "dual", "condition": "hierarchical"},  # 4: eps & x0, no learned mix
    "dynamic": {"prediction": "dynamic", "condition": "hierarchical"},  # 5: + Benny & Wolf's dual output
    "srdiff": {"prediction": "srdiff", "condition": "hierarchical"},  # 6: SRDiff
}


def conv3x3(spatial_dims: int, in_channels: int, out_channels: int) -> Convolution:
    """A plain 3×3 (3×3×3) convolution, stride 1, same padding, no norm or activation."""
    return Convolution(spatial_dims, in_channels, out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)


@dataclass
class HSRDiffOutput:
    """What one :class:`HSRDiff` forward pass returns.

    Attributes:
        eps: (B, M, *spatial) predicted noise eps_theta; None when the network has no eps path
            (``prediction="x0"``).
        x0: (B, M, *spatial) predicted label x_theta in label units (the {-1, +1} scale); None when
            the network has no x0 path (``prediction="eps"``).
        kappa: weight of the x0-mode mean mu_x in (0, 1) (paper Eq. 8): (B,) kappa_phi for
            ``prediction="srdiff"``; (B, 1, *spatial), one weight per pixel shared by the M label
            channels, for ``prediction="dynamic"`` (Benny & Wolf's interpolation weight); None
            otherwise.
    """

    eps: torch.Tensor | None
    x0: torch.Tensor | None
    kappa: torch.Tensor | None


def _per_level(value: int | Sequence[int], num_levels: int) -> tuple[int, ...]:
    # an int is repeated per level; a sequence is kept as given so its length can be checked with a clear message
    return tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * num_levels


def _group_norm(num_groups: int, eps: float) -> tuple:
    return ("group", {"num_groups": num_groups, "eps": eps})


class ConditionEncoder(nn.Module):
    """E_c: the condition encoder of HSRDiff (paper §Hierarchical Multi-scale Condition Guidance).

    L levels of residual blocks without any time input, so the features depend on the condition
    image only and can be computed once per image and reused at every denoising step. Level k
    has ``num_res_blocks[k]`` MONAI ``UnetResBlock`` s (conv-norm-act residual blocks, which take
    no time embedding; the diffusion ``DiffusionUNetResnetBlock`` always adds a projected time
    embedding, and feeding it zeros would leave its time projection as dead weights), a
    ``SpatialAttentionBlock`` after each where ``attention_levels[k]``, then a strided-conv
    ``DiffusionUnetDownsample`` except at the deepest level. ``f_k`` is taken before the
    down-sampling.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: channels C of the condition image.
        channels: output channels of each level, (C_1, ..., C_L).
        num_res_blocks: residual blocks per level.
        attention_levels: whether each level has self-attention.
        num_head_channels: channels per attention head, per level.
        norm_num_groups: groups of every GroupNorm.
        norm_eps: epsilon of every GroupNorm.
        use_flash_attention: attention through ``torch.nn.functional.scaled_dot_product_attention``
            (see :class:`HSRDiff`).

    Returns (forward):
        F_h = [f_1, ..., f_L], f_k of shape (B, C_k, *spatial / 2^(k-1)); f_L is the global
        condition f_g.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        num_res_blocks: Sequence[int],
        attention_levels: Sequence[bool],
        num_head_channels: Sequence[int],
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        self.conv_in = conv3x3(spatial_dims, in_channels, channels[0])
        self.levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        previous = channels[0]
        for level, width in enumerate(channels):
            blocks: list[nn.Module] = []
            for i in range(num_res_blocks[level]):
                blocks.append(
                    UnetResBlock(
                        spatial_dims=spatial_dims,
                        in_channels=previous if i == 0 else width,
                        out_channels=width,
                        kernel_size=3,
                        stride=1,
                        norm_name=_group_norm(norm_num_groups, norm_eps),
                        act_name="swish",
                    )
                )
                if attention_levels[level]:
                    blocks.append(
                        SpatialAttentionBlock(
                            spatial_dims=spatial_dims,
                            num_channels=width,
                            num_head_channels=num_head_channels[level],
                            norm_num_groups=norm_num_groups,
                            norm_eps=norm_eps,
                            use_flash_attention=use_flash_attention,
                        )
                    )
            self.levels.append(nn.Sequential(*blocks))
            if level < len(channels) - 1:
                self.downsamplers.append(
                    DiffusionUnetDownsample(spatial_dims, num_channels=width, use_conv=True, out_channels=width)
                )
            previous = width

    def forward(self, condition: torch.Tensor) -> list[torch.Tensor]:
        h = self.conv_in(condition)
        features = []
        for level, block in enumerate(self.levels):
            h = block(h)
            features.append(h)  # f_k: before this level's down-sampling
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
        return features


class HSRDiffDecoder(nn.Module):
    """D_eps or D_x: one decoder path of HSRDiff (paper Eq. 5-6); the two paths do not share weights.

    It walks the levels from the deepest (L) to the finest (1). At level k it first concatenates
    to the running feature, along channels, the E_d skip e_k (when ``decoder_skips``) and the
    condition feature f_k (when ``hierarchical``), i.e. before the up-sampling of that scale, then
    applies ``num_res_blocks[k]`` ``DiffusionUNetResnetBlock`` s (with the time embedding), a
    ``SpatialAttentionBlock`` after each where ``attention_levels[k]``, and a nearest
    ``WrappedUpsample`` with a 3x3 post-convolution (as MONAI's ``UpBlock``) except at level 1.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        channels: channels of each level, (C_1, ..., C_L); the input is (B, C_L, *spatial / 2^(L-1)).
        num_res_blocks: residual blocks per level.
        attention_levels: whether each level has self-attention.
        num_head_channels: channels per attention head, per level.
        temb_channels: width of the time embedding.
        decoder_skips: concatenate the E_d skip of each level.
        hierarchical: concatenate the condition feature f_k of each level.
        norm_num_groups: groups of every GroupNorm.
        norm_eps: epsilon of every GroupNorm.
        use_flash_attention: attention through ``torch.nn.functional.scaled_dot_product_attention``
            (see :class:`HSRDiff`).

    Returns (forward):
        f_eps or f_x: (B, C_1, *spatial).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        num_res_blocks: Sequence[int],
        attention_levels: Sequence[bool],
        num_head_channels: Sequence[int],
        temb_channels: int,
        decoder_skips: bool = True,
        hierarchical: bool = True,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        self.decoder_skips = decoder_skips
        self.hierarchical = hierarchical
        # Stored deepest first, the order in which forward visits them.
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        previous = channels[-1]
        for level in reversed(range(len(channels))):
            width = channels[level]
            extra = width * (int(decoder_skips) + int(hierarchical))
            resnets, attentions = [], []
            for i in range(num_res_blocks[level]):
                resnets.append(
                    DiffusionUNetResnetBlock(
                        spatial_dims=spatial_dims,
                        in_channels=previous + extra if i == 0 else width,
                        out_channels=width,
                        temb_channels=temb_channels,
                        norm_num_groups=norm_num_groups,
                        norm_eps=norm_eps,
                    )
                )
                attentions.append(
                    SpatialAttentionBlock(
                        spatial_dims=spatial_dims,
                        num_channels=width,
                        num_head_channels=num_head_channels[level],
                        norm_num_groups=norm_num_groups,
                        norm_eps=norm_eps,
                        use_flash_attention=use_flash_attention,
                    )
                    if attention_levels[level]
                    else nn.Identity()
                )
            self.resnets.append(nn.ModuleList(resnets))
            self.attentions.append(nn.ModuleList(attentions))
            if level > 0:
                self.upsamplers.append(
                    WrappedUpsample(
                        spatial_dims=spatial_dims,
                        mode="nontrainable",
                        in_channels=width,
                        out_channels=width,
                        interp_mode="nearest",
                        scale_factor=2.0,
                        post_conv=conv3x3(spatial_dims, width, width),
                        align_corners=None,
                    )
                )
            previous = width

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        skips: Sequence[torch.Tensor] | None = None,
        condition_features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        num_levels = len(self.resnets)
        for step, (resnets, attentions) in enumerate(zip(self.resnets, self.attentions)):
            level = num_levels - 1 - step
            parts = [h]
            if self.decoder_skips:
                parts.append(skips[level])  # type: ignore[index]
            if self.hierarchical:
                parts.append(condition_features[level])  # type: ignore[index]
            h = torch.cat(parts, dim=1) if len(parts) > 1 else h
            for resnet, attention in zip(resnets, attentions):
                h = attention(resnet(h, emb))
            if step < len(self.upsamplers):
                h = self.upsamplers[step](h)
        return h


class SelfRegulationHead(nn.Module):
    """The self-regulating process of HSRDiff (paper Eq. 7, Figure 2 B).

    ``f_dual = C_1(f_eps) + C_2(f_x)`` with two independent 3x3 convolutions, then a small
    down-sampling network Phi (stride-2 ``Convolution`` blocks with GroupNorm and SiLU, global
    average pooling, a linear layer to 2 logits) and ``kappa = softmax(Phi(f_dual))[..., 0]``:
    one scalar in (0, 1) per item, the weight of the x0-mode mean mu_x (Eq. 8).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: channels of f_eps and f_x (C_1).
        phi_channels: output channels of Phi's stride-2 convolutions, one per convolution.
        norm_num_groups: groups of Phi's GroupNorms (each of ``phi_channels`` must be divisible).
        norm_eps: epsilon of Phi's GroupNorms.

    Returns (forward):
        kappa: (B,) in (0, 1).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        phi_channels: Sequence[int],
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.c1 = conv3x3(spatial_dims, in_channels, in_channels)
        self.c2 = conv3x3(spatial_dims, in_channels, in_channels)
        layers: list[nn.Module] = []
        previous = in_channels
        for width in phi_channels:
            layers.append(
                Convolution(
                    spatial_dims=spatial_dims,
                    in_channels=previous,
                    out_channels=width,
                    strides=2,
                    kernel_size=3,
                    padding=1,
                    adn_ordering="NA",
                    norm=_group_norm(norm_num_groups, norm_eps),
                    act="swish",
                )
            )
            previous = width
        layers += [Pool[Pool.ADAPTIVEAVG, spatial_dims](1), nn.Flatten(1), nn.Linear(previous, 2)]
        self.phi = nn.Sequential(*layers)

    def forward(self, f_eps: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        f_dual = self.c1(f_eps) + self.c2(f_x)
        logits = self.phi(f_dual)  # (B, 2)
        return torch.softmax(logits, dim=1)[:, 0]


class DualOutputHead(nn.Module):
    """The last layer of Benny & Wolf's dynamic dual-output model (CVPR 2022), on one decoder's feature.

    GroupNorm, SiLU and ONE 3x3 convolution with 2M + 1 output channels: eps_theta (M), x_theta
    (M) and the logit of the interpolation weight (1), which a sigmoid maps into (0, 1). Their
    model differs from a plain one only by these extra output channels of the last layer, so the
    three outputs share every other parameter; HSRDiff criticises exactly this sharing (the
    two modes decoded with shared parameters, the weight not computed from the predictions).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: channels of the decoder feature (C_1).
        out_channels: label channels M.
        norm_num_groups: groups of the GroupNorm.
        norm_eps: epsilon of the GroupNorm.

    Returns (forward):
        eps (B, M, *spatial), x0 (B, M, *spatial), kappa (B, 1, *spatial) in (0, 1): the
        per-pixel weight of the x0 mode (of mu_x in DDPM, of x_theta in DDIM's fused x0).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm_num_groups: int = 32, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=norm_eps, affine=True)
        self.act = nn.SiLU()
        self.conv = conv3x3(spatial_dims, in_channels, 2 * out_channels + 1)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.conv(self.act(self.norm(feature)))
        m = self.out_channels
        return out[:, :m], out[:, m : 2 * m], torch.sigmoid(out[:, 2 * m :])


class HSRDiff(nn.Module):
    """HSRDiff: the denoising network of Hierarchical Self-Regulation Diffusion (AAAI 2025, Figure 2).

    From a noisy label x_t, its timestep t and a condition image c it predicts the noise eps_theta,
    the clean label x_theta and the self-regulating parameter kappa_phi (paper Eq. 5-7):

    1. ``F_h = E_c(c)`` (:class:`ConditionEncoder`), once per image: ``encode_condition``.
    2. E_d over x_t with time embedding; its feature of each level before down-sampling is the
       U-Net skip e_k.
    3. ``f_m = M(concat(E_d(x_t), f_g))``: a ``DiffusionUNetResnetBlock`` that fuses the two
       (and brings the width back to C_L), then MONAI's ``AttnMidBlock`` (res, attention, res).
    4. ``f_eps = D_eps(f_m, F_h)``, ``f_x = D_x(f_m, F_h)`` with separate weights
       (:class:`HSRDiffDecoder`), heads ``eps_theta = C_eps(f_eps)``, ``x_theta = C_x(f_x)``
       (GroupNorm, SiLU, 3x3 convolution).
    5. ``kappa = softmax(Phi(C_1(f_eps) + C_2(f_x)))[..., 0]`` (:class:`SelfRegulationHead`).

    The network knows nothing of the noise schedule: ``timesteps`` is only embedded
    (sinusoidal, then an MLP, as MONAI's ``DiffusionModelUNet``).

    Ablation switches (paper Table 6, :data:`TABLE6_ROWS`) choose which parts exist, so no
    parameter is wasted: ``prediction="eps"`` / ``"x0"`` builds one decoder and head, ``"dual"``
    both without kappa, ``"srdiff"`` everything; ``"dynamic"`` is Benny & Wolf's dual output
    (row 5): one decoder and a :class:`DualOutputHead` giving eps, x0 and a per-pixel weight
    kappa of shape (B, 1, *spatial). ``condition="hierarchical"`` feeds F_h to the decoders and f_g to M,
    ``"global"`` only f_g to M, ``"none"`` builds no E_c and ignores any condition.
    ``decoder_skips`` additionally concatenates the E_d skips in the decoders; the paper's
    Figure 2 shows F_h only, but an eps-decoder cannot reproduce full-resolution noise through
    a bottleneck without them, so they are on by default.

    Initialisation: MONAI's residual blocks keep their zero-initialised second convolution (each
    block starts as the identity, as in guided-diffusion), but the output heads C_eps, C_x,
    C_1, C_2 and Phi use PyTorch's default initialisation: zero heads would stop every gradient
    to the decoders on the first step.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: channels C of the condition image (LIDC 1, MS-Lesion 4).
        out_channels: channels M of the label (1 for binary tasks, the number of classes for
            one-hot multi-class labels).
        channels: widths (C_1, ..., C_L) of the L levels, shared by E_c, E_d and both decoders;
            spatial sizes must be divisible by 2^(L-1).
        num_res_blocks: residual blocks per level (int for every level, or one per level).
        attention_levels: self-attention at each level (the middle block always has attention).
        norm_num_groups: groups of every GroupNorm; every width must be divisible by it.
        norm_eps: epsilon of every GroupNorm.
        num_head_channels: channels per attention head (int, or one per level); the widths of
            levels with attention (and of the deepest level) must be divisible by it.
        prediction: "srdiff", "dual", "eps", "x0" or "dynamic" (see above).
        condition: "hierarchical", "global" or "none" (see above).
        decoder_skips: concatenate the E_d skips in the decoders.
        phi_channels: widths of Phi's stride-2 convolutions; default (C_1, 2 C_1, 4 C_1).
        use_flash_attention: run every self-attention through PyTorch's fused
            ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``) instead of explicit
            softmax(QK^T)V products: the same weights and the same result up to float rounding
            (|Δ| ~ 1e-7), ~10 % less time per denoising step on CPU and no (tokens x tokens)
            attention matrix in memory (benchmarks/README.md). It is not part of the state dict,
            so checkpoints load either way.

    Example::

        net = HSRDiff(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64),
                      attention_levels=(False, True), norm_num_groups=8, num_head_channels=32)
        x_t, c = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
        t = torch.tensor([0, 249])
        out = net(x_t, t, condition=c)            # eps, x0: (2, 1, 32, 32); kappa: (2,)
        feats = net.encode_condition(c)           # E_c once per image ...
        feats16 = [f.repeat_interleave(16, 0) for f in feats]   # ... reused for 16 samples
        out16 = net(x_t.repeat_interleave(16, 0), t.repeat_interleave(16, 0), condition_features=feats16)

        # 3D works the same way
        net3d = HSRDiff(spatial_dims=3, in_channels=4, out_channels=1, channels=(16, 32),
                        attention_levels=(False, True), norm_num_groups=8, num_head_channels=16)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        num_head_channels: int | Sequence[int] = 32,
        prediction: str = "srdiff",
        condition: str = "hierarchical",
        decoder_skips: bool = True,
        phi_channels: Sequence[int] | None = None,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        # 0. validation, before anything is built
        if spatial_dims not in (2, 3):
            raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"{name}: prediction must be one of {PREDICTIONS}, got {prediction!r}.")
        if condition not in CONDITIONS:
            raise ValueError(f"{name}: condition must be one of {CONDITIONS}, got {condition!r}.")
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if int(value) < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}.")
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        num_levels = len(channels)
        if num_levels < 1 or any(c < 1 for c in channels):
            raise ValueError(f"{name}: channels must be a non-empty list of positive widths, got {channels!r}.")
        if len(attention_levels) != num_levels:
            raise ValueError(
                f"{name}: attention_levels must have one entry per level of channels ({num_levels}), "
                f"got {len(attention_levels)}: channels={channels!r}, attention_levels={attention_levels!r}."
            )
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"{name}: every entry of channels must be divisible by norm_num_groups={norm_num_groups}, "
                f"got channels={channels!r}."
            )
        num_res_blocks = _per_level(num_res_blocks, num_levels)
        if len(num_res_blocks) != num_levels or any(int(n) < 1 for n in num_res_blocks):
            raise ValueError(
                f"{name}: num_res_blocks must be a positive int or one positive int per level ({num_levels}), "
                f"got {num_res_blocks!r}."
            )
        num_head_channels = _per_level(num_head_channels, num_levels)
        if len(num_head_channels) != num_levels:
            raise ValueError(
                f"{name}: num_head_channels must be an int or one int per level ({num_levels}), "
                f"got {num_head_channels!r}."
            )
        for level in range(num_levels):
            # the deepest width is used by the middle block's attention whatever attention_levels says
            if (attention_levels[level] or level == num_levels - 1) and channels[level] % num_head_channels[level]:
                raise ValueError(
                    f"{name}: channels[{level}]={channels[level]} has attention and must be divisible by "
                    f"num_head_channels[{level}]={num_head_channels[level]}."
                )
        if phi_channels is None:
            phi_channels = (channels[0], 2 * channels[0], 4 * channels[0])
        phi_channels = tuple(int(c) for c in phi_channels)
        if prediction == "srdiff" and (not phi_channels or any(c % norm_num_groups for c in phi_channels)):
            raise ValueError(
                f"{name}: phi_channels must be a non-empty list of widths divisible by "
                f"norm_num_groups={norm_num_groups}, got {phi_channels!r}."
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.num_res_blocks = num_res_blocks
        self.attention_levels = attention_levels
        self.num_head_channels = num_head_channels
        self.prediction = prediction
        self.condition = condition
        self.decoder_skips = decoder_skips
        self.phi_channels = phi_channels
        self.use_flash_attention = use_flash_attention
        levels = {"channels": channels, "num_res_blocks": num_res_blocks, "attention_levels": attention_levels,
                  "num_head_channels": num_head_channels, "use_flash_attention": use_flash_attention}  # fmt: skip
        norm = {"norm_num_groups": norm_num_groups, "norm_eps": norm_eps}

        # 1. time embedding (as MONAI's DiffusionModelUNet)
        time_embed_dim = channels[0] * 4
        self.time_embed = nn.Sequential(
            nn.Linear(channels[0], time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        # 2. E_c (absent for condition="none")
        self.condition_encoder: ConditionEncoder | None = (
            ConditionEncoder(spatial_dims, in_channels, **levels, **norm) if condition != "none" else None
        )

        # 3. E_d: MONAI down blocks over x_t
        self.label_conv_in = conv3x3(spatial_dims, out_channels, channels[0])
        self.label_encoder = nn.ModuleList()
        previous = channels[0]
        for level, width in enumerate(channels):
            common = {
                "spatial_dims": spatial_dims,
                "in_channels": previous,
                "out_channels": width,
                "temb_channels": time_embed_dim,
                "num_res_blocks": num_res_blocks[level],
                "add_downsample": level < num_levels - 1,
                **norm,
            }
            if attention_levels[level]:
                block: nn.Module = AttnDownBlock(
                    **common, num_head_channels=num_head_channels[level], use_flash_attention=use_flash_attention
                )
            else:
                block = DownBlock(**common)
            self.label_encoder.append(block)
            previous = width

        # 4. M: fuse concat(E_d deepest, f_g), then res - attention - res
        deepest = channels[-1]
        self.middle_fuse = DiffusionUNetResnetBlock(
            spatial_dims=spatial_dims,
            in_channels=deepest * (2 if condition != "none" else 1),
            out_channels=deepest,
            temb_channels=time_embed_dim,
            **norm,
        )
        self.middle_block = AttnMidBlock(
            spatial_dims=spatial_dims,
            in_channels=deepest,
            temb_channels=time_embed_dim,
            num_head_channels=num_head_channels[-1],
            use_flash_attention=use_flash_attention,
            **norm,
        )

        # 5. D_eps, D_x and their heads C_eps, C_x (only those the prediction mode uses)
        def decoder() -> HSRDiffDecoder:
            return HSRDiffDecoder(
                spatial_dims,
                **levels,
                temb_channels=time_embed_dim,
                decoder_skips=decoder_skips,
                hierarchical=condition == "hierarchical",
                **norm,
            )

        def head() -> nn.Module:
            return nn.Sequential(
                nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels[0], eps=norm_eps, affine=True),
                nn.SiLU(),
                conv3x3(spatial_dims, channels[0], out_channels),
            )

        has_eps = prediction in ("srdiff", "dual", "eps")
        has_x = prediction in ("srdiff", "dual", "x0")
        self.eps_decoder: HSRDiffDecoder | None = decoder() if has_eps else None
        self.eps_head: nn.Module | None = head() if has_eps else None
        self.x_decoder: HSRDiffDecoder | None = decoder() if has_x else None
        self.x_head: nn.Module | None = head() if has_x else None
        # Benny & Wolf: one decoder shared by both modes and the weight, one last layer for all three
        dynamic = prediction == "dynamic"
        self.dual_decoder: HSRDiffDecoder | None = decoder() if dynamic else None
        self.dual_head: DualOutputHead | None = (
            DualOutputHead(spatial_dims, channels[0], out_channels, **norm) if dynamic else None
        )

        # 6. C_1, C_2, Phi
        self.kappa_head: SelfRegulationHead | None = (
            SelfRegulationHead(spatial_dims, channels[0], phi_channels, **norm) if prediction == "srdiff" else None
        )

    def encode_condition(self, condition: torch.Tensor) -> list[torch.Tensor] | None:
        """Run E_c on the condition image; independent of x_t and t, so run it ONCE per image.

        Args:
            condition: (B, C, *spatial) condition image, C = ``in_channels``, every spatial size
                divisible by 2^(L-1).

        Returns:
            F_h = [f_1, ..., f_L] with f_k of shape (B, C_k, *spatial / 2^(k-1)), the deepest
            (f_g) last; None when ``condition="none"``. To draw N samples per image repeat each
            tensor along the batch: ``[f.repeat_interleave(N, 0) for f in feats]``.
        """
        if self.condition_encoder is None:
            return None
        self._check_image(condition, "condition", self.in_channels, "in_channels")
        return self.condition_encoder(condition)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        condition_features: Sequence[torch.Tensor] | None = None,
    ) -> HSRDiffOutput:
        """Predict eps_theta, x_theta and kappa_phi for one denoising step.

        Args:
            x: (B, M, *spatial) noisy label x_t, M = ``out_channels``; spatial sizes divisible by
                2^(L-1).
            timesteps: (B,) 0-based step indices t in {0, ..., T-1} (MONAI's scheduler
                convention), integer or float.
            condition: (B, C, *spatial) condition image; E_c is run on it. Ignored (may be None)
                when ``condition="none"``.
            condition_features: F_h precomputed by :meth:`encode_condition` (batch B), used
                instead of ``condition``. Pass one of the two, not both.

        Returns:
            :class:`HSRDiffOutput` with eps, x0 of shape (B, M, *spatial) (None where the path
            does not exist) and kappa in (0, 1): (B,) for ``prediction="srdiff"``,
            (B, 1, *spatial) for ``"dynamic"``, None otherwise.
        """
        name = type(self).__name__
        # 1. validation
        self._check_image(x, "x", self.out_channels, "out_channels")
        batch = x.shape[0]
        if timesteps.ndim != 1 or timesteps.shape[0] != batch:
            raise ValueError(
                f"{name}.forward: timesteps must have shape (B,) = ({batch},) matching x, "
                f"got {tuple(timesteps.shape)}; pass one step index per item."
            )
        features: Sequence[torch.Tensor] | None = None
        if self.condition != "none":
            if condition is not None and condition_features is not None:
                raise ValueError(f"{name}.forward: pass either condition or condition_features, not both.")
            if condition_features is not None:
                features = condition_features
            elif condition is not None:
                if condition.shape[0] != batch or condition.shape[2:] != x.shape[2:]:
                    raise ValueError(
                        f"{name}.forward: condition must have the batch size and spatial size of x "
                        f"{(batch, '*', *x.shape[2:])}, got {tuple(condition.shape)}."
                    )
                features = self.encode_condition(condition)
            else:
                raise ValueError(
                    f"{name}.forward: condition={self.condition!r} needs the condition image (condition=...) "
                    "or its features from encode_condition (condition_features=...); got neither."
                )
            self._check_features(features, x)  # type: ignore[arg-type]

        # 2. time embedding
        t_emb = get_timestep_embedding(timesteps, self.channels[0]).to(dtype=x.dtype)
        emb = self.time_embed(t_emb)

        # 3. E_d, keeping each level's feature before its down-sampling as the skip e_k
        h = self.label_conv_in(x)
        skips = []
        for block in self.label_encoder:
            h, states = block(h, emb)
            skips.append(states[len(block.resnets) - 1])

        # 4. M: f_m = M(E_d(x_t), f_g)
        if features is not None:
            h = torch.cat([h, features[-1]], dim=1)
        h = self.middle_block(self.middle_fuse(h, emb), emb)

        # 5. the two decoding paths (differentiation)
        decoder_features = features if self.condition == "hierarchical" else None
        decoder_skips = skips if self.decoder_skips else None
        f_eps = f_x = None
        eps = x0 = kappa = None
        if self.eps_decoder is not None and self.eps_head is not None:
            f_eps = self.eps_decoder(h, emb, decoder_skips, decoder_features)
            eps = self.eps_head(f_eps)
        if self.x_decoder is not None and self.x_head is not None:
            f_x = self.x_decoder(h, emb, decoder_skips, decoder_features)
            x0 = self.x_head(f_x)
        if self.dual_decoder is not None and self.dual_head is not None:
            eps, x0, kappa = self.dual_head(self.dual_decoder(h, emb, decoder_skips, decoder_features))

        # 6. self-regulation (unification)
        if self.kappa_head is not None:
            kappa = self.kappa_head(f_eps, f_x)
        return HSRDiffOutput(eps=eps, x0=x0, kappa=kappa)

    def _check_image(self, image: torch.Tensor, arg: str, expected: int, expected_arg: str) -> None:
        name = type(self).__name__
        if image.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{name}: {arg} must have shape (B, C, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(image.shape)}."
            )
        if image.shape[1] != expected:
            raise ValueError(
                f"{name}: {arg} has {image.shape[1]} channels but the network was built with "
                f"{expected_arg}={expected}; got shape {tuple(image.shape)}."
            )
        factor = 2 ** (len(self.channels) - 1)
        if any(s % factor for s in image.shape[2:]):
            raise ValueError(
                f"{name}: every spatial size of {arg} must be divisible by 2^(L-1)={factor} "
                f"(L={len(self.channels)} levels), got {tuple(image.shape[2:])}; pad or crop the input."
            )

    def _check_features(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> None:
        name = type(self).__name__
        num_levels = len(self.channels)
        if not isinstance(features, (list, tuple)) or len(features) != num_levels:
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(
                f"{name}.forward: condition_features must be the list F_h of {num_levels} tensors returned "
                f"by encode_condition, got {got}."
            )
        for level, feature in enumerate(features):
            spatial = tuple(s // 2**level for s in x.shape[2:])
            expected = (x.shape[0], self.channels[level], *spatial)
            if tuple(feature.shape) != expected:
                raise ValueError(
                    f"{name}.forward: condition_features[{level}] must have shape {expected} for x of shape "
                    f"{tuple(x.shape)}, got {tuple(feature.shape)}; repeat each feature along the batch "
                    "(f.repeat_interleave(N, 0)) when drawing N samples per image."
                )

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

