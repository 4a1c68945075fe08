"""Cost of flatness: time per training step of each method relative to plain, side by side.

All methods train their own copy of the same model on the same batch, interleaved round by
round (plain, wnoise, ..., plain, wnoise, ...) so that load from other processes hits all of
them alike; the table reports medians over rounds after warm-up. On CPU both wall time and
process CPU time are measured (CPU time is steadier on a shared machine).

    python benchmarks/bench_precondition.py                       # default ViT on CPU
    python benchmarks/bench_precondition.py --device cuda --rounds 50
    python benchmarks/bench_precondition.py --methods plain,dnq --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from workbench.precondition import MethodConfig, create_method
from workbench.train_method import StepContext


def build_model(name: str) -> nn.Module:
    try:
        from workbench import models

        return models.create(name, num_classes=10, in_chans=1, img_size=28)
    except ImportError:  # fallback: a timm ViT of the default's size
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128,
                                 depth=4, num_heads=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-micro")
    ap.add_argument("--methods", default="plain,wnoise,anoise,dnq,uniform,sam,qat")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--bits", default="4,8", help="W,A")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    w_bits, a_bits = (int(b) for b in args.bits.split(","))
    names = [m.strip() for m in args.methods.split(",")]
    if "plain" not in names:
        names.insert(0, "plain")

    torch.manual_seed(0)
    base = build_model(args.model).to(device)
    x = torch.randn(args.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    use_amp = args.amp and device.type == "cuda"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp)

    runs = []
    for name in names:
        model = copy.deepcopy(base).train()
        method = create_method(MethodConfig(method=name, w_bits=w_bits, a_bits=a_bits, seed=0))
        method.prepare(model)  # QAT's learned steps join the parameters before the optimizer is made
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctx = StepContext(loss_fn=nn.functional.cross_entropy, optimizer=opt, device=device, epochs=1,
                          steps_per_epoch=args.rounds + args.warmup, autocast=autocast)
        method.setup(model, ctx)
        method.on_epoch_start(model, 0)
        runs.append((name, model, method, ctx))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        for name, model, method, ctx in runs:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            method.training_step(model, x, y, ctx)
            sync()
            if r >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    for _, model, method, _ in runs:
        method.teardown(model)

    ref_w, ref_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    n_par = sum(p.numel() for p in base.parameters())
    print(f"model {args.model} ({n_par / 1e6:.2f}M params), batch {args.batch_size}, W{w_bits}A{a_bits}, "
          f"device {device}, threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} warm-up")
    head = f"{'method':<9} {'wall ms':>9} {'x plain':>8}"
    if device.type == "cpu":
        head += f" {'cpu ms':>9} {'x plain':>8}"
    print(head)
    for name in names:
        mw = statistics.median(wall[name])
        line = f"{name:<9} {mw * 1e3:9.1f} {mw / ref_w:8.3f}"
        if device.type == "cpu":
            mc = statistics.median(cpu[name])
            line += f" {mc * 1e3:9.1f} {mc / ref_c:8.3f}"
        print(line)


if __name__ == "__main__":
    main()
