"""Starting from timm's pretrained weights, offline: the real loading code path (timm's
``load_pretrained`` reading a local weight file instead of the hub), the model's input pipeline
against timm's own transform, and the CLI run that records and replays that pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench import data, models
from workbench.errors import ConfigError

TIMM_VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A stand-in for a cached hub download: the state dict of an RGB, 1000-class timm ViT."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model(TIMM_VIT)
    path = tmp_path_factory.mktemp("weights") / f"{TIMM_VIT}.pth"
    torch.save(source.state_dict(), path)
    return path, {k: v.clone() for k, v in source.state_dict().items()}


def test_pretrained_weights_load_with_a_new_head_and_a_grey_stem(weight_file, mini: data.DataBundle) -> None:
    path, source = weight_file
    m = models.create(f"timm:{TIMM_VIT}", mini.info, pretrained_file=path, img_size=32)
    got = m.state_dict()
    # the transformer body is the file's, bit for bit
    body = [k for k in source if k.startswith("blocks.")]
    assert body and all(torch.equal(got[k], source[k]) for k in body)
    # a new 10-class head (fashion-mnist-mini), not the file's 1000-class one
    assert got["head.weight"].shape == (10, source["head.weight"].shape[1])
    # the RGB stem summed over its channels: a grey image stands for R = G = B
    stem = "patch_embed.proj.weight"
    assert got[stem].shape[1] == 1
    torch.testing.assert_close(got[stem], source[stem].sum(1, keepdim=True), rtol=0, atol=1e-6)
    # the position embedding resampled from 14x14 patches (224 px) to 2x2 (32 px), plus the class token
    assert got["pos_embed"].shape[1] == 1 + 2 * 2
    assert m.workbench_spec["pretrained"] == str(path)
    with pytest.raises(ConfigError, match="does not exist"):
        models.create(f"timm:{TIMM_VIT}", mini.info, pretrained_file=path.with_suffix(".missing"))


def test_pretrained_input_reads_timms_pretrained_cfg() -> None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("resnet18")
    got = models.pretrained_input("timm:resnet18")
    assert got == {"image_size": cfg.input_size[-1], "mean": tuple(cfg.mean), "std": tuple(cfg.std),
                   "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}
    assert models.pretrained_input("timm:resnet18", image_size=64)["image_size"] == 64
    with pytest.raises(ConfigError, match="timm:NAME"):
        models.pretrained_input("vit-micro")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_input_pipeline_matches_pil_resize_and_torchvision_centre_crop(interpolation: str,
                                                                       mini: data.DataBundle) -> None:
    """The batches a pretrained model gets equal timm's eval transform done independently: PIL
    resizes (in float, so no 8-bit rounding) to ``floor(size / crop_pct)``, torchvision crops the
    centre, then the pipeline's mean/std standardize."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import center_crop

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    piped = data.with_input_pipeline(mini, image_size=40, mean=mean, std=std, crop_pct=0.875,
                                     interpolation=interpolation)
    assert piped.info.image_size == 40 and piped.info.stored_size == 28
    assert piped.info.mean == (round(sum(mean) / 3, 6),)  # grey images: the channel average
    x, _ = next(data.batches(piped.test, piped.info, batch_size=8))
    assert x.shape == (8, 1, 40, 40)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    scale = int(40 / 0.875)  # 45, as timm's transforms_factory computes it
    ref = []
    for img in piped.test.images[:8]:
        grey = Image.fromarray(img[0].numpy().astype(np.float32) / 255, mode="F").resize((scale, scale), resample)
        ref.append(center_crop(torch.from_numpy(np.array(grey))[None], [40, 40]))
    ref = (torch.stack(ref).clamp(0, 1) - piped.info.mean[0]) / piped.info.std[0]
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)  # float32 resampling order, nothing more
    # the pipeline is recorded where a checkpoint keeps it, and replayed from there
    again = data.match_recorded_pipeline(mini, piped.info.to_dict())
    assert again.info == piped.info
    assert data.match_recorded_pipeline(mini, mini.info.to_dict()) is mini
    with pytest.raises(ConfigError, match="crop_pct"):
        data.with_input_pipeline(mini, image_size=32, crop_pct=1.5)
    with pytest.raises(ConfigError, match="interpolation"):
        data.with_input_pipeline(mini, image_size=32, interpolation="lanczos")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_cli_fine_tunes_pretrained_weights_and_eval_replays_the_pipeline(weight_file, tmp_path: Path) -> None:
    path, _ = weight_file
    out = tmp_path / "ft"
    r = _cli("train", "--model", f"timm:{TIMM_VIT}", "--pretrained-file", str(path), "--image-size", "32",
             "--steps", "2", "--batch-size", "32", "--seed", "0", "--device", "cpu", "--no-progress",
             "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    pipe = run["params"]["data"]["input_pipeline"]
    assert pipe["image_size"] == 32 and pipe["interpolation"] == "bicubic"  # vit_tiny's pretrained_cfg
    assert run["params"]["train"]["lr"] == models.finetune_recipe(f"timm:{TIMM_VIT}")["lr"]
    metrics = json.loads((out / "metrics.json").read_text())
    r = _cli("eval", str(out / "model.pt"), "--device", "cpu", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    evaluated = json.loads(r.stdout)
    # the same images through the same pipeline: the accuracy training reported
    assert evaluated["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    r = _cli("train", "--model", "vit-micro", "--pretrained", "--steps", "1", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode != 0 and "timm:NAME" in r.stderr
    r = _cli("train", "--init", f"timm:{TIMM_VIT}", "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert r.returncode != 0 and "--pretrained" in r.stderr
