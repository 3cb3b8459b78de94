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

Every analyzer declares its settings (analyzers/spec.py; the registry lists them all): unknown analyzers
or keys are an error (a typo must not silently keep the default), and so is a value the setting cannot take
(an invalid regular expression, a negative count, a fraction above 1, a 400-digit number). docs/analyzers.md
explains every key.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpudoctor.analyzers.findings import severity_for
from gpudoctor.analyzers.registry import ANALYZERS, SECTIONS, SEVERITY
from gpudoctor.analyzers.spec import Setting, SettingError
from gpudoctor.errors import GpudoctorError
from gpudoctor.readers.limits import read_json_file, read_small_file


def _setting(dotted: str) -> Setting:
    """The declared setting ``analyzer.key``, or a one-line GpudoctorError naming what is unknown."""
    analyzer, sep, key = dotted.partition(".")
    if not sep or analyzer not in SECTIONS:
        raise GpudoctorError(f"config: unknown analyzer in {dotted!r} (known: {', '.join(SECTIONS)})")
    for s in SECTIONS[analyzer]:
        if s.key == key:
            return s
    raise GpudoctorError(f"config: unknown key {dotted!r} (known for {analyzer}: "
                         f"{', '.join(s.key for s in SECTIONS[analyzer])})")


def _defaults() -> dict[str, dict[str, Any]]:
    return {a: {s.key: s.default for s in settings} for a, settings in SECTIONS.items()}


@dataclass
class Config:
    """Resolved thresholds of every analyzer, where each value came from, and measured ceilings."""

    values: dict[str, dict[str, Any]] = field(default_factory=_defaults)
    sources: dict[str, str] = field(default_factory=dict)  # "analyzer.key" -> "gpudoctor.toml" | "override"
    disabled: set[str] = field(default_factory=set)
    ceilings: dict | None = None

    def get(self, analyzer: str, key: str) -> Any:
        try:
            return self.values[analyzer][key]
        except KeyError:
            raise KeyError(f"no config key {analyzer}.{key}") from None

    def section(self, analyzer: str) -> dict[str, Any]:
        return dict(self.values[analyzer])

    def set(self, dotted: str, value: Any, source: str = "override") -> None:
        """Set ``analyzer.key`` to ``value`` (a TOML value or a command-line string), validated against its
        declaration: an unknown key or a value it cannot take is a one-line GpudoctorError."""
        setting = _setting(dotted)
        try:
            checked = setting.validate(value)
        except SettingError as e:
            raise GpudoctorError(f"config {dotted}: {e}") from None
        analyzer = dotted.partition(".")[0]
        self.values[analyzer][setting.key] = checked
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
        own = self.values.get(analyzer, {}).get(key)
        return float(own) if own is not None else float(self.values[SEVERITY][key])

    def severity(self, fraction: float, analyzer: str | None = None) -> str:
        """The general severity rule applied to a cost ``fraction`` of the steady-state window."""
        a = analyzer or SEVERITY
        return severity_for(fraction, self.threshold(a, "medium_fraction"), self.threshold(a, "high_fraction"),
                            self.threshold(a, "low_fraction"))

    def enabled(self, analyzer: str) -> bool:
        return analyzer not in self.disabled

    def describe(self) -> dict[str, Any]:
        """Every non-default value and where it came from (for reports)."""
        return {k: {"value": self.values[k.split(".")[0]][k.split(".", 1)[1]], "source": s} for k, s in sorted(self.sources.items())}


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
            unknown = [x for x in table if x not in ANALYZERS]
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
