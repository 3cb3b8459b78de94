"""Where the change went: GPU time per step by kernel, category and NVTX range, baseline vs candidate.

Per side, a kernel's time per step is its total duration inside the steady-state steps of every run,
divided by the number of steady steps of those runs (for several ranks: rank-steps, so "per step per GPU").
Rows are sorted by their contribution to the total change (largest first in the direction of the change);
kernels present on one side only are marked ``new`` or ``vanished``.

Kernel time is summed kernel durations: with kernels overlapping on several streams it can exceed the GPU
busy time that the ``gpu_time`` metric measures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.render.fmt import short

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gpudoctor.gate.run import RunData


def _ms(ns: float) -> str:
    return f"{ns / 1e6:+.3g} ms" if abs(ns) >= 1e5 else f"{ns / 1e3:+.3g} us"


def _pool(runs, attr: str, keys: list[str]) -> tuple[pd.DataFrame, int]:
    frames = [getattr(r, attr) for r in runs if len(getattr(r, attr))]
    steps = int(sum(r.steps for r in runs))
    if not frames:
        return pd.DataFrame(columns=keys + ["total_ns", "count"]), steps
    df = pd.concat(frames, ignore_index=True)
    df = df.astype({"total_ns": "int64", "count": "int64"})
    return df.groupby(keys, sort=False).agg(total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index(), steps


def _table(base: pd.DataFrame, bsteps: int, cand: pd.DataFrame, csteps: int, keys: list[str]) -> pd.DataFrame:
    b = base.rename(columns={"total_ns": "b_ns", "count": "b_n"})
    c = cand.rename(columns={"total_ns": "c_ns", "count": "c_n"})
    j = b.merge(c, on=keys, how="outer")
    for col in ("b_ns", "b_n", "c_ns", "c_n"):
        j[col] = j[col].fillna(0)
    j["baseline_ns_per_step"] = j["b_ns"] / max(bsteps, 1)
    j["candidate_ns_per_step"] = j["c_ns"] / max(csteps, 1)
    j["baseline_count_per_step"] = j["b_n"] / max(bsteps, 1)
    j["candidate_count_per_step"] = j["c_n"] / max(csteps, 1)
    j["delta_ns_per_step"] = j["candidate_ns_per_step"] - j["baseline_ns_per_step"]
    j["status"] = np.where(j["b_n"] == 0, "new", np.where(j["c_n"] == 0, "vanished", "changed"))
    return j.drop(columns=["b_ns", "b_n", "c_ns", "c_n"])


def _sorted(j: pd.DataFrame, total: float) -> pd.DataFrame:
    sign = 1.0 if total >= 0 else -1.0
    return j.assign(_k=-sign * j["delta_ns_per_step"]).sort_values("_k", kind="stable").drop(columns="_k")


def _records(df: pd.DataFrame) -> list[dict]:
    out = []
    for row in df.to_dict(orient="records"):
        rec = {}
        for k, v in row.items():
            if isinstance(v, (float, np.floating)):
                rec[k] = round(float(v), 3) if "count" in k else int(round(float(v)))
            elif isinstance(v, np.integer):
                rec[k] = int(v)
            else:
                rec[k] = v
        out.append(rec)
    return out


def attribute(baselines: Sequence[RunData], candidates: Sequence[RunData], top: int = 10) -> dict:
    """Per-kernel, per-category and per-range change in GPU time per step (see the module docstring)."""
    kb, bsteps = _pool(baselines, "kernels", ["name", "category"])
    kc, csteps = _pool(candidates, "kernels", ["name", "category"])
    if bsteps == 0 or csteps == 0:
        return {"total_delta_ns_per_step": None, "kernels": [], "categories": [], "ranges": [], "new": [],
                "vanished": [], "headline": "", "complete": False,
                "note": "no steady-state steps on one side: no per-step attribution"}
    kern = _table(kb, bsteps, kc, csteps, ["name", "category"])
    total = float(kern["delta_ns_per_step"].sum())
    base_total = float(kern["baseline_ns_per_step"].sum())
    kern = _sorted(kern, total)
    cat = kern.groupby("category", sort=False)[["baseline_ns_per_step", "candidate_ns_per_step", "delta_ns_per_step"]].sum()
    cat = _sorted(cat.reset_index(), total)
    rb, _ = _pool(baselines, "ranges", ["text"])
    rc, _ = _pool(candidates, "ranges", ["text"])
    rng = _table(rb, bsteps, rc, csteps, ["text"]) if len(rb) or len(rc) else pd.DataFrame()
    if len(rng):
        rng = _sorted(rng, total)
    new = kern[kern["status"] == "new"].sort_values("candidate_ns_per_step", ascending=False)
    gone = kern[kern["status"] == "vanished"].sort_values("baseline_ns_per_step", ascending=False)
    complete = all(getattr(r, "attribution_complete", True) for r in list(baselines) + list(candidates))
    return {
        "total_delta_ns_per_step": int(round(total)),
        "baseline_kernel_ns_per_step": int(round(base_total)),
        "total_delta_fraction": (total / base_total) if base_total else None,
        "baseline_steps": bsteps, "candidate_steps": csteps,
        "kernels": _records(kern.head(top)),
        "categories": _records(cat),
        "ranges": _records(rng.head(top)) if len(rng) else [],
        "new": _records(new.head(top)),
        "vanished": _records(gone.head(top)),
        "new_count": int(len(new)), "vanished_count": int(len(gone)),
        "headline": headline(kern, total),
        "complete": complete,
    }


def headline(kern: pd.DataFrame, total: float, n: int = 3) -> str:
    """'+1.8 ms/step: softmax_warp_forward +1.2 ms; new kernel X +0.5 ms'."""
    if kern.empty:
        return ""
    parts = []
    for row in kern.head(n).itertuples(index=False):
        d = float(row.delta_ns_per_step)
        if d == 0 or (total and np.sign(d) != np.sign(total)):
            break
        prefix = {"new": "new kernel ", "vanished": "vanished kernel "}.get(row.status, "")
        parts.append(f"{prefix}{short(row.name, 60)} {_ms(d)}")
    return f"{_ms(total)}/step kernel time" + (": " + "; ".join(parts) if parts else "")
