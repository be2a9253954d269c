"""scikit-learn's 8×8 digits: a dataset that ships with a dependency, for tests and demos."""
from __future__ import annotations

import numpy as np
import torch

from potion.datasets.base import DATASETS, ArraySource, DatasetSplits, channel_stats
from potion.errors import PotionError


@DATASETS.register("digits")
def digits(upscale: int = 2, test_share: float = 0.2, seed: int = 0) -> DatasetSplits:
    """1,797 grey digits, split with a seeded stratified draw.

    ``upscale`` repeats every pixel (nearest neighbour) so that a 3×3 trigger is a small
    mark on a 16×16 image rather than a third of an 8×8 one.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(upscale, int) or isinstance(upscale, bool) or upscale < 1:
        raise PotionError(f"digits: upscale must be a positive integer, got {upscale!r}")
    if not (isinstance(test_share, (int, float)) and 0 < test_share < 1):
        raise PotionError(f"digits: test_share must lie strictly between 0 and 1, got {test_share!r}")

    bunch = load_digits()
    # Pixel values are counts (0..16) of ink in a 4×4 block of the original scan; stretch them onto the uint8 range.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    if upscale > 1:
        images = images.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    labels = bunch.target.astype(np.int64)
    classes = [str(c) for c in range(10)]

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_share, random_state=seed, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train = ArraySource(images[torch.from_numpy(train_idx)], labels[train_idx], classes)
    test = ArraySource(images[torch.from_numpy(test_idx)], labels[test_idx], classes)
    mean, std = channel_stats(train.images)
    return DatasetSplits("digits", train, test, mean, std, hflip=False)
