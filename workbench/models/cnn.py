"""A small CNN: the fast baseline for CPU demos and tests."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-conv-pool, conv-conv-pool, global average pool, linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32, drop_rate: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(in_chans, width), *_block(width, width), nn.MaxPool2d(2),              # (B, w, H/2, W/2)
            *_block(width, 2 * width), *_block(2 * width, 2 * width), nn.MaxPool2d(2),     # (B, 2w, H/4, W/4)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)                                           # (B, 2w)
        return self.head(self.drop(x))


@register_model("cnn-small", help="4 conv layers (32/64 channels) + linear head (~65k params)")
def cnn_small(num_classes: int, in_chans: int, img_size: int, *, pretrained: bool = False, **kw) -> nn.Module:
    if pretrained:
        from ..errors import ModelError
        raise ModelError("cnn-small has no pretrained weights")
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, **kw)
