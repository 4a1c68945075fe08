"""Models: one registry, one factory (``create``), timm underneath.

>>> import workbench.models as wm
>>> model = wm.create("vit-micro", num_classes=10, in_chans=1, img_size=28)
"""

from __future__ import annotations

import torch
from torch import nn

from . import cnn, resnet, vit  # noqa: F401  (register the builders)
from ._registry import (
    DEFAULT_MODEL,
    MODELS,
    RECIPES,
    create,
    default_recipe,
    finetune_recipe,
    list_models,
    pretrained_input,
    register_model,
)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, in_chans: int, img_size: int) -> int:
    """FLOPs of one forward pass on one image (2 per multiply-add; matmuls and convs only)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, in_chans, img_size, img_size, device=device)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def model_summary(model: nn.Module) -> dict:
    """Name, parameter count and FLOPs per image of a model made by :func:`create`."""
    spec = getattr(model, "workbench_spec", {})
    in_chans, img_size = spec.get("in_chans", 1), spec.get("img_size", 28)
    return {"model": spec.get("name", type(model).__name__), "params": count_parameters(model),
            "flops_per_image": count_flops(model, in_chans, img_size), "in_chans": in_chans,
            "img_size": img_size, "num_classes": spec.get("num_classes")}


__all__ = ["DEFAULT_MODEL", "MODELS", "RECIPES", "count_flops", "default_recipe", "finetune_recipe", "count_parameters", "create", "list_models",
           "model_summary", "pretrained_input", "register_model"]
