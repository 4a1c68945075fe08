"""The fine-tune protocol: which trained parents, which fine-tune arms, which PTQ settings.

Every arm is a fine-tune of the same parent with the same seed and steps; ``plain`` is the
control. A *replicate* is one (parent, fine-tune seed) pair, and every arm's result is compared
with the control of the same replicate (paired). The protocol file (YAML) says::

    name: finetune-quick
    epochs: 1                       # fine-tune budget(s): a number or a list
    val_size: 1000                  # training images held out of every fine-tune (the search judges there)
    families:                       # parent families, each reported on its own
      vit-micro-mini:
        parents: [zoo:vit-micro-mini-s0, zoo:vit-micro-mini-s1, zoo:vit-micro-mini-s2]
        seeds: [0, 1]               # fine-tune seeds per parent: 3 x 2 = 6 replicates
        extra: {seeds: [2], arms: [plain, dnq]}   # optional: more replicates for these arms only
      vit-micro-fmnist:
        parents: [zoo:vit-micro-fmnist]
        seeds: [0, 1, 2, 3, 4]
        arms: [plain, dnq]          # optional: the arms this family runs (default: all; the control always)
        epochs: 0.15                # optional: this family's budget(s), instead of the protocol's
        n_eval: 2000                # optional: its first N test images (default: the protocol's n_eval)
    arms:                           # MethodConfig fields; noise_mult: search = the searched value
      plain: {method: plain}
      dnq: {method: dnq, w_bits: 4, a_bits: 4, noise_mult: search}
      dnq-w3: {method: dnq, w_bits: 3, a_bits: 3, noise_mult: search}   # takes the same searched value
    search:                         # optional: the noise multiplier, chosen on the validation split
      arm: dnq
      values: [0.5, 1.0, 2.0]
      replicates: 3                 # the first N replicates of the first family
      bits: W4A4
      observer: mse
      fp_tolerance: 0.5             # eligible: mean FP val accuracy within this of plain's
    ptq:
      bits: [W4A4, W3A3]
      observers: [minmax, mse]
      n_calib: 128
      calib_draws: 3                # calibration draws for draw_bits (the rest: the first draw)
      draw_bits: [W4A4, W3A3]
      float_attention: [W4A4]       # also measured with the attention matmuls in float (mse)
      strong: {bc: {observer: mse, bias_correction: true}}
      strong_arms: [plain, dnq]
      strong_bits: [W4A4, W3A3]
      wide: {bits: [W8A8, W2A4], observers: [minmax, percentile, mse], arms: [plain, dnq],
             families: [vit-micro-mini]}   # optional: more bits and observers, one draw, for some arms
    curvature: {n_hessian: 256, w_bits: [4, 3], max_probes: 20}

The search criterion is stated here, before anything runs: the value with the highest mean
validation accuracy at ``bits``/``observer`` over the search replicates, among the values whose
mean full-precision validation accuracy is within ``fp_tolerance`` points of ``plain``'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..quant import parse_bits_pair

#: The value of ``noise_mult`` (or another searched field) that means "the search's choice".
SEARCHED = "search"

#: What a family may say: its parents and seeds, and optionally extra seeds, its arms, its budget
#: and how many test images it is judged on.
FAMILY_KEYS = {"parents", "seeds", "extra", "arms", "epochs", "n_eval"}

#: PTQConfig fields a strong setting may set (the rest: the protocol's bits and n_calib).
STRONG_FIELDS = {"observer", "w_observer", "bias_correction", "reconstruction", "qdrop", "recon_iters", "repq",
                 "percentile", "softmax_quantizer"}


@dataclass(frozen=True)
class Replicate:
    """One parent and one fine-tune seed: the unit that pairs an arm with its control."""

    family: str
    parent: str
    seed: int

    @property
    def name(self) -> str:
        short = self.parent.split(":", 1)[-1]
        short = Path(short).stem if short.endswith(".pt") else short
        return f"{short}-s{self.seed}"


@dataclass(frozen=True)
class PTQSetting:
    """One PTQ measurement of a member: its label, the PTQConfig fields and the calibration draw."""

    label: str  # e.g. "W4A4/mse", "W4A4/mse/float-attn", "W3A3/bc"
    bits: str
    column: str  # observer or strong-method name: what a table's column is
    fields: Mapping[str, Any]
    draw: int = 0

    @property
    def key(self) -> str:
        return f"{self.label}#{self.draw}"


@dataclass
class Protocol:
    name: str
    families: dict[str, dict[str, Any]]
    arms: dict[str, dict[str, Any]]
    epochs: list[float] = field(default_factory=lambda: [1.0])
    val_size: int = 1000
    split_seed: int = 0  # fixes the validation split and the calibration draws for every member
    ptq: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] | None = None
    curvature: dict[str, Any] | None = None
    control: str = "plain"
    n_eval: int | None = None  # test images (None: the whole test split)
    description: str = ""

    # ------------------------------------------------------------------ reading and checking

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protocol:
        known = {"name", "families", "arms", "epochs", "val_size", "split_seed", "ptq", "search", "curvature",
                 "control", "n_eval", "description"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown protocol key(s) {unknown}; valid: {sorted(known)}")
        for key in ("name", "families", "arms"):
            if key not in d:
                raise ConfigError(f"the protocol needs {key!r}")
        epochs = d.get("epochs", 1.0)
        epochs = [float(e) for e in (epochs if isinstance(epochs, (list, tuple)) else [epochs])]
        p = cls(name=str(d["name"]), families={k: dict(v) for k, v in d["families"].items()},
                arms={k: dict(v) for k, v in d["arms"].items()}, epochs=epochs,
                val_size=int(d.get("val_size", 1000)), split_seed=int(d.get("split_seed", 0)),
                ptq=dict(d.get("ptq") or {}), search=dict(d["search"]) if d.get("search") else None,
                curvature=dict(d["curvature"]) if d.get("curvature") else None,
                control=str(d.get("control", "plain")), n_eval=d.get("n_eval"),
                description=str(d.get("description", "")))
        p.check()
        return p

    @classmethod
    def from_file(cls, path: str | Path) -> Protocol:
        import yaml

        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"no protocol file at {path} (see docs/study/finetune/*.yaml)")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(d, Mapping):
            raise ConfigError(f"{path} must hold a mapping (name, families, arms, ...)")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "families": self.families, "arms": self.arms,
                "epochs": self.epochs, "val_size": self.val_size, "split_seed": self.split_seed, "ptq": self.ptq,
                "search": self.search, "curvature": self.curvature, "control": self.control, "n_eval": self.n_eval}

    def check(self) -> None:
        """Every name and setting, checked before anything is trained."""
        from ..precondition import MethodConfig
        from ..ptq import PTQConfig

        if self.control not in self.arms:
            raise ConfigError(f"the control arm {self.control!r} is not among the arms {list(self.arms)}")
        if not self.families:
            raise ConfigError("the protocol has no parent family")
        for fam, spec in self.families.items():
            if not spec.get("parents") or not spec.get("seeds"):
                raise ConfigError(f"family {fam!r} needs a list of parents and a list of seeds")
            unknown = sorted(set(spec) - FAMILY_KEYS)
            if unknown:
                raise ConfigError(f"family {fam!r}: unknown key(s) {unknown}; valid: {', '.join(sorted(FAMILY_KEYS))}")
            if "arms" in spec:
                arms = spec["arms"]
                bad = [a for a in arms if a not in self.arms] if isinstance(arms, (list, tuple)) else [arms]
                if bad or self.control not in arms:
                    raise ConfigError(f"family {fam!r}: arms must list arms of the protocol, the control "
                                      f"{self.control!r} among them; got {arms!r}")
            budgets = family_epochs(spec, self.epochs)
            if not budgets or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0 for e in budgets):
                raise ConfigError(f"family {fam!r}: epochs must be numbers > 0 (a fraction trains part of an "
                                  f"epoch), got {spec.get('epochs', self.epochs)!r}")
            n_eval = spec.get("n_eval")
            if n_eval is not None and (isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1):
                raise ConfigError(f"family {fam!r}: n_eval must be a whole number of test images >= 1, got {n_eval!r}")
            extra = spec.get("extra")
            if extra is not None:
                if not isinstance(extra, Mapping) or set(extra) != {"seeds", "arms"} or not extra["seeds"]:
                    raise ConfigError(f"family {fam!r}: extra needs seeds (a non-empty list) and arms, e.g. "
                                      "{seeds: [2], arms: [plain, dnq]}")
                clash = sorted(set(map(int, extra["seeds"])) & set(map(int, spec["seeds"])))
                if clash:
                    raise ConfigError(f"family {fam!r}: extra seeds {clash} are already among its seeds")
                bad = [a for a in extra["arms"] if a not in self.arms_of(fam)]
                if bad or self.control not in extra["arms"]:
                    raise ConfigError(f"family {fam!r}: extra arms must be arms the family runs and include the "
                                      f"control {self.control!r}; got {list(extra['arms'])}")
        if any(not e > 0 for e in self.epochs):
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        for arm, spec in self.arms.items():
            if "method" not in spec:
                raise ConfigError(f"arm {arm!r} has no method")
            searched = [k for k, v in spec.items() if v == SEARCHED]
            if searched and self.search is None:
                raise ConfigError(f"arm {arm!r} takes {searched} from the search, but the protocol has no search")
            MethodConfig.from_dict({k: (1.0 if v == SEARCHED else v) for k, v in spec.items()})
        if self.search is not None:
            s = self.search
            for key in ("arm", "values"):
                if key not in s:
                    raise ConfigError(f"the search needs {key!r}")
            if s["arm"] not in self.arms:
                raise ConfigError(f"the search's arm {s['arm']!r} is not among the arms")
            if len(s["values"]) < 2:
                raise ConfigError("a search needs at least two values to choose between")
            if int(s.get("replicates", 3)) > len(self.replicates()):
                raise ConfigError(f"the search wants {s.get('replicates', 3)} replicates, the protocol has "
                                  f"{len(self.replicates())}")
            parse_bits_pair(str(s.get("bits", "W4A4")))
        ptq = self.ptq
        unknown = sorted(set(ptq) - {"bits", "observers", "n_calib", "calib_draws", "draw_bits", "float_attention",
                                     "strong", "strong_arms", "strong_bits", "wide"})
        if unknown:
            raise ConfigError(f"unknown ptq key(s) {unknown}")
        wide = ptq.get("wide")
        if wide is not None:
            if not isinstance(wide, Mapping) or sorted(set(wide) - {"bits", "observers", "arms", "families"}) \
                    or not wide.get("bits") or not wide.get("arms"):
                raise ConfigError("ptq.wide needs bits and arms (and may name observers and families), e.g. "
                                  "{bits: [W8A8, W2A4], observers: [minmax, mse], arms: [plain, dnq]}")
            bad = [a for a in wide["arms"] if a not in self.arms] + [
                f for f in wide.get("families", []) if f not in self.families]
            if bad or self.control not in wide["arms"]:
                raise ConfigError(f"ptq.wide: arms and families must be the protocol's, and the arms must include "
                                  f"the control {self.control!r} (its differences need it); got {bad or wide['arms']}")
            for b in wide["bits"]:
                parse_bits_pair(str(b))
        for name, spec in (ptq.get("strong") or {}).items():
            bad = sorted(set(spec) - STRONG_FIELDS)
            if bad:
                raise ConfigError(f"strong PTQ setting {name!r}: unknown field(s) {bad}; valid: {sorted(STRONG_FIELDS)}")
        for arm in ptq.get("strong_arms", []):
            if arm not in self.arms:
                raise ConfigError(f"strong_arms names {arm!r}, which is not an arm")
        for s in self.settings(self.control, next(iter(self.families))) + self.settings(next(iter(self.arms))):
            w, a = parse_bits_pair(s.bits)
            PTQConfig(w_bits=w, a_bits=a, n_calib=int(ptq.get("n_calib", 128)), **s.fields)

    # ------------------------------------------------------------------ the plan

    def replicates(self, family: str | None = None) -> list[Replicate]:
        """Every (parent, seed) pair: each family's seeds first, then its extra seeds (which run
        :meth:`arms_for` says)."""
        out = []
        for fam, spec in self.families.items():
            if family is not None and fam != family:
                continue
            extra = (spec.get("extra") or {}).get("seeds", [])
            for seeds in (spec["seeds"], extra):
                for parent in spec["parents"]:
                    for seed in seeds:
                        out.append(Replicate(fam, str(parent), int(seed)))
        return out

    def arms_of(self, family: str) -> list[str]:
        """The arms a family runs (its ``arms`` key, else all), in the protocol's order."""
        chosen = self.families[family].get("arms")
        return [a for a in self.arms if chosen is None or a in chosen]

    def arms_for(self, replicate: Replicate) -> list[str]:
        """The arms a replicate runs: its family's, or on a family's extra seeds its extra arms."""
        spec = self.families[replicate.family]
        extra = spec.get("extra")
        if extra and replicate.seed in {int(s) for s in extra["seeds"]}:
            return [a for a in self.arms_of(replicate.family) if a in extra["arms"]]
        return self.arms_of(replicate.family)

    def epochs_for(self, family: str) -> list[float]:
        """The fine-tune budgets of ``family``: its own ``epochs``, else the protocol's."""
        return [float(e) for e in family_epochs(self.families[family], self.epochs)]

    def n_eval_for(self, family: str) -> int | None:
        """How many test images judge ``family``'s members (None: the whole test split)."""
        return self.families[family].get("n_eval", self.n_eval)

    def budgets(self) -> list[tuple[Replicate, float]]:
        """Every (replicate, epochs) pair to fine-tune, budget by budget."""
        budgets = {fam: self.epochs_for(fam) for fam in self.families}
        pairs = [(rep, e) for rep in self.replicates() for e in budgets[rep.family]]
        return sorted(pairs, key=lambda pair: budgets[pair[0].family].index(pair[1]))  # stable

    def search_replicates(self) -> list[Replicate]:
        """The first N replicates of the first family (its main seeds before any extra ones)."""
        if self.search is None:
            return []
        return self.replicates(next(iter(self.families)))[: int(self.search.get("replicates", 3))]

    def search_epochs(self) -> float:
        """The budget the search fine-tunes with: the first family's first."""
        return self.epochs_for(next(iter(self.families)))[0]

    def search_setting(self) -> PTQSetting | None:
        if self.search is None:
            return None
        bits = str(self.search.get("bits", "W4A4"))
        obs = str(self.search.get("observer", "mse"))
        return PTQSetting(f"{bits}/{obs}", bits, obs, {"observer": obs})

    def arm_config(self, arm: str, chosen: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The arm's MethodConfig fields with the searched value filled in (``chosen``)."""
        spec = dict(self.arms[arm])
        for k, v in spec.items():
            if v == SEARCHED:
                if not chosen or k not in chosen:
                    raise ConfigError(f"arm {arm!r} needs the search's choice of {k!r}, which is not made yet")
                spec[k] = chosen[k]
        return spec

    def depends_on_search(self, arm: str) -> bool:
        return any(v == SEARCHED for v in self.arms[arm].values())

    def settings(self, arm: str, family: str | None = None) -> list[PTQSetting]:
        """Every PTQ measurement a main member of ``arm`` (in ``family``) gets, in the order they are
        run: the grid, the float-attention settings, the strong methods of the strong arms, then
        the wide grid's settings (one draw) that the grid has not measured already."""
        ptq = self.ptq
        bits = [str(b) for b in ptq.get("bits", ["W4A4", "W3A3"])]
        draws = int(ptq.get("calib_draws", 1))
        draw_bits = {str(b) for b in ptq.get("draw_bits", bits)}
        out = []
        for b in bits:
            for obs in ptq.get("observers", ["minmax", "mse"]):
                for d in range(draws if b in draw_bits else 1):
                    out.append(PTQSetting(f"{b}/{obs}", b, obs, {"observer": obs}, d))
        for b in ptq.get("float_attention", []):
            out.append(PTQSetting(f"{b}/mse/float-attn", str(b), "mse float-attn",
                                  {"observer": "mse", "quant_attn": False}))
        if arm in ptq.get("strong_arms", []):
            for b in ptq.get("strong_bits", ["W4A4", "W3A3"]):
                for name, spec in (ptq.get("strong") or {}).items():
                    out.append(PTQSetting(f"{b}/{name}", str(b), name, dict(spec)))
        wide = ptq.get("wide") or {}
        if arm in wide.get("arms", []) and (family is None or family in wide.get("families", [family])):
            have = {s.label for s in out}
            for b in wide["bits"]:
                for obs in wide.get("observers", ["minmax", "mse"]):
                    if f"{b}/{obs}" not in have:
                        out.append(PTQSetting(f"{b}/{obs}", str(b), obs, {"observer": obs}))
        return out


def family_epochs(spec: Mapping[str, Any], default: Any) -> list[Any]:
    """A family's fine-tune budgets: its ``epochs`` (a number or a list), else ``default`` (the
    protocol's ``epochs``). Takes the family's own mapping, as ``protocol.json`` stores it too, so
    the report reads budgets the same way the runner does."""
    epochs = spec.get("epochs", default)
    return list(epochs) if isinstance(epochs, (list, tuple)) else [epochs]


def member_id(replicate: Replicate, method_fields: Mapping[str, Any], epochs: float) -> str:
    """A member's folder name: what it trains, not which arm asked for it, so a search candidate
    and the main arm it turns out to equal are one member (trained once)."""
    text = json.dumps({"parent": replicate.parent, "seed": replicate.seed, "epochs": epochs,
                       "method": dict(sorted(method_fields.items()))}, sort_keys=True)
    label = str(method_fields.get("method", "plain"))
    return f"{replicate.name}/{label}-e{epochs:g}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

