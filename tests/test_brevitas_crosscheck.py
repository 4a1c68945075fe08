"""Low-bit cross-check of the PTQ engine against Brevitas (workbench.ptq.brevitas_check).

The ONNX Runtime test in test_ptq.py covers 8 bits; these cover W4A4 and W3A3. Brevitas gets
only the workbench's ranges (scales, zero points) and does the rounding, clamping and
dequantization itself, so these compare two independent implementations of the same grids.
Skipped when the ``xcheck`` extra (brevitas) is absent; CI installs it (``make install``).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from workbench import quant
from workbench.errors import ConfigError, MissingDependencyError
from workbench.ptq import PTQConfig, quantize_model

BITS = [4, 3]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bc():
    """The cross-check module, or skip: brevitas is the optional ``xcheck`` extra."""
    pytest.importorskip("brevitas")
    from workbench.ptq import brevitas_check

    return brevitas_check


def tiny_cnn(seed: int = 0) -> nn.Module:
    # reflect padding: Brevitas pads the quantized input itself, as the workbench pads codes
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GELU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # non-trivial BN statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _layer_inputs(qm) -> tuple[dict[str, torch.Tensor], Callable[[], object]]:
    """Record what each workbench quantized layer receives (to feed both sides identical inputs)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0].detach().clone()))
             for n, m in qm.quant_layers()]
    return seen, lambda: [h.remove() for h in hooks]


