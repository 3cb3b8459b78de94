"""Analyzer thresholds: documented defaults, a ``gpudoctor.toml``, and command-line overrides.

Precedence (later wins): the defaults below < ``gpudoctor.toml`` < overrides (``--set ANALYZER.KEY=VALUE``
or a dict ``{"gpu_idle.idle_fraction_medium": 0.2}``).

gpudoctor.toml::

    [analyzers.severity]            # the rule every analyzer's severity follows (see ``severity_for``)
    medium_fraction = 0.05
    high_fraction = 0.15

    [analyzers.gpu_idle]
    idle_fraction_medium = 0.2

    [analyzers]
    disable = ["low_tensor_core"]   # analyzers not to run

    [ceilings]                      # measured ceilings (or: ceilings_file = "ceilings.json" at top level)
    copy_bandwidth_bytes_per_s = 2.99e12

Unknown analyzers or keys are an error (a typo must not silently keep the default). docs/analyzers.md
explains every key.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpudoctor.errors import GpudoctorError
from gpudoctor.readers.limits import read_json_file, read_small_file

# analyzer id -> key -> (default, one-line meaning). ``None`` defaults are facts about the workload that
# only the user knows (model size, batch): numbers, unknown until given.
DEFAULTS: dict[str, dict[str, tuple[Any, str]]] = {
    "severity": {
        "medium_fraction": (0.05, "a problem costing at least this fraction of the steady-state window is medium"),
        "high_fraction": (0.15, "... at least this fraction is high"),
        "low_fraction": (0.01, "below this fraction it is info, between this and medium_fraction low"),
    },
    "unfused_attention": {
        "max_kernels_between": (10, "most non-GEMM kernels between a GEMM and the softmax on either side of a chain"),
        "max_gemms_per_side": (2, "GEMMs directly before/after the chain counted as part of it (backward has 2)"),
        "medium_fraction": (None, "own override of severity.medium_fraction (estimated saving / window)"),
        "high_fraction": (None, "own override of severity.high_fraction"),
    },
    "low_tensor_core": {
        "fallback_precision": ("tf32", "precision whose tensor-core rate the saving estimate assumes (tf32: allow_tf32)"),
        "tensor_active_min": (0.05, "GPU metrics: a GEMM kernel whose Tensor Active per unit of GEMM time is below this runs without tensor cores (NVML: the window mean)"),
        "tensor_pipe_min": (0.05, "ncu: a GEMM whose tensor pipe is active less than this fraction runs without tensor cores"),
        "gemv_max_n": (16, "a GEMM whose N tile (nvjet _MxN_) or M (shapes) is at most this is GEMV-shaped: not flagged"),
        "misaligned_penalty": (0.25, "fraction of a misaligned fp16/bf16/fp8 GEMM's time assumed recoverable by padding"),
        "medium_fraction": (None, "own override of severity.medium_fraction (estimated saving / window)"),
        "high_fraction": (None, "own override of severity.high_fraction"),
    },
    "memory_bound_decode": {
        "decode_range_pattern": ("decode|generate|generation", "regex (case-insensitive) of step range names that are decode steps"),
        "gemv_max_n": (16, "N tile (nvjet _MxN_) at most this, or M <= this in shapes: a GEMV-shaped (decode) GEMM"),
        "decode_max_tokens": (256, "with CPU-op shapes: steps of at most this many tokens whose intensity is below the ridge point are decode steps"),
        "decode_gemv_fraction": (0.5, "steps whose GEMM time is at least this fraction GEMV-shaped are decode steps"),
        "model_bytes": (None, "bytes of weights read per step (e.g. parameters x 2 for bf16); shapes give it when recorded"),
        "kv_bytes_per_step": (None, "bytes of KV cache read per step (added to model_bytes)"),
        "tokens_per_step": (None, "tokens produced per step (the decode batch); shapes give it when recorded"),
        "bytes_per_param": (2, "bytes per weight (2 = bf16/fp16, 1 = fp8/int8) for FLOPs = 2 x params x tokens"),
        "precision": ("bf16", "precision of the matrix products, for the compute ceiling (bf16 | fp16 | fp8 | tf32)"),
        "target_batch": (32, "batch the recommendation quotes ('batching to B would give ...'), capped by the ridge point"),
        "medium_headroom": (4.0, "medium when ridge point / arithmetic intensity >= this (batching can give >= 4x)"),
        "high_headroom": (16.0, "high when ridge point / arithmetic intensity >= this"),
        "gemv_busy_fraction_min": (0.25, "below medium unless GEMV-shaped GEMMs are at least this fraction of GPU busy time"),
    },
    "gpu_idle": {
        "idle_fraction_medium": (0.25, "medium when the GPU is idle at least this fraction of the steady-state window"),
        "idle_fraction_high": (0.5, "high at this fraction"),
        "launch_bound_kernel_ns": (5000, "median kernel shorter than this (ns) with host-late gaps: launch-bound"),
        "launch_gap_max_ns": (50000, "a host-late gap up to this long with no other cause counts as launch overhead"),
        "module_call_min_ns": (10000, "cudaFuncSetAttribute / cuKernelSetAttribute calls at least this long count as module load"),
        "max_examples": (5, "examples of each cause listed in the evidence"),
        "profiler_op_overhead_ns": (2200, "torch.profiler host cost per operator with record_shapes (ns), when no unprofiled step time was measured"),
        "profiler_op_overhead_stack_ns": (4400, "... with record_shapes and with_stack"),
    },
}



def register_defaults(analyzer: str, defaults: dict[str, tuple[Any, str]]) -> None:
    """Add an analyzer's keys (key -> (default, meaning)) so that gpudoctor.toml and overrides accept them.

    For analyzers that live in their own module (e.g. ``register_defaults(ID, DEFAULTS)`` at import);
    keys already known keep their default.
    """
    section = DEFAULTS.setdefault(analyzer, {})
    for key, spec in defaults.items():
        section.setdefault(key, tuple(spec))


def analyzer_ids() -> tuple[str, ...]:
    return tuple(k for k in DEFAULTS if k != "severity")


ANALYZER_IDS = analyzer_ids()


def _coerce(value: Any, default: Any, name: str) -> Any:
    """``value`` as the type of ``default`` (strings from the command line become numbers)."""
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        low = text.lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null", ""):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    raise GpudoctorError(f"config {name}: expected a number, got {text!r}") from None
    if value is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise GpudoctorError(f"config {name}: expected true/false, got {value!r}")
        return value
    if isinstance(default, str):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GpudoctorError(f"config {name}: expected a number, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and float(value).is_integer():
        return int(value)
    if not math.isfinite(float(value)):
        raise GpudoctorError(f"config {name}: expected a finite number, got {value!r}")
    return float(value) if isinstance(default, float) else value


@dataclass
class Config:
    """Resolved thresholds of every analyzer, where each value came from, and measured ceilings."""

    values: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        a: {k: v for k, (v, _) in keys.items()} for a, keys in DEFAULTS.items()})
    sources: dict[str, str] = field(default_factory=dict)  # "analyzer.key" -> "gpudoctor.toml" | "override"
    disabled: set[str] = field(default_factory=set)
    ceilings: dict | None = None

    def _section(self, analyzer: str) -> dict[str, Any]:
        """The analyzer's values, with defaults registered after this Config was made filled in."""
        sec = self.values.setdefault(analyzer, {})
        for k, (v, _) in DEFAULTS.get(analyzer, {}).items():
            sec.setdefault(k, v)
        return sec

    def get(self, analyzer: str, key: str) -> Any:
        try:
            return self._section(analyzer)[key]
        except KeyError:
            raise KeyError(f"no config key {analyzer}.{key}") from None

    def section(self, analyzer: str) -> dict[str, Any]:
        return dict(self._section(analyzer))

    def set(self, dotted: str, value: Any, source: str = "override") -> None:
        analyzer, sep, key = dotted.partition(".")
        if not sep or analyzer not in DEFAULTS:
            raise GpudoctorError(f"config: unknown analyzer in {dotted!r} (known: {', '.join(DEFAULTS)})")
        if key not in DEFAULTS[analyzer]:
            raise GpudoctorError(f"config: unknown key {dotted!r} (known for {analyzer}: {', '.join(DEFAULTS[analyzer])})")
        self._section(analyzer)[key] = _coerce(value, DEFAULTS[analyzer][key][0], dotted)
        self.sources[dotted] = source

    def update(self, overrides: dict[str, Any] | list[str] | None, source: str = "override") -> "Config":
        """Apply ``{"analyzer.key": value}`` or ``["analyzer.key=value", ...]``. Returns self."""
        if not overrides:
            return self
        items = overrides.items() if isinstance(overrides, dict) else (_split_assignment(s) for s in overrides)
        for k, v in items:
            self.set(k, v, source)
        return self

    def with_overrides(self, overrides: dict[str, Any] | list[str] | None) -> "Config":
        """A copy with ``overrides`` applied."""
        return copy.deepcopy(self).update(overrides)

    def threshold(self, analyzer: str, key: str) -> float:
        """The analyzer's own value of ``key`` (medium_fraction / high_fraction / low_fraction) or the general one."""
        own = self._section(analyzer).get(key) if analyzer in DEFAULTS else None
        return float(own) if own is not None else float(self.values["severity"][key])

    def severity(self, fraction: float, analyzer: str | None = None) -> str:
        """The general severity rule applied to a cost ``fraction`` of the steady-state window."""
        a = analyzer or "severity"
        return severity_for(fraction, self.threshold(a, "medium_fraction"), self.threshold(a, "high_fraction"),
                            self.threshold(a, "low_fraction"))

    def enabled(self, analyzer: str) -> bool:
        return analyzer not in self.disabled

    def describe(self) -> dict[str, Any]:
        """Every non-default value and where it came from (for reports)."""
        return {k: {"value": self.values[k.split(".")[0]][k.split(".", 1)[1]], "source": s} for k, s in sorted(self.sources.items())}


