"""U-Net topology and its activation-memory model, as pure functions.

The rules follow nnU-Net v2 (its published behaviour, re-derived): pool an axis while
it stays at least ``2 * MIN_EDGE`` voxels and its spacing is within 2x of the finest;
use kernel 1 along an axis until its spacing catches up; features double from 32 up to
a cap. The activation model counts the elements of every convolution output for one
sample; :mod:`autoseg.model.network` builds exactly this topology and a test checks the two
agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_EDGE = 4
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}


@dataclass(frozen=True)
class Topology:
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]
    divisible_by: list[int]


def derive_topology(spacing: list[float], patch: list[float], min_edge: int = MIN_EDGE) -> Topology:
    """Strides and kernels for ``patch`` at ``spacing``; the patch is padded up to the total stride.

    ``patch`` may hold fractions (a patch clipped to a fractional median shape); the padded
    patch is whole.
    """
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch]
    strides = [[1] * dims]
    kernels: list[list[int]] = []
    pools = [0] * dims
    kernel = [1] * dims
    while True:
        valid = [a for a in range(dims) if current_size[a] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        overall_finest = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[a] / overall_finest < 2 else 1 for a, k in enumerate(kernel)]
        stride = [1] * dims
        for a in valid:
            stride[a] = 2
            pools[a] += 1
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dims)
    divisible_by = [2**p for p in pools]
    padded = [int(math.ceil(p / d) * d) for p, d in zip(patch, divisible_by)]
    return Topology(strides, kernels, padded, divisible_by)


def features_per_stage(n_stages: int, dims: int) -> list[int]:
    return [min(BASE_FEATURES * 2**i, MAX_FEATURES[dims]) for i in range(n_stages)]


def activation_elements(
    patch: list[int],
    strides: list[list[int]],
    features: list[int],
    num_classes: int,
    convs_encoder: int = 2,
    convs_decoder: int = 2,
    deep_supervision: bool = False,
) -> int:
    """Elements of all conv / transposed-conv / head outputs for one sample (the memory proxy)."""
    sizes, size = [], list(patch)
    for stride in strides:
        size = [s // k for s, k in zip(size, stride)]
        sizes.append(size)
    total = 0
    for size, f in zip(sizes, features):
        total += convs_encoder * f * math.prod(size)
    n = len(strides)
    for s in range(n - 2, -1, -1):  # decoder stages, lowest resolution first
        voxels = math.prod(sizes[s])
        total += convs_decoder * features[s] * voxels  # conv blocks
        total += features[s] * voxels  # transposed conv
        if deep_supervision or s == 0:
            total += num_classes * voxels
    return total


def residual_activation_elements(
    patch: list[int],
    strides: list[list[int]],
    features: list[int],
    num_classes: int,
    blocks: list[int],
    convs_decoder: int = 1,
    deep_supervision: bool = False,
) -> int:
    """:func:`activation_elements` of the residual-encoder U-Net: the stem conv, two convs per residual block
    and the 1x1 projection of each stage's first block, then the plain decoder (what nnU-Net's
    ResidualEncoderUNet.compute_conv_feature_map_size counts)."""
    total = features[0] * math.prod(patch)  # stem
    size, channels = list(patch), features[0]
    for stride, f, n in zip(strides, features, blocks):
        after = [s // k for s, k in zip(size, stride)]
        voxels = math.prod(after)
        total += 2 * f * voxels * n
        if channels != f or after != size:
            total += f * voxels
        size, channels = after, f
    decoder = activation_elements(patch, strides, features, num_classes, 0, convs_decoder, deep_supervision)
    return total + decoder
