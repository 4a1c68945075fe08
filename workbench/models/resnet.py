"""ResNet-18 adapted to small images (CIFAR style): 3x3 stem, no max-pool."""

from __future__ import annotations

from torch import nn

from ._registry import register_model


@register_model("resnet18", help="timm ResNet-18 with a 3x3 stride-1 stem and no max-pool (small images)")
def resnet18(num_classes: int, in_chans: int, img_size: int, *, stem_stride: int = 1,
             pretrained: bool = False, **kw) -> nn.Module:
    """``stem_stride=2`` quarters the compute for quick CPU runs on 28-32 px inputs."""
    import timm

    model = timm.create_model("resnet18", pretrained=pretrained, num_classes=num_classes,
                              in_chans=in_chans, **kw)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
