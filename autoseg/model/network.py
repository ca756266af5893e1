"""The U-Net built from a plan's topology (2D or 3D).

Per stage: ``convs`` x (conv -> instance norm -> LeakyReLU 0.01); downsampling by the
stride of each stage's first conv, upsampling by transposed convolution, skip
concatenation, and a 1x1 head on every decoder stage for deep supervision. The
activation elements it produces are exactly what :func:`activation_elements` in the
planner counts, so plans and networks cannot drift apart (a test checks it).

The residual-encoder variant (``network.architecture = "residual_encoder"``, nnU-Net's
ResidualEncoderUNet of its ResEnc presets) puts a stem conv before the encoder and builds each
encoder stage from residual blocks (:class:`ResidualBlock`, ResNet-D's BasicBlockD); its
decoder is the plain one. Module order and shapes follow dynamic_network_architectures, so an
nnU-Net checkpoint maps onto it key by key (:func:`autoseg.deploy.nnunet.autoseg_key`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.core.plan import Configuration, Network, Plan

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVGPOOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
NEGATIVE_SLOPE = 0.01


class ConvBlock(nn.Sequential):
    def __init__(
        self, dims: int, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]
    ) -> None:
        super().__init__(
            _CONV[dims](
                in_channels,
                out_channels,
                tuple(kernel),
                tuple(stride),
                padding=tuple((k - 1) // 2 for k in kernel),
                bias=True,
            ),
            _NORM[dims](out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        )


def _stage(dims: int, in_channels: int, out_channels: int, kernel, stride, convs: int) -> nn.Sequential:
    blocks = [ConvBlock(dims, in_channels, out_channels, kernel, stride)]
    blocks += [ConvBlock(dims, out_channels, out_channels, kernel, [1] * dims) for _ in range(convs - 1)]
    return nn.Sequential(*blocks)


class ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, plus the skip (average pooling where the block strides, then a 1x1 conv and
    norm where the width changes), then act: dynamic_network_architectures' BasicBlockD."""

    def __init__(
        self, dims: int, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]
    ) -> None:
        super().__init__()
        self.conv1 = ConvBlock(dims, in_channels, out_channels, kernel, stride)
        self.conv2 = nn.Sequential(*list(ConvBlock(dims, out_channels, out_channels, kernel, [1] * dims))[:2])
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(_AVGPOOL[dims](tuple(stride), tuple(stride)))
        if in_channels != out_channels:
            skip.append(
                nn.Sequential(
                    _CONV[dims](in_channels, out_channels, 1, 1, 0, bias=False),
                    _NORM[dims](out_channels, eps=1e-5, affine=True),
                )
            )
        self.skip = nn.Sequential(*skip)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.act(out)


def _residual_stage(dims: int, in_channels: int, out_channels: int, kernel, stride, blocks: int) -> nn.Sequential:
    first = ResidualBlock(dims, in_channels, out_channels, kernel, stride)
    rest = [ResidualBlock(dims, out_channels, out_channels, kernel, [1] * dims) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


class UNet(nn.Module):
    """Plain convolutional U-Net; ``forward`` returns the full-resolution logits, or with
    deep supervision (in training mode) a list of logits from highest to lowest resolution.
    ``head_bias``: every head's initial bias (:mod:`autoseg.training.output_prior`), else 0 as nnU-Net."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        topology: Network,
        dims: int,
        deep_supervision: bool = True,
        head_bias: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        features, strides, kernels = topology.features_per_stage, topology.strides, topology.kernel_sizes
        self.stem: nn.Module = nn.Identity()
        self.encoder = nn.ModuleList()
        channels = in_channels
        if topology.architecture == "residual_encoder":
            self.stem = ConvBlock(dims, in_channels, features[0], kernels[0], [1] * dims)
            channels = features[0]
            for f, stride, kernel, blocks in zip(features, strides, kernels, topology.blocks_per_stage):
                self.encoder.append(_residual_stage(dims, channels, f, kernel, stride, blocks))
                channels = f
        else:
            for f, stride, kernel in zip(features, strides, kernels):
                self.encoder.append(_stage(dims, channels, f, kernel, stride, topology.convs_per_stage_encoder))
                channels = f
        self.upsample, self.decoder, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(len(features) - 2, -1, -1):
            self.upsample.append(
                _TRANSPOSED[dims](features[s + 1], features[s], tuple(strides[s + 1]), tuple(strides[s + 1]), bias=True)
            )
            self.decoder.append(
                _stage(dims, 2 * features[s], features[s], kernels[s], [1] * dims, topology.convs_per_stage_decoder)
            )
            self.heads.append(_CONV[dims](features[s], num_classes, 1, 1, 0, bias=True))
        self.apply(_he_init)
        for module in self.modules():  # each residual block starts as the identity of its skip (nnU-Net's init)
            if isinstance(module, ResidualBlock):
                nn.init.zeros_(module.conv2[1].weight)
        if head_bias is not None:
            with torch.no_grad():
                for head in self.heads:
                    head.bias.copy_(torch.as_tensor(head_bias, dtype=head.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        last = len(self.decoder) - 1
        for i, (up, stage, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
            if i == last or (self.deep_supervision and self.training):
                outputs.append(head(x))
        if self.deep_supervision and self.training:
            return outputs[::-1]
        return outputs[-1]


def _he_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(
    config: Configuration,
    in_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    head_bias: Sequence[float] | None = None,
) -> UNet:
    return UNet(in_channels, num_classes, config.network, config.dims, deep_supervision, head_bias)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def network_parameters(plan: Plan, config: Configuration) -> int:
    """Parameter count of the configuration's U-Net (what ``plan`` and ``info`` print), built on the meta
    device: no memory, no time."""
    with torch.device("meta"):
        return parameter_count(build_network(config, plan.input_channels(config), plan.num_classes))


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """1/2^i per output (highest resolution first), the lowest weighted 0, normalised to sum 1."""
    weights = [1 / 2**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]
