"""The from-scratch study's tables, gathered from its sweep folders, and the noise search's choice."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import RunDirError

log = logging.getLogger(__name__)



def read_rows(path: Path) -> list[dict[str, Any]]:

    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def collect_sweep(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The members, PTQ rows and flatness rows of one study sweep folder, each tagged with ``job``.

    Members that failed (no ``member.json``) are listed under ``failed``.
    """

    folder = Path(folder)
    if not (folder / "sweep.json").is_file():
        raise RunDirError(f"{folder} is not a sweep folder (no sweep.json)")
    status = {r.get("job"): r for r in read_rows(folder / "summary.json")}
    out: dict[str, list[dict[str, Any]]] = {"members": [], "ptq": [], "flatness": [], "failed": []}
    meta = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    points = meta.get("points") or []
    for job_dir in sorted(p for p in (folder / "jobs").glob("*") if p.is_dir()):
        job = job_dir.name
        res = job_dir / "results"
        members = read_rows(res / "member.json")
        point = points[int(job)] if job.isdigit() and int(job) < len(points) else {}
        if not members:
            st = status.get(job, {})
            out["failed"].append({"job": job, **point, "status": st.get("status", "missing"),
                                  "error": st.get("message", "no member.json")})
            continue
        m = members[0]
        key = {"job": job, "model": m["model"], "label": m["label"], "seed": m["seed"]}
        out["members"].append({"job": job, **m, "point": point})
        for f in [res / "ptq.json", *sorted(res.glob("ptq_*.json"))]:  # ptq_*: settings added later
            out["ptq"] += [{**key, **r} for r in read_rows(f) if f.name == "ptq.json" or r["config"] != "FP32"]
        out["flatness"] += [{**key, **r, "label": m["label"]} for r in read_rows(res / "flatness.json")]
    return out


def collect_study(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """:func:`collect_sweep` over a study's ``main`` sweep and any ``main-*`` sweeps added to it later
    (e.g. more seeds for some methods); job ids of the added sweeps are prefixed with their folder name."""
    folder = Path(folder)
    sweeps = [folder / "main", *sorted(p for p in folder.glob("main-*") if (p / "sweep.json").is_file())]
    out: dict[str, list[dict[str, Any]]] = {"members": [], "ptq": [], "flatness": [], "failed": []}
    for sw in sweeps:
        got = collect_sweep(sw)
        prefix = "" if sw.name == "main" else f"{sw.name}/"
        for key, rows in got.items():
            out[key] += [{**r, "job": prefix + r["job"]} for r in rows]
    return out


def select_search(folder: str | Path, select: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Pick the searched values: best quantized validation accuracy at ``select['config']``
    among candidates whose FP accuracy is within ``max_fp_loss`` of the reference method's.

    Returns:
        ``{"values": {key: value}, "table": rows, "rule": text, "constrained": bool}``.

    Raises:
        RunDirError: no candidate finished.
    """
    got = collect_sweep(folder)
    cfg, obs, ref = select["config"], select.get("observer", "minmax"), select.get("reference", "plain")
    max_loss = float(select.get("max_fp_loss", math.inf))
    by_job = {m["job"]: m for m in got["members"]}
    quant = {r["job"]: r["accuracy"] for r in got["ptq"]
             if r["config"] == cfg and r.get("observer") == obs and r.get("quant_attn") in (True, None)}
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    ref_fp = [m["fp_accuracy"] for m in got["members"] if m["method"] == ref]
    for job, m in by_job.items():
        if m["method"] == ref or job not in quant:
            continue
        values = tuple((m.get("point") or {}).get(k, m.get(k)) for k in keys)
        groups[(m["label"], values)].append({"fp": m["fp_accuracy"], "q": quant[job]})
    if not groups:
        raise RunDirError(f"{folder}: no search candidate finished; see its summary.json")
    ref_mean = statistics.fmean(ref_fp) if ref_fp else None
    table = []
    for (label, values), rs in groups.items():
        fp, q = statistics.fmean(r["fp"] for r in rs), statistics.fmean(r["q"] for r in rs)
        ok = ref_mean is None or fp >= ref_mean - max_loss
        table.append({"label": label, **dict(zip(keys, values)), "val_fp_accuracy": fp,
                      f"val_{cfg}_accuracy": q, "reference_fp_accuracy": ref_mean, "eligible": ok})
    ref_q = [quant[j] for j, m in by_job.items() if m["method"] == ref and j in quant]
    reference_row = ({"label": f"{ref} (reference)", **{k: None for k in keys}, "val_fp_accuracy": ref_mean,
                      f"val_{cfg}_accuracy": statistics.fmean(ref_q) if ref_q else math.nan,
                      "reference_fp_accuracy": ref_mean, "eligible": None} if ref_fp else None)
    eligible = [r for r in table if r["eligible"]]
    constrained = bool(eligible)
    best = max(eligible or table, key=lambda r: r[f"val_{cfg}_accuracy"])
    for r in table:
        r["chosen"] = r is best
    if reference_row is not None:
        table.append({**reference_row, "chosen": False})
    rule = (f"highest validation accuracy at {cfg} ({obs} observer) among candidates whose FP validation "
            f"accuracy is within {max_loss:g} points of {ref!r}"
            + ("" if constrained else "; none qualified, so the best overall was taken"))
    return {"values": {k: best[k] for k in keys}, "table": table, "rule": rule, "constrained": constrained}
