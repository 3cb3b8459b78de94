"""The gate's options, from (later wins) the defaults < a calibrated baseline < gpudoctor.toml's [gate]
table < the command line; every value checked, a one-line error otherwise (docs/ci.md lists the keys)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from gpudoctor.analyzers.config import Config, from_toml, load_config, read_toml
from gpudoctor.errors import GpudoctorError
from gpudoctor.gate.compare import GateOptions
from gpudoctor.gate.rules import KNOWN_ANALYZERS, RULE_KEYS, validate_rules
from gpudoctor.gate.run import METRICS, UserMetric

GATE_KEYS = {"tolerance", "tolerances", "min_steps", "alpha", "confidence", "bootstrap", "seed", "inconclusive",
             "metrics", "user_metrics", "baseline_dir", "top"}
INCONCLUSIVE_MODES = ("pass", "fail", "exit3")


@dataclass
class CommandLine:
    """The gate options given on the command line (they win over gpudoctor.toml); None: not given."""

    tolerance: float | None = None
    inconclusive: str | None = None
    min_steps: int | None = None
    metrics: str | None = None  # comma-separated
    allow_mismatch: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CommandLine:
        return cls(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)})


def _config_path(path: str | None) -> Path | None:
    if path:
        return Path(path)
    p = Path("gpudoctor.toml")
    return p if p.is_file() else None


@dataclass
class GateSetup:
    """What the gate's commands take from gpudoctor.toml, read once: its [gate] table, the analyzers'
    config, and where baselines live (the command line's directory, else the table's)."""

    table: dict
    analyzers: Config
    baseline_dir: str | None


def read_setup(path: str | None, baseline_dir: str | None = None) -> GateSetup:
    """gpudoctor.toml (``path``, else ./gpudoctor.toml if there is one) read and checked once."""
    p = _config_path(path)
    doc = read_toml(p) if p is not None else {}
    table = _gate_table(p, doc)
    analyzers = from_toml(doc, origin=str(p), base_dir=p.parent) if p is not None else Config()
    return GateSetup(table, analyzers, baseline_dir or table.get("baseline_dir"))


def _gate_table(p: Path | None, doc: dict) -> dict:
    """The [gate] table of a parsed gpudoctor.toml; unknown keys are an error."""
    gate = doc.get("gate", {})
    if not isinstance(gate, dict):
        raise GpudoctorError(f"{p}: [gate] must be a table")
    unknown = set(gate) - GATE_KEYS - set(RULE_KEYS)
    if unknown:
        raise GpudoctorError(f"{p}: unknown [gate] keys {sorted(unknown)} (known: {', '.join(sorted(GATE_KEYS | set(RULE_KEYS)))})")
    return gate


def analyzer_config(path: str | None) -> Config:
    return load_config(path, [])


def _num(cfg: dict, key: str, kind: type = float, lo: float | None = None, hi: float | None = None) -> float:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise GpudoctorError(f"gate.{key} must be a number, not {v!r}")
    if kind is int and not float(v).is_integer():
        raise GpudoctorError(f"gate.{key} must be a whole number, not {v!r}")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise GpudoctorError(f"gate.{key} = {v} is out of range [{lo}, {hi}]")
    return v


def user_metrics_from(cfg: dict) -> list[UserMetric]:
    """[gate.user_metrics.NAME] tables: numbers the program prints, found with a regex."""
    out = []
    table = cfg.get("user_metrics") or {}
    if not isinstance(table, dict):
        raise GpudoctorError("gate.user_metrics must be a table of tables: [gate.user_metrics.tokens_per_s]")
    for name, spec in table.items():
        if name in METRICS:
            raise GpudoctorError(f"gate.user_metrics.{name}: the name is taken by a built-in metric")
        if not isinstance(spec, dict) or not isinstance(spec.get("regex"), str):
            raise GpudoctorError(f"gate.user_metrics.{name} needs regex = '...' (one capture group: the number)")
        extra = set(spec) - {"regex", "higher_is_better", "unit", "files", "gate", "label"}
        if extra:
            raise GpudoctorError(f"gate.user_metrics.{name}: unknown keys {sorted(extra)}")
        kw = {k: spec[k] for k in ("higher_is_better", "unit", "gate", "label") if k in spec}
        if "files" in spec:
            files = spec["files"]
            kw["files"] = tuple([files] if isinstance(files, str) else files)
        out.append(UserMetric(name=name, regex=spec["regex"], **kw))
    return out


def build_options(cli: CommandLine, cfg: dict, baseline_tolerances: dict | None = None) -> GateOptions:
    """GateOptions from (later wins) defaults < calibrated baseline < gpudoctor.toml [gate] < command line."""
    o = GateOptions()
    for metric, tol in (baseline_tolerances or {}).items():
        o.tolerances[metric] = tol
    if "gpu_time" in (baseline_tolerances or {}):
        o.tolerance, o.tolerance_source = baseline_tolerances["gpu_time"], "calibrated baseline"
    _from_toml(o, cfg)
    if cli.tolerance is not None:
        if not (0 <= cli.tolerance <= 10):
            raise GpudoctorError("--tolerance is a relative change, e.g. 0.03 for 3%")
        o.tolerance, o.tolerance_source, o.tolerances = cli.tolerance, "--tolerance", {}
    if cli.inconclusive:
        o.inconclusive = cli.inconclusive
    if cli.min_steps is not None:
        if cli.min_steps < 2:
            raise GpudoctorError("--min-steps must be at least 2")
        o.min_samples = cli.min_steps
    if cli.metrics:
        o.gated = tuple(x.strip() for x in cli.metrics.split(",") if x.strip())
    if cli.allow_mismatch:
        o.allow_mismatch = True
    return o


def _from_toml(o: GateOptions, cfg: dict) -> None:
    if "tolerance" in cfg:
        o.tolerance, o.tolerance_source = _num(cfg, "tolerance", float, 0.0, 10.0), "gpudoctor.toml"
        o.tolerances = {}
    if "tolerances" in cfg:
        if not isinstance(cfg["tolerances"], dict):
            raise GpudoctorError("gate.tolerances must be a table: metric = relative tolerance")
        for k in cfg["tolerances"]:
            o.tolerances[k] = _num(cfg["tolerances"], k, float, 0.0, 10.0)
    if "min_steps" in cfg:
        o.min_samples = int(_num(cfg, "min_steps", int, 2, None))
    if "alpha" in cfg:
        o.alpha = _num(cfg, "alpha", float, 1e-9, 0.5)
    if "confidence" in cfg:
        o.confidence = _num(cfg, "confidence", float, 0.5, 0.9999)
    if "bootstrap" in cfg:
        o.bootstrap = int(_num(cfg, "bootstrap", int, 100, 1_000_000))
    if "seed" in cfg:
        o.seed = int(_num(cfg, "seed", int, 0, None))
    if "top" in cfg:
        o.top = int(_num(cfg, "top", int, 1, 1000))
    if "inconclusive" in cfg:
        if cfg["inconclusive"] not in INCONCLUSIVE_MODES:
            raise GpudoctorError(f"gate.inconclusive must be one of {', '.join(INCONCLUSIVE_MODES)}")
        o.inconclusive = cfg["inconclusive"]
    if "metrics" in cfg:
        m = cfg["metrics"]
        if not isinstance(m, list) or not all(isinstance(x, str) for x in m):
            raise GpudoctorError("gate.metrics must be a list of metric names")
        o.gated = tuple(m)
    o.user_metrics = user_metrics_from(cfg)
    o.rules = validate_rules({k: v for k, v in cfg.items() if k in RULE_KEYS}, known_analyzers=KNOWN_ANALYZERS)
