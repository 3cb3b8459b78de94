"""Number formatting shared by the text renderers."""


def ns(v) -> str:
    """A duration in ns, in the unit a person reads best."""
    v = float(v)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}" if abs(v) < 100 * scale else f"{v / scale:.0f} {unit}"
    return f"{v:.0f} ns"


def pct(frac) -> str:
    return f"{100 * float(frac):.1f}%"


def short(name: str, width: int = 70) -> str:
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def metric(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 1e9:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)