def _near_tie(r: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Where ``r = x / s`` is (within float32 noise) halfway between two integers."""
    return ((r - r.floor()) - 0.5).abs() < tol


def assert_same_outputs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Logits equal to float32 reordering, allowing one image moved by a code flipped at a rounding tie.

    The workbench folds the input step into the weight (``W @ (s c) = (s W) @ c``) where Brevitas
    multiplies dequantized tensors: measured 3e-8 apart on the tiny models. A code that rounds
    the other way at a tie (module docstring) moves an image by about a step times a weight; one
    such image of 64 is allowed, a systematic difference is not.
    """
    tol = 1e-5 * float(ours.abs().max())
    close = (ours - theirs).abs().amax(1) <= tol
    assert int((~close).sum()) <= 1, (ours - theirs).abs().amax(1)
    assert torch.equal(ours.argmax(1)[close], theirs.argmax(1)[close])


def test_missing_brevitas_is_a_clear_import_error(monkeypatch) -> None:
    from workbench.ptq import brevitas_check

    monkeypatch.setitem(sys.modules, "brevitas", None)  # `import brevitas` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'flatquant-workbench\[xcheck\]'") as e:
        brevitas_check.require_brevitas()
    assert isinstance(e.value, MissingDependencyError)
    qm = quantize_model(tiny_cnn(), PTQConfig(w_bits=4, a_bits=4), [images(8)])
    with pytest.raises(MissingDependencyError, match="xcheck"):
        brevitas_check.to_brevitas(qm)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("make", [tiny_cnn, tiny_vit])
def test_tiny_model_equals_workbench_quantization(bc, make, bits: int) -> None:
    model = make()
    x = images(64)
    qm = quantize_model(model, PTQConfig(w_bits=bits, a_bits=bits, quant_attn=False), [x])
    bm = bc.to_brevitas(qm)
    ours_layers, their_layers = qm.quant_layers(), bc.brevitas_layers(bm)
    assert [n for n, _ in ours_layers] == [n for n, _ in their_layers] and len(ours_layers) >= 3

    seen, remove = _layer_inputs(qm)
    with torch.no_grad():
        ours = qm(x)
    remove()
    theirs = bc.predict(bm, [x])
    n_codes = n_flips = 0
    for (name, w), (_, b) in zip(ours_layers, their_layers):
        aq = w.input_quant
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bw = b.quant_weight()
            bx = b.input_quant(seen[name])
        # the ranges that were handed over, bit for bit
        assert torch.equal(bw.scale, w.w_step) and int(bw.bit_width) == bits
        assert torch.equal(bx.scale.reshape(()), aq.scale) and int(bx.zero_point) == int(aq.zero_point)
        assert int(bx.bit_width) == bits and not bx.signed
        # Brevitas's rounding of the weights (zero point 0: no tie question) is the workbench's, exactly
        assert torch.equal(bw.value, w.weight_q), name
        assert int(bw.int().abs().max()) <= 2 ** (bits - 1) - 1  # the narrow grid
        # input codes on identical inputs: equal except where x/s sits on a half (see module docstring)
        ours_codes = quant.quantize(seen[name], aq.qparams())
        differ = bx.int().float() != ours_codes
        r = seen[name] / aq.scale
        assert bool(_near_tie(r)[differ].all()), f"{name}: codes differ away from a rounding tie"
        assert bool(((bx.int().float() - ours_codes)[differ].abs() == 1).all())
        n_codes += differ.numel()
        n_flips += int(differ.sum())
        assert int(bx.int().max()) <= 2**bits - 1 and int(bx.int().min()) >= 0
    assert n_flips <= max(1, n_codes // 10**5)  # measured: 0 here, 10 in 34M codes on the zoo ViT
    assert_same_outputs(ours, theirs)
    # and the comparison is not between two float models: quantization moved the logits far more
    with torch.no_grad():
        assert float((ours - model(x)).abs().max()) > 1e-2 * float(ours.abs().max())


@pytest.mark.parametrize("cfg", [
    PTQConfig(w_bits=4, a_bits=4, w_per_channel=False), PTQConfig(w_bits=3, a_bits=3, a_symmetric=True),
    PTQConfig(w_bits=3, a_bits=3, first_last_8bit=True), PTQConfig(w_bits=4, a_bits=4, bias_correction=True),
    PTQConfig(w_bits=3, a_bits=None)], ids=["per-tensor", "a-symmetric", "first-last-8bit", "bias-correction",
                                            "weights-only"])
def test_other_settings_convert_too(bc, cfg: PTQConfig) -> None:
    # per-tensor weights, signed activations, 8-bit boundary layers, corrected biases, weights only
    model, x = tiny_cnn(), images(64)
    qm = quantize_model(model, cfg.replace(quant_attn=False), [x])
    bm = bc.to_brevitas(qm)
    for (_, w), (_, b) in zip(qm.quant_layers(), bc.brevitas_layers(bm)):
        with torch.no_grad():
            assert torch.equal(b.quant_weight().value, w.weight_q)
            assert int(b.quant_weight().bit_width) == w.w_bits
        assert b.input_quant.is_quant_enabled == (w.input_quant is not None)
    assert_same_outputs(bc.predict(qm, [x]), bc.predict(bm, [x]))


@pytest.mark.parametrize("bits", BITS)
def test_a_grid_with_one_level_too_many_would_be_caught(bc, bits: int) -> None:
    # The comparison has teeth: had the workbench's fake quantizer used step = range / 2^b (one
    # level too many) while recording range / (2^b - 1), Brevitas, which uses the recorded step,
    # would disagree far beyond what assert_same_outputs allows.
    model, x = tiny_vit(), images(64)
    qm = quantize_model(model, PTQConfig(w_bits=bits, a_bits=bits, quant_attn=False), [x])
    bad = copy.deepcopy(qm)
    for _, layer in bad.quant_layers():
        aq = layer.input_quant
        aq.load_state_dict({"scale": aq.scale * (2**bits - 1) / 2**bits, "zero_point": aq.zero_point})
    with pytest.raises(AssertionError):
        assert_same_outputs(bc.predict(qm, [x]), bc.predict(bc.to_brevitas(bad), [x]))


@pytest.mark.parametrize("zero_point", [0, 1, 2, 3, 7, 8])
def test_rounding_ties_both_half_to_even_with_the_zero_point_added_before_or_after(bc, zero_point: int) -> None:
    # Inputs exactly halfway between grid points (s = 1/4: x / s is exact in float32). Both sides
    # round half to even (torch.round), never half away from zero. The workbench rounds x/s and
    # then adds zp (the ONNX QuantizeLinear convention); Brevitas rounds x/s + zp. With an even
    # zp that is the same; with an odd zp every tie lands one code apart: Brevitas's code is
    # even, the workbench's code minus zp is even.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(15, 3)).eval()
    qm = quantize_model(model, PTQConfig(w_bits=4, a_bits=4, quant_attn=False), [torch.randn(4, 15)])
    aq = qm.quant_layers()[0][1].input_quant
    s = 0.25
    aq.load_state_dict({"scale": torch.tensor(s), "zero_point": torch.tensor(zero_point, dtype=torch.int32)})
    bm = bc.to_brevitas(qm)
    codes = torch.arange(15, dtype=torch.float32)  # ties j + 0.5 for j = 0..14: inside [0, 15] on both sides
    x = ((codes + 0.5 - zero_point) * s).reshape(1, 15)
    ours = quant.quantize(x, aq.qparams())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bc.brevitas_layers(bm)[0][1].input_quant(x).int().float()
    assert torch.equal(theirs, torch.round(codes + 0.5).reshape(1, 15)) and bool((theirs % 2 == 0).all())
    assert bool(((ours - zero_point) % 2 == 0).all())
    if zero_point % 2 == 0:
        assert torch.equal(ours, theirs)
    else:
        assert bool(((ours - theirs).abs() == 1).all())
    # not half away from zero: x/s = 0.5 -> 0 and 2.5 -> 2 (the workbench's codes, zp added after)
    assert int(ours[0, zero_point]) == zero_point and int(ours[0, zero_point + 2]) == zero_point + 2


def test_attention_quantization_is_refused(bc) -> None:
    qm = quantize_model(tiny_vit(), PTQConfig(w_bits=4, a_bits=4), [images(8)])  # quant_attn=True
    with pytest.raises(ConfigError, match="quant_attn=False"):
        bc.to_brevitas(qm)


# ---------------------------------------------------------------------------------------
# a zoo model: the criterion


N_TEST = 500  # images: each one is 0.2 points
N_CALIB = 128


@pytest.fixture(scope="module")
def zoo_vit(mini):
    from workbench import data as wd
    from workbench import zoo

    model, ckpt, _ = zoo.load_init("zoo:vit-micro-mini-s0")
    bundle = wd.match_recorded_pipeline(mini, ckpt.get("data_info"))
    calib = list(wd.batches(bundle.calib, bundle.info, 256, limit=N_CALIB))
    test = list(wd.batches(bundle.test, bundle.info, 250, limit=N_TEST))
    return model.eval(), calib, test


@pytest.mark.parametrize("bits", BITS)
def test_zoo_vit_minmax_accuracy_agrees_with_brevitas(bc, zoo_vit, bits: int) -> None:
    model, calib, test = zoo_vit
    cfg = PTQConfig(w_bits=bits, a_bits=bits, observer="minmax", quant_attn=False, n_calib=N_CALIB)
    qm = quantize_model(model, cfg, calib)  # the same calibration images feed both: Brevitas takes these ranges
    res = bc.cross_check(qm, test, model=model)
    print(res)  # shown with -s: the measured accuracies
    assert res["n"] == N_TEST and qm.calib_images == N_CALIB
    assert abs(res["accuracy_gap"]) <= 0.5, res
    # stronger than the criterion: the two disagree on at most a few images (rounding ties)
    assert res["prediction_agreement"] >= 99.0, res
    # and quantization is real at these widths: it moved the logits (from the float model's) two
    # orders of magnitude more than the two implementations differ (measured: about 600x, 2700x)
    assert res["fp_logit_mean_abs_diff"] > 100 * res["logit_mean_abs_diff"], res
