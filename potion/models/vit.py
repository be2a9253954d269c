"""Vision Transformers (or any timm model) built from scratch by timm.

``pretrained`` is always False: Potion never downloads at run time. Pre-trained weights
come in through a local file (``model.init`` when training, ``checkpoint.py``).

Without a ``timm_name`` the ViT is sized for the image (``vit_size``): the paper's ViT-B/16
(section 4.2) for ImageNet-sized images, and a CPU-sized member of the ViT-Ti family for
small ones, where ViT-B/16 would see a single 16 px token and take many minutes per
hundred updates on a CPU.
"""
from __future__ import annotations

import math
import re

from torch import nn

from potion.errors import PotionError
from potion.models import MODELS

LARGE_IMAGE = 112  # from here on the paper's ViT-B/16 (224 px: 14 × 14 tokens of 16 px)
LARGE = ("vit_base_patch16_224", 14)
# Small images: patch 4 up to 32 px (4 × 4 tokens at 16 px, 8 × 8 at CIFAR's 32), 8 × 8
# tokens above; embedding 96, 3 heads; depth 4 up to 16 px, 6 above. Sized so that a digits
# run (16 px) learns its backdoor in minutes on a 2-core CPU (tests/test_vit.py,
# benchmarks/suites/vit-cpu.yaml).
SMALL = "vit_tiny_patch16_224"
SMALL_ARCH = {"embed_dim": 96, "num_heads": 3}


def patch_for(image_size: int, grid: int) -> int:
    """The patch size that divides ``image_size`` into the token grid closest to ``grid``
    per side (timm's position embedding needs a whole number of patches)."""
    # never a single token while more are possible (17 px: patch 1, not 17)
    divisors = [p for p in range(1, image_size // 2 + 1) if image_size % p == 0] or [image_size]
    return min(divisors, key=lambda p: (abs(math.log(image_size / p / grid)), p))


def vit_size(image_size: int) -> tuple[str, dict]:
    """The timm model name and keyword arguments of the ViT Potion builds for square
    images of ``image_size`` pixels when none is named."""
    if image_size >= LARGE_IMAGE:
        name, grid = LARGE
        if image_size % 16 == 0:  # ViT-B/16 as published (384 px: 24 × 24 tokens)
            return name, {}
        return name, {"patch_size": patch_for(image_size, grid)}
    grid = min(8, max(4, image_size // 4))
    return SMALL, {"patch_size": patch_for(image_size, grid), "depth": 4 if image_size <= 16 else 6, **SMALL_ARCH}


@MODELS.register("vit")
def vit(*, num_classes: int, in_channels: int, image_size: int, timm_name: str | None = None, **timm_kwargs) -> nn.Module:
    """``timm_name`` None: sized for the image (``vit_size``), with ``timm_kwargs``
    overriding single entries (e.g. ``depth``); a named timm model is built as named."""
    import timm  # imported here: timm is slow to import and only this model needs it

    if "pretrained" in timm_kwargs:
        raise PotionError(
            "vit: 'pretrained' cannot be set; Potion never downloads weights. "
            "Load pre-trained weights from a local file instead (model.init when training)"
        )
    if timm_name is None:
        timm_name, sized = vit_size(image_size)
        timm_kwargs = {**sized, **timm_kwargs}
    if not isinstance(timm_name, str) or not timm.is_model(timm_name):
        raise PotionError(f"vit: timm has no model '{timm_name}'; see timm.list_models('vit_*') for names")
    patch = timm_kwargs.get("patch_size")
    if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0 and image_size % patch:
        raise PotionError(
            f"vit: patch_size {patch} does not divide the image size {image_size}; "
            f"pick a divisor of {image_size} (e.g. {patch_for(image_size, image_size // patch or 1)})"
        )
    try:
        return timm.create_model(
            timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, img_size=image_size, **timm_kwargs
        )
    except TypeError as e:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        kwarg = match.group(1) if match else None
        raise PotionError(f"vit: timm model '{timm_name}' does not accept parameter '{kwarg}' ({e})") from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise PotionError(f"vit: timm could not build '{timm_name}' with {timm_kwargs or 'default settings'}: {e}") from None
