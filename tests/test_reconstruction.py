"""Strong PTQ: learned rounding (AdaRound, BRECQ, QDrop) and the RepQ-ViT reparameterization.

References are independent of the code under test: round-to-nearest's reconstruction error on
the same images, the rectified sigmoid in closed form, a per-channel fake quantizer built from
``workbench.quant`` primitives, and the unquantized model in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench import quant
from workbench.errors import ConfigError
from workbench.ptq import ActQuantizer, PTQConfig, quantize_model
from workbench.ptq.modules import QuantLayer
from workbench.ptq.reconstruction import GAMMA, ZETA, LearnedRounding, reconstruction_units

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(seed: int = 0, depth: int = 1) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=depth,
                          num_heads=2, mlp_ratio=2.0).eval()
    with torch.no_grad():  # LayerNorm affine parameters far from (1, 0): channels of very different ranges
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.1, 3.0)
                mod.bias.uniform_(-1.0, 1.0)
    return m


def images(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def output_error(qmodel: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((qmodel(x) - model(x)).pow(2).sum(1).mean())


# ---------------------------------------------------------------------------------------
# AdaRound


def test_learned_rounding_starts_at_the_float_weight_and_rounds_to_neighbouring_grid_points() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    q = quantize_model(nn.Sequential(layer), PTQConfig(w_bits=3, a_bits=None)).model[0]
    r = LearnedRounding(q)
    w, step = layer.weight.detach(), q.w_step
    inside = (w / step).abs() <= 3 - 1e-3  # away from the grid's ends (3 bits: codes -3..3)
    # closed form of the rectified sigmoid at V0: h = frac(W/s), so the soft weight is W itself
    h = torch.clamp(torch.sigmoid(r.v) * (ZETA - GAMMA) + GAMMA, 0, 1)
    assert torch.allclose(h, (w / step - torch.floor(w / step)).clamp(1e-4, 1 - 1e-4), atol=1e-5)
    assert torch.allclose(r()[inside], w[inside], atol=1e-4 * float(step.max()))
    codes = r.hard() / step
    assert torch.equal(codes, torch.round(codes))  # on the grid
    assert ((codes - torch.floor(w / step)).abs() <= 1).all()  # floor or floor + 1, never further


def test_adaround_on_one_linear_layer_reconstructs_at_least_as_well_as_round_to_nearest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16)).eval()
    x = images(256, (24,))
    calib = list(x.split(64))
    for bits in (2, 3, 4):
        rtn = quantize_model(model, PTQConfig(w_bits=bits, a_bits=None), calib)
        ada = quantize_model(model, PTQConfig(w_bits=bits, a_bits=None, reconstruction="adaround",
                                              recon_iters=400), calib)
        e_rtn, e_ada = output_error(rtn, model, x), output_error(ada, model, x)
        assert e_ada <= e_rtn, (bits, e_ada, e_rtn)
        # same grid, same steps: only the rounding direction changed
        q_rtn, q_ada = rtn.model[0], ada.model[0]
        assert torch.equal(q_rtn.w_step, q_ada.w_step)
        assert ((q_ada.weight_q - q_rtn.weight_q).abs() <= q_rtn.w_step * 1.0001).all()
        row = ada.details["reconstruction"][0]
        assert row["unit"] == "0" and row["layers"] == 1 and row["flipped"] > 0


def test_adaround_and_brecq_are_deterministic_for_a_seed() -> None:
    model = tiny_vit()
    calib = list(images(32, (1, 8, 8)).split(16))
    cfg = PTQConfig(w_bits=3, a_bits=4, reconstruction="brecq", qdrop=0.5, recon_iters=20)
    a, b = quantize_model(model, cfg, calib), quantize_model(model, cfg, calib)
    for (_, la), (_, lb) in zip(a.quant_layers(), b.quant_layers()):
        assert torch.equal(la.weight_q, lb.weight_q)
    sa = [m.scale for m in a.modules() if isinstance(m, ActQuantizer)]
    sb = [m.scale for m in b.modules() if isinstance(m, ActQuantizer)]
    assert all(torch.equal(p, q) for p, q in zip(sa, sb))
    c = quantize_model(model, cfg.replace(seed=1), calib)
    assert any(not torch.equal(la.weight_q, lc.weight_q) for (_, la), (_, lc) in zip(a.quant_layers(), c.quant_layers()))


# ---------------------------------------------------------------------------------------
# BRECQ and QDrop


def test_brecq_units_are_the_vit_blocks_plus_the_layers_outside_them() -> None:
    q = quantize_model(tiny_vit(depth=2), PTQConfig(w_bits=4, a_bits=4), [images(8, (1, 8, 8))])
    assert [n for n, _ in reconstruction_units(q.model, "brecq")] == ["patch_embed.proj", "blocks.0", "blocks.1",
                                                                       "head"]
    assert len(reconstruction_units(q.model, "adaround")) == len(q.quant_layers())


def test_brecq_reduces_the_block_output_error_and_learns_activation_steps() -> None:
    model = tiny_vit()
    x = images(64, (1, 8, 8))
    calib = list(x.split(32))
    rtn = quantize_model(model, PTQConfig(w_bits=3, a_bits=3), calib)
    for qdrop in (0.0, 0.5):
        cfg = PTQConfig(w_bits=3, a_bits=3, reconstruction="brecq", qdrop=qdrop, recon_iters=150)
        rec = quantize_model(model, cfg, calib)
        assert output_error(rec, model, x) < output_error(rtn, model, x)
        block = next(r for r in rec.details["reconstruction"] if r["unit"] == "blocks.0")
        assert block["layers"] == 4 and block["act_steps"] == 8  # qkv, proj, fc1, fc2; 4 inputs + q, k, v, softmax
        changed = [not torch.equal(a.scale, b.scale) for a, b in zip(
            (m for m in rtn.modules() if isinstance(m, ActQuantizer)),
            (m for m in rec.modules() if isinstance(m, ActQuantizer)))]
        assert any(changed)
        # the reconstructed model is an ordinary quantized model again: weights on the grid, fast path on
        for _, layer in rec.quant_layers():
            codes = layer.weight_q / layer.w_step
            assert torch.allclose(codes, torch.round(codes), atol=1e-4) and "_rounding" not in layer.__dict__
        assert all(m.mode == "quant" for m in rec.modules() if isinstance(m, ActQuantizer))


def test_block_reconstruction_on_a_model_without_known_blocks_is_a_clear_error() -> None:
    from workbench.models import create

    cnn = create("cnn-small", num_classes=10, in_chans=1, img_size=8).eval()
    with pytest.raises(ConfigError, match="adaround"):
        quantize_model(cnn, PTQConfig(w_bits=4, a_bits=4, reconstruction="brecq"), [images(4, (1, 8, 8))])


def test_strong_ptq_config_errors_and_method_labels() -> None:
    with pytest.raises(ConfigError, match="brecq"):
        PTQConfig(qdrop=0.5)
    with pytest.raises(ConfigError, match="probability"):
        PTQConfig(reconstruction="brecq", qdrop=1.0)
    with pytest.raises(ConfigError, match="w_bits"):
        PTQConfig(w_bits=None, reconstruction="adaround")
    with pytest.raises(ConfigError, match="reconstruction must be one of"):
        PTQConfig(reconstruction="gptq")
    with pytest.raises(ConfigError, match="recon_iters"):
        PTQConfig(recon_iters=0)
    labels = [PTQConfig(**kw).method for kw in (
        {}, {"bias_correction": True}, {"reconstruction": "adaround"}, {"reconstruction": "brecq"},
        {"reconstruction": "brecq", "qdrop": 0.5}, {"repq": True}, {"repq": True, "reconstruction": "brecq",
                                                                    "qdrop": 0.5, "bias_correction": True})]
    assert labels == ["rtn", "rtn+bc", "adaround", "brecq", "qdrop", "repq+rtn", "repq+qdrop+bc"]
    assert PTQConfig.from_dict(PTQConfig(reconstruction="brecq", qdrop=0.5).to_dict()).method == "qdrop"


# ---------------------------------------------------------------------------------------
# RepQ-ViT reparameterization


def _all_activation_quantizers_off(qmodel: nn.Module, keep: set[int] = frozenset()) -> None:
    for m in qmodel.modules():
        if isinstance(m, ActQuantizer) and id(m) not in keep:
            m.mode = "off"


def test_reparameterization_leaves_the_full_precision_function_unchanged() -> None:
    model = tiny_vit(depth=2).double()
    x = images(16, (1, 8, 8)).double()
    q = quantize_model(model, PTQConfig(w_bits=None, a_bits=4, repq=True), [x])
    assert len(q.details["repq"]) == 4  # norm1 and norm2 of both blocks
    assert not torch.equal(q.model.blocks[0].norm1.weight, model.blocks[0].norm1.weight)  # it did change them
    _all_activation_quantizers_off(q.model)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=1e-10, atol=1e-10)


def test_per_tensor_quantizer_after_reparameterization_equals_per_channel_quantizer_before() -> None:
    model = tiny_vit().double()
    x = images(16, (1, 8, 8)).double()
    q = quantize_model(model, PTQConfig(w_bits=None, a_bits=4, repq=True), [x])
    qkv_in = q.model.blocks[0].attn.qkv.input_quant
    _all_activation_quantizers_off(q.model, keep={id(qkv_in)})
    # the reference: the original model with an independent per-channel fake quantizer on norm1's output
    seen = []
    h = model.blocks[0].norm1.register_forward_hook(lambda m, a, y: seen.append(y.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    ln = seen[0].reshape(-1, seen[0].shape[-1])
    qp = quant.activation_qparams(ln.amin(0), ln.amax(0), 4)
    qp = quant.QParams(qp.step.double(), qp.zero_point.double(), qp.qmin, qp.qmax, 4, False)
    h = model.blocks[0].norm1.register_forward_hook(lambda m, a, y: quant.fake_quantize(y, qp))
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        h.remove()
    assert qkv_in.mode == "quant"
    with torch.no_grad():
        got = q(x)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # and it is not trivially the float model
        assert (got - model(x)).abs().max() > 1e-3


def test_repq_on_a_model_without_layernorm_pairs_is_a_clear_error_and_weights_follow_the_new_scale() -> None:
    from workbench.models import create

    cnn = create("cnn-small", num_classes=10, in_chans=1, img_size=8).eval()
    with pytest.raises(ConfigError, match="repq"):
        quantize_model(cnn, PTQConfig(w_bits=4, a_bits=4, repq=True), [images(4, (1, 8, 8))])
    model = tiny_vit()
    q = quantize_model(model, PTQConfig(w_bits=4, a_bits=4, repq=True), [images(16, (1, 8, 8))])
    qkv = q.model.blocks[0].attn.qkv
    expected = quant.fake_quantize(qkv.layer.weight, quant.weight_qparams(qkv.layer.weight, 4))
    torch.testing.assert_close(qkv.weight_q, expected, rtol=0, atol=0)  # the reparameterized weight, quantized
    assert isinstance(qkv, QuantLayer)


# ---------------------------------------------------------------------------------------
# CLI


def test_ptq_command_runs_learned_rounding_and_labels_the_rows(ptq_cli) -> None:
    rows = ptq_cli("--bits", "4", "--n-calib", "32", "--n-eval", "64", "--reconstruction", "adaround",
                   "--recon-iters", "3")
    assert [(r["config"], r["ptq_method"]) for r in rows] == [("FP32", None), ("W4A4", "adaround")]


def test_not_applicable_names_the_methods_a_model_cannot_take(capsys) -> None:
    from workbench import nbtools
    from workbench.models import create
    from workbench.ptq import not_applicable

    cnn = create("cnn-small", num_classes=10, in_chans=1, img_size=8).eval()
    vit = tiny_vit()
    repq, brecq = PTQConfig(w_bits=4, a_bits=4, repq=True), PTQConfig(w_bits=4, a_bits=4, reconstruction="brecq")
    assert "LayerNorm" in not_applicable(repq, cnn) and "blocks" in not_applicable(brecq, cnn)
    assert not_applicable(repq, vit) is None and not_applicable(brecq, vit) is None
    assert not_applicable(PTQConfig(w_bits=4, a_bits=None, repq=True), cnn) is None  # nothing to reparameterize
    methods = {"bias correction": {"bias_correction": True}, "RepQ": {"repq": True}}
    configs = nbtools.ptq_method_configs(methods, 3, cnn)
    assert [c.method for c in configs] == ["rtn", "rtn+bc"] and "RepQ: left out" in capsys.readouterr().out
    assert [c.method for c in nbtools.ptq_method_configs(methods, 3, vit)] == ["rtn", "rtn+bc", "repq+rtn"]
