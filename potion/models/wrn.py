"""Pre-activation WideResNet (Zagoruyko & Komodakis 2016) as in the benchmark (SPEC §10).

Global average pooling is adaptive so the same network runs on inputs other than 32 px;
at 32 px it equals the benchmark's AvgPool(8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from potion.errors import PotionError
from potion.models import MODELS


class WideBasic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 28, widen: int = 10, dropout: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBasic(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, dropout) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.fc(torch.flatten(out, 1))


@MODELS.register("wrn")
def wrn(*, num_classes: int, in_channels: int, image_size: int, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> nn.Module:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise PotionError(f"wrn: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth!r}")
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 1:
        raise PotionError(f"wrn: widen must be a positive integer, got {widen!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PotionError(f"wrn: dropout must be in [0, 1), got {dropout!r}")
    return WideResNet(num_classes, in_channels, depth, widen, float(dropout))
