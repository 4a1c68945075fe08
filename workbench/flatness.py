"""Flatness analysis: Hessian-vector products, spectrum, trace, sharpness, and PTQ damage predicted
from curvature before quantizing.

A small, PyHessian-like API that stays close to the maths::

    import workbench.flatness as fl
    with fl.LossHessian(model, (x, y)) as H:        # cheap; nothing is computed yet
        eig = fl.top_eigenvalues(H, k=3)             # Lanczos, with a tolerance
        tr = fl.hutchinson_trace(H, tol=0.05)        # estimate +- standard error
        pred = fl.weight_quant_prediction(H, w_bits=4)  # 1/2 sum sigma_i^2 H_ii vs measured PTQ
    fl.flatness_report(model, (x, y), w_bits=(4, 3))   # everything as a plain dict (CLI --json)

Every function also accepts ``(model, data, ...)`` instead of a :class:`LossHessian`.

Honesty rules followed here:

* The model is never changed: all evaluations go through ``torch.func.functional_call`` with
  detached copies (or views) of the parameters, so parameters and buffers stay bitwise equal;
  train/eval flags of every submodule are restored afterwards.
* The Hessian is that of the model in **eval mode** (dropout off, BatchNorm using its running
  statistics). In train mode BatchNorm would make the loss depend on the batch composition and
  update running statistics as a side effect; PyHessian users call ``model.eval()`` for the same
  reason.
* Stochastic estimates come with their standard error, the number of Hessian-vector products used
  and whether the tolerance was met.
* Fused attention (``F.scaled_dot_product_attention``) has no double backward on CPU: timm
  ``Attention`` modules get ``fused_attn = False`` only while a Hessian-vector product runs.

Data-parallel (several processes, see :mod:`workbench.distributed`): with a process group of two or
more, every rank builds a :class:`LossHessian` over its *own* batches and runs the same analysis
with the same random generator; Hessian-vector products, gradients and losses are summed over the
ranks with sample weights, so every rank gets the Hessian of the loss over the union of the data
(and the same estimates). Each product checks that all ranks multiply the same vector.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from . import distributed as wdist
from . import quant
from .errors import ConfigError, ModelError
from .stats import MIN_RANK_POINTS, spearman  # noqa: F401  (spearman: re-exported, used below)

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Layer types whose weights PTQ quantizes (see :mod:`workbench.ptq`): the sigma-weighted trace uses these.
QUANT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
HVP_METHODS = ("auto", "fwd", "dbl")


# ----------------------------------------------------------------------------- model state helpers


@contextmanager
def preserved_mode(model: nn.Module, train: bool = False) -> Iterator[nn.Module]:
    """Put every submodule in train/eval mode for the block, then restore each flag exactly."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``fused_attn = False`` on timm attention modules (double backward on CPU)."""
    mods = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in mods:
            m.fused_attn = True


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def select_params(model: nn.Module, params: str | Sequence[str] | None = None) -> list[str]:
    """Names of the parameters to differentiate: all requiring grad, or those matching names/patterns.

    Args:
        params: ``None`` (every parameter with ``requires_grad``), one name/``fnmatch`` pattern, or a
            list of them (e.g. ``["blocks.0.*", "head.weight"]``).
    Raises:
        ModelError: nothing requires grad / nothing matches.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ModelError("the model has no parameters requiring grad: nothing to differentiate "
                         "(unfreeze some with p.requires_grad_(True))")
    if params is None:
        return [n for n, _ in named]
    pats = [params] if isinstance(params, str) else list(params)
    chosen = [n for n, _ in named if any(n == pat or fnmatch.fnmatchcase(n, pat) for pat in pats)]
    if not chosen:
        raise ModelError(f"no trainable parameter matches {pats}; names look like "
                         f"{[n for n, _ in named[:5]]}")
    return chosen


def quantized_weight_names(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv weights that weight PTQ quantizes (and that requires grad)."""
    names = []
    for mname, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS) and mod.weight is not None and mod.weight.requires_grad:
            names.append(f"{mname}.weight" if mname else "weight")
    return names


def _as_batches(data: Batch | Iterable[Batch]) -> list[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        batches = [data]
    else:
        batches = [tuple(b) for b in data]  # type: ignore[misc]
    if not batches:
        raise ConfigError("no batches given: pass (x, y) or a list of (x, y)")
    for x, y in batches:
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise ConfigError("a batch of size 0 was given: the loss (and its Hessian) is undefined")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"images and labels differ in batch size: {x.shape[0]} vs {y.shape[0]}")
    return batches  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the Hessian operator


#: ``auto``'s choice per :meth:`LossHessian._trial_key`, so that repeated analyses of the same kind of model
#: in one process (a report, a notebook) pay for the timing trial once
_CHOSEN_METHOD: dict[tuple, str] = {}


