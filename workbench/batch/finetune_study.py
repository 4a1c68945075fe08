"""Run a fine-tune protocol: the noise-multiplier search, then every member, then the tidy tables.

``run_protocol(protocol, out)`` is resumable: a rerun on the same folder keeps every finished
member (and every finished PTQ setting of an unfinished one) and runs only what is missing, so a
protocol can span sessions and be extended (more seeds, more settings) without redoing work.
Members run in ``jobs`` worker processes with one CPU thread each (two torch processes sharing
2 cores with their default threading slow each other down many times over).

The folder::

    protocol.json       the protocol as run (a rerun with a different one is refused)
    members/REPLICATE/MEMBER/...   see workbench.batch.members
    search.json         the search's candidates and the choice
    ptq.csv, members.csv, curvature.csv, search.csv   tidy tables (regenerated from members/)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runinfo import run_metadata, write_csv, write_json
from .members import read_rows, run_member
from .protocol import Protocol, PTQSetting, Replicate, member_id

logger = logging.getLogger(__name__)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    return run_member(**job)


def _job(protocol: Protocol, out: Path, rep: Replicate, fields: Mapping[str, Any], epochs: float, *,
         settings: list[PTQSetting], val_settings: list[PTQSetting], curvature: bool) -> dict[str, Any]:
    return {"folder": str(out / "members" / member_id(rep, fields, epochs)), "replicate": rep,
            "method_fields": dict(fields), "epochs": epochs, "settings": settings, "val_settings": val_settings,
            "n_calib": int(protocol.ptq.get("n_calib", 128)), "val_size": protocol.val_size,
            "split_seed": protocol.split_seed, "n_eval": protocol.n_eval_for(rep.family),
            "curvature": protocol.curvature if curvature else None}


def _merge(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One job per member folder: a search candidate that is also a main member gets both lists."""
    merged: dict[str, dict[str, Any]] = {}
    for j in jobs:
        if j["folder"] not in merged:
            merged[j["folder"]] = j
            continue
        m = merged[j["folder"]]
        for key in ("settings", "val_settings"):
            have = {s.key for s in m[key]}
            m[key] = m[key] + [s for s in j[key] if s.key not in have]
        m["curvature"] = m["curvature"] or j["curvature"]
    return list(merged.values())


def _execute(jobs: list[dict[str, Any]], n_jobs: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(jobs), desc="members", disable=not progress)
    if n_jobs <= 1:
        for j in jobs:
            results.append(run_member(**j))
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            for res in pool.map(_run_job, jobs):
                results.append(res)
                bar.update()
    bar.close()
    return results


def _as_stored(protocol: Protocol) -> dict[str, Any]:
    """The protocol as its folder's ``protocol.json`` holds it (JSON types: tuples become lists)."""
    return json.loads(json.dumps(protocol.to_dict()))


def report_folder_note(protocol: Protocol, out: str | Path) -> str | None:
    """Before ``--report-only``: the report follows what ``out`` ran, as its ``protocol.json``
    records it. Raises where nothing ran there; returns a note when ``protocol`` says otherwise."""
    stored = Path(out).expanduser() / "protocol.json"
    if not stored.is_file():
        raise ConfigError(f"--report-only: {stored.parent} holds no protocol.json, so no protocol ran there; "
                          "run it first (without --report-only) or name the folder that ran it")
    if json.loads(stored.read_text()) != _as_stored(protocol):
        return f"note: {stored} differs from the protocol file given; the report follows the folder (what ran there)"
    return None


def _check_folder(protocol: Protocol, out: Path) -> None:
    path = out / "protocol.json"
    if path.is_file():
        old = json.loads(path.read_text())
        new = _as_stored(protocol)
        if old != new:
            same_core = all(old.get(k) == new[k] for k in ("val_size", "split_seed", "control", "n_eval"))
            if not same_core:
                raise ConfigError(f"{out} holds a protocol with another validation split, control or test set; "
                                  "use a new --out folder")
            logger.info("the protocol in %s was extended; finished members are kept", out)
    write_json(path, protocol.to_dict())


