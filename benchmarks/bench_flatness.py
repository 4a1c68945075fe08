"""Benchmark: workbench.flatness against PyHessian 0.1 on the same model, batch and work.

PyHessian is GPL-3.0, so it is never a dependency of the workbench: this script installs it (without
dependencies) into its own virtual environment and puts only that environment's site-packages on
``sys.path`` of this process. Without network access, or with ``--no-pyhessian``, it times the
workbench alone and says why.

Both tools run interleaved in one process (the CPU is shared with other jobs, so only ratios measured
side by side mean anything). Each model is first trained for ``--trained`` epochs (default 2) on
``fashion-mnist-mini`` (cached in the temp dir; ``--trained 0``: a fresh model on random data), and the
Hessian is that of a real batch: a trained network's Hessian has the few outlying eigenvalues that
make trace estimation hard, a fresh one does not. For each model:

* equal work: top eigenvalue with 20 Hessian-vector products (PyHessian: power iteration; workbench:
  Lanczos, and power iteration for reference) and trace with 10 Rademacher probes (workbench with
  ``deflate=0``, i.e. the same estimator). Per product both tools run the same double backward, so
  these ratios sit near 1; the floor of an exact product (2x a forward+backward in matmul/conv work)
  is printed beside them;
* trace at equal accuracy: PyHessian's Hutchinson with ``--acc-probes`` probes against the workbench's
  deflated estimator stopped as soon as its standard error is at most PyHessian's; and the extrapolated
  cost of each to reach 5 % relative standard error (error ~ 1/sqrt(probes));
* eigenvalue at equal accuracy (``--at-tol``): PyHessian's default stopping (``tol=1e-3`` on
  successive power iterates) vs the workbench's Lanczos with ``tol=1e-3`` on the Ritz residual.

Run::

    python benchmarks/bench_flatness.py                 # default ViT (batch 128) + ResNet-18 at 32 px
    python benchmarks/bench_flatness.py --full          # + timm vit_tiny 32 px patch 4, small-image ResNet-18 28 px
    python benchmarks/bench_flatness.py --models resnet18-32 --batch 64 --json out.json
    python benchmarks/bench_flatness.py --trained 0       # fresh models on random data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench import flatness as fl  # noqa: E402

DEFAULT_MODELS = ["vit-micro", "resnet18-32"]
FULL_MODELS = DEFAULT_MODELS + ["vit_tiny-32", "resnet18-28"]


def build(name: str) -> tuple[torch.nn.Module, int, int]:
    """(model, in_chans, img_size) for a benchmark model name."""
    import timm

    if name == "vit-micro":  # the workbench default ViT on 28 px grayscale
        try:
            from workbench import models

            return models.create("vit-micro", num_classes=10, in_chans=1, img_size=28), 1, 28
        except Exception:  # the models package is not there yet: same layout, built directly
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                                     depth=4, num_heads=3), 1, 28
    if name == "resnet18-28":  # the workbench's small-image ResNet-18 (stride-1 stem, no max-pool)
        from workbench import models

        return models.create("resnet18", num_classes=10, in_chans=1, img_size=28), 1, 28
    if name == "resnet18-32":  # the reference figure's model: timm resnet18 on 32 px
        return timm.create_model("resnet18", num_classes=10, in_chans=3), 3, 32
    if name == "vit_tiny-32":  # the reference figure's model: timm vit_tiny, 32 px, patch 4
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192,
                                 depth=12, num_heads=3), 3, 32
    raise SystemExit(f"unknown model {name!r}; choose from {FULL_MODELS}")


def trained(name: str, epochs: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``name`` trained ``epochs`` epochs (Adam) on fashion-mnist-mini; returns (model, x, y) of one real batch.

    The weights are cached in the temp dir (``torch.load(weights_only=True)``), so reruns skip training.
    """
    from workbench import data

    torch.manual_seed(seed)
    model, c, size = build(name)
    bundle = data.load("fashion-mnist-mini", seed=seed)
    pad = (size - 28) // 2

    def prep(x: torch.Tensor) -> torch.Tensor:  # 28 px grayscale -> the model's input
        x = F.pad(x, (pad, pad, pad, pad)) if pad else x
        return x.expand(-1, c, -1, -1) if c != 1 else x

    cache = Path(tempfile.gettempdir()) / f"workbench-bench-flatness-{name}-e{epochs}-s{seed}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        model.train()
        for epoch in range(epochs):
            for x, y in data.batches(bundle.train, bundle.info, 128, shuffle=True, seed=seed, epoch=epoch):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(prep(x)), y).backward()
                opt.step()
        torch.save(model.state_dict(), cache)
        print(f"trained {name} for {epochs} epochs in {time.perf_counter() - t0:.0f} s (cached in {cache})")
    model.eval()
    with torch.no_grad():
        xt, yt = next(iter(data.batches(bundle.test, bundle.info, 512)))
        acc = float((model(prep(xt)).argmax(1) == yt).float().mean())
    print(f"{name}: test accuracy {acc:.1%} after {epochs} epochs")
    x, y = next(iter(data.batches(bundle.calib, bundle.info, 10**9)))
    return model, prep(x), y


