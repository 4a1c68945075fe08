"""The model registry and the ``create`` factory (timm style)."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError, ModelError, UnknownNameError
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


def finetune_recipe(name: str, epochs: float = 1) -> dict[str, Any]:
    """The TrainConfig fields of a fine-tune from a trained model (``--init``): ``epochs`` (one by
    default), a tenth of the model's peak learning rate, a warm-up over the first tenth of the
    fine-tune. Pre-conditioning and its plain control share it, so they differ only in the method.
    The warm-up scales with ``epochs`` so that a fine-tune of part of an epoch still decays."""
    from ..train import TrainConfig

    base_lr = default_recipe(name).get("lr", TrainConfig.lr)
    return {"epochs": epochs, "lr": base_lr / 10, "warmup_epochs": 0.1 * epochs, "min_lr": base_lr / 1000}


def list_models() -> list[str]:
    """Registered names; ``timm:<name>`` passes any timm model through."""
    return MODELS.names() + ["timm:<any timm model name>"]


def pretrained_input(name: str, image_size: int | None = None) -> dict[str, Any]:
    """The input a pretrained ``timm:NAME`` model was trained on, from timm's ``pretrained_cfg``:
    ``image_size``, ``mean``, ``std``, ``crop_pct`` and ``interpolation``, the keywords of
    :func:`workbench.data.with_input_pipeline`. ``image_size`` replaces the model's own size
    (a ViT's position embedding is then resampled by timm).

    Raises:
        ConfigError: ``name`` is not a timm model, or timm has no pretrained weights for it.
    """
    from ..data import INTERPOLATIONS

    if not str(name).startswith("timm:"):
        raise ConfigError(f"pretrained weights come from timm: use --model timm:NAME, not {name!r} "
                          "(a workbench model starts from a checkpoint instead: --init CKPT or zoo:NAME)")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name[5:])
    if cfg is None or not cfg.input_size:
        raise ConfigError(f"timm has no pretrained weights for {name[5:]!r}; pick a name from "
                          "`python -c \"import timm; print(timm.list_pretrained())\"`")
    interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bicubic"
    return {"image_size": int(image_size or cfg.input_size[-1]), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
            "crop_pct": float(cfg.crop_pct or 1.0), "interpolation": interpolation}


def create(name: str = DEFAULT_MODEL, info: Any = None, *, num_classes: int | None = None,
           in_chans: int | None = None, img_size: int | None = None, pretrained: bool = False,
           pretrained_file: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a model for a dataset.

    Args:
        name: a registered name (``workbench models``) or ``timm:<timm model name>``.
        info: a :class:`workbench.data.DataInfo`; supplies classes, channels and image size
            unless given explicitly.
        pretrained: load timm's pretrained weights (from the hub, or its cache: needs internet
            access once). A new classifier head is made when the class count differs, and the
            stem is adapted to the input channels (timm's own loading code). Feed the model
            :func:`pretrained_input`'s pipeline (``workbench train --pretrained`` does).
        pretrained_file: load the pretrained weights from this local file instead of the hub
            (a ``.pth``/``.safetensors`` state dict of the same timm model); implies ``pretrained``.
        **overrides: architecture overrides (e.g. ``depth=6, embed_dim=192``); ``None``
            values are dropped so per-model defaults survive.

    The returned model carries ``model.workbench_spec``: everything needed to rebuild it
    (used by checkpoints).
    """
    num_classes = num_classes if num_classes is not None else (info.num_classes if info else 10)
    in_chans = in_chans if in_chans is not None else (info.channels if info else 1)
    img_size = img_size if img_size is not None else (info.image_size if info else 28)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if pretrained_file is not None:
        pretrained_file = Path(pretrained_file).expanduser()
        if not pretrained_file.is_file():
            raise ConfigError(f"pretrained weights file {str(pretrained_file)!r} does not exist")
        pretrained = True
    if pretrained_file is not None and not name.startswith("timm:"):
        raise ConfigError(f"a pretrained weights file is read by timm's loader: use timm:NAME, not {name!r}")
    if name.startswith("timm:"):
        if pretrained_file is not None:
            overrides["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        model = _create_timm(name[5:], num_classes, in_chans, img_size, pretrained, **overrides)
        overrides.pop("pretrained_cfg_overlay", None)
    else:
        builder = MODELS.get(name)
        try:
            model = builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                            pretrained=pretrained, **overrides)
        except TypeError as e:
            raise ModelError(f"cannot build model {name!r} with overrides {overrides}: {e}") from e
    model.workbench_spec = {"name": name, "num_classes": num_classes, "in_chans": in_chans,
                            "img_size": img_size, "overrides": dict(overrides)}
    if pretrained:  # a record only: a checkpoint rebuilds the architecture and loads its own weights
        model.workbench_spec["pretrained"] = str(pretrained_file) if pretrained_file else "timm"
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
