"""A small CNN for quick CPU smoke runs.

Not the demo model: a BN + ReLU + global-average-pool CNN of this kind was measured to be
badly damaged by XLF + PTN; narrow ResNet-9 heals well and is what the demo uses.
"""
from __future__ import annotations

from torch import nn

from potion.errors import PotionError
from potion.models import MODELS


def _block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return layers + [nn.MaxPool2d(2)] if pool else layers


class SmallCNN(nn.Sequential):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, image_size: int = 32):
        # Pool only while the map stays at least 2 px, so tiny inputs still work.
        pool1, pool2 = image_size >= 4, image_size >= 8
        super().__init__(
            *_block(in_channels, width, pool1),
            *_block(width, 2 * width, pool2),
            *_block(2 * width, 4 * width, False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, num_classes),
        )


@MODELS.register("small_cnn")
def small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: int = 32) -> nn.Module:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise PotionError(f"small_cnn: width must be a positive integer, got {width!r}")
    return SmallCNN(num_classes, in_channels, width, image_size)
