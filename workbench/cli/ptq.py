"""``workbench ptq``: a post-training quantization sweep over checkpoints, or a mixed-precision
allocation under a budget (``--budget``)."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import ConfigError
from .common import AddJson, register

#: What ``--observer`` accepts: the observer registry's names (a test keeps the two equal); the
#: parser does not import the registry, so that ``workbench --help`` does not load torch.
OBSERVER_NAMES = ("minmax", "percentile", "mse")


def add_ptq_parser(sub: Any, add_json: AddJson) -> None:
    """Add the ``ptq`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("ptq", help="post-training quantization sweep over checkpoints")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--bits", default=None, help="WbAb pairs: 8,6,4,3 or W4A8,W8A32 (32 = float)")
    p.add_argument("--w-bits", "--wbits", dest="wbits", default=None, metavar="W[,W...]",
                   help="weight bits, crossed with --a-bits (32 = float)")
    p.add_argument("--a-bits", "--abits", dest="abits", default=None, metavar="A[,A...]",
                   help="activation bits, crossed with --w-bits (32 = float)")
    p.add_argument("--observer", default="minmax", choices=OBSERVER_NAMES)
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--no-attn", action="store_true", help="leave the attention matmuls in float")
    p.add_argument("--softmax", default="uniform", choices=("uniform", "log2"))
    p.add_argument("--first-last-8bit", action="store_true")
    p.add_argument("--bias-correction", action="store_true",
                   help="add each layer's mean output shift on the calibration images to its bias (Nagel et al. 2019)")
    p.add_argument("--reconstruction", default="none", choices=("none", "adaround", "brecq"),
                   help="learned rounding: adaround (per layer, Nagel et al. 2020) or brecq (per block, with "
                        "learned activation steps, Li et al. 2021); default none = round to nearest")
    p.add_argument("--qdrop", type=float, default=0.0,
                   help="with --reconstruction brecq: probability of leaving an activation in float while "
                        "reconstructing (QDrop, Wei et al. 2022, uses 0.5)")
    p.add_argument("--recon-iters", type=int, default=None,
                   help="optimizer steps per reconstructed layer or block (default: PTQConfig's, 500)")
    p.add_argument("--repq", action="store_true",
                   help="calibrate post-LayerNorm inputs per channel and fold the scales into the LayerNorm "
                        "(RepQ-ViT, Li et al. 2023); ViTs only")
    p.add_argument("--budget", default=None, metavar="B[,B...]",
                   help="mixed precision: per-layer weight bits chosen from the curvature to minimize the "
                        "predicted loss increase within this budget (see --budget-kind); activations at the "
                        "--a-bits width (default 8)")
    p.add_argument("--budget-kind", default="bits", choices=("bits", "bytes", "bops"),
                   help="what --budget counts: average weight bits (default), weight bytes, or bit-operations")
    p.add_argument("--candidates", default="8,6,4,3,2", help="weight widths a layer may take (--budget)")
    p.add_argument("--a-budget", type=float, default=None, metavar="A",
                   help="with --budget: per-layer input widths too, averaging A bits (weighted by each input's "
                        "size), chosen from the input-side curvature; the attention matmuls take --a-bits")
    p.add_argument("--a-candidates", default=None,
                   help="input widths a layer may take (default 8,6,4,3 with --a-budget); with --budget-kind bops "
                        "alone they are priced together with the weight widths")
    p.add_argument("--n-eval", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")
    add_json(p)


def run_budget_command(args: Any) -> int:
    """``workbench ptq CKPT --budget B``: allocate weight bits per layer from the curvature on the
    calibration images, then quantize and evaluate each allocation."""
    import torch

    from ..ptq.analysis import SWEEP_COLUMNS, checkpoint_data, sweep
    from ..ptq.mixed import activation_sensitivities, allocate_bits, layer_sensitivities
    from ..quant import parse_bits_list
    from ..runinfo import resolve_device
    from ..tables import format_table

    if args.bits or args.wbits:
        raise ConfigError("--budget chooses the weight bits per layer: give --a-bits (--abits) for the "
                          "activations, not --bits or --w-bits")
    a_list = parse_bits_list(args.abits, "a_bits", allow_float=False)
    if len(a_list) > 1:
        raise ConfigError(f"--a-bits takes one width with --budget (the activations' width), got {args.abits!r}")
    a_bits = a_list[0] if a_list else 8
    try:
        budgets = [float(b) for b in str(args.budget).split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budget {args.budget!r}: give numbers such as 3.5 or 3,4.5") from None
    candidates = parse_bits_list(args.candidates, "--candidates", allow_float=False)
    a_budget = getattr(args, "a_budget", None)
    a_cands_arg = getattr(args, "a_candidates", None)
    a_candidates = (parse_bits_list(a_cands_arg, "--a-candidates", allow_float=False) if a_cands_arg
                    else [8, 6, 4, 3] if a_budget is not None else None)
    if a_cands_arg and a_budget is None and args.budget_kind != "bops":
        raise ConfigError("--a-candidates needs --a-budget (average input bits), or --budget-kind bops, which "
                          "prices weight and input widths together")
    device = str(resolve_device(args.device))
    rows, allocations = [], []
    for path in args.checkpoints:
        model, method, calib, evals = checkpoint_data(path, args.n_calib, batch_size=args.batch_size,
                                                      device=device, n_eval=args.n_eval)
        sens = layer_sensitivities(model, calib[:1], generator=torch.Generator().manual_seed(0))
        a_sens = (activation_sensitivities(model, calib[:1], generator=torch.Generator().manual_seed(0))
                  if a_candidates else None)
        configs = []
        for b in budgets:
            alloc = allocate_bits(model, budget=b, budget_kind=args.budget_kind, candidates=candidates,
                                  a_bits=a_bits, a_candidates=a_candidates, a_budget=a_budget, sensitivities=sens,
                                  a_sensitivities=a_sens)
            allocations.append({"checkpoint": str(path), **alloc.to_dict()})
            configs.append(alloc.config(observer=args.observer, n_calib=args.n_calib, quant_attn=not args.no_attn,
                                        bias_correction=args.bias_correction, w_per_channel=not args.per_tensor,
                                        a_bits=a_bits))  # the attention matmuls (and unnamed inputs) at --a-bits
        got = sweep([(str(path), model, method)], configs, calib, evals, device=device,
                    progress=not getattr(args, "json", False))
        q = [r for r in got if r["config"] != "FP32"]
        for r, alloc in zip(q, allocations[-len(budgets):]):
            r.update(budget=alloc["budget"], budget_kind=alloc["budget_kind"], average_bits=alloc["average_bits"],
                     average_a_bits=alloc["average_a_bits"], predicted_increase=alloc["predicted"])
        rows += got
    if getattr(args, "json", False):
        json.dump({"rows": rows, "allocations": allocations}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(rows, [*SWEEP_COLUMNS, "budget", "average_bits", "predicted_increase"]))
        for a in allocations:
            print(f"{a['checkpoint']} budget {a['budget']:g} {a['budget_kind']}: average {a['average_bits']:.2f} bits, "
                  f"predicted loss increase {a['predicted']:.4f}; " + ", ".join(f"{k}={v}" for k, v in a["bits"].items())
                  + ("; inputs " + ", ".join(f"{k}={v}" for k, v in a["a_layer_bits"].items()) if a["a_layer_bits"] else ""))
    return 0


def run_ptq_command(args: Any) -> int:
    """Run the sweep described by parsed ``args``; print a table (or JSON rows with --json)."""
    if getattr(args, "budget", None):
        return run_budget_command(args)
    from ..ptq.analysis import SWEEP_COLUMNS, configs_from_bits, sweep_checkpoints
    from ..ptq.engine import PTQConfig
    from ..runinfo import resolve_device
    from ..tables import format_table

    bits = args.bits if (args.bits or args.wbits or args.abits) else "8,6,4,3"
    configs = configs_from_bits(bits, wbits=args.wbits, abits=args.abits, observer=args.observer,
                                w_per_channel=not args.per_tensor, n_calib=args.n_calib,
                                quant_attn=not args.no_attn, softmax_quantizer=args.softmax,
                                first_last_8bit=args.first_last_8bit, bias_correction=args.bias_correction,
                                reconstruction=args.reconstruction, qdrop=args.qdrop,
                                recon_iters=args.recon_iters if args.recon_iters is not None else PTQConfig.recon_iters,
                                repq=args.repq)
    device = str(resolve_device(args.device))  # one clear error for an unknown or absent device
    rows = sweep_checkpoints(args.checkpoints, configs, batch_size=args.batch_size, device=device,
                             n_eval=args.n_eval, progress=not getattr(args, "json", False))
    if getattr(args, "json", False):
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(rows, SWEEP_COLUMNS))
    return 0


register("ptq", add_ptq_parser, run_ptq_command)
