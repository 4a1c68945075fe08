"""Vision Transformers sized for small images, built on timm's ``VisionTransformer``.

A plain patch-4 ViT trained from scratch on 10k 28-px images learns slowly (its patch
embedding has no locality prior). ``vit-micro``, the workbench default, puts a two-layer
convolutional stem in front (stride 4 in all: 28 px -> 7x7 = 49 tokens) through timm's
``HybridEmbed``: the same token count as patch 4, but far faster to train. The stem's
convolutions are ordinary ``Conv2d`` layers, so noise injection and PTQ treat them like any
other layer; its BatchNorms stay in floating point.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ._registry import register_model


class ConvStem(nn.Sequential):
    """Two 3x3 stride-2 conv-BN-GELU layers: (B, C, H, W) -> (B, width, H/4, W/4)."""

    def __init__(self, in_chans: int, width: int = 64) -> None:
        super().__init__(
            nn.Conv2d(in_chans, width // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width // 2),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.GELU(),
        )


def _vit(num_classes: int, in_chans: int, img_size: int, *, patch_size: int = 4, embed_dim: int = 128,
         depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, conv_stem: bool = False,
         stem_width: int = 64, class_token: bool = False, global_pool: str = "avg",
         drop_path_rate: float = 0.0, pretrained: bool = False, **kwargs) -> nn.Module:
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        from ..errors import ModelError
        raise ModelError("the workbench's small-image ViTs have no pretrained weights; use "
                         "timm:<name> (e.g. timm:vit_tiny_patch16_224) with pretrained=True instead")
    embed_kwargs = {}
    if conv_stem:
        embed_kwargs["embed_layer"] = partial(HybridEmbed, backbone=ConvStem(in_chans, stem_width))
        patch_size = 1  # the stem already downsamples by 4; tokens are its output pixels
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        class_token=class_token, global_pool=global_pool if not class_token else "token",
        drop_path_rate=drop_path_rate, **embed_kwargs, **kwargs,
    )


@register_model("vit-micro", help="default: 4-block ViT, dim 128, conv stem to 7x7 tokens (~0.6M params)")
def vit_micro(num_classes: int, in_chans: int, img_size: int, **kw) -> nn.Module:
    kw.setdefault("conv_stem", True)
    return _vit(num_classes, in_chans, img_size, **kw)


@register_model("vit-tiny", help="ViT-Tiny (dim 192, 12 blocks, 3 heads), patch 4, average pooling")
def vit_tiny(num_classes: int, in_chans: int, img_size: int, **kw) -> nn.Module:
    for k, v in dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, patch_size=4).items():
        kw.setdefault(k, v)
    return _vit(num_classes, in_chans, img_size, **kw)


@register_model("deit-tiny", help="DeiT-Tiny layout (dim 192, 12 blocks, class token), patch 4")
def deit_tiny(num_classes: int, in_chans: int, img_size: int, **kw) -> nn.Module:
    for k, v in dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, patch_size=4, class_token=True).items():
        kw.setdefault(k, v)
    return _vit(num_classes, in_chans, img_size, **kw)
