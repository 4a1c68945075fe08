"""``workbench flatness``: Hessian trace, eigenvalues and density, the predicted PTQ damage, and
loss landscapes of a checkpoint (:mod:`workbench.flatness`, :mod:`workbench.landscape`)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError
from .common import AddJson, register


def add_flatness_parser(sub: Any, add_json: AddJson) -> None:
    """Add the ``flatness`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("flatness", help="Hessian trace/eigenvalues/density, predicted PTQ damage, landscapes")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--trace", action="store_true", help="Hessian trace (with standard error)")
    p.add_argument("--eig", type=int, default=None, metavar="K", help="top-K Hessian eigenvalues")
    p.add_argument("--density", action="store_true", help="eigenvalue density (stochastic Lanczos quadrature)")
    p.add_argument("--landscape", choices=("1d", "2d"), default=None, help="loss landscape on a random "
                   "filter-normalized direction (1d) or plane (2d)")
    p.add_argument("--steps", type=int, default=None, help="landscape grid points per axis (default 21 / 11)")
    p.add_argument("--span", type=float, default=1.0, help="landscape range: alpha in [-span, span]")
    p.add_argument("--w-bits", "--wbits", dest="wbits", default="4,3", metavar="W[,W...]", help="weight bits for the sigma-weighted trace and the predicted "
                   "vs measured PTQ loss increase (comma list)")
    p.add_argument("--a-bits", "--abits", dest="abits", default=None, metavar="A[,A...]", help="also predict activation-quantization damage at these bits")
    p.add_argument("--n-samples", type=int, default=256, help="training images the loss is averaged over")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-probes", type=int, default=30)
    p.add_argument("--tol", type=float, default=0.05, help="relative standard error at which the trace stops")
    p.add_argument("--deflate", type=int, default=20, metavar="M", help="Lanczos steps taken exactly before the "
                   "trace probes (variance reduction; 0 = plain Hutchinson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    add_json(p)


def check_args(args: Any) -> None:
    """Refuse nonsensical counts and ranges up front, naming the flag and its valid range.

    Raises:
        ConfigError: the first bad flag.
    """
    mins = (("--eig", "eig", 1, "omit --eig for no eigenvalues"),
            ("--n-samples", "n_samples", 1, None), ("--batch-size", "batch_size", 1, None),
            ("--max-probes", "max_probes", 2, "a standard error needs two probes"),
            ("--deflate", "deflate", 0, "0 = plain Hutchinson"),
            ("--steps", "steps", 1, "omit --steps for the default grid"))
    for flag, attr, low, hint in mins:
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value} is out of range: use an integer >= {low}" + (f" ({hint})" if hint else ""))
    if not args.span > 0:
        raise ConfigError(f"--span {args.span} is out of range: use a number > 0 (alpha runs over [-span, span])")
    if not args.tol > 0:
        raise ConfigError(f"--tol {args.tol} is out of range: use a relative standard error > 0, e.g. 0.05")


def run_flatness_command(args: Any) -> int:
    """Load the checkpoint and its data, compute the asked-for measures, print them."""
    import torch

    from .. import data
    from ..checkpoint import load_model, recorded_data_params
    from ..flatness import flatness_report
    from ..landscape import landscape_1d, landscape_2d
    from ..quant import parse_bits_list
    from ..runinfo import json_default, resolve_device

    check_args(args)
    w_bits = parse_bits_list(args.wbits, "--w-bits", allow_float=False) or [4]
    a_bits = parse_bits_list(args.abits, "--a-bits", allow_float=False) or None
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    # the run's own training images: the held-out val split (if any) is not among them
    recorded = recorded_data_params(args.checkpoint, ckpt)
    name = recorded["name"]
    if not name:
        raise ConfigError("the checkpoint does not record its dataset")
    bundle = data.load(name, data_dir=args.data_dir, seed=recorded["seed"], n_calib=args.n_samples,
                       val_size=recorded["val_size"])
    bundle = data.match_recorded_pipeline(bundle, ckpt.get("data_info"))
    # the calibration split: a seed-fixed subset of the training images, without augmentation
    batches = list(data.batches(bundle.calib, bundle.info, args.batch_size, device=device))
    any_measure = args.trace or args.eig or args.density or args.landscape
    report = flatness_report(model, batches, w_bits=w_bits, a_bits=a_bits,
                             trace=args.trace or not any_measure, eig=args.eig if args.eig is not None else
                             (0 if any_measure else 1), density=args.density, max_probes=args.max_probes,
                             trace_tol=args.tol, trace_deflate=args.deflate, device=device, seed=args.seed, progress=not args.json)
    if args.landscape:
        gen = torch.Generator().manual_seed(args.seed)
        span = (-args.span, args.span)
        if args.landscape == "1d":
            land = landscape_1d(model, batches, span=span, steps=args.steps or 21, generator=gen,
                                device=device, progress=not args.json)
        else:
            land = landscape_2d(model, batches, span=span, steps=args.steps or 11, generator=gen,
                                device=device, progress=not args.json)
        report["landscape"] = land.to_dict()
    report.update(checkpoint=str(args.checkpoint), data=name, model=ckpt["model_spec"]["name"],
                  method=ckpt.get("method_config", {}).get("method", "plain"))
    if args.json:
        print(json.dumps(report, indent=2, default=json_default))
        return 0
    print(f"{report['model']} ({report['method']}) on {report['samples']} {name} training images: "
          f"loss {report['loss']:.4f}, accuracy {report['accuracy']:.2f}%")
    if "top_eigenvalues" in report:
        print(f"top eigenvalues: {', '.join(f'{v:.4g}' for v in report['top_eigenvalues']['eigenvalues'])}")
    if "trace" in report:
        t = report["trace"]
        print(f"Hessian trace: {t['estimate']:.4g} ± {t['stderr']:.2g} ({t['deflated']} Lanczos steps + "
              f"{t['probes']} probes)")
    for key, q in report.get("quant", {}).items():
        print(f"{key}: sigma-weighted trace {q['sigma_trace']:.4g}, predicted loss increase "
              f"{q['predicted']:.4g} ± {q['predicted_stderr']:.2g}, measured (round-to-nearest) "
              f"{q['measured_rtn']:.4g}, under noise of that variance {q['measured_noise']:.4g}")
    for key, q in report.get("quant_act", {}).items():
        measured = q.get("measured_rtn", q.get("measured", float("nan")))
        print(f"{key}: predicted loss increase {q['predicted']:.4g}, measured {measured:.4g}")
    if "sharpness" in report:
        s = report["sharpness"]
        print(f"sharpness: ascent {s['ascent']['increase']:.4g}, gaussian {s['gaussian']['increase']:.4g}")
    if "landscape" in report:
        print(f"landscape {args.landscape}: {len(json.dumps(report['landscape']))} bytes (use --json to get it)")
    return 0


register("flatness", add_flatness_parser, run_flatness_command)
