"""The model registry and the ``create`` factory (timm style)."""

from __future__ import annotations

import difflib
import logging
from typing import Any, Callable

from torch import nn

from ..errors import ModelError, UnknownNameError
from ..registry import Registry

log = logging.getLogger(__name__)

#: name -> builder(num_classes, in_chans, img_size, pretrained, **overrides) -> nn.Module
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
DEFAULT_MODEL = "vit-micro"


#: Training-recipe defaults a model owns (fields of workbench.train.TrainConfig); a model not
#: listed uses TrainConfig's defaults, which are vit-micro's recipe. Measured in
#: benchmarks/bench_train.py on 2 CPU cores.
RECIPES: dict[str, dict[str, Any]] = {
    # 85.9 % on fashion-mnist-mini in 46 s
    "cnn-small": {"epochs": 6, "lr": 5e-3, "warmup_epochs": 0.5, "batch_size": 64},
}


def register_model(name: str, help: str = "") -> Callable:  # noqa: A002
    """Decorator adding a builder to the registry."""
    return MODELS.register(name, help=help)


def default_recipe(name: str) -> dict[str, Any]:
    """The TrainConfig fields this model overrides by default (empty: TrainConfig's defaults)."""
    return dict(RECIPES.get(name, {}))


def finetune_recipe(name: str) -> dict[str, Any]:
    """The TrainConfig fields of a fine-tune from a trained model (``--init``): one epoch, a tenth
    of the model's peak learning rate, a short warm-up. Pre-conditioning and its plain control
    share it, so they differ only in the method."""
    from ..train import TrainConfig

    base_lr = default_recipe(name).get("lr", TrainConfig.lr)
    return {"epochs": 1, "lr": base_lr / 10, "warmup_epochs": 0.1, "min_lr": base_lr / 1000}


def list_models() -> list[str]:
    """Registered names; ``timm:<name>`` passes any timm model through."""
    return MODELS.names() + ["timm:<any timm model name>"]


def create(name: str = DEFAULT_MODEL, info: Any = None, *, num_classes: int | None = None,
           in_chans: int | None = None, img_size: int | None = None, pretrained: bool = False,
           **overrides: Any) -> nn.Module:
    """Build a model for a dataset.

    Args:
        name: a registered name (``workbench models``) or ``timm:<timm model name>``.
        info: a :class:`workbench.data.DataInfo`; supplies classes, channels and image size
            unless given explicitly.
        pretrained: load timm hub weights (needs internet access).
        **overrides: architecture overrides (e.g. ``depth=6, embed_dim=192``); ``None``
            values are dropped so per-model defaults survive.

    The returned model carries ``model.workbench_spec``: everything needed to rebuild it
    (used by checkpoints).
    """
    num_classes = num_classes if num_classes is not None else (info.num_classes if info else 10)
    in_chans = in_chans if in_chans is not None else (info.channels if info else 1)
    img_size = img_size if img_size is not None else (info.image_size if info else 28)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name.startswith("timm:"):
        model = _create_timm(name[5:], num_classes, in_chans, img_size, pretrained, **overrides)
    else:
        builder = MODELS.get(name)
        try:
            model = builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                            pretrained=pretrained, **overrides)
        except TypeError as e:
            raise ModelError(f"cannot build model {name!r} with overrides {overrides}: {e}") from e
    model.workbench_spec = {"name": name, "num_classes": num_classes, "in_chans": in_chans,
                            "img_size": img_size, "overrides": dict(overrides)}
    return model


def _create_timm(timm_name: str, num_classes: int, in_chans: int, img_size: int, pretrained: bool,
                 **overrides: Any) -> nn.Module:
    import timm

    if timm_name not in timm.list_models():
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f" Closest timm names: {', '.join(close)}." if close else ""
        raise UnknownNameError(f"unknown timm model {timm_name!r}.{hint} List them with "
                               "`python -c \"import timm; print(timm.list_models())\"`.")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **overrides)
    # Transformers need the input size; CNNs take any size and reject the keyword.
    if any(k in timm_name for k in ("vit", "deit", "swin", "beit", "eva", "cait", "xcit")):
        kwargs.setdefault("img_size", img_size)
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained:
            raise ModelError(
                f"could not load pretrained weights for timm model {timm_name!r}: {type(e).__name__}: {e}\n"
                "Pretrained weights come from the Hugging Face hub and need internet access. Either run "
                "once online (the weights are then cached), set HF_HUB_OFFLINE=1 with a filled cache, "
                "or train from scratch (pretrained=False)."
            ) from e
        raise ModelError(f"timm could not build {timm_name!r} with {kwargs}: {e}") from e