def load_pyhessian(env_dir: Path | None, enabled: bool):
    """Import PyHessian from its own virtual env (created on first use); None with a message if impossible."""
    if not enabled:
        print("PyHessian: disabled (--no-pyhessian); timing the workbench alone")
        return None
    env = env_dir or Path(tempfile.gettempdir()) / "workbench-bench-pyhessian-env"
    py = env / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
            subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
                            "--no-deps", "pyhessian==0.1"], check=True, timeout=300)
        purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        if not (Path(purelib) / "pyhessian").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
                            "--no-deps", "pyhessian==0.1"], check=True, timeout=300)
        site.addsitedir(purelib)  # only for this process; the workbench env is untouched
        import pyhessian

        print(f"PyHessian: loaded from its own env {env}")
        return pyhessian
    except Exception as e:  # offline, no pip, ...
        print(f"PyHessian: SKIPPED, could not install it into a separate env ({type(e).__name__}: {e}); "
              "timing the workbench alone")
        return None


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fwd_bwd(model, x, y, reps: int = 3) -> float:
    times = []
    for _ in range(reps + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _unfuse(model) -> list:
    # PyHessian differentiates twice through the model: fused attention has no double backward on CPU
    mods = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for m in mods:
        m.fused_attn = False
    return mods


def ph_eig(ph, model, x, y, iters: int, tol: float, seed: int):
    """(top eigenvalue, seconds, Hessian-vector products) of PyHessian's power iteration."""
    mods = _unfuse(model)
    module = sys.modules[ph.hessian.__module__]
    product = module.hessian_vector_product
    count = [0]

    def counted(*a, **kw):  # PyHessian does not report its iterations: count its products
        count[0] += 1
        return product(*a, **kw)

    module.hessian_vector_product = counted
    torch.manual_seed(seed)
    try:
        t0 = time.perf_counter()
        H = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False)
        vals, _ = H.eigenvalues(maxIter=iters, tol=tol, top_n=1)
        dt = time.perf_counter() - t0
    finally:
        module.hessian_vector_product = product
    del H
    model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad behind
    for m in mods:
        m.fused_attn = True
    return vals[0], dt, count[0]


def ph_trace(ph, model, x, y, probes: int, seed: int):
    mods = _unfuse(model)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    H = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False)
    # tol=-inf: PyHessian stops early whenever its running mean is negative (it divides by trace, not |trace|)
    samples = H.trace(maxIter=probes, tol=float("-inf"))
    dt = time.perf_counter() - t0
    del H
    model.zero_grad(set_to_none=True)
    for m in mods:
        m.fused_attn = True
    n = len(samples)
    mean = sum(samples) / n
    se = statistics.stdev(samples) / math.sqrt(n) if n > 1 else math.inf
    return mean, se, n, dt


