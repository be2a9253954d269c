"""ResNet-9 of the poison-unlearning benchmark (Goel et al. 2024; SPEC §10).

The layer names and order are fixed: checkpoints and importance tables are keyed by
parameter name, so renaming a layer would orphan saved results.
"""
from __future__ import annotations

import torch
from torch import nn

from potion.errors import PotionError
from potion.models import MODELS


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=True),
        nn.BatchNorm2d(c_out),
        nn.CELU(0.075),
    )


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.res = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _final_padding(image_size: int) -> int:
    # The last conv_bn has no padding in the benchmark, which needs a feature map of at
    # least 3 px there (inputs of 11 px or more). For smaller inputs (8 px digits) we pad
    # instead; padding changes no parameter shape, so the weights stay interchangeable.
    after_stride = (image_size - 1) // 2 + 1
    return 0 if after_stride // 2 >= 3 else 1


class ResNet9(nn.Sequential):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, image_size: int = 32):
        c = {n: scaled(n, width) for n in (64, 128, 256)}
        super().__init__()
        self.prep = conv_bn(in_channels, c[64])
        self.layer1 = conv_bn(c[64], c[128], kernel_size=5, stride=2, padding=2)
        self.res1 = Residual(conv_bn(c[128], c[128]), conv_bn(c[128], c[128]))
        self.layer2 = nn.Sequential(conv_bn(c[128], c[256]), nn.MaxPool2d(2))
        self.res2 = Residual(conv_bn(c[256], c[256]), conv_bn(c[256], c[256]))
        self.layer3 = conv_bn(c[256], c[128], padding=_final_padding(image_size))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c[128], num_classes, bias=False)


@MODELS.register("resnet9")
def resnet9(*, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise PotionError(f"resnet9: width must be a positive number (1.0 = the benchmark's widths), got {width!r}")
    if image_size < 4:
        raise PotionError(f"resnet9 needs images of at least 4 px, got image_size={image_size}")
    return ResNet9(num_classes, in_channels, float(width), image_size)
