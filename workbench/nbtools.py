"""Helpers the notebooks share: output folders, run records, small data, training, tables.

The notebooks in ``notebooks/`` import this module as ``nbt`` (d2l style: every helper's
origin is visible in the notebook text). Logic two notebooks need lives here, not in cells;
each docstring names the notebook that introduced the helper.

Vocabulary (the same names as notebook parameters, CLI flags and CSV columns): ``data``,
``model``, ``model_args``, ``methods``, ``w_bits``, ``a_bits``, ``bits``, ``noise_mult``,
``epochs``, ``seed``, ``device``, ``limit_train``, ``limit_test``, ``n_calib``, ``out_dir``,
``ckpt_dir``.

This module is notebook glue: it may import plotly and IPython (inside functions), but the
compute modules never import it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from . import data as wdata
from . import models as wmodels
from .errors import CheckpointError, ConfigError
from .runinfo import (
    model_device,
    prepare_run_dir,
    resolve_device,
    run_metadata,
    set_seed,
    write_csv,
    write_json,
)
from .tables import Table

log = logging.getLogger(__name__)

#: Environment variable naming the folder where notebooks run without ``out_dir`` write their
#: results (default: ``runs/notebooks`` in the repository). The test suite points it at a temp folder.
OUT_ROOT_ENV = "WORKBENCH_OUT_ROOT"

# ---------------------------------------------------------------------------------------
# output folders and run records


def default_out_root() -> Path:
    """``$WORKBENCH_OUT_ROOT`` if set, else ``runs/notebooks`` in the repository, or in the
    working directory (the notebook's folder) when the workbench is an installed wheel."""
    from .bundled import repo_root

    env = os.environ.get(OUT_ROOT_ENV)
    return Path(env) if env else (repo_root() or Path.cwd()) / "runs" / "notebooks"


def prepare_out_dir(out_dir: str | Path | None, notebook: str) -> Path:
    """The notebook's output folder: ``out_dir`` (must be new or empty), or a new time-stamped
    folder under :func:`default_out_root` (introduced in 00_quickstart).

    Raises:
        RunDirError: ``out_dir`` exists and holds files (nothing is overwritten silently).
    """
    if out_dir:
        return prepare_run_dir(out_dir)
    root = default_out_root()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{notebook}-{stamp}"
    n = 2
    while path.exists():  # two runs within one second: never share a folder
        path = root / f"{notebook}-{stamp}-{n}"
        n += 1
    return prepare_run_dir(path)


def record_run(out_dir: str | Path, params: dict[str, Any], notebook: str | None = None) -> dict[str, Any]:
    """Write ``run.json`` (parameters, versions, git commit, time) into ``out_dir`` and return it."""
    meta = run_metadata(dict(params))
    if notebook:
        meta["notebook"] = notebook
    write_json(Path(out_dir) / "run.json", meta)
    return meta


#: Names IPython keeps in a notebook's namespace that are not the notebook's parameters.
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
_PARAMETER_TYPES = (type(None), bool, int, float, str, list, tuple, dict)


def parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """The notebook's parameters, read from its namespace (``nbt.parameters(globals())`` right
    after the parameters and import cells), so ``run.json`` records every parameter, also one
    added later, without the notebook retyping them: every public name bound to a plain value
    (None, bool, number, string, list, tuple, dict). Modules, functions and classes imported so
    far, IPython's own names and ``_private`` names are left out."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, _PARAMETER_TYPES)}


def start(notebook: str, params: dict[str, Any]) -> Path:
    """Everything a notebook does first (introduced in 00_quickstart): prepare the output folder,
    record the run, seed every generator, set plotly's renderer. Returns the output folder."""
    out = prepare_out_dir(params.get("out_dir"), notebook)
    record_run(out, params, notebook)
    set_seed(int(params.get("seed", 0)))
    _setup_plotly()
    log.info("%s: results go to %s", notebook, out)
    return out


def _setup_plotly() -> None:
    try:
        import plotly.io as pio
    except ImportError:  # pragma: no cover - plotly is a dependency
        return
    # JupyterLab renders the mimetype; the exported HTML (workbench run) needs plotly.js embedded once.
    pio.renderers.default = "plotly_mimetype+notebook"


# ---------------------------------------------------------------------------------------
# data


def subset_bundle(bundle: wdata.DataBundle, limit_train: int | None = None, limit_test: int | None = None,
                  n_calib: int | None = None, seed: int = 0) -> wdata.DataBundle:
    """A seed-fixed random slice of a :class:`~workbench.data.DataBundle` (0/None = keep all).

    Calibration images are redrawn from the kept training images (never from test), so PTQ
    calibrates on data the model was trained on. Introduced in 00_quickstart.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def cut(split: wdata.ImageSplit, limit: int | None) -> wdata.ImageSplit:
        if not limit or limit >= len(split):
            return split
        if limit < 0:
            raise ConfigError(f"limits must be >= 0, got {limit}")
        return split.subset(torch.randperm(len(split), generator=gen)[: int(limit)].sort().values)

    train, test = cut(bundle.train, limit_train), cut(bundle.test, limit_test)
    k = len(bundle.calib) if n_calib is None else int(n_calib)
    calib = train.subset(torch.randperm(len(train), generator=gen)[: min(k, len(train))].sort().values)
    params = {**bundle.params, "limit_train": limit_train or 0, "limit_test": limit_test or 0,
              "n_calib": len(calib)}
    return wdata.DataBundle(bundle.info, train, test, calib, bundle.val, seed=bundle.seed, params=params)


def load_data(name: str, *, seed: int = 0, limit_train: int | None = None, limit_test: int | None = None,
              n_calib: int = 128, data_dir: str | Path | None = None, init: str | Path | None = None,
              image_size: int | None = None, val_size: int | float = 0) -> wdata.DataBundle:
    """:func:`workbench.data.load` then :func:`subset_bundle` (introduced in 00_quickstart).

    ``val_size`` training images are held out first as ``val`` (where a search judges its
    candidates); the limits and the calibration subset then come from the remaining ones.

    With ``init`` (the notebooks' starting point) the images are fed as that model wants them:
    a pretrained ``timm:NAME`` gets timm's input size, mean/std, resize and centre crop
    (``image_size`` replaces its size); a checkpoint trained with such a pipeline gets the same.
    """
    from .zoo import TIMM_PREFIX, init_data_info

    bundle = wdata.load(name, data_dir=data_dir, seed=seed, n_calib=max(int(n_calib), 1), val_size=val_size)
    if init and str(init).startswith(TIMM_PREFIX):
        bundle = wdata.with_input_pipeline(bundle, **wmodels.pretrained_input(str(init), image_size))
    elif init:
        bundle = wdata.match_recorded_pipeline(bundle, init_data_info(init))
    elif image_size:
        bundle = wdata.with_input_pipeline(bundle, image_size=int(image_size))
    return subset_bundle(bundle, limit_train, limit_test, n_calib, seed)


def calib_batches(bundle: wdata.DataBundle, n_calib: int | None = None, batch_size: int = 128,
                  device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration images as a list of normalized batches (introduced in 00_quickstart)."""
    return list(wdata.batches(bundle.calib, bundle.info, batch_size, limit=n_calib, device=device))


def eval_batches(bundle: wdata.DataBundle, split: str = "test", batch_size: int = 500,
                 device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A split as a list of normalized batches, materialized once for repeated evaluation."""
    return list(wdata.batches(bundle.split(split), bundle.info, batch_size, device=device))


def describe_data(bundle: wdata.DataBundle) -> dict[str, Any]:
    """Deterministic facts about a bundle: name, image shape, classes, split sizes."""
    x = bundle.train.images
    return {"data": bundle.info.name, "image_shape": list(x.shape[1:]), "classes": bundle.info.num_classes,
            "train": len(bundle.train), "test": len(bundle.test), "calib": len(bundle.calib)}


# ---------------------------------------------------------------------------------------
# models and training


def build_model(name: str, info: wdata.DataInfo, model_args: dict[str, Any] | None = None,
                seed: int = 0) -> nn.Module:
    """A freshly initialized model; the seed fixes the initialization (introduced in 00_quickstart)."""
    set_seed(int(seed))
    return wmodels.create(name, info, **(model_args or {}))


def method_spec(entry: str | dict[str, Any], *, w_bits: int | None = 4, a_bits: int | None = 4,
                noise_mult: float = 1.0) -> tuple[str, dict[str, Any]]:
    """``(label, MethodConfig dict)`` for a ``methods`` entry.

    An entry is a method name (``'dnq'``) or a dict of MethodConfig fields plus an optional
    ``label`` (``{'method': 'dnq', 'noise_mult': 2, 'label': 'dnq-k2'}``). The notebook's
    ``w_bits``/``a_bits``/``noise_mult`` fill what the entry leaves out.
    """
    d = {"method": entry} if isinstance(entry, str) else dict(entry)
    if "method" not in d:
        raise ConfigError(f"a methods entry needs a 'method' name, got {entry!r}")
    label = str(d.pop("label", d["method"]))
    cfg = {"w_bits": w_bits, "a_bits": a_bits, "noise_mult": noise_mult, **d}
    return label, cfg


@dataclass
class Trained:
    """A trained model and what training reported (introduced in 00_quickstart)."""

    label: str
    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    method_config: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    reused: bool = False
    arm: str | None = None  # the method label, when several seeds run per method (train_seeds)
    seed: int | None = None

    def summary(self) -> dict[str, Any]:
        """One tidy row: method, accuracy, loss, training time per step."""
        steps = [r.get("step_time", math.nan) for r in self.history]
        return {"method": self.label, "test_accuracy": self.metrics.get("test_accuracy"),
                "test_loss": self.metrics.get("test_loss"), "epochs": self.metrics.get("epochs"),
                "train_time_s": self.metrics.get("total_train_time"),
                "step_time_s": sum(steps) / len(steps) if steps else math.nan, "reused": self.reused}


def _reusable(ckpt_path: Path, model_name: str, model_args: dict[str, Any], bundle: wdata.DataBundle,
              method_cfg: dict[str, Any], init_sha: str | None = None, seed: int | None = None) -> bool:
    from .checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        log.warning("not reusing %s: %s", ckpt_path, e)
        return False
    spec, saved_method = ckpt.get("model_spec", {}), ckpt.get("method_config", {})
    same = (spec.get("name") == model_name and spec.get("overrides", {}) == dict(model_args)
            and ckpt.get("data_info", {}).get("name") == bundle.info.name
            and all(saved_method.get(k) == v for k, v in method_cfg.items() if k in saved_method)
            and _parent_id(ckpt.get("extra", {}).get("init")) == init_sha
            and ckpt.get("data_info", {}).get("image_size") == bundle.info.image_size
            and (seed is None or ckpt.get("train_config", {}).get("seed") == seed))
    if not same:
        log.warning("not reusing %s: it was trained with another model, dataset, method setting, parent or seed",
                    ckpt_path)
    return same


def _check_parent_fits(spec: dict[str, Any], bundle: wdata.DataBundle, init: str | Path,
                       spec_data: str | None = None) -> None:
    info = bundle.info
    if (spec["num_classes"], spec.get("in_chans"), spec.get("img_size")) != \
            (info.num_classes, info.channels, info.image_size):
        raise ConfigError(f"init={str(init)!r} takes {spec.get('in_chans')}-channel {spec.get('img_size')}px images "
                          f"in {spec['num_classes']} classes, but data={info.name!r} has {info.channels}-channel "
                          f"{info.image_size}px images in {info.num_classes} classes; use the parent's dataset "
                          f"(data={spec_data!r}), another parent (`workbench zoo list`), or init=None to train "
                          "from scratch")


def _parent_id(record: dict[str, Any] | None) -> str | None:
    """What identifies a starting point: its file's sha256, or the timm name of pretrained weights."""
    return (record.get("sha256") or record.get("source")) if record else None


def load_parent(init: str | Path, bundle: wdata.DataBundle, device: str = "cpu",
                pretrained: bool = True) -> dict[str, Trained]:
    """``{"parent": Trained}``: a trained starting point as it is, without training: the
    reference row of a fine-tune comparison, or the quantize-only path. ``pretrained=False``:
    a ``timm:NAME`` architecture with random weights (an offline dry run)."""
    from .zoo import load_init

    parent, ckpt, record = load_init(init, resolve_device(device), info=bundle.info, pretrained=pretrained)
    _check_parent_fits(parent.workbench_spec, bundle, init, record["data"])
    return {"parent": Trained("parent", parent.eval(), dict(ckpt.get("metrics", {})),
                              list(ckpt.get("extra", {}).get("history", [])), dict(ckpt.get("method_config", {})),
                              Path(record["file"]) if record["file"] else None, reused=True)}


def train_methods(methods: Sequence[str | dict[str, Any]], bundle: wdata.DataBundle, *, model: str,
                  model_args: dict[str, Any] | None = None, epochs: int = 2, seed: int = 0,
                  device: str = "cpu", w_bits: int | None = 4, a_bits: int | None = 4,
                  noise_mult: float = 1.0, batch_size: int = 128, out_dir: str | Path | None = None,
                  ckpt_dir: str | Path | None = None, progress: bool = True,
                  callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
                  train_args: dict[str, Any] | None = None, init: str | Path | None = None,
                  noise_bits: str | None = None) -> dict[str, Trained]:
    """Train one model per method from the same starting point (introduced in 00_quickstart).

    ``noise_bits`` (``"W4A4"``, ``"W3A8"``, ...) is the precision the noise methods imitate; when
    given it replaces ``w_bits`` and ``a_bits``. It says nothing about the PTQ applied later.

    ``init`` (``zoo:NAME`` or a checkpoint path; see :mod:`workbench.zoo`): every method
    fine-tunes the same trained parent with the model's fine-tune recipe for ``epochs`` (a
    fraction is allowed); ``model`` and ``model_args`` are the parent's. ``epochs=0`` trains
    nothing and returns the parent alone, labelled ``parent``: the quantize-only path.
    Without ``init`` each method trains from the same fresh initialization.

    Each run's checkpoint and history go to ``out_dir/checkpoints/<label>/``. With ``ckpt_dir``
    (e.g. the ``checkpoints`` folder of an earlier notebook's output), a compatible
    ``ckpt_dir/<label>/model.pt`` (same model, data, method and parent) is loaded instead of
    training again.

    Returns:
        ``{label: Trained}`` in the order of ``methods``.
    """
    from .checkpoint import load_model
    from .precondition import MethodConfig, create_method
    from .train import TrainConfig, fit

    model_args = dict(model_args or {})
    if noise_bits is not None:
        from .quant import parse_bits_pair

        w_bits, a_bits = parse_bits_pair(noise_bits)
    dev = resolve_device(device)
    record = None
    if init:
        from .zoo import load_init

        if not epochs:
            return load_parent(init, bundle, device=device)
        parent, parent_ckpt, record = load_init(init, dev, info=bundle.info)
        model, model_args = record["model"], dict(parent_ckpt["model_spec"].get("overrides", {}))
        _check_parent_fits(parent.workbench_spec, bundle, init, record["data"])
        recipe = wmodels.finetune_recipe(model, epochs=epochs)
    else:
        if not epochs:
            raise ConfigError("epochs=0 trains nothing: give a trained starting point (init='zoo:NAME' or a "
                              "checkpoint path) to quantize without training, or epochs >= 1")
        # a 1-epoch warm-up would eat half of a 2-epoch quick run: keep it to a fifth of the run
        recipe = {"warmup_epochs": min(1.0, float(epochs) / 5)}
    cfg = TrainConfig.from_dict({**recipe, "epochs": epochs, "seed": int(seed), "device": device,
                                 "batch_size": int(batch_size), **(train_args or {})})
    out: dict[str, Trained] = {}
    for entry in methods:
        label, mcfg = method_spec(entry, w_bits=w_bits, a_bits=a_bits, noise_mult=noise_mult)
        if label in out:
            raise ConfigError(f"method label {label!r} appears twice; give entries distinct 'label's")
        method_cfg = MethodConfig.from_dict(mcfg).to_dict()
        saved = Path(ckpt_dir) / label / "model.pt" if ckpt_dir else None
        if saved is not None and saved.is_file() and _reusable(saved, model, model_args, bundle, method_cfg,
                                                               _parent_id(record), int(seed)):
            net, ckpt = load_model(saved, dev)
            out[label] = Trained(label, net, dict(ckpt.get("metrics", {})), list(ckpt["extra"].get("history", [])),
                                 ckpt.get("method_config", {}), saved, reused=True)
            continue
        # every method starts from the same weights: the parent's exactly, or one seeded initialization
        net = copy.deepcopy(parent) if record else build_model(model, bundle.info, model_args, seed)
        run_dir = prepare_run_dir(Path(out_dir) / "checkpoints" / label) if out_dir else None
        res = fit(net, bundle, cfg, create_method(method_cfg), method_config=method_cfg, out_dir=run_dir,
                  progress=progress, callbacks=callbacks, init=record)
        out[label] = Trained(label, net.eval(), res.metrics, res.history, method_cfg, res.checkpoint)
    return out


def ptq_rows(trained: dict[str, Trained], configs: Sequence[Any], bundle: wdata.DataBundle,
             n_calib: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """:func:`workbench.ptq.sweep` over trained models with ``drop`` (FP minus quantized accuracy)
    and ``loss_increase`` added to each row (introduced in 00_quickstart)."""
    from .ptq import against_fp, sweep

    models = [(t.label, t.model, t.method_config.get("method", t.label)) for t in trained.values()]
    dev = model_device(next(iter(trained.values())).model) if trained else "cpu"
    rows = against_fp(sweep(models, configs, calib_batches(bundle, n_calib, device=dev),
                            eval_batches(bundle, device=dev), progress=progress))
    for r in rows:
        r["label"] = r.pop("checkpoint")
        t = trained[r["label"]]
        r["arm"] = t.arm if t.arm is not None else t.label
        r["seed"] = t.seed
    return rows


def train_seeds(methods: Sequence[str | dict[str, Any]], bundle: wdata.DataBundle, *, seeds: Sequence[int],
                **kwargs: Any) -> dict[str, Trained]:
    """:func:`train_methods` once per seed: labels ``<method> s<seed>``,
    with ``arm`` and ``seed`` set, so :func:`seed_summary` can pair each arm with the control of
    the same seed. ``out_dir`` gets one ``seed<N>`` sub-folder per seed.
    """
    if not seeds:
        raise ConfigError("seeds must name at least one seed, e.g. [0, 1]")
    out: dict[str, Trained] = {}
    base_out, base_ckpt = kwargs.pop("out_dir", None), kwargs.pop("ckpt_dir", None)
    for seed in seeds:
        got = train_methods(methods, bundle, seed=int(seed),
                            out_dir=Path(base_out) / f"seed{seed}" if base_out else None,
                            ckpt_dir=Path(base_ckpt) / f"seed{seed}" if base_ckpt else None, **kwargs)
        for label, t in got.items():
            if label == "parent":  # epochs=0: the parent is the same model whatever the seed
                out.setdefault(label, t)
                continue
            t.arm, t.seed = label, int(seed)
            t.label = f"{label} s{seed}"
            out[t.label] = t
    return out


def seed_summary(rows: Sequence[dict[str, Any]], control: str = "plain") -> list[dict[str, Any]]:
    """Quantized accuracy per arm and PTQ setting over the seeds (mean, 95 % interval) and the
    paired difference with ``control`` of the same seed (see :mod:`workbench.stats`)."""
    from .stats import paired_summary

    seeded = [r for r in rows if r.get("seed") is not None]
    table = paired_summary(seeded, value="accuracy", control=control, by=("config", "observer", "ptq_method"))
    order = {a: i for i, a in enumerate(dict.fromkeys(r["arm"] for r in seeded))}
    return sorted(table, key=lambda r: (r["config"] != "FP32", str(r["config"]), str(r["observer"]),
                                        order.get(r["arm"], 0)))


@contextmanager
def timed(row: dict[str, Any], key: str = "seconds") -> Iterator[dict[str, Any]]:
    """Put the wall time of the ``with`` block into ``row[key]`` (cost columns in tables)."""
    t0 = time.perf_counter()
    try:
        yield row
    finally:
        row[key] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# tables and figures


def save_table(rows: Sequence[dict[str, Any]], out_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """Write tidy rows as ``<name>.csv`` and ``<name>.json`` (atomically) and return them."""
    rows = [dict(r) for r in rows]
    write_csv(Path(out_dir) / f"{name}.csv", rows)
    write_json(Path(out_dir) / f"{name}.json", rows)
    return rows


def save_summary(out_dir: str | Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The notebook's headline rows as ``summary.csv/json``: what ``workbench report`` aggregates."""
    return save_table(rows, out_dir, "summary")


def save_figure(fig: Any, out_dir: str | Path, name: str) -> Any:
    """Save a plotly figure as ``figures/<name>.html`` and ``.json`` and return the figure, so a
    cell can end with ``nbt.save_figure(plots.x(rows), out, 'x')`` (introduced in 00_quickstart).

    The HTML files share one ``plotly.min.js`` in that folder: they open offline, and a run with
    many figures does not embed plotly.js many times.
    """
    from . import plots

    plots.save_figure(fig, Path(out_dir) / "figures" / name, formats=("html", "json"),
                      include_plotlyjs="directory")
    return fig


def compare(trained: dict[str, Trained], ptq: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Headline rows: per method and PTQ setting, FP and quantized accuracy, the drop, and the cost
    of training (introduced in 00_quickstart)."""
    out = []
    for r in ptq:
        if r["config"] == "FP32":
            continue
        t = trained.get(r["label"])
        out.append({"method": r["label"], "config": r["config"], "observer": r.get("observer"),
                    "fp_accuracy": r["accuracy"] + r["drop"], "quant_accuracy": r["accuracy"], "drop": r["drop"],
                    "step_time_s": t.summary()["step_time_s"] if t else None})
    return out


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 2,
          title: str | None = None) -> Table:
    """Display helper: ``nbt.table(rows, ['method', 'accuracy'])`` as the last line of a cell."""
    return Table(rows, columns, digits, title)


def pick(rows: Sequence[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """Rows whose columns equal the given values: ``pick(rows, config='W4A4')``."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


# ---------------------------------------------------------------------------------------
# helpers of the later notebooks


def ptq_configs(bits: Sequence[int], observers: Sequence[str] = ("minmax",), n_calib: int = 128,
                per_channel: bool = True, **overrides: Any) -> list[Any]:
    """``WbAb`` PTQ settings for every bit width and observer (introduced in 02_ptq)."""
    from .ptq import configs_from_bits

    # observer by observer, so a table lists one observer's widths together
    return [c for o in observers for c in configs_from_bits([str(int(b)) for b in bits], observer=o,
                                                            n_calib=int(n_calib), w_per_channel=per_channel,
                                                            **overrides)]


def ptq_method_configs(methods: dict[str, dict[str, Any]], bits: int, model: Any, n_calib: int = 128,
                       observer: str = "minmax") -> list[Any]:
    """Round to nearest plus one ``WbAb`` setting per named method (``{name: PTQConfig fields}``),
    leaving out, with a printed reason, the methods that do not apply to ``model`` (RepQ on a CNN,
    say) (introduced in 02_ptq)."""
    from .ptq import not_applicable

    configs = ptq_configs([bits], [observer], n_calib=n_calib)
    for name, fields in methods.items():
        cfg = ptq_configs([bits], [observer], n_calib=n_calib, **fields)[0]
        reason = not_applicable(cfg, model)
        if reason:
            print(f"{name}: left out, {reason}")
        else:
            configs.append(cfg)
    return configs


def error_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per error kind (and site): how well ``step/sqrt(12)`` predicts the measured std and how
    Gaussian the errors look, averaged over layers (introduced in 01_error_model)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r.get("site") or "input"), []).append(r)
    out = []
    for (kind, site), rs in groups.items():
        def mean(col: str, rs: list[dict[str, Any]] = rs) -> float:
            vals = [float(r[col]) for r in rs if r.get(col) is not None and not math.isnan(float(r[col]))]
            return sum(vals) / len(vals) if vals else math.nan
        out.append({"kind": kind, "site": site, "layers": len(rs), "bits": rs[0].get("bits"),
                    "ratio_mean": mean("ratio"), "ratio_min": min(r["ratio"] for r in rs),
                    "ratio_max": max(r["ratio"] for r in rs), "kurtosis_mean": mean("kurtosis"),
                    "ks_gaussian_mean": mean("ks_gaussian"), "ks_uniform_mean": mean("ks_uniform")})
    return out