class LossHessian:
    """The Hessian of a loss w.r.t. (some) parameters, accessed through Hessian-vector products.

    Constructing it is cheap. Use it as a context manager (the analysis functions do that for you):
    on entry the model goes to eval mode and parameter views/copies are taken on ``device``; on exit
    the modes are restored and any cached autograd graph is freed (nothing is kept alive between uses).

    The loss is the sample-weighted mean of ``loss_fn(model(x), y)`` over the given batches.

    HVP methods:
        ``fwd``: forward-over-reverse, ``jvp(grad(loss))`` via ``torch.func`` (no graph kept).
        ``dbl``: double backward; with a single batch the gradient graph is built once and reused.
        ``auto`` (default): the first product uses ``fwd``, the second ``dbl`` (both are exact, so no
        work is wasted); the faster one (by process CPU time) is used from then on, and by later
        ``LossHessian`` objects of this process for the same model layout, data shapes and device. Measured on CPU:
        ``fwd`` ~4x faster on a 12-block patch-4 ViT (its LayerNorm/GELU double backward is slow),
        ``dbl`` with graph reuse ~1.5-2x faster on ResNet-18 and on the conv-stem ``vit-micro``.
        ``vmap`` over several probes was slower than a loop on CPU for such models, so the estimators
        loop (see :meth:`hvp_many` for small models). Because the choice depends on timing, results
        can differ between runs in the last bits; pass ``fwd`` or ``dbl`` for bitwise reproducibility.

    Args:
        model: any ``nn.Module``; never modified.
        data: one ``(x, y)`` batch or an iterable of them (materialized once).
        loss_fn: ``loss_fn(outputs, targets)`` returning a mean loss (default cross-entropy).
        params: parameter subset (names or ``fnmatch`` patterns, see :func:`select_params`).
        device: where to compute (default: the model's device). Parameters are copied there, the
            model itself is not moved.
        method: ``auto`` | ``fwd`` | ``dbl``.
        compile: ``torch.compile`` the forward-over-reverse product (implies ``fwd``). Measured on the
            default ViT on CPU: 2-3x faster per product (inductor fuses the elementwise ops that dominate),
            after a one-time compile of ~50 CPU-seconds; worth it from ~20 products on.
        distributed: average over the ranks of the process group (each rank passes its own batches,
            the loss is the sample-weighted mean over the union). ``None`` (default): when a process
            group of two or more exists; every rank must then run the same computation.
    Raises:
        ModelError: no parameter requires grad / nothing matches ``params``.
        ConfigError: empty data, batch of size 0, unknown method.
    """

    def __init__(self, model: nn.Module, data: Batch | Iterable[Batch], *, loss_fn: LossFn | None = None,
                 params: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                 method: str = "auto", compile: bool = False,  # noqa: A002
                 distributed: bool | None = None) -> None:
        if method not in HVP_METHODS:
            raise ConfigError(f"method must be one of {HVP_METHODS}, got {method!r}")
        if distributed and not wdist.is_distributed():
            raise ConfigError("distributed=True needs a process group of two or more processes "
                              "(workbench.distributed.init_from_env under torchrun)")
        self.distributed = distributed
        self.model = model
        self.batches = _as_batches(data)
        self.loss_fn: LossFn = loss_fn or F.cross_entropy
        self.names = select_params(model, params)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.compile = bool(compile)
        self.method = "fwd" if compile else method
        named = dict(model.named_parameters())
        self.shapes = [tuple(named[n].shape) for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.numel = sum(self.sizes)
        self.dtype = named[self.names[0]].dtype
        self.hvp_count = 0
        self.hvp_seconds = 0.0
        self._depth = 0
        self._mode_ctx: Any = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._params: dict[str, torch.Tensor] = {}
        self._const: dict[str, torch.Tensor] = {}
        self._data: list[Batch] = []
        self._weights: list[float] = []
        self._graph: tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        self._chosen: str | None = None if self.method == "auto" else self.method
        self._timing: dict[str, float] = {}
        self._compiled: Callable | None = None
        self._dist = False  # reduce over the ranks (decided on entry)
        self._total = 0  # samples over which the loss is averaged (all ranks')
        self._probe_weights: torch.Tensor | None = None

    # -- context management
    def __enter__(self) -> LossHessian:
        if self._depth == 0:
            self._mode_ctx = preserved_mode(self.model, train=False)
            self._mode_ctx.__enter__()
            dev = self.device
            sel = set(self.names)
            # detach() shares storage (no copy) on the same device; nobody writes to these tensors
            for n, p in self.model.named_parameters():
                (self._params if n in sel else self._const)[n] = p.detach().to(dev)
            for n, b in self.model.named_buffers():
                self._const[n] = b.detach().to(dev)
            self._data = [(x.to(dev), y.to(dev)) for x, y in self.batches]
            total = sum(x.shape[0] for x, _ in self._data)
            self._dist = wdist.is_distributed() if self.distributed is None else bool(self.distributed)
            if self._dist:  # weights over the union of every rank's samples
                total = int(round(wdist.all_reduce_values([total])[0]))
            self._weights = [x.shape[0] / total for x, _ in self._data]
            self._total = total
            if self._chosen is None and not self._dist:  # auto: reuse this process's earlier timing trial
                self._chosen = _CHOSEN_METHOD.get(self._trial_key())
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._mode_ctx.__exit__(None, None, None)
            self._reset_state()

    def _trial_key(self) -> tuple:
        """What the ``auto`` timing trial depends on: the model's layout, the data's shapes, the device."""
        cls = type(self.model)
        return (cls.__module__, cls.__qualname__, tuple(self.names), tuple(self.shapes), self.dtype,
                tuple((tuple(x.shape), x.dtype) for x, _ in self._data), str(self.device))

    def _require_entered(self) -> None:
        if self._depth == 0:
            raise ConfigError("use the LossHessian inside `with LossHessian(...) as H:`")

    # -- vectors
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector (on ``device``)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into a ``{name: tensor}`` dict of views."""
        return {n: c.view(s) for n, c, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def param_vector(self) -> torch.Tensor:
        """The selected parameters as one flat vector."""
        self._require_entered()
        return self.flatten([self._params[n] for n in self.names])

    def blocks(self) -> dict[str, slice]:
        """Slices of the flat vector per layer (module name), for per-layer traces."""
        out: dict[str, slice] = {}
        start = 0
        for n, size in zip(self.names, self.sizes):
            layer = n.rsplit(".", 1)[0] if "." in n else n
            s = out.get(layer)
            out[layer] = slice(s.start if s else start, start + size)
            start += size
        return out

    # -- losses
    def _loss_of(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, ({**self._const, **params},), (x,))
        return self.loss_fn(out, y)

    @torch.no_grad()
    def loss(self, params: Mapping[str, torch.Tensor] | None = None,
             accuracy: bool = False) -> float | tuple[float, float]:
        """Loss (and optionally accuracy) at the current or given parameters (a ``{name: tensor}`` dict)."""
        self._require_entered()
        p = {**self._params, **(params or {})}
        total = correct = 0.0
        for (x, y), w in zip(self._data, self._weights):
            out = functional_call(self.model, ({**self._const, **p},), (x,))
            total += w * float(self.loss_fn(out, y))
            if accuracy:
                correct += float((out.argmax(-1) == y).float().sum())
        if self._dist:
            total, correct = wdist.all_reduce_values([total, correct])
        if accuracy:
            return total, correct / self._total
        return total

    def perturbed_loss(self, delta: torch.Tensor) -> float:
        """Loss at ``params + delta`` (``delta`` a flat vector)."""
        d = self.unflatten(delta)
        return float(self.loss({n: self._params[n] + d[n] for n in self.names}))  # type: ignore[arg-type]

    def gradient(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Flat gradient of the loss w.r.t. the selected parameters (at ``params`` if given)."""
        self._require_entered()
        p = {**self._params, **(params or {})}
        g = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
        for (x, y), w in zip(self._data, self._weights):
            gd = grad(self._loss_of)(p, x, y)
            g += w * self.flatten([gd[n] for n in self.names])
        return self._reduce(g)

    # -- several processes
    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (the per-rank parts carry weights over the union); identity otherwise."""
        return wdist.all_reduce_(t, "sum") if self._dist else t

    def _check_same_vector(self, v: torch.Tensor) -> None:
        """Refuse to go on when the ranks multiply different vectors (one tiny all-reduce)."""
        if not self._dist:
            return
        flat = v.reshape(-1)
        if self._probe_weights is None or self._probe_weights.numel() != flat.numel():
            # a fixed, irregular weighting: different probes give different fingerprints
            self._probe_weights = torch.arange(flat.numel(), dtype=torch.float64, device=v.device).cos_()
        f = float(flat.double() @ self._probe_weights)
        hi, neg_lo = wdist.all_reduce_values([f, -f], "max")
        if hi + neg_lo > 1e-9 * (abs(hi) + 1.0):
            raise ConfigError("the ranks multiply different vectors: run the same analysis with the same seeded "
                              "generator (e.g. generator=torch.Generator().manual_seed(0)) on every rank")

    # -- Hessian-vector products
    def _fwd_product(self, params: dict[str, torch.Tensor], v: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> dict[str, torch.Tensor]:
        return jvp(lambda p: grad(self._loss_of)(p, x, y), (params,), (v,))[1]

    def _hvp_fwd(self, v: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] | None = None
        fn = self._fwd_product
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._fwd_product)
            fn = self._compiled
        for (x, y), w in zip(self._data, self._weights):
            hv = fn(self._params, v, x, y)
            part = [w * hv[n] for n in self.names]
            out = part if out is None else [a + b for a, b in zip(out, part)]
        return out  # type: ignore[return-value]

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        leaves = {n: self._params[n].detach().requires_grad_(True) for n in self.names}
        with torch.enable_grad():
            loss = self._loss_of(leaves, x, y)
            g = torch.autograd.grad(loss, [leaves[n] for n in self.names], create_graph=True)
        return leaves, g

    def _hvp_dbl(self, v: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        vs = [v[n] for n in self.names]
        if len(self._data) == 1:  # one batch: build the gradient graph once, reuse it (freed on exit)
            if self._graph is None:
                clock = time.process_time if self.device.type == "cpu" else time.perf_counter
                t0 = clock()
                self._graph = self._build_graph(*self._data[0])
                self._timing["dbl_build"] = clock() - t0
            leaves, g = self._graph
            hv = torch.autograd.grad(g, [leaves[n] for n in self.names], grad_outputs=vs, retain_graph=True)
            w = self._weights[0]  # 1 unless other ranks hold samples too
            return list(hv) if w == 1.0 else [w * h for h in hv]
        out: list[torch.Tensor] | None = None
        for (x, y), w in zip(self._data, self._weights):
            leaves, g = self._build_graph(x, y)
            hv = torch.autograd.grad(g, [leaves[n] for n in self.names], grad_outputs=vs)
            part = [w * h for h in hv]
            out = part if out is None else [a + b for a, b in zip(out, part)]
        return out  # type: ignore[return-value]

    def _hvp_with(self, method: str, v: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with unfused_attention(self.model):
            return self._hvp_fwd(v) if method == "fwd" else self._hvp_dbl(v)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a flat vector ``v`` (length :attr:`numel`); returns a new flat vector."""
        self._require_entered()
        if v.shape != (self.numel,):
            raise ConfigError(f"vector has shape {tuple(v.shape)}, expected ({self.numel},)")
        vd = self.unflatten(v.to(self.device, self.dtype))
        t0 = time.perf_counter()
        c0 = time.process_time()  # CPU time of this process: less disturbed by other jobs than wall time
        if self._chosen is None:  # auto: try fwd first, then dbl, keep the faster
            method = "fwd" if "fwd" not in self._timing else "dbl"
            try:
                hv = self._hvp_with(method, vd)
            except RuntimeError as e:  # an op without forward-AD or double-backward support
                other = "dbl" if method == "fwd" else "fwd"
                log.warning("HVP by %s failed (%s); using %s", method, e, other)
                self._chosen = other
                hv = self._hvp_with(other, vd)
            else:
                clock = time.process_time() - c0 if self.device.type == "cpu" else time.perf_counter() - t0
                dt = clock - self._timing.get("dbl_build", 0.0)
                self._timing[method] = dt
                if method == "dbl":
                    if self._dist:  # every rank must choose alike: compare the ranks' total times
                        self._timing["fwd"], self._timing["dbl"] = wdist.all_reduce_values(
                            [self._timing["fwd"], self._timing["dbl"]])
                    self._chosen = "fwd" if self._timing["fwd"] <= self._timing["dbl"] else "dbl"
                    if not self._dist:
                        _CHOSEN_METHOD[self._trial_key()] = self._chosen
                    if self._chosen == "fwd":
                        self._graph = None  # free the graph we will not use
                    log.debug("HVP timings %s -> using %s", self._timing, self._chosen)
        else:
            try:
                hv = self._hvp_with(self._chosen, vd)
            except RuntimeError as e:
                raise ModelError(f"Hessian-vector product by {self._chosen!r} failed: {e}") from e
        out = self.flatten(hv).detach()
        if self._dist:
            self._check_same_vector(v)
            self._reduce(out)
        self.hvp_count += 1
        self.hvp_seconds += time.perf_counter() - t0
        return out

    def hvp_many(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V[i]`` for the rows of ``V`` (shape (m, numel)) in one vectorized call.

        Uses ``torch.func.vmap`` over forward-over-reverse products. Worth it for small models (the
        per-call overhead dominates; the exact-Hessian tests use it); on CPU for ViT/ResNet-sized
        models a loop over :meth:`hvp` was faster (measured), so the estimators default to blocks of 1.
        """
        self._require_entered()
        if V.dim() != 2 or V.shape[1] != self.numel:
            raise ConfigError(f"vectors have shape {tuple(V.shape)}, expected (m, {self.numel})")
        if V.shape[0] == 1:
            return self.hvp(V[0])[None]
        t0 = time.perf_counter()
        Vd = {n: c.view(V.shape[0], *s) for n, c, s in
              zip(self.names, V.to(self.device, self.dtype).split(self.sizes, dim=1), self.shapes)}
        out = None
        try:
            with unfused_attention(self.model):
                for (x, y), w in zip(self._data, self._weights):
                    def one(v: dict[str, torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y) -> dict:
                        return jvp(lambda p: grad(self._loss_of)(p, x, y), (self._params,), (v,))[1]
                    hv = torch.func.vmap(one)(Vd)
                    part = w * torch.cat([hv[n].reshape(V.shape[0], -1) for n in self.names], dim=1)
                    out = part if out is None else out + part
        except RuntimeError as e:  # e.g. a loss whose Hessian is constant: vmap meets immutable zero tangents
            log.debug("vectorized HVP failed (%s); looping over the vectors", e)
            return torch.stack([self.hvp(v) for v in V])
        out = out.detach()  # type: ignore[union-attr]
        if self._dist:
            self._check_same_vector(V)
            self._reduce(out)
        self.hvp_count += V.shape[0]
        self.hvp_seconds += time.perf_counter() - t0
        return out

    @property
    def method_used(self) -> str:
        """The HVP method in use (``auto`` until it has decided)."""
        return self._chosen or "auto"


@contextmanager
def _hessian(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None,
             opts: dict[str, Any]) -> Iterator[LossHessian]:
    if isinstance(target, LossHessian):
        with target as H:
            yield H
        return
    if not isinstance(target, nn.Module):
        raise ConfigError(f"expected a LossHessian or an nn.Module, got {type(target).__name__}")
    if data is None:
        raise ConfigError("pass data=(x, y) (or a list of batches) together with a model")
    with LossHessian(target, data, **{k: v for k, v in opts.items() if v is not None}) as H:
        yield H


def _rademacher(n: int, generator: torch.Generator | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # drawn on the generator's device (CPU by default) so results do not depend on the compute device
    gdev = generator.device if generator is not None else torch.device("cpu")
    return (torch.randint(0, 2, (n,), generator=generator, device=gdev).to(dtype) * 2 - 1).to(device)


def _randn(n: int, generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(n, generator=generator, device=gdev, dtype=dtype).to(device)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-able) dict."""
        return asdict(self)


@dataclass(frozen=True)
class EigenResult(_Result):
    """Top-k Hessian eigenvalues (largest first)."""

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]  # ||H u - lambda u|| per eigenpair (Lanczos: Ritz residual bound)
    iterations: int
    hvps: int
    converged: bool
    tol: float
    algorithm: str
    method: str
    seconds: float
    eigenvectors: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "eigenvectors"}
        return d


