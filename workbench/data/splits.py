"""What a dataset is in memory: ``DataInfo`` (metadata and input pipeline), ``ImageSplit``
(uint8 images and labels) and ``DataBundle`` (the seed-fixed splits of one load)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class DataInfo:
    """What a model and the batching code need to know about a dataset."""

    name: str
    image_size: int
    channels: int
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Whether a horizontal flip keeps the label (clothes: yes; digits: no).
    hflip: bool = True
    source: str = ""
    licence: str = ""
    #: Set when the model's input differs from the stored images (a pretrained model's input
    #: pipeline, :func:`with_input_pipeline`): the stored images' size. ``image_size`` is then the
    #: model's input, reached by resizing to ``image_size / crop_pct`` and cropping the centre.
    stored_size: int | None = None
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        d = dict(d)
        for k in ("class_names", "mean", "std"):
            d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class ImageSplit:
    """Images (uint8, N x C x H x W) and integer labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    """The result of :func:`load`: metadata and the seed-fixed splits."""

    info: DataInfo
    train: ImageSplit
    test: ImageSplit
    #: Calibration images for PTQ: a seed-fixed subset of ``train`` (never of ``test``).
    calib: ImageSplit
    #: Validation split carved from the training set when ``val_size > 0`` (else empty).
    val: ImageSplit
    seed: int = 0
    params: dict = field(default_factory=dict)

    def split(self, name: str) -> ImageSplit:
        if name not in ("train", "test", "calib", "val"):
            raise ConfigError(f"unknown split {name!r}: use train, test, calib or val")
        return getattr(self, name)

    def summary(self) -> dict:
        return {**self.info.to_dict(), "train": len(self.train), "test": len(self.test),
                "calib": len(self.calib), "val": len(self.val), "seed": self.seed}
