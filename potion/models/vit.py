"""Vision Transformers (or any timm model) built from scratch by timm.

``pretrained`` is always False: Potion never downloads at run time. Pre-trained weights
come in through a Potion checkpoint (see ``checkpoint.py``).
"""
from __future__ import annotations

import re

from torch import nn

from potion.errors import PotionError
from potion.models import MODELS


@MODELS.register("vit")
def vit(*, num_classes: int, in_channels: int, image_size: int, timm_name: str = "vit_base_patch16_224", **timm_kwargs) -> nn.Module:
    import timm  # imported here: timm is slow to import and only this model needs it

    if "pretrained" in timm_kwargs:
        raise PotionError(
            "vit: 'pretrained' cannot be set; Potion never downloads weights. "
            "Load pre-trained weights from a Potion checkpoint instead"
        )
    if not isinstance(timm_name, str) or not timm.is_model(timm_name):
        raise PotionError(f"vit: timm has no model '{timm_name}'; see timm.list_models('vit_*') for names")
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
