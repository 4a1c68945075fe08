import pytest
import torch

from workbench import models
from workbench.errors import ModelError, UnknownNameError

# Every registered model gets forward/backward/NaN checks for free (timm style).
CASES = [(n, 1, 28) for n in models.MODELS.names()] + [("vit-micro", 3, 32), ("cnn-small", 1, 8)]


@pytest.mark.parametrize("name,chans,size", CASES)
def test_forward_backward_shapes(name, chans, size):
    torch.manual_seed(0)
    m = models.create(name, num_classes=7, in_chans=chans, img_size=size)
    x = torch.randn(2, chans, size, size)
    y = m(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.workbench_spec == {"name": name, "num_classes": 7, "in_chans": chans, "img_size": size, "overrides": {}}


def test_parameter_and_flop_counts_match_hand_computation():
    m = models.create("cnn-small", num_classes=10, in_chans=1, img_size=28)
    w = 32
    convs = 1 * w * 9 + w * w * 9 + w * 2 * w * 9 + 2 * w * 2 * w * 9
    bns = 2 * (w + w + 2 * w + 2 * w)
    head = 2 * w * 10 + 10
    assert models.count_parameters(m) == convs + bns + head
    # conv FLOPs: 2 * k*k*cin*cout*H*W per layer, plus the head
    flops = 2 * 9 * (1 * w * 28 * 28 + w * w * 28 * 28 + w * 2 * w * 14 * 14 + 4 * w * w * 14 * 14) + 2 * 2 * w * 10
    assert models.count_flops(m, 1, 28) == flops


def test_overrides_and_none_dropping():
    m = models.create("vit-micro", num_classes=10, in_chans=1, img_size=28, depth=2, embed_dim=64, num_heads=2,
                      mlp_ratio=None)
    assert len(m.blocks) == 2 and m.embed_dim == 64
    assert m.workbench_spec["overrides"] == {"depth": 2, "embed_dim": 64, "num_heads": 2}
    assert m.patch_embed.num_patches == 49  # conv stem: 28 px -> 7x7 tokens


def test_timm_passthrough_and_errors():
    m = models.create("timm:resnet10t", num_classes=5, in_chans=1, img_size=32)
    assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    with pytest.raises(UnknownNameError, match="resnet10t|Closest"):
        models.create("timm:resnet10x")
    with pytest.raises(UnknownNameError, match="vit-micro"):
        models.create("vit-mikro")
    with pytest.raises(ModelError, match="no pretrained weights"):
        models.create("vit-micro", pretrained=True)


def test_pretrained_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    # offline mode fails at once instead of retrying DNS for a minute
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="internet access"):
        models.create("timm:vit_tiny_patch16_224", pretrained=True, num_classes=10, in_chans=3, img_size=224)


def test_same_seed_same_init():
    torch.manual_seed(5)
    a = models.create("vit-micro")
    torch.manual_seed(5)
    b = models.create("vit-micro")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_models_own_their_recipe():
    from workbench.train import TrainConfig

    assert models.default_recipe("vit-micro") == {}  # TrainConfig's defaults are its recipe
    cfg = TrainConfig(**models.default_recipe("cnn-small"))
    assert cfg.epochs == models.RECIPES["cnn-small"]["epochs"] and cfg.lr == models.RECIPES["cnn-small"]["lr"]
    assert set(models.RECIPES) <= set(models.MODELS.names())