def bench_model(name: str, ph, args) -> dict:
    if args.trained:
        model, x, y = trained(name, args.trained, args.seed)
        x, y = x[: args.batch], y[: args.batch]
    else:
        torch.manual_seed(0)
        model, c, s = build(name)
        model.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, c, s, s, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
    nparams = sum(p.numel() for p in model.parameters())
    row: dict = {"model": name, "params": nparams, "batch": args.batch, "trained_epochs": args.trained,
                 "fwd_bwd_s": fwd_bwd(model, x, y)}
    print(f"\n== {name}: {nparams / 1e6:.2f}M params, batch {args.batch}, fwd+bwd {row['fwd_bwd_s']:.2f} s "
          f"(an exact product costs at least ~2x that: {2 * row['fwd_bwd_s']:.2f} s)")
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731

    def wb_eig(algorithm: str, iters: int, tol: float):
        return fl.top_eigenvalues(model, (x, y), k=1, max_iter=iters, tol=tol, algorithm=algorithm, generator=gen())

    def wb_trace(probes: int):  # the same estimator as PyHessian's
        return fl.hutchinson_trace(model, (x, y), min_probes=probes, max_probes=probes, deflate=0,
                                   generator=gen())

    # ---- equal work, interleaved
    it, pr = args.eig_iters, args.trace_probes
    if ph is not None:
        (row["ph_eig"], row["ph_eig_s"], _) = ph_eig(ph, model, x, y, it, 0.0, args.seed)
        print(f"PyHessian  top eig ({it} it power):   {row['ph_eig']:.5g}  {row['ph_eig_s']:.1f} s")
    r = wb_eig("lanczos", it, 0.0)
    row.update(wb_eig=r.eigenvalues[0], wb_eig_s=r.seconds, wb_eig_resid=r.residuals[0], hvp_method=r.method)
    print(f"workbench  top eig ({it} it Lanczos): {r.eigenvalues[0]:.5g} (Ritz residual {r.residuals[0]:.2g}) "
          f"{r.seconds:.1f} s  [HVP: {r.method}]")
    r = wb_eig("power", it, 0.0)
    row.update(wb_eig_power=r.eigenvalues[0], wb_eig_power_s=r.seconds)
    print(f"workbench  top eig ({it} it power):   {r.eigenvalues[0]:.5g}  {r.seconds:.1f} s")
    if ph is not None:
        m, se, n, dt = ph_trace(ph, model, x, y, pr, args.seed)
        row.update(ph_trace=m, ph_trace_se=se, ph_trace_s=dt)
        print(f"PyHessian  trace ({n} probes):        {m:.5g} +- {se:.3g}  {dt:.1f} s")
    r = wb_trace(pr)
    row.update(wb_trace=r.estimate, wb_trace_se=r.stderr, wb_trace_s=r.seconds)
    print(f"workbench  trace ({r.probes} probes):        {r.estimate:.5g} +- {r.stderr:.3g}  {r.seconds:.1f} s")

    if args.compile:  # forward-over-reverse through torch.compile: one-time compile, then cheaper products
        with fl.LossHessian(model, (x, y), compile=True) as H:
            _, row["wbc_compile_s"] = timed(lambda: H.hvp(torch.randn(H.numel, generator=gen())))
            r = fl.top_eigenvalues(H, k=1, max_iter=it, tol=0.0, generator=gen())
            rt = fl.hutchinson_trace(H, min_probes=pr, max_probes=pr, generator=gen())
        row.update(wbc_eig=r.eigenvalues[0], wbc_eig_s=r.seconds, wbc_trace=rt.estimate, wbc_trace_s=rt.seconds)
        print(f"workbench compiled: compile+1st product {row['wbc_compile_s']:.1f} s; top eig {r.eigenvalues[0]:.5g} "
              f"{r.seconds:.1f} s; trace {rt.estimate:.5g} +- {rt.stderr:.3g} {rt.seconds:.1f} s")

    # ---- trace at equal accuracy: the workbench stops once its standard error is PyHessian's or less
    if ph is not None and args.acc_probes:
        m, se, n, dt = ph_trace(ph, model, x, y, args.acc_probes, args.seed)
        row.update(ph_acc_trace=m, ph_acc_se=se, ph_acc_probes=n, ph_acc_s=dt)
        print(f"PyHessian  trace ({n} probes):        {m:.5g} +- {se:.3g}  {dt:.1f} s")
        r = fl.hutchinson_trace(model, (x, y), tol=se / abs(m), min_probes=2, max_probes=4 * n,
                                deflate=args.deflate, generator=gen())
        row.update(wb_acc_trace=r.estimate, wb_acc_se=r.stderr, wb_acc_hvps=r.hvps, wb_acc_s=r.seconds)
        print(f"workbench  trace (deflate {r.deflated} + {r.probes} probes = {r.hvps} HVPs): {r.estimate:.5g} "
              f"+- {r.stderr:.3g}  {r.seconds:.1f} s")
        row["speedup_trace_equal_se"] = dt / r.seconds
        row["trace_acc_diff_in_se"] = abs(m - r.estimate) / math.hypot(se, r.stderr)
        # cost of 5 % relative standard error, from each run's per-probe spread (error ~ 1/sqrt(probes))
        target = 0.05 * abs(r.estimate)
        ph_need = n * (se / target) ** 2
        wb_need = r.deflated + max(2.0, r.probes * (r.stderr / target) ** 2)
        row.update(ph_probes_for_5pct=ph_need, wb_hvps_for_5pct=wb_need,
                   speedup_trace_5pct=(ph_need * dt / n) / (wb_need * r.seconds / r.hvps))
        print(f"   to reach 5% relative SE: PyHessian ~{ph_need:.0f} probes, workbench ~{wb_need:.0f} HVPs "
              f"-> x{row['speedup_trace_5pct']:.1f}")

    # ---- equal accuracy: each tool's own stopping rule at tol 1e-3
    if args.at_tol:
        if ph is not None:
            v, dt, n = ph_eig(ph, model, x, y, 100, 1e-3, args.seed)
            row.update(ph_eig_tol=v, ph_eig_tol_s=dt, ph_eig_tol_hvps=n)
            print(f"PyHessian  top eig (tol 1e-3):        {v:.5g} in {n} HVPs  {dt:.1f} s")
        r = wb_eig("lanczos", 100, 1e-3)
        row.update(wb_eig_tol=r.eigenvalues[0], wb_eig_tol_s=r.seconds, wb_eig_tol_hvps=r.hvps,
                   wb_eig_tol_converged=r.converged)
        print(f"workbench  top eig (Lanczos tol 1e-3): {r.eigenvalues[0]:.5g} in {r.hvps} HVPs, "
              f"converged={r.converged}  {r.seconds:.1f} s")

    if ph is not None:
        row["speedup_eig_equal_work"] = row["ph_eig_s"] / row["wb_eig_s"]
        row["speedup_trace_equal_work"] = row["ph_trace_s"] / row["wb_trace_s"]
        row["eig_rel_diff"] = abs(row["wb_eig"] - row["ph_eig"]) / abs(row["wb_eig"])
        comb = math.hypot(row["ph_trace_se"], row["wb_trace_se"])
        row["trace_diff_in_se"] = abs(row["wb_trace"] - row["ph_trace"]) / comb if comb else math.inf
        if args.at_tol:
            row["speedup_eig_at_tol"] = row["ph_eig_tol_s"] / row["wb_eig_tol_s"]
        if args.compile:
            row["speedup_eig_compiled"] = row["ph_eig_s"] / row["wbc_eig_s"]
            row["speedup_trace_compiled"] = row["ph_trace_s"] / row["wbc_trace_s"]
            row["speedup_both_compiled_incl_compile"] = (row["ph_eig_s"] + row["ph_trace_s"]) / (
                row["wbc_eig_s"] + row["wbc_trace_s"] + row["wbc_compile_s"])
            print(f"-> compiled: eig x{row['speedup_eig_compiled']:.2f}, trace x{row['speedup_trace_compiled']:.2f}, "
                  f"eig+trace incl. compile x{row['speedup_both_compiled_incl_compile']:.2f}")
        print(f"-> speed-up eig x{row['speedup_eig_equal_work']:.2f}, trace x{row['speedup_trace_equal_work']:.2f}"
              + (f", eig at tol x{row['speedup_eig_at_tol']:.2f}" if args.at_tol else "")
              + (f", trace at equal SE x{row['speedup_trace_equal_se']:.2f}" if args.acc_probes else "")
              + f"; eig rel diff {row['eig_rel_diff']:.2%}, trace diff {row['trace_diff_in_se']:.2f} combined SE")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma-separated, from {FULL_MODELS}")
    p.add_argument("--full", action="store_true", help="all models (adds the reference vit_tiny 32 px)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eig-iters", type=int, default=20)
    p.add_argument("--trace-probes", type=int, default=10)
    p.add_argument("--trained", type=int, default=2, metavar="EPOCHS",
                   help="train each model this many epochs on fashion-mnist-mini first (0: fresh, random data)")
    p.add_argument("--acc-probes", type=int, default=40,
                   help="PyHessian probes for the equal-accuracy trace comparison (0: skip it)")
    p.add_argument("--deflate", type=int, default=10, help="workbench Lanczos steps in that comparison")
    p.add_argument("--at-tol", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare each tool's own stopping rule (tol 1e-3) for the top eigenvalue")
    p.add_argument("--compile", action="store_true",
                   help="also time the workbench with torch.compile'd forward-over-reverse products")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-pyhessian", action="store_true")
    p.add_argument("--pyhessian-env", type=Path, default=None, help="where PyHessian's own venv lives")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else (FULL_MODELS if args.full else DEFAULT_MODELS)
    ph = load_pyhessian(args.pyhessian_env, not args.no_pyhessian)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rows = [bench_model(n, ph, args) for n in names]
    print("\nspeed-up of the workbench over PyHessian (x > 1: the workbench is faster)")
    print("model          params  fwd+bwd  eig (equal work)  trace (equal work)  eig (at tol)  "
          "trace (equal SE)  trace (5% SE)")
    for r in rows:
        print(f"{r['model']:<14} {r['params'] / 1e6:5.2f}M  {r['fwd_bwd_s']:6.2f}s  "
              f"{r.get('speedup_eig_equal_work', math.nan):15.2f}  {r.get('speedup_trace_equal_work', math.nan):17.2f}"
              f"  {r.get('speedup_eig_at_tol', math.nan):11.2f}  {r.get('speedup_trace_equal_se', math.nan):15.2f}"
              f"  {r.get('speedup_trace_5pct', math.nan):12.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