@dataclass(frozen=True)
class TraceResult(_Result):
    """Trace estimate: the exactly known deflated part plus the Hutchinson mean of the rest, with its standard error."""

    estimate: float
    stderr: float
    probes: int
    converged: bool
    tol: float
    method: str
    seconds: float
    samples: tuple[float, ...] = field(repr=False)  # of the estimated (non-deflated) part
    per_layer: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    deflated: int = 0  # Lanczos steps whose subspace was taken exactly
    deflated_part: float = 0.0  # the exact part of the estimate (sum of the Lanczos coefficients)
    hvps: int = 0  # Hessian-vector products in all (deflation + probes)

    @property
    def rel_stderr(self) -> float:
        return self.stderr / abs(self.estimate) if self.estimate else math.inf


@dataclass(frozen=True)
class DensityResult(_Result):
    """Spectral density by stochastic Lanczos quadrature (Gaussian-broadened)."""

    grid: tuple[float, ...]
    density: tuple[float, ...]
    nodes: tuple[tuple[float, ...], ...]  # Ritz values per run
    weights: tuple[tuple[float, ...], ...]  # quadrature weights per run (sum to 1)
    runs: int
    lanczos_steps: int
    sigma: float
    hvps: int
    seconds: float


@dataclass(frozen=True)
class QuantPrediction(_Result):
    """Second-order prediction of the weight-quantization loss increase vs what PTQ does.

    ``predicted = 1/2 sum_i sigma_i^2 H_ii`` with sigma the rounding-noise std (step/sqrt(12)) of
    per-channel symmetric round-to-nearest at ``w_bits``; ``measured_rtn`` is the actual loss increase
    of that quantizer (on a functional copy); ``measured_noise`` the mean increase under uniform noise
    of the same variance (what the noise model assumes), with its standard error.
    """

    w_bits: int
    sigma_trace: float
    sigma_trace_stderr: float
    predicted: float
    predicted_stderr: float
    measured_rtn: float
    measured_noise: float
    measured_noise_stderr: float
    clean_loss: float
    quant_loss: float
    clean_acc: float
    quant_acc: float
    first_order: float  # g . (Q(w) - w): the linear term the second-order prediction ignores
    probes: int
    converged: bool
    params: int
    seconds: float


