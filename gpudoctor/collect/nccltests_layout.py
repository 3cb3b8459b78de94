"""The text layout nccl-tests prints (its printf formats), which ``gpudoctor nccl-bench`` writes so that the
nccl-tests reader (gpudoctor.readers.nccltests) serves both.
"""

from __future__ import annotations

import math


def _float_str(value: float, width: int) -> str:
    """nccl-tests' getFloatStr: fixed width, fewer decimals as the value grows."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'N/A':>{width}}"
    power, val = 0, 1
    while value >= val:
        power += 1
        val *= 10
    if power < width - 2:
        return f"{value:{width}.2f}"
    if power < width - 1:
        return f"{value:{width}.1f}"
    if power < width + 1:
        return f"{value:{width}.0f}"
    return f"{value:{width}.1e}"


def format_run_header(*, nthreads: int, ngpus: int, min_bytes: int, max_bytes: int, factor: int,
                      warmup: int, iters: int, check: bool, devices: list[dict], binary: str | None = None,
                      preamble: list[str] | None = None) -> str:
    """The lines before the table: parameters and the device of every rank.

    ``devices``: dicts with rank, pid, host, device, bus (e.g. "0x18" or "0000:18:00"), name.
    """
    lines = list(preamble or [])
    if binary:
        lines.append(f"# Collective test starting: {binary}")
    lines.append(f"# nThread {nthreads} nGpus {ngpus} minBytes {min_bytes} maxBytes {max_bytes} "
                 f"step: {factor}(factor) warmup iters: {warmup} iters: {iters} agg iters: 1 "
                 f"validation: {int(bool(check))} graph: 0")
    lines.append("#")
    lines.append("# Using devices")
    for d in devices:
        lines.append(f"#  Rank {int(d['rank']):2d} Group {0:2d} Pid {int(d.get('pid', 0)):6d} on "
                     f"{str(d.get('host', '')):>10s} device {int(d.get('device', 0)):2d} "
                     f"[{d.get('bus', '')}] {d.get('name', '')}")
    return "\n".join(lines) + "\n"


def format_table_header() -> str:
    """The three header lines of the result table (nccl-tests' writeResultHeader, no timestamps)."""
    e = ("", "", "", "", "")
    return (
        "#\n"
        + "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          \n" % e
        + "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s \n" % (
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
            "time", "algbw", "busbw", "#wrong")
        + "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s \n" % (
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "")
    )


def format_row(size_bytes: int, count: int, type_name: str, redop: str, root: int,
               results: list[tuple[float, float, float, int | None]]) -> str:
    """One data row. ``results``: (time_us, algbw, busbw, wrong or None when not checked) per mode,
    out-of-place first."""
    out = "%12d  %12d  %8s  %6s  %6s" % (size_bytes, count, type_name, redop, "%6i" % root)
    for time_us, alg, bus, wrong in results:
        w = "%6s" % "N/A" if wrong is None else "%6g" % float(wrong)
        out += "  %7s  %6s  %6s  %s" % (_float_str(time_us, 7), _float_str(alg, 6), _float_str(bus, 6), w)
    return out + "\n"


def format_footer(out_of_bounds: int, avg_busbw: float, binary: str | None = None) -> str:
    lines = ["# %-20s : %d %s" % ("Out of bounds values", out_of_bounds, "FAILED" if out_of_bounds else "OK"),
             "# %-20s : %g " % ("Avg bus bandwidth", avg_busbw), "#"]
    if binary:
        lines.append(f"# Collective test concluded: {binary}")
    return "\n".join(lines) + "\n"