def severity_for(fraction: float, medium: float = 0.05, high: float = 0.15, low: float = 0.01) -> str:
    """THE severity rule: a problem costing ``fraction`` of the steady-state window is

    high if fraction >= high (15%), medium if >= medium (5%), low if >= low (1%), else info.
    NaN (cost unknown) is info. Analyzers whose cost is not a share of the window (memory_bound_decode,
    gpu_idle) document their own thresholds and call this with them.
    """
    if fraction is None or not math.isfinite(fraction):
        return "info"
    if fraction >= high:
        return "high"
    if fraction >= medium:
        return "medium"
    if fraction >= low:
        return "low"
    return "info"


def _split_assignment(text: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise GpudoctorError(f"config override expects ANALYZER.KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _load_ceilings_file(path: Path) -> dict:
    data = read_json_file(path, "measured ceilings")  # a regular file, size and depth limits
    if not isinstance(data, dict):
        raise GpudoctorError(f"{path}: measured ceilings must be a JSON object")
    return data


def from_toml(data: dict, origin: str = "gpudoctor.toml", base_dir: Path | None = None) -> Config:
    """A Config from parsed gpudoctor.toml data."""
    cfg = Config()
    analyzers = data.get("analyzers", {})
    if not isinstance(analyzers, dict):
        raise GpudoctorError(f"{origin}: [analyzers] must be a table")
    for name, table in analyzers.items():
        if name == "disable":
            if not isinstance(table, list) or not all(isinstance(x, str) for x in table):
                raise GpudoctorError(f"{origin}: analyzers.disable must be a list of analyzer ids")
            unknown = [x for x in table if x not in analyzer_ids()]
            if unknown:
                raise GpudoctorError(f"{origin}: analyzers.disable names unknown analyzers {unknown}")
            cfg.disabled |= set(table)
            continue
        if not isinstance(table, dict):
            raise GpudoctorError(f"{origin}: analyzers.{name} must be a table")
        for key, value in table.items():
            cfg.set(f"{name}.{key}", value, source=origin)
    if "ceilings" in data:
        if not isinstance(data["ceilings"], dict):
            raise GpudoctorError(f"{origin}: [ceilings] must be a table")
        cfg.ceilings = dict(data["ceilings"])
    if "ceilings_file" in data:
        p = Path(data["ceilings_file"])
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        cfg.ceilings = _load_ceilings_file(p)
    return cfg


def read_toml(p: Path) -> dict:
    """A gpudoctor.toml as a dict, or a one-line GpudoctorError naming the file."""
    data = read_small_file(p, "a gpudoctor.toml config")  # a regular file within GPUDOCTOR_MAX_CONFIG_MB
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise GpudoctorError(f"{p}: not valid TOML: invalid UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise GpudoctorError(f"{p}: not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                ceilings: dict | str | Path | None = None) -> Config:
    """Defaults, then ``path`` (gpudoctor.toml; None: ./gpudoctor.toml when present), then ``overrides``.

    ``ceilings``: measured ceilings as a dict or a JSON file path (replaces any in the toml).
    """
    if path is None and Path("gpudoctor.toml").is_file():
        path = Path("gpudoctor.toml")
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        data = read_toml(p)
        cfg = from_toml(data, origin=str(p), base_dir=p.parent)
    if ceilings is not None:
        cfg.ceilings = ceilings if isinstance(ceilings, dict) else _load_ceilings_file(Path(ceilings))
    return cfg.update(overrides)


def as_config(config: Config | dict | None) -> Config:
    """Accept a Config, a dict of dotted overrides, or None (defaults)."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config().update(config)
    raise TypeError(f"config must be a Config, a dict of overrides or None, not {type(config).__name__}")