@dataclass(frozen=True)
class SharpnessResult(_Result):
    """Loss increase under a weight perturbation: worst case in an eps-ball or mean under noise."""

    kind: str  # "ascent" | "gaussian"
    radius: float  # eps (ascent) or sigma (gaussian)
    increase: float
    stderr: float  # 0 for ascent
    base_loss: float
    steps: int  # ascent steps or noise samples
    relative: bool
    seconds: float


# ----------------------------------------------------------------------------- eigenvalues


def top_eigenvalues(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                    k: int = 1, tol: float = 1e-3, max_iter: int = 100, algorithm: str = "lanczos",
                    generator: torch.Generator | None = None, return_vectors: bool = False,
                    loss_fn: LossFn | None = None, params: str | Sequence[str] | None = None,
                    device: str | torch.device | None = None, method: str | None = None) -> EigenResult:
    """Top-k (largest algebraic) Hessian eigenvalues.

    Args:
        target: a :class:`LossHessian`, or a model (then ``data`` and the Hessian options apply).
        k: how many eigenvalues.
        tol: relative tolerance: Lanczos stops when every Ritz residual bound ``|beta_j s_jk|`` is
            below ``tol * |theta_k|``; power iteration when ``|lambda_t - lambda_{t-1}| < tol |lambda_t|``.
        max_iter: Lanczos steps in all, or power iterations per eigenvalue.
        algorithm: ``lanczos`` (default; full reorthogonalization, far fewer products than power
            iteration for the same accuracy) or ``power`` (power iteration with deflation, PyHessian's
            algorithm, which finds the largest-*magnitude* eigenvalues).
    Raises:
        ConfigError: k < 1 or k larger than the number of parameters; unknown algorithm.
    """
    if algorithm not in ("lanczos", "power"):
        raise ConfigError(f"algorithm must be 'lanczos' or 'power', got {algorithm!r}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device, "method": method}
    with _hessian(target, data, opts) as H:
        if not 1 <= k <= H.numel:
            raise ConfigError(f"k={k} must be between 1 and the number of parameters ({H.numel})")
        t0, h0 = time.perf_counter(), H.hvp_count
        if algorithm == "power":
            vals, res, vecs, iters, conv = _power(H, k, tol, max_iter, generator)
        else:
            vals, res, vecs, iters, conv = _lanczos_top(H, k, tol, max_iter, generator)
        return EigenResult(tuple(vals), tuple(res), iters, H.hvp_count - h0, conv, tol, algorithm,
                           H.method_used, time.perf_counter() - t0,
                           tuple(v.cpu() for v in vecs) if return_vectors else None)


def _power(H: LossHessian, k: int, tol: float, max_iter: int, gen: torch.Generator | None):
    vals, res, vecs, iters, conv_all = [], [], [], 0, True
    for _ in range(k):
        v = _randn(H.numel, gen, H.device, H.dtype)
        v /= v.norm()
        lam, conv, hv = None, False, v
        for _ in range(max_iter):
            for u in vecs:  # deflation: stay orthogonal to the eigenvectors found so far
                v -= (u @ v) * u
            v /= v.norm().clamp_min(1e-30)
            hv = H.hvp(v)
            iters += 1
            new = float(hv @ v)
            nrm = hv.norm()
            if lam is not None and abs(new - lam) < tol * (abs(lam) + 1e-12):
                lam, conv = new, True
                break
            lam = new
            if nrm == 0:
                conv = True
                break
            v = hv / nrm
        vals.append(lam)
        res.append(float((hv - lam * v).norm()))
        vecs.append(v)
        conv_all &= conv
    return vals, res, vecs, iters, conv_all


def _lanczos(H: LossHessian, v0: torch.Tensor, steps: int,
             check: Callable[[list[float], list[float], float], bool] | None = None,
             matvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
             on_product: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
    """Lanczos with full reorthogonalization, on ``H.hvp`` (or on ``matvec`` when given).

    ``on_product(q, A q)`` sees every product before it is orthogonalized.
    Returns ``(alphas, betas, b_last, Q)``: the tridiagonal coefficients (``len(betas) == m - 1``),
    the norm of the final residual (0 when the Krylov space is exhausted) and the basis ``Q`` (m, n).
    """
    n = H.numel
    steps = min(steps, n)
    mv = matvec or H.hvp
    # the basis grows as needed: allocating max_iter rows up front costs seconds on ResNet-18 (4.5 GB at 100)
    Q = torch.empty(min(steps, 16), n, device=H.device, dtype=H.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    q = v0 / v0.norm()
    b = 0.0
    for j in range(steps):
        if j == Q.shape[0]:
            grown = torch.empty(min(2 * j, steps), n, device=H.device, dtype=H.dtype)
            grown[:j] = Q
            Q = grown
        Q[j] = q
        w = mv(q)
        if on_product is not None:
            on_product(q, w)
        a = float(w @ q)
        alphas.append(a)
        # the three-term recurrence removes the large components; one full reorthogonalization pass then
        # keeps the Ritz values free of ghost copies (a second pass costs ~20% of a product on ResNet-18)
        w -= a * q
        if j > 0:
            w -= b * Q[j - 1]
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(w.norm())
        if b < 1e-10 * max(1.0, abs(a)) or j + 1 == n:
            b = 0.0  # invariant subspace / whole space: the Ritz values are exact
            break
        if j + 1 == steps or (check is not None and check(alphas, betas, b)):
            break
        betas.append(b)
        q = w / b
    return alphas, betas, b, Q[: len(alphas)]


def _tridiag(alphas: Sequence[float], betas: Sequence[float]) -> torch.Tensor:
    a = torch.as_tensor(alphas, dtype=torch.float64)
    b = torch.as_tensor(betas, dtype=torch.float64)[: len(a) - 1]
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def ritz_values(matrix: torch.Tensor, steps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` Lanczos steps on an explicit symmetric matrix from a random start: the Ritz
    values (the eigenvalues of the tridiagonal ``T``), largest first. The same Lanczos the
    Hessian estimators run, on a matrix small enough to check against ``torch.linalg.eigvalsh``:
    the extreme eigenvalues converge first, in far fewer steps than the dimension.

    Raises:
        ConfigError: ``matrix`` is not square and symmetric, or ``steps`` < 1.
    """
    from types import SimpleNamespace

    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or not torch.allclose(matrix, matrix.T):
        raise ConfigError(f"ritz_values needs a square symmetric matrix, got shape {tuple(matrix.shape)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    n = matrix.shape[0]
    target = SimpleNamespace(numel=n, device=matrix.device, dtype=matrix.dtype, hvp=lambda v: matrix @ v)
    alphas, betas, _, _ = _lanczos(target, _randn(n, generator, matrix.device, matrix.dtype), steps)
    return torch.linalg.eigvalsh(_tridiag(alphas, betas)).flip(0)


def _ritz_top(alphas: Sequence[float], betas: Sequence[float], b_last: float, k: int):
    """Top-k Ritz values (largest first), their residual bounds ``|b_last * s_m,i|`` and vectors of T."""
    theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
    m = len(alphas)
    top = torch.arange(m - 1, max(m - 1 - k, -1), -1)
    return theta[top], (b_last * S[-1, top]).abs(), S[:, top]


def _lanczos_top(H: LossHessian, k: int, tol: float, max_iter: int, gen: torch.Generator | None):
    def check(alphas: list[float], betas: list[float], b_next: float) -> bool:
        if len(alphas) < k:
            return False
        theta, bounds, _ = _ritz_top(alphas, betas, b_next, k)
        return bool((bounds <= tol * theta.abs().clamp_min(1e-12)).all())

    alphas, betas, b_last, Q = _lanczos(H, _randn(H.numel, gen, H.device, H.dtype), max(max_iter, k), check)
    theta, bounds, S = _ritz_top(alphas, betas, b_last, k)
    if len(theta) < k:
        raise ModelError(f"the Krylov space has dimension {len(theta)} < k={k}: the Hessian restricted to "
                         "the start vector's Krylov space is too small (e.g. a zero Hessian)")
    conv = bool((bounds <= tol * theta.abs().clamp_min(1e-12)).all())
    vecs = [S[:, i].to(Q.dtype).to(Q.device) @ Q for i in range(k)]
    return theta.tolist(), bounds.tolist(), vecs, len(alphas), conv


# ----------------------------------------------------------------------------- trace


def hutchinson_trace(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                     tol: float = 0.05, min_probes: int = 10, max_probes: int = 100, deflate: int = 20,
                     per_layer: bool = False, scale: torch.Tensor | None = None, block: int = 1,
                     generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                     params: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                     method: str | None = None, progress: bool = False) -> TraceResult:
    """Estimate ``tr(H)`` (or ``sum_i s_i^2 H_ii`` with ``scale=s``) from Rademacher probes, with its standard error.

    Deflation (``deflate`` > 0, the default): the variance of plain Hutchinson comes from the few
    large outlying eigenvalues of a network Hessian. ``deflate`` Lanczos steps first build an orthonormal
    basis ``Q`` that captures them; with ``P = Q Q^T`` the exact identity
    ``tr(A) = tr(Q^T A Q) + tr(A (I - P))`` splits the trace into a part known exactly (the sum of the
    Lanczos coefficients ``q_j^T A q_j``) and a remainder estimated by ``z^T A (I - P) z`` over
    Rademacher probes ``z``, whose standard error is ``std(samples, ddof=1) / sqrt(probes)`` (given
    ``Q``, which does not depend on the probes). Measured on a trained ``vit-micro`` (batch 128): the
    per-probe standard deviation falls from ~1000 to ~53 for the trace and 35-fold for the sigma-weighted
    trace, so the same standard error needs hundreds of times fewer products. ``deflate=0`` is plain
    Hutchinson (PyHessian's ``trace``). When the Krylov space covers every direction (tiny models), the
    trace is exact and the standard error 0.

    Stops after ``min_probes`` once ``stderr / |estimate| < tol``, or at ``max_probes``. With
    ``per_layer`` each layer's diagonal-block trace is estimated by the same split, from the same
    products (the layers' estimates add up to the total).

    Args:
        deflate: Lanczos steps before the probes (their products count in ``hvps``, not in ``probes``).
        scale: optional flat vector ``s``: the estimate is of ``tr(S H S)``, ``S = diag(s)``.
        block: probes per vectorized call (:meth:`LossHessian.hvp_many`); >1 only pays off for small models.
    Raises:
        ConfigError: ``min_probes`` < 2 or > ``max_probes``; ``deflate`` < 0; ``scale`` of the wrong shape.
    """
    if not 2 <= min_probes <= max_probes:
        raise ConfigError(f"need 2 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
    if deflate < 0:
        raise ConfigError(f"deflate must be >= 0 (Lanczos steps; 0 = plain Hutchinson), got {deflate}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device, "method": method}
    with _hessian(target, data, opts) as H:
        t0, h0 = time.perf_counter(), H.hvp_count
        if scale is not None and scale.shape != (H.numel,):
            raise ConfigError(f"scale has shape {tuple(scale.shape)}, expected ({H.numel},)")
        s = scale.to(H.device, H.dtype) if scale is not None else None

        def matvec(v: torch.Tensor) -> torch.Tensor:  # A = S H S
            return H.hvp(v) if s is None else s * H.hvp(s * v)

        def matvec_many(V: torch.Tensor) -> torch.Tensor:  # hvp_many takes a single row through hvp
            return H.hvp_many(V) if s is None else s * H.hvp_many(s * V)

        blocks = H.blocks() if per_layer else {}
        bar = _progress(deflate + max_probes, "trace", progress)
        exact_part, exact_layers = 0.0, {b: 0.0 for b in blocks}
        Q = None
        if deflate:
            def on_product(q: torch.Tensor, aq: torch.Tensor) -> None:
                prod = q * aq  # diag(A q q^T): its block sums are tr_b(A q q^T)
                for b, sl in blocks.items():
                    exact_layers[b] += float(prod[sl].sum())
                bar.update(1)

            alphas, _, _, Q = _lanczos(H, _randn(H.numel, generator, H.device, H.dtype), deflate,
                                       matvec=matvec, on_product=on_product)
            exact_part = float(sum(alphas))
        samples: list[float] = []
        layer_samples: dict[str, list[float]] = {b: [] for b in blocks}
        converged = False
        while len(samples) < max_probes:
            m = min(max(1, block), max_probes - len(samples))
            Z = torch.stack([_rademacher(H.numel, generator, H.device, H.dtype) for _ in range(m)])
            Zr = Z if Q is None else Z - (Z @ Q.T) @ Q  # (I - P) z
            prods = Z * matvec_many(Zr)
            samples.extend(prods.sum(1).tolist())
            for b, sl in blocks.items():
                layer_samples[b].extend(prods[:, sl].sum(1).tolist())
            bar.update(m)
            if len(samples) >= min_probes:
                est, se = _mean_se(samples)
                if se < tol * abs(est + exact_part):
                    converged = True
                    break
        bar.close()
        est, se = _mean_se(samples)
        layers = {b: {"estimate": exact_layers[b] + m_, "stderr": se_}
                  for b, (m_, se_) in ((b, _mean_se(v)) for b, v in layer_samples.items())} or None
        return TraceResult(exact_part + est, se, len(samples), converged, tol, H.method_used,
                           time.perf_counter() - t0, tuple(samples), layers,
                           deflated=0 if Q is None else Q.shape[0], deflated_part=exact_part,
                           hvps=H.hvp_count - h0)


def _mean_se(x: Sequence[float]) -> tuple[float, float]:
    n = len(x)
    mean = sum(x) / n
    if n < 2:
        return mean, math.inf
    var = sum((v - mean) ** 2 for v in x) / (n - 1)
    return mean, math.sqrt(var / n)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# ----------------------------------------------------------------------------- spectral density


def spectral_density(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                     runs: int = 1, steps: int = 50, grid_size: int = 500, sigma: float | None = None,
                     generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                     params: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                     method: str | None = None) -> DensityResult:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al.; PyHessian's ``density``).

    Each run starts Lanczos from a random unit vector; the Ritz values ``theta_k`` with weights
    ``tau_k = (first component of the k-th Ritz vector)^2`` form a quadrature of the spectral measure.
    The density on a grid is the runs' mean of ``sum_k tau_k N(t; theta_k, sigma^2)``.

    Args:
        runs: independent starting vectors (variance reduction).
        steps: Lanczos steps per run (capped at the parameter count).
        sigma: Gaussian broadening (default 1% of the spectral range).
    """
    if runs < 1 or steps < 1:
        raise ConfigError("runs and steps must be >= 1")
    opts = {"loss_fn": loss_fn, "params": params, "device": device, "method": method}
    with _hessian(target, data, opts) as H:
        t0, h0 = time.perf_counter(), H.hvp_count
        nodes, weights = [], []
        for _ in range(runs):
            alphas, betas, _, _ = _lanczos(H, _randn(H.numel, generator, H.device, H.dtype), steps)
            theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
            nodes.append(theta)
            weights.append(S[0] ** 2)
        lo = min(float(t.min()) for t in nodes)
        hi = max(float(t.max()) for t in nodes)
        pad = 0.01 * max(hi - lo, 1e-12)
        sig = sigma if sigma is not None else max(hi - lo, 1e-12) * 0.01
        grid = torch.linspace(lo - 5 * sig - pad, hi + 5 * sig + pad, grid_size, dtype=torch.float64)
        dens = torch.zeros_like(grid)
        for th, w in zip(nodes, weights):
            g = torch.exp(-((grid[:, None] - th[None]) ** 2) / (2 * sig**2)) / (sig * math.sqrt(2 * math.pi))
            dens += (g * w[None]).sum(1) / runs
        return DensityResult(tuple(grid.tolist()), tuple(dens.tolist()),
                             tuple(tuple(t.tolist()) for t in nodes), tuple(tuple(w.tolist()) for w in weights),
                             runs, len(nodes[0]), sig, H.hvp_count - h0, time.perf_counter() - t0)


def density_trace(result: DensityResult, numel: int) -> float:
    """Trace implied by an SLQ result: ``numel * mean_runs sum_k tau_k theta_k``."""
    vals = [sum(t * w for t, w in zip(th, ws)) for th, ws in zip(result.nodes, result.weights)]
    return numel * sum(vals) / len(vals)


# ----------------------------------------------------------------------------- quantization


def weight_sigma(model: nn.Module, names: Sequence[str], w_bits: int, per_channel: bool = True,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Flat vector of rounding-noise stds ``step/sqrt(12)`` (per output channel) for ``names``.

    Parameters that are not Linear/Conv weights (biases, norms, embeddings) stay in float under PTQ,
    so their sigma is 0.
    """
    quantized = set(quantized_weight_names(model))
    named = dict(model.named_parameters())
    parts = []
    for n in names:
        w = named[n].detach()
        if n in quantized:
            sd = quant.weight_qparams(w, w_bits, per_channel=per_channel).noise_std
            parts.append(sd.expand_as(w).reshape(-1))
        else:
            parts.append(torch.zeros(w.numel(), device=w.device))
    dev = torch.device(device) if device is not None else _model_device(model)
    return torch.cat([p.to(dev, named[names[0]].dtype) for p in parts])


def _quantized_params(H: LossHessian, w_bits: int, per_channel: bool) -> dict[str, torch.Tensor]:
    quantized = set(quantized_weight_names(H.model))
    out = {}
    for n in H.names:
        w = H._params[n]
        if n in quantized:
            out[n] = quant.fake_quantize(w, quant.weight_qparams(w, w_bits, per_channel=per_channel))
    return out


def weight_quant_prediction(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                            w_bits: int = 4, per_channel: bool = True, tol: float = 0.05,
                            min_probes: int = 10, max_probes: int = 100, deflate: int = 20, block: int = 1,
                            noise_samples: int = 8, generator: torch.Generator | None = None,
                            loss_fn: LossFn | None = None,
                            device: str | torch.device | None = None,
                            method: str | None = None) -> QuantPrediction:
    """Predict the loss increase of weight PTQ at ``w_bits`` from curvature, and measure it.

    ``sigma_trace = sum_i sigma_i^2 H_ii = tr(S H S)`` by (deflated, see :func:`hutchinson_trace`)
    Hutchinson with ``S = diag(sigma)`` over the quantized (Linear/Conv) weights only; ``predicted = sigma_trace / 2``. Measured: round-to-nearest per-channel
    symmetric quantization (``quant.fake_quantize``) applied to a functional copy of the weights, and
    the mean over ``noise_samples`` draws of uniform noise with the same per-channel variance.

    Activations stay in float here; see :func:`activation_quant_prediction` for the input Hessian.
    """
    w_bits = quant.check_bits(w_bits, "w_bits")
    if isinstance(target, LossHessian):  # same data and options, but over the quantized weights only
        model, data = target.model, target.batches
        loss_fn, device, method = target.loss_fn, target.device, method or target.method
        distributed = target.distributed
    else:
        model, distributed = target, None
    names = quantized_weight_names(model)
    if not names:
        raise ModelError("the model has no Linear/Conv weights requiring grad: nothing is weight-quantized")
    if data is None:
        raise ConfigError("pass data=(x, y) (or a list of batches) together with a model")
    target = LossHessian(model, data, loss_fn=loss_fn, params=names, device=device, method=method or "auto",
                         distributed=distributed)
    with target as H:
        t0 = time.perf_counter()
        sig = weight_sigma(H.model, H.names, w_bits, per_channel, H.device)
        tr = hutchinson_trace(H, tol=tol, min_probes=min_probes, max_probes=max_probes, deflate=deflate,
                              scale=sig, block=block, generator=generator)
        clean_loss, clean_acc = H.loss(accuracy=True)  # type: ignore[misc]
        qparams = _quantized_params(H, w_bits, per_channel)
        quant_loss, quant_acc = H.loss(qparams, accuracy=True)  # type: ignore[misc]
        delta = H.flatten([qparams[n] - H._params[n] for n in H.names])
        first = float(H.gradient() @ delta)
        # uniform noise on [-step/2, step/2] has std step/sqrt(12) = sigma: half-width sqrt(3) sigma
        incs = []
        for _ in range(noise_samples):
            u = torch.rand(H.numel, generator=generator,
                           device=generator.device if generator is not None else "cpu").to(H.device)
            incs.append(H.perturbed_loss((2 * u - 1) * math.sqrt(3.0) * sig) - clean_loss)
        mn, mse = _mean_se(incs) if incs else (math.nan, math.nan)
        return QuantPrediction(w_bits, tr.estimate, tr.stderr, tr.estimate / 2, tr.stderr / 2,
                               quant_loss - clean_loss, mn, mse, clean_loss, quant_loss, clean_acc, quant_acc,
                               first, tr.probes, tr.converged, H.numel, time.perf_counter() - t0)


@dataclass(frozen=True)
class ActQuantPrediction(_Result):
    """Second-order prediction of the activation-quantization loss increase vs measured.

    ``sigma_trace = sum sigma_l^2 H_xx`` over every element of every quantized layer input (Linear/Conv
    inputs, per-tensor asymmetric min/max ranges observed on the same data), by Hutchinson on the
    Hessian w.r.t. zero perturbations added to those inputs.
    """

    a_bits: int
    sigma_trace: float
    sigma_trace_stderr: float
    predicted: float
    predicted_stderr: float
    measured_rtn: float
    measured_noise: float
    measured_noise_stderr: float
    clean_loss: float
    quant_loss: float
    clean_acc: float
    quant_acc: float
    probes: int
    converged: bool
    layers: int
    seconds: float
    #: with ``per_layer``: each Linear/Conv input's own ``{"estimate", "stderr"}`` of
    #: ``sum sigma_l^2 H_xx`` over that input alone (its diagonal block; the same probes)
    per_layer: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    #: with ``per_layer``: each input's elements per image (what an activation width is paid on)
    elements: dict[str, int] | None = field(default=None, repr=False)


class _InputSites:
    """Forward pre-hooks on Linear/Conv layers that add a perturbation to, or quantize, their input."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
        self.mode: str | None = None  # None | "record" | "add" | "quant"
        self.delta: dict[str, torch.Tensor] = {}
        self.qparams: dict[str, quant.QParams] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self.mode == "record":
                self.shapes[name] = tuple(x.shape)
                self.lo[name] = min(self.lo.get(name, math.inf), float(x.detach().min()))
                self.hi[name] = max(self.hi.get(name, -math.inf), float(x.detach().max()))
            elif self.mode == "add":
                return (x + self.delta[name],) + args[1:]
            elif self.mode == "quant":
                return (quant.fake_quantize(x, self.qparams[name]),) + args[1:]
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def activation_quant_prediction(model: nn.Module, data: Batch | Iterable[Batch], *, a_bits: int = 8,
                                tol: float = 0.05, min_probes: int = 10, max_probes: int = 100,
                                block: int = 1, noise_samples: int = 8, generator: torch.Generator | None = None,
                                loss_fn: LossFn | None = None, per_layer: bool = False, measure: bool = True,
                                device: str | torch.device | None = None) -> ActQuantPrediction:
    """Predict the loss increase of quantizing Linear/Conv inputs at ``a_bits`` from the input Hessian.

    Forward pre-hooks add a perturbation ``delta_l`` (zero at the expansion point) to each Linear/Conv
    input; Hutchinson probes ``sigma_l z`` on ``d^2 L / d delta^2`` (forward-over-reverse) give
    ``sum sigma_l^2 H_ii``. Ranges are per-tensor min/max over the given data, the quantizer is
    quant's asymmetric one (the PTQ default). Weights stay in float here. Not covered: the attention
    matmul inputs (q, k, softmax output) that PTQ may also quantize, since they are not module inputs.
    ``block`` probes go through one ``vmap``-ed call (pays off for small models). With ``per_layer``
    each input's diagonal block is estimated from the same probes (``z_l . (H z)_l``: the cross
    terms average out, as in :func:`hutchinson_trace`), which prices every layer's activation
    width separately (:func:`workbench.ptq.mixed.activation_sensitivities`). ``measure=False`` skips
    the measured side (clean, rounded and noisy losses: NaN), for a prediction alone or a loss
    that is not a classifier's.

    Raises:
        ModelError: the model has no Linear/Conv layer.
    """
    a_bits = quant.check_bits(a_bits, "a_bits")
    batches = _as_batches(data)
    lf = loss_fn or F.cross_entropy
    dev = torch.device(device) if device is not None else _model_device(model)
    t0 = time.perf_counter()
    with preserved_mode(model, train=False):
        sites = _InputSites(model)
        try:
            if not sites.names:
                raise ModelError("the model has no Linear/Conv layer: no activations are quantized")
            state = {n: t.detach().to(dev) for n, t in model.state_dict(keep_vars=True).items()}
            data_d = [(x.to(dev), y.to(dev)) for x, y in batches]
            total = sum(x.shape[0] for x, _ in data_d)
            weights = [x.shape[0] / total for x, _ in data_d]

            def run(x: torch.Tensor) -> torch.Tensor:
                return functional_call(model, (state,), (x,))

            def evaluate() -> tuple[float, float]:
                loss = correct = 0.0
                with torch.no_grad():
                    for (x, y), w in zip(data_d, weights):
                        out = run(x)
                        loss += w * float(lf(out, y))
                        correct += float((out.argmax(-1) == y).sum())
                return loss, correct / total

            shapes = []
            for x, _ in data_d:
                sites.mode, sites.shapes = "record", {}
                with torch.no_grad():
                    run(x)
                shapes.append(dict(sites.shapes))
            sites.mode = None
            sites.qparams = {n: quant.activation_qparams(sites.lo[n], sites.hi[n], a_bits) for n in sites.names}
            sig = {n: float(sites.qparams[n].noise_std) for n in sites.names}

            def loss_at(delta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                sites.delta = delta
                return lf(run(x), y)

            samples: list[float] = []
            site_samples: dict[str, list[float]] = {n: [] for n in sites.names}
            converged = False
            sites.mode = "add"
            with unfused_attention(model):
                while len(samples) < max_probes:
                    m = min(max(1, block), max_probes - len(samples))
                    sample = torch.zeros(m, dtype=torch.float64)
                    by_site = {n: torch.zeros(m, dtype=torch.float64) for n in sites.names}
                    for (x, y), w, shp in zip(data_d, weights, shapes):
                        zero = {n: torch.zeros(s, device=dev) for n, s in shp.items()}
                        z = {n: torch.stack([_rademacher(math.prod(s), generator, dev).view(s) for _ in range(m)])
                             * sig[n] for n, s in shp.items()}

                        def hvp(v: dict[str, torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y,
                                zero: dict[str, torch.Tensor] = zero) -> dict[str, torch.Tensor]:
                            return jvp(lambda d: grad(loss_at)(d, x, y), (zero,), (v,))[1]

                        hz = torch.func.vmap(hvp)(z) if m > 1 else {n: t[None] for n, t in hvp(
                            {n: t[0] for n, t in z.items()}).items()}
                        for n in shp:
                            part = w * (z[n] * hz[n]).reshape(m, -1).sum(1).double().cpu()
                            sample += part
                            by_site[n] += part
                    samples.extend(sample.tolist())
                    for n, t in by_site.items():
                        site_samples[n].extend(t.tolist())
                    if len(samples) >= min_probes:
                        est, se = _mean_se(samples)
                        if se < tol * abs(est):
                            converged = True
                            break
            sites.mode = None
            clean_loss = clean_acc = quant_loss = quant_acc = math.nan
            if measure:
                clean_loss, clean_acc = evaluate()
                sites.mode = "quant"
                quant_loss, quant_acc = evaluate()
            incs = []
            sites.mode = "add"
            for _ in range(noise_samples if measure else 0):
                loss = 0.0
                with torch.no_grad():
                    for (x, y), w, shp in zip(data_d, weights, shapes):
                        sites.delta = {n: (2 * torch.rand(math.prod(s), generator=generator).view(s) - 1).to(dev)
                                       * math.sqrt(3.0) * sig[n] for n, s in shp.items()}
                        loss += w * float(lf(run(x), y))
                incs.append(loss - clean_loss)
        finally:
            sites.mode = None
            sites.delta = {}
            sites.remove()
    est, se = _mean_se(samples)
    mn, mse = _mean_se(incs) if incs else (math.nan, math.nan)
    layers = elements = None
    if per_layer:
        layers = {n: dict(zip(("estimate", "stderr"), _mean_se(v))) for n, v in site_samples.items()}
        elements = {n: math.prod(shapes[0][n][1:]) for n in sites.names if n in shapes[0]}
    return ActQuantPrediction(a_bits, est, se, est / 2, se / 2, quant_loss - clean_loss, mn, mse, clean_loss,
                              quant_loss, clean_acc, quant_acc, len(samples), converged, len(sites.names),
                              time.perf_counter() - t0, layers, elements)


# ----------------------------------------------------------------------------- sharpness


def sharpness_ascent(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                     eps: float = 0.05, steps: int = 5, relative: bool = False,
                     loss_fn: LossFn | None = None, params: str | Sequence[str] | None = None,
                     device: str | torch.device | None = None) -> SharpnessResult:
    """Largest loss increase found in the ball ``||delta|| <= eps`` by projected gradient ascent.

    The first step is SAM's (``eps * g / ||g||``); later steps move ``eps/2`` along the normalized
    gradient and project back onto the ball. With ``relative`` the ball is ASAM's: ``||delta / |w| || <= eps``
    (the perturbation is scaled elementwise by ``|w|``). A lower bound on the true maximum.
    """
    if eps <= 0 or steps < 1:
        raise ConfigError(f"need eps > 0 and steps >= 1, got {eps}, {steps}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device}
    with _hessian(target, data, opts) as H:
        t0 = time.perf_counter()
        base = float(H.loss())
        w = H.param_vector()
        t = w.abs() if relative else torch.ones_like(w)  # delta = t * u with ||u|| <= eps
        u = torch.zeros_like(w)
        best = 0.0
        for i in range(steps):
            d = H.unflatten(t * u)
            p = {n: H._params[n] + d[n] for n in H.names}
            gu = H.gradient(p) * t  # chain rule: d loss / d u
            gn = gu.norm()
            if gn == 0:
                break
            u = u + (eps if i == 0 else eps / 2) * gu / gn
            un = u.norm()
            if un > eps:
                u = u * (eps / un)
            best = max(best, H.perturbed_loss(t * u) - base)
        return SharpnessResult("ascent", eps, best, 0.0, base, steps, relative, time.perf_counter() - t0)


def sharpness_gaussian(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                       sigma: float | torch.Tensor = 0.01, samples: int = 10, relative: bool = False,
                       generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                       params: str | Sequence[str] | None = None,
                       device: str | torch.device | None = None) -> SharpnessResult:
    """Mean loss increase under Gaussian weight noise ``N(0, sigma^2)`` (elementwise ``sigma |w|`` if relative).

    ``sigma`` may be a flat per-parameter vector (e.g. :func:`weight_sigma`). By the expected value
    identity the result is about ``1/2 sum sigma_i^2 H_ii`` for small sigma.
    """
    if samples < 2:
        raise ConfigError(f"samples must be >= 2 (for a standard error), got {samples}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device}
    with _hessian(target, data, opts) as H:
        t0 = time.perf_counter()
        base = float(H.loss())
        w = H.param_vector()
        s = sigma.to(H.device) if isinstance(sigma, torch.Tensor) else torch.full_like(w, float(sigma))
        if relative:
            s = s * w.abs()
        incs = [H.perturbed_loss(_randn(H.numel, generator, H.device, H.dtype) * s) - base for _ in range(samples)]
        mean, se = _mean_se(incs)
        radius = float(sigma) if not isinstance(sigma, torch.Tensor) else float(sigma.pow(2).mean().sqrt())
        return SharpnessResult("gaussian", radius, mean, se, base, samples, relative, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- reports


def flatness_report(model: nn.Module, data: Batch | Iterable[Batch], *, w_bits: int | Sequence[int] = (4, 3),
                    a_bits: int | Sequence[int] | None = None,
                    trace: bool = True, eig: int = 1, density: bool = False, sharpness: bool = True,
                    per_layer: bool = False, trace_tol: float = 0.05, max_probes: int = 30, trace_deflate: int = 20,
                    eig_tol: float = 1e-3, eig_max_iter: int = 50, sharpness_eps: float = 0.05,
                    noise_sigma: float = 0.01, loss_fn: LossFn | None = None,
                    device: str | torch.device | None = None, seed: int = 0, compile: bool = False,  # noqa: A002
                    progress: bool = False) -> dict[str, Any]:
    """All flatness measures of one model on fixed data, as a plain JSON-able dict.

    Keys: ``loss``, ``accuracy``, ``params``, ``hvp_method``, ``top_eigenvalues`` (if ``eig``),
    ``trace`` (if ``trace``), ``density`` (if ``density``), ``sharpness`` (ascent and gaussian) and
    ``quant`` (one entry per ``w_bits``: sigma-weighted trace, predicted vs measured loss increase) and
    ``quant_act`` (one entry per ``a_bits``, if given: the same for Linear/Conv inputs).
    ``compile`` applies to the full-parameter Hessian (eigenvalues, trace, density); see :class:`LossHessian`.
    ``trace_deflate`` Lanczos steps are taken exactly before the probes of every trace (0: plain Hutchinson).
    """
    bits = [w_bits] if isinstance(w_bits, int) else list(w_bits)
    gen = torch.Generator().manual_seed(seed)
    probes = {"min_probes": min(10, max_probes), "max_probes": max_probes}
    deflate = {"deflate": trace_deflate}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with LossHessian(model, data, loss_fn=loss_fn, device=device, compile=compile) as H:
        loss, acc = H.loss(accuracy=True)  # type: ignore[misc]
        out.update(loss=loss, accuracy=acc, params=H.numel, batches=len(H.batches),
                   samples=sum(x.shape[0] for x, _ in H.batches))
        if eig:
            out["top_eigenvalues"] = top_eigenvalues(H, k=eig, tol=eig_tol, max_iter=eig_max_iter,
                                                     generator=gen).to_dict()
        if trace:
            out["trace"] = hutchinson_trace(H, tol=trace_tol, **probes, **deflate, per_layer=per_layer,
                                            generator=gen, progress=progress).to_dict()
            out["trace"].pop("samples", None)
        if density:
            d = spectral_density(H, generator=gen)
            out["density"] = d.to_dict() | {"trace": density_trace(d, H.numel)}
        if sharpness:
            out["sharpness"] = {
                "ascent": sharpness_ascent(H, eps=sharpness_eps).to_dict(),
                "gaussian": sharpness_gaussian(H, sigma=noise_sigma, generator=gen).to_dict(),
            }
        out["hvp_method"] = H.method_used
        H_data = H.batches
    out["quant"] = {f"W{b}": weight_quant_prediction(model, H_data, w_bits=b, tol=trace_tol, **probes, **deflate,
                                                     generator=gen, loss_fn=loss_fn, device=device).to_dict()
                    for b in bits}
    if a_bits is not None:
        abits = [a_bits] if isinstance(a_bits, int) else list(a_bits)
        out["quant_act"] = {f"A{b}": activation_quant_prediction(model, H_data, a_bits=b, tol=trace_tol, **probes,
                                                                 generator=gen,
                                                                 loss_fn=loss_fn, device=device).to_dict()
                            for b in abits}
    out["seconds"] = time.perf_counter() - t0
    return out


#: Flatness measures compared against the measured PTQ damage, as (column, getter on a report).
MEASURES: dict[str, Callable[[dict[str, Any], str], float]] = {
    "top_eigenvalue": lambda r, b: r.get("top_eigenvalues", {}).get("eigenvalues", [math.nan])[0],
    "trace": lambda r, b: r.get("trace", {}).get("estimate", math.nan),
    "sigma_trace": lambda r, b: r["quant"][b]["sigma_trace"],
    "predicted_increase": lambda r, b: r["quant"][b]["predicted"],
    "sharpness_ascent": lambda r, b: r.get("sharpness", {}).get("ascent", {}).get("increase", math.nan),
    "sharpness_gaussian": lambda r, b: r.get("sharpness", {}).get("gaussian", {}).get("increase", math.nan),
}


#: Fewest models a rank correlation is computed over (:data:`workbench.stats.MIN_RANK_POINTS`).
MIN_RANK_MODELS = MIN_RANK_POINTS


def damage_table(models: Mapping[str, nn.Module], data: Batch | Iterable[Batch], *,
                 w_bits: int | Sequence[int] = (4, 3), **report_kwargs: Any) -> dict[str, Any]:
    """Which flatness measure predicts PTQ damage? One report per model, a tidy table and rank correlations.

    Returns ``{"rows": [...], "spearman": {w_bits: {measure: rho_vs_loss_increase, ...}},
    "spearman_acc": {...}, "spearman_note": str, "reports": {name: report}}``. Each row: model,
    w_bits, every measure in :data:`MEASURES`, ``measured_increase`` (RTN loss increase) and
    ``acc_drop``. Below :data:`MIN_RANK_MODELS` models the correlations are left empty and
    ``spearman_note`` says why.
    """
    bits = [w_bits] if isinstance(w_bits, int) else list(w_bits)
    batches = _as_batches(data)
    reports = {name: flatness_report(m, batches, w_bits=bits, **report_kwargs) for name, m in models.items()}
    rows = []
    for name, r in reports.items():
        for b in bits:
            key = f"W{b}"
            q = r["quant"][key]
            row = {"model": name, "w_bits": b}
            row.update({m: float(f(r, key)) for m, f in MEASURES.items()})
            row.update(measured_increase=q["measured_rtn"], acc_drop=q["clean_acc"] - q["quant_acc"],
                       first_order=q["first_order"])
            rows.append(row)
    rho: dict[str, dict[str, float]] = {}
    rho_acc: dict[str, dict[str, float]] = {}
    if len(models) < MIN_RANK_MODELS:
        note = (f"{len(models)} model(s): no rank correlation is computed below {MIN_RANK_MODELS} models "
                "(over 2 models Spearman's rho is +-1 whatever the measures are)")
        return {"rows": rows, "spearman": rho, "spearman_acc": rho_acc, "spearman_note": note, "reports": reports}
    for b in bits:
        sub = [r for r in rows if r["w_bits"] == b]
        rho[f"W{b}"] = {m: spearman([r[m] for r in sub], [r["measured_increase"] for r in sub]) for m in MEASURES}
        rho_acc[f"W{b}"] = {m: spearman([r[m] for r in sub], [r["acc_drop"] for r in sub]) for m in MEASURES}
    return {"rows": rows, "spearman": rho, "spearman_acc": rho_acc,
            "spearman_note": f"over {len(models)} models", "reports": reports}

