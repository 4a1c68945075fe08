"""``workbench train`` (from scratch, from a zoo parent, or from timm's pretrained weights) and
``workbench eval``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..errors import CheckpointError, ConfigError
from .common import AddJson, emit, parse_kv, parse_val_size, register

#: ``workbench train`` stopped by Ctrl-C (SIGINT) after saving ``last.pt``: 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130


def add_train_parser(sub: Any, add_json: AddJson) -> None:
    t = sub.add_parser("train", help="train a model (optionally with a pre-conditioning method)")
    t.add_argument("--data", default=None, help="dataset (default: fashion-mnist-mini, or the --init model's)")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--val-size", default="0", metavar="N|FRACTION",
                   help="hold out N training images (a whole number) or this fraction of them (below 1) "
                   "as a validation split")
    t.add_argument("--model", default=None, help="model (default: vit-micro, or the --init model's)")
    t.add_argument("--init", default=None, metavar="CKPT|zoo:NAME",
                   help="fine-tune from these weights (a new run: its own optimizer and the fine-tune recipe, "
                   "a tenth of the model's learning rate, 1 epoch; `workbench zoo list`)")
    t.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="architecture override, repeatable")
    t.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (--model timm:NAME; needs internet once, then the "
                   "cache): its input size, mean/std and interpolation, a new head for the dataset's classes")
    t.add_argument("--pretrained-file", default=None, metavar="PATH",
                   help="the same, with the weights read from a local state-dict file of that timm model")
    t.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="the model's input size: images are resized (and centre-cropped for pretrained models)")
    t.add_argument("--epochs", type=_epochs, default=None, help="epochs (a fraction trains part of the last one)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps in all, instead of --epochs")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default=None)
    t.add_argument("--train-arg", action="append", metavar="KEY=VALUE", help="any TrainConfig field, repeatable")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--method", default="plain", help="plain, wnoise, anoise, dnq, uniform, sam, swa, qat")
    t.add_argument("--bits", default=None, help="target precision of the noise (or of qat's quantizers): W[,A], e.g. 4 or 4,8 or W4A8")
    t.add_argument("--w-bits", default=None, metavar="W", help="the weight side of --bits alone (32 = weights left clean)")
    t.add_argument("--a-bits", default=None, metavar="A", help="the activation side of --bits alone (32 = activations left clean)")
    t.add_argument("--noise-mult", type=float, default=None, help="noise multiplier k (sigma = k * step / sqrt(12))")
    t.add_argument("--rho", type=float, default=None, help="SAM neighbourhood radius")
    t.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="any MethodConfig field, repeatable")
    t.add_argument("--out", required=True, help="run folder (must be new or empty)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    t.add_argument("--no-progress", action="store_true")
    add_json(t)


def add_eval_parser(sub: Any, add_json: AddJson) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--data", default=None, help="default: the checkpoint's dataset")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--split", default="test", choices=["train", "test", "calib", "val"])
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    add_json(e)


def build_method(args: argparse.Namespace):
    """(TrainMethod, method_config dict) from the CLI flags."""
    from ..precondition import MethodConfig, create_method
    from ..quant import parse_bits_list, parse_bits_pair

    kw: dict[str, Any] = {"method": args.method}
    if args.bits is not None:
        if args.w_bits is not None or args.a_bits is not None:
            raise ConfigError("give the target bits once: --bits W,A or --w-bits W / --a-bits A, not both")
        w, a = parse_bits_pair(args.bits)
        kw.update(w_bits=w, a_bits=a)
    for side in ("w_bits", "a_bits"):
        text = getattr(args, side)
        if text is not None:
            widths = parse_bits_list(text, "--" + side.replace("_", "-"))
            if len(widths) != 1:
                raise ConfigError(f"--{side.replace('_', '-')} takes one width, got {text!r}")
            kw[side] = widths[0]
    if args.noise_mult is not None:
        kw["noise_mult"] = args.noise_mult
    if args.rho is not None:
        kw["rho"] = args.rho
    kw.update(parse_kv(args.method_arg, "--method-arg"))
    cfg = MethodConfig.from_dict(kw)
    return create_method(cfg), cfg.to_dict()


def _epochs(text: str) -> int | float:
    """``--epochs``: a whole number stays an int (as recorded by earlier runs), else a fraction."""
    value = float(text)
    return int(value) if value.is_integer() else value


def cmd_train(args: argparse.Namespace) -> int:
    """Train; under ``torchrun --nproc-per-node N`` every process runs this and trains data-parallel."""
    from .. import data, distributed, models
    from ..runinfo import prepare_run_dir, resolve_device, set_seed
    from ..train import TrainConfig, fit

    init = None
    if args.init:  # a fine-tune: the parent's architecture and (by default) dataset, the fine-tune recipe
        from ..zoo import load_init

        if args.model_arg or args.image_size:
            raise ConfigError("--model-arg and --image-size change the architecture; a fine-tune (--init) keeps its parent's")
        if args.pretrained or args.pretrained_file:
            raise ConfigError("--pretrained loads timm's weights and --init a checkpoint's: give one starting point")
        if str(args.init).startswith("timm:"):
            raise ConfigError(f"--init takes a checkpoint or zoo:NAME; for timm's weights use --model {args.init} "
                              "--pretrained")
        parent, parent_ckpt, init = load_init(args.init)
        if args.model is not None and args.model != init["model"]:
            raise ConfigError(f"--model {args.model} but the --init checkpoint is a {init['model']}; "
                              "leave --model out when fine-tuning")
        model_name, data_name = init["model"], args.data or init["data"]
        recipe = models.finetune_recipe(model_name, **({"epochs": args.epochs} if args.epochs else {}))
    else:
        model_name, data_name = args.model or models.DEFAULT_MODEL, args.data or "fashion-mnist-mini"
        pretrained = bool(args.pretrained or args.pretrained_file)
        # pretrained weights are fine-tuned like a zoo parent: a tenth of the learning rate, 1 epoch
        recipe = models.finetune_recipe(model_name) if pretrained else models.default_recipe(model_name)
    cfg_kw = {"epochs": args.epochs, "steps": args.steps, "seed": args.seed, "device": args.device,
              "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
              "weight_decay": args.weight_decay}
    # the model's own recipe (or its fine-tune recipe) first, then whatever the user said explicitly
    cfg_kw = {**recipe, **{k: v for k, v in cfg_kw.items() if v is not None}}
    cfg_kw.update(parse_kv(args.train_arg, "--train-arg"))
    cfg = TrainConfig.from_dict(cfg_kw)
    resolve_device(cfg.device)  # an unknown or absent device fails here, before --out is touched
    bundle = data.load(data_name, data_dir=args.data_dir, seed=cfg.seed, val_size=parse_val_size(args.val_size))
    if init is not None:  # the images as the parent saw them (its input pipeline, if it had one)
        bundle = data.match_recorded_pipeline(bundle, parent_ckpt.get("data_info"))
    elif pretrained:  # timm's pretrained_cfg: input size, mean/std, resize and centre crop
        bundle = data.with_input_pipeline(bundle, **models.pretrained_input(model_name, args.image_size))
    elif args.image_size:
        bundle = data.with_input_pipeline(bundle, image_size=args.image_size)
    method, method_cfg = build_method(args)
    set_seed(cfg.seed)  # the same initial weights on every rank
    if init is not None:
        model = parent
        spec = model.workbench_spec
        have = (bundle.info.num_classes, bundle.info.channels, bundle.info.image_size)
        want = (spec["num_classes"], spec.get("in_chans", have[1]), spec.get("img_size", have[2]))
        if have != want:
            raise ConfigError(f"the --init model takes {want[1]}-channel {want[2]}px images in {want[0]} classes, "
                              f"but {data_name} has {have[1]}-channel {have[2]}px images in {have[0]} classes; "
                              "fine-tune on the parent's dataset (leave --data out)")
    else:
        model = models.create(model_name, bundle.info, pretrained=pretrained, pretrained_file=args.pretrained_file,
                              **parse_kv(args.model_arg, "--model-arg"))
    # WORLD_SIZE > 1 (torchrun): one process group; a no-op in a single process
    distributed.init_from_env(cfg.device)
    main = distributed.is_main()  # (kept: after cleanup() every process would look like rank 0)
    if not main:
        logging.getLogger("workbench").setLevel(logging.WARNING)  # rank 0 logs for everyone
    try:
        distributed.check_global_batch(cfg.batch_size)  # before the output folder is touched
        # Only now, with every name and option checked, touch the output folder (rank 0 alone).
        out = distributed.call_on_main(lambda: prepare_run_dir(args.out, resume=args.resume,
                                                               overwrite=args.overwrite))
        try:
            result = fit(model, bundle, cfg, method, method_config=method_cfg, out_dir=out, resume=args.resume,
                         progress=not args.no_progress, init=init)
        except KeyboardInterrupt:
            if main:
                print(f"interrupted: progress saved in {out / 'last.pt'}; continue with the same command plus "
                      "--resume", file=sys.stderr)
            return EXIT_INTERRUPTED
    finally:
        distributed.cleanup()
    if not main:
        return 0
    m = result.metrics
    procs = f" x {m['world_size']} processes" if m.get("world_size", 1) > 1 else ""
    emit({**m, "checkpoint": str(result.checkpoint), "out": str(out)}, args.json,
         f"{model_name} on {data_name} ({method_cfg.get('method')}"
         f"{', fine-tuned from ' + init['source'] if init else ''}): test accuracy {m['test_accuracy']:.2f}% "
         f"(loss {m['test_loss']:.4f}) after {m['steps']} steps ({m['epochs']} epochs), "
         f"{m['total_train_time']:.0f} s training "
         f"on {m['device']}{procs}\ncheckpoint: {result.checkpoint}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import data
    from ..checkpoint import load_model, recorded_data_params
    from ..runinfo import resolve_device
    from ..train import evaluate_split

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    # the run's own splits (seed, held-out val), as recorded in its run.json
    recorded = recorded_data_params(args.checkpoint, ckpt)
    name = args.data or recorded["name"]
    if not name:
        raise ConfigError("the checkpoint does not record its dataset; pass --data NAME")
    same = name == recorded["name"]
    val_size = recorded["val_size"] if same else 0
    if args.split == "val" and not val_size:
        raise ConfigError(f"no validation split to evaluate: {recorded['source']} records no val_size for "
                          f"{name} (train with --val-size N to hold one out), or use --split test")
    bundle = data.load(name, data_dir=args.data_dir, seed=recorded["seed"], val_size=val_size,
                       **({"n_calib": recorded["n_calib"]} if same and "n_calib" in recorded else {}))
    bundle = data.match_recorded_pipeline(bundle, ckpt.get("data_info"))
    if bundle.info.num_classes != ckpt["model_spec"]["num_classes"]:
        raise CheckpointError(f"the checkpoint has {ckpt['model_spec']['num_classes']} classes but {name} has "
                              f"{bundle.info.num_classes}")
    res = evaluate_split(model, bundle, args.split, device=device)
    from .. import lsq

    if lsq.has_quantizers(model):  # a QAT model: the score above is quantized; its latent weights too
        with lsq.disabled(model):
            fp = evaluate_split(model, bundle, args.split, device=device)
        res.update(fp_accuracy=fp["accuracy"], fp_loss=fp["loss"], qat_bits=list(lsq.bits(model)))
    res.update(checkpoint=str(args.checkpoint), data=name, split=args.split, val_size=val_size,
               model=ckpt["model_spec"]["name"],
               method=ckpt.get("method_config", {}).get("method", "plain"))
    emit(res, args.json, f"{res['model']} ({res['method']}) on {name}/{args.split}: accuracy {res['accuracy']:.2f}%, "
         f"loss {res['loss']:.4f} ({res['n']} images)")
    return 0


register("train", add_train_parser, cmd_train)
register("eval", add_eval_parser, cmd_eval)