def run_protocol(protocol: Protocol, out: str | Path, *, jobs: int = 1, progress: bool = True,
                 only_search: bool = False) -> dict[str, Any]:
    """Run (or finish) ``protocol`` in ``out``; returns the search result and the members' statuses."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(protocol, out)
    write_json(out / "run.json", run_metadata({"protocol": protocol.to_dict(), "jobs": jobs}))
    curv = protocol.curvature is not None
    first: list[dict[str, Any]] = []
    val = [protocol.search_setting()] if protocol.search else []
    for arm, rep, epochs in arm_major(protocol):
        if not protocol.depends_on_search(arm):
            first.append(_job(protocol, out, rep, protocol.arm_config(arm), epochs,
                              settings=[] if only_search else protocol.settings(arm, rep.family),
                              val_settings=val if rep in protocol.search_replicates() else [],
                              curvature=curv and not only_search))
    for rep, fields, epochs in search_members(protocol):
        first.append(_job(protocol, out, rep, fields, epochs, settings=[], val_settings=val, curvature=False))
    if only_search:
        first = [j for j in first if j["val_settings"]]
    statuses = _execute(_merge(first), jobs, progress)
    chosen = choose(protocol, out)
    if not only_search and protocol.search and chosen.get("chosen") is not None:
        second = [_job(protocol, out, rep, protocol.arm_config(arm, chosen["chosen"]), epochs,
                       settings=protocol.settings(arm, rep.family), val_settings=[], curvature=curv)
                  for arm, rep, epochs in arm_major(protocol) if protocol.depends_on_search(arm)]
        statuses += _execute(_merge(second), jobs, progress)
    tables = collect(out)
    return {"out": str(out), "search": chosen, "members": statuses,
            "failed": [s for s in statuses if s.get("status") != "done"], "tables": {k: len(v) for k, v in tables.items()}}


def arm_major(protocol: Protocol) -> list[tuple[str, Replicate, float]]:
    """Every (arm, replicate, budget) to run, arm by arm in the protocol's order: the control's
    members first, then each arm's across every family, so a run stopped early has whole arms
    to compare rather than whole families with every arm but no partner for the last one."""
    arms = list(protocol.arms)
    todo = [(arm, rep, e) for rep, e in protocol.budgets() for arm in protocol.arms_for(rep)]
    return sorted(todo, key=lambda t: arms.index(t[0]))  # stable: families and budgets keep their order


# ----------------------------------------------------------------------------- the search


def search_members(protocol: Protocol) -> list[tuple[Replicate, dict[str, Any], float]]:
    """(replicate, method fields, epochs) of every search candidate (the first budget)."""
    if protocol.search is None:
        return []
    s = protocol.search
    spec = protocol.arms[s["arm"]]
    keys = [k for k, v in spec.items() if v == "search"] or ["noise_mult"]
    out = []
    for value in s["values"]:
        fields = {**spec, **{k: float(value) for k in keys}}
        for rep in protocol.search_replicates():
            out.append((rep, fields, protocol.search_epochs()))
    return out


def choose(protocol: Protocol, out: Path) -> dict[str, Any]:
    """Apply the protocol's stated criterion to the finished search members (``search.json``).

    Each candidate's score is its mean validation accuracy at the search setting over the
    search replicates; a candidate is eligible when its mean FP validation accuracy is within
    ``fp_tolerance`` points of the control's on the same replicates. Candidates with a failed
    or missing replicate are not eligible (their mean would stand on fewer seeds).
    """
    if protocol.search is None:
        return {"chosen": None, "candidates": []}
    s = protocol.search
    setting = protocol.search_setting()
    tol = float(s.get("fp_tolerance", 0.5))
    reps = protocol.search_replicates()
    spec = protocol.arms[s["arm"]]
    keys = [k for k, v in spec.items() if v == "search"] or ["noise_mult"]

    def scores(fields: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        fp, q = [], []
        for rep in reps:
            folder = out / "members" / member_id(rep, fields, protocol.search_epochs())
            info = _read_json(folder / "member.json")
            rows = [r for r in read_rows(folder / "ptq.csv") if r["split"] == "val" and r["setting"] == setting.label]
            if info and "val_accuracy" in info and rows:
                fp.append(float(info["val_accuracy"]))
                q.append(float(rows[0]["accuracy"]))
        return fp, q

    ref_fp, ref_q = scores(protocol.arm_config(protocol.control))
    candidates = []
    for value in s["values"]:
        fp, q = scores({**spec, **{k: float(value) for k in keys}})
        complete = len(fp) == len(reps) and len(ref_fp) == len(reps)
        row = {"value": float(value), "replicates": len(fp), "val_fp_accuracy": _mean(fp),
               "control_val_fp_accuracy": _mean(ref_fp), f"val_{setting.label}": _mean(q),
               f"control_val_{setting.label}": _mean(ref_q)}
        row["eligible"] = bool(complete and row["val_fp_accuracy"] >= row["control_val_fp_accuracy"] - tol)
        candidates.append(row)
    eligible = [c for c in candidates if c["eligible"]]
    best = max(eligible, key=lambda c: c[f"val_{setting.label}"]) if eligible else None
    for c in candidates:
        c["chosen"] = c is best
    result = {"criterion": (f"highest mean validation accuracy at {setting.label} over {len(reps)} replicates, "
                            f"among values of {keys} whose mean FP validation accuracy is within {tol} points of "
                            f"{protocol.control!r}"),
              "keys": keys, "candidates": candidates,
              "chosen": {k: best["value"] for k in keys} if best else None}
    write_json(out / "search.json", result)
    return result


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- tidy tables


def collect(out: str | Path, protocol: Protocol | None = None) -> dict[str, list[dict[str, Any]]]:
    """The tidy tables of a protocol folder, from its member folders, written beside them:
    ``members.csv`` (one row per main member, failures included), ``ptq.csv`` (one row per
    measurement), ``curvature.csv`` and ``search.csv``."""
    out = Path(out)
    if protocol is None:
        path = out / "protocol.json"
        if not path.is_file():
            raise ConfigError(f"{out} is not a protocol folder (no protocol.json)")
        protocol = Protocol.from_dict(json.loads(path.read_text()))
    search = _read_json(out / "search.json") or {}
    chosen = search.get("chosen")
    members, ptq, curvature = [], [], []
    for rep, epochs in protocol.budgets():
        for arm in protocol.arms_for(rep):
            if protocol.depends_on_search(arm) and not chosen:
                members.append(_member_row(rep, arm, epochs, None, {"status": "waiting for the search"}))
                continue
            folder = out / "members" / member_id(rep, protocol.arm_config(arm, chosen), epochs)
            status = _read_json(folder / "status.json") or {"status": "not run"}
            info = _read_json(folder / "member.json") or {}
            rep_curv = _read_json(folder / "curvature.json")
            ptq_rows = read_rows(folder / "ptq.csv")
            row = _member_row(rep, arm, epochs, info, status, folder.relative_to(out))
            # the member's measured work, summed from its parts: a rerun that finds it done does not reset it
            row["work_seconds"] = (float(info.get("train_seconds") or 0.0) + (rep_curv or {}).get("seconds", 0.0)
                                   + sum(float(r.get("calib_time_s") or 0) + float(r.get("eval_time_s") or 0)
                                         for r in ptq_rows)) if info else None
            members.append(row)
            base = {"family": rep.family, "replicate": rep.name, "parent": rep.parent, "seed": rep.seed,
                    "arm": arm, "epochs": epochs}
            if info.get("test_accuracy") is not None:
                ptq.append({**base, "setting": "FP32", "bits": "FP32", "column": "fp", "draw": 0, "split": "test",
                            "accuracy": info["test_accuracy"], "loss": info["test_loss"]})
            if info.get("qat_own_accuracy") is not None:
                ptq.append({**base, "setting": "own/qat", "bits": "own", "column": "qat-own", "draw": 0,
                            "split": "test", "accuracy": info["qat_own_accuracy"], "loss": info["qat_own_loss"]})
            ptq += [{**base, **r} for r in ptq_rows if r["split"] == "test"]
            if rep_curv:
                curvature += curvature_rows(base, rep_curv, info)
    search_rows = [{k: v for k, v in c.items()} for c in search.get("candidates", [])]
    for name, rows in (("members", members), ("ptq", ptq), ("curvature", curvature), ("search", search_rows)):
        if rows:
            write_csv(out / f"{name}.csv", rows)
    return {"members": members, "ptq": ptq, "curvature": curvature, "search": search_rows}


def _member_row(rep: Replicate, arm: str, epochs: float, info: Mapping[str, Any] | None, status: Mapping[str, Any],
                folder: Path | None = None) -> dict[str, Any]:
    info = info or {}
    return {"family": rep.family, "replicate": rep.name, "parent": rep.parent, "seed": rep.seed, "arm": arm,
            "epochs": epochs, "status": status.get("status"), "error": status.get("error", ""),
            "test_accuracy": info.get("test_accuracy"), "val_accuracy": info.get("val_accuracy"),
            "qat_own_accuracy": info.get("qat_own_accuracy"), "train_seconds": info.get("train_seconds"),
            "last_call_seconds": status.get("seconds"), "folder": str(folder) if folder else "",
            "command": info.get("command", "")}


#: Curvature measures per weight bit width, read from a flatness report.
CURVATURE_MEASURES: dict[str, Callable[[Mapping[str, Any], str], float]] = {
    "trace": lambda r, b: r.get("trace", {}).get("estimate", math.nan),
    "top_eigenvalue": lambda r, b: (r.get("top_eigenvalues", {}).get("eigenvalues") or [math.nan])[0],
    "sigma_trace": lambda r, b: r["quant"][b]["sigma_trace"],
    "predicted_increase": lambda r, b: r["quant"][b]["predicted"],
}


def _accuracy_drop(q: Mapping[str, Any]) -> float:
    """Accuracy points lost to RTN weights in a flatness report's ``quant`` entry. Reports keep
    ``clean_accuracy``/``quant_accuracy`` in percent; members written before that unit was fixed
    hold ``clean_acc``/``quant_acc`` as fractions (the key names tell them apart, not the values)."""
    if "clean_accuracy" in q:
        return float(q["clean_accuracy"]) - float(q["quant_accuracy"])
    return 100 * (float(q.get("clean_acc", math.nan)) - float(q.get("quant_acc", math.nan)))


def curvature_rows(base: Mapping[str, Any], rep: Mapping[str, Any], info: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, q in rep.get("quant", {}).items():
        row = {**base, "w_bits": int(key[1:]), **{m: float(f(rep, key)) for m, f in CURVATURE_MEASURES.items()},
               "predicted_stderr": q.get("predicted_stderr", math.nan), "first_order": q.get("first_order", math.nan),
               "measured_increase": q.get("measured_rtn", math.nan),
               "acc_drop": _accuracy_drop(q),  # points
               "trace_stderr": rep.get("trace", {}).get("stderr", math.nan), "n_hessian": rep.get("n_hessian"),
               "seconds": rep.get("seconds")}
        rows.append(row)
    return rows
