"""The loss Hessian of a model on fixed data: Hessian-vector products (forward-over-reverse or
double backward), with the model's state and modes left untouched."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from .. import distributed as wdist
from ..errors import ConfigError, ModelError
from ..runinfo import model_device  # noqa: F401 - part of workbench.flatness' helpers

log = logging.getLogger(__name__)


Batch = tuple[torch.Tensor, torch.Tensor]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: Layer types whose weights PTQ quantizes (see :mod:`workbench.ptq`): the sigma-weighted trace uses these.
QUANT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


HVP_METHODS = ("auto", "fwd", "dbl")


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


def as_batches(data: Batch | Iterable[Batch]) -> list[Batch]:
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
        self.batches = as_batches(data)
        self.loss_fn: LossFn = loss_fn or F.cross_entropy
        self.names = select_params(model, params)
        self.device = torch.device(device) if device is not None else model_device(model)
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

    def param(self, name: str) -> torch.Tensor:
        """The expansion point of one selected parameter (a detached copy on the Hessian's device)."""
        return self._params[name]

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
        """Loss (and optionally top-1 accuracy in percent) at the current or given parameters (a
        ``{name: tensor}`` dict)."""
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
            return total, 100.0 * correct / self._total
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
def hessian_of(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None,
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
