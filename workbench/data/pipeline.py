"""From stored images to model inputs: normalization, the input pipeline (resize, centre crop),
augmentation on whole batches, and seed-fixed batching."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..distributed import shard_bounds
from ..errors import ConfigError, DataError
from .splits import DataBundle, DataInfo, ImageSplit


def normalize(images: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """uint8 images -> the model's float input: scaled to [0, 1], resized and centre-cropped when
    ``info`` carries an input pipeline (:func:`with_input_pipeline`), then standardized with
    ``info``'s mean/std."""
    x = images.float().div_(255.0)
    if info.stored_size is not None:
        x = resize_center_crop(x, info.image_size, info.crop_pct, info.interpolation)
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (x - mean) / std


#: Interpolations of timm's ``pretrained_cfg`` that torch's ``interpolate`` has (PIL's names).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def resize_center_crop(x: torch.Tensor, size: int, crop_pct: float = 1.0,
                       interpolation: str = "bilinear") -> torch.Tensor:
    """timm's evaluation transform on a float batch in [0, 1]: resize the (square) images to
    ``floor(size / crop_pct)``, then keep the central ``size`` x ``size`` pixels."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    scale = int(math.floor(size / crop_pct))
    if x.shape[-1] != scale or x.shape[-2] != scale:
        smooth = interpolation != "nearest"
        x = F.interpolate(x, size=(scale, scale), mode=interpolation,
                          **({"align_corners": False, "antialias": True} if smooth else {}))
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots; the pixel values it stands for do not
    top = (scale - size) // 2
    return x[..., top:top + size, top:top + size]


def with_input_pipeline(bundle: DataBundle, *, image_size: int, mean: tuple[float, ...] | None = None,
                        std: tuple[float, ...] | None = None, crop_pct: float = 1.0,
                        interpolation: str = "bilinear") -> DataBundle:
    """``bundle`` fed to a model that wants another input: ``image_size`` pixels (resize to
    ``image_size / crop_pct``, centre crop) standardized with ``mean``/``std`` (e.g. a pretrained
    timm model's ``pretrained_cfg``). The images stay stored at their own size; batches are
    transformed as they are made. A 3-value mean/std on 1-channel images is averaged: timm sums a
    pretrained RGB stem over its channels, so a grey image stands for R = G = B.

    Raises:
        ConfigError: a size below 1, a crop fraction outside (0, 1], an unknown interpolation,
            or a mean/std whose length fits neither the images' channels nor 3.
    """
    info = bundle.info
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a whole number of pixels >= 1, got {image_size!r}")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")

    def per_channel(values: tuple[float, ...] | None, current: tuple[float, ...], what: str) -> tuple[float, ...]:
        if values is None:
            return current
        values = tuple(float(v) for v in values)
        if len(values) == info.channels:
            return values
        if info.channels == 1 and len(values) == 3:
            return (round(sum(values) / 3, 6),)
        raise ConfigError(f"{what} has {len(values)} values but {info.name} has {info.channels}-channel images")

    stored = info.stored_size if info.stored_size is not None else info.image_size
    new = replace(info, image_size=image_size, stored_size=stored, crop_pct=float(crop_pct),
                  interpolation=interpolation, mean=per_channel(mean, info.mean, "mean"),
                  std=per_channel(std, info.std, "std"))
    pipeline = {"image_size": image_size, "mean": list(new.mean), "std": list(new.std),
                "crop_pct": float(crop_pct), "interpolation": interpolation}
    return replace(bundle, info=new, params={**bundle.params, "input_pipeline": pipeline})


def match_recorded_pipeline(bundle: DataBundle, recorded_info: dict | None) -> DataBundle:
    """``bundle`` with the input pipeline a checkpoint was trained with (its ``data_info``), so
    that evaluation, PTQ and flatness see the images the model saw. Without one: unchanged."""
    if not recorded_info or recorded_info.get("stored_size") is None:
        return bundle
    return with_input_pipeline(bundle, image_size=int(recorded_info["image_size"]),
                               mean=tuple(recorded_info["mean"]), std=tuple(recorded_info["std"]),
                               crop_pct=float(recorded_info.get("crop_pct", 1.0)),
                               interpolation=recorded_info.get("interpolation", "bilinear"))


def augment_batch(images: torch.Tensor, info: DataInfo, generator: torch.Generator,
                  padding: int | None = None, *, total: int | None = None, offset: int = 0) -> torch.Tensor:
    """Random crop with zero padding, plus a horizontal flip where the labels allow it.

    Done on the whole uint8 batch with one gather instead of per-sample Python code.
    ``total``/``offset``: draw the random crops and flips of a batch of ``total`` images and apply
    those of positions ``offset .. offset + len(images)``: one process's shard of a global batch
    gets exactly the augmentation one process would give those images.
    """
    n, _, h, w = images.shape
    total = n if total is None else int(total)
    if not 0 <= offset <= total - n:
        raise ConfigError(f"a shard of {n} images at offset {offset} does not fit a batch of {total}")
    pad = max(1, h // 8) if padding is None else padding
    padded = F.pad(images, (pad, pad, pad, pad))
    shard = slice(offset, offset + n)
    oy = torch.randint(0, 2 * pad + 1, (total, 1, 1), generator=generator)[shard]
    ox = torch.randint(0, 2 * pad + 1, (total, 1, 1), generator=generator)[shard]
    rows = oy + torch.arange(h).view(1, h, 1)                       # (N, H, 1)
    cols = ox + torch.arange(w).view(1, 1, w)                       # (N, 1, W)
    if info.hflip:
        flip = torch.rand(total, 1, 1, generator=generator)[shard] < 0.5
        cols = torch.where(flip, ox + (w - 1 - torch.arange(w)).view(1, 1, w), cols)
    batch = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]             # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator fixing data order and augmentation of one epoch (resumable)."""
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def num_batches(split: ImageSplit, batch_size: int, drop_last: bool = False) -> int:
    return len(split) // batch_size if drop_last else math.ceil(len(split) / batch_size)


def batches(split: ImageSplit, info: DataInfo, batch_size: int = 256, *, shuffle: bool = False,
            augment: bool = False, device: str | torch.device = "cpu", seed: int = 0, epoch: int = 0,
            drop_last: bool = False, start_batch: int = 0, limit: int | None = None,
            rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized float ``(images, labels)`` batches on ``device``.

    Order and augmentation depend only on ``(seed, epoch)``, so a resumed run can skip the
    first ``start_batch`` batches and see exactly what the interrupted run would have seen.
    ``limit`` caps the number of images (e.g. ``n_calib``).

    With ``world_size`` > 1 each batch of ``batch_size`` images (the global batch) is cut into
    ``world_size`` contiguous shards and rank ``rank`` gets its own (``batch_size / world_size``
    images when it divides), augmented as the whole batch would be: the processes together see
    exactly the batches of a single process. Empty shards (a last batch smaller than
    ``world_size``) are skipped.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    shard_bounds(0, rank, world_size)  # checks rank and world_size
    n = len(split) if limit is None else min(len(split), int(limit))
    if n == 0:
        raise DataError("the split is empty: nothing to iterate over")
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(len(split), generator=gen)[:n] if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i, start in enumerate(range(0, stop, batch_size)):
        idx = order[start:start + batch_size]
        lo, hi = shard_bounds(len(idx), rank, world_size)
        full, idx = len(idx), idx[lo:hi]
        imgs = split.images[idx]
        if augment:  # draws the random numbers of the whole batch (resumable, shard-independent)
            imgs = augment_batch(imgs, info, gen, total=full, offset=lo)
        if i < start_batch or len(idx) == 0:
            continue
        x = normalize(imgs.to(device, non_blocking=True), info)
        yield x, split.labels[idx].to(device, non_blocking=True)
