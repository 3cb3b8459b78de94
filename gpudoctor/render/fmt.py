"""Number formatting shared by the text renderers."""

from __future__ import annotations


def ns(v: float) -> str:
    """A duration in ns, in the unit a person reads best."""
    v = float(v)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}" if abs(v) < 100 * scale else f"{v / scale:.0f} {unit}"
    return f"{v:.0f} ns"


def pct(frac: float) -> str:
    return f"{100 * float(frac):.1f}%"


def short(name: str, width: int = 70) -> str:
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def metric(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 1e9:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def metric_text(v: object) -> str:
    """A metric value for people: "unknown" for a value the run could not supply (None / NaN)."""
    if v is None or (isinstance(v, float) and v != v):
        return "unknown"
    return metric(v)


# What supplies a metric that came out unknown, per analyzer (``*`` = any analyzer).
UNKNOWN_SOURCES = {
    ("memory_bound_decode", "mbu"): "the model's weight bytes: --set memory_bound_decode.model_bytes=N",
    ("memory_bound_decode", "mbu_gpu_busy"): "the model's weight bytes: --set memory_bound_decode.model_bytes=N",
    ("memory_bound_decode", "bytes_per_step"): "the model's weight bytes: --set memory_bound_decode.model_bytes=N",
    ("memory_bound_decode", "achieved_bandwidth_bytes_per_s"):
        "the model's weight bytes: --set memory_bound_decode.model_bytes=N",
    ("memory_bound_decode", "tokens_per_step"): "--set memory_bound_decode.tokens_per_step=N",
    ("memory_bound_decode", "tokens_per_s"): "--set memory_bound_decode.tokens_per_step=N",
    ("*", "median_launch_call_ns"): "CUDA API calls in the trace (nsys -t cuda)",
    ("*", "link_ceiling_gbps"): "a measured link bandwidth (gpudoctor nccl-bench)",
}


def unknown_sources(analyzer: str, keys: list[str]) -> str:
    """What would supply the unknown metrics ``keys`` of a finding, as one phrase ("" when none are)."""
    parts: dict[str, list[str]] = {}
    for k in keys:
        src = UNKNOWN_SOURCES.get((analyzer, k)) or UNKNOWN_SOURCES.get(("*", k)) or "not in this trace"
        parts.setdefault(src, []).append(k)
    return "; ".join(f"{', '.join(ks)} need {src}" if src != "not in this trace" else f"{', '.join(ks)}: not in this trace"
                     for src, ks in parts.items())
