"""What an analyzer declares about itself: its id, its settings (default, meaning, unit, what values are
valid), the evidence its findings carry, and whether it needs every rank at once.

Each analyzer module ends with ``SPEC = AnalyzerSpec(...)``; ``registry.ANALYZERS`` lists them. The config
(``gpudoctor.toml``, ``--set``), its validation, the settings table of docs/analyzers.md and the parallel
path are built from these declarations, so a setting exists everywhere as soon as it is declared here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from gpudoctor.analyzers.findings import Finding

if TYPE_CHECKING:  # annotations only; every analyzer module imports both this module and the context
    from gpudoctor.analyzers.context import AnalysisContext

KINDS = ("number", "integer", "text", "regex", "choice")

# Values beyond these are a typo or an attack (a 400-digit number), never a threshold.
_MAX_INTEGER = 2**62
_MAX_NUMBER = 1e18


class SettingError(ValueError):
    """A value a setting cannot take; the message says why in a few words."""


@dataclass(frozen=True)
class Setting:
    """One key of an analyzer's section of the config.

    ``kind``: number | integer | text | regex | choice (taken from ``default`` when it is not None).
    ``unit``: what the number counts (fraction, ns, bytes, GB/s, count, x...), for the docs.
    ``minimum`` / ``maximum``: the valid range of a number (inclusive). ``choices``: the valid texts.
    ``None`` defaults are facts about the workload that only the user knows (model size, batch).
    """

    key: str
    default: Any
    meaning: str
    unit: str = ""
    kind: str = ""
    minimum: float | None = 0.0
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.kind:
            d = self.default
            kind = ("choice" if self.choices else "text" if isinstance(d, str)
                    else "integer" if isinstance(d, int) and not isinstance(d, bool) else "number")
            object.__setattr__(self, "kind", kind)
        if self.kind not in KINDS:
            raise ValueError(f"setting {self.key}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.default is not None:
            self.validate(self.default)

    def validate(self, value: Any) -> Any:
        """``value`` (a TOML value or a command-line string) as this setting's type, or SettingError."""
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            if self.default is not None:
                raise SettingError("a value is required")
            return None
        if self.kind in ("text", "regex", "choice"):
            text = str(value)
            if self.kind == "regex":
                try:
                    re.compile(text)
                except re.error as e:
                    raise SettingError(f"invalid regular expression ({e})") from None
            if self.kind == "choice" and text not in self.choices:
                raise SettingError(f"expected one of {', '.join(self.choices)}")
            return text
        number = _number(value)
        if self.kind == "integer":
            if not float(number).is_integer():
                raise SettingError("expected a whole number")
            number = int(number)
            if abs(number) > _MAX_INTEGER:
                raise SettingError("number out of range")
        else:
            number = float(number)
            if abs(number) > _MAX_NUMBER:
                raise SettingError("number out of range")
        if self.minimum is not None and number < self.minimum:
            raise SettingError(f"must be at least {self.minimum:g}")
        if self.maximum is not None and number > self.maximum:
            raise SettingError(f"must be at most {self.maximum:g}")
        return number


def _number(value: Any) -> int | float:
    if isinstance(value, bool):
        raise SettingError("expected a number")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 40:
            raise SettingError("number out of range")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise SettingError(f"expected a number, got {text!r}") from None
    if not isinstance(value, (int, float)):
        raise SettingError(f"expected a number, got {value!r}")
    if isinstance(value, int) and abs(value) > _MAX_INTEGER:
        raise SettingError("number out of range")
    if not math.isfinite(float(value)):
        raise SettingError("expected a finite number")
    return value


def fraction(key: str, default: float | None, meaning: str) -> Setting:
    """A share of something (of the window, of a step...): between 0 and 1."""
    return Setting(key, default, meaning, unit="fraction", kind="number", maximum=1.0)


@dataclass(frozen=True)
class AnalyzerSpec:
    """An analyzer: ``analyze(ctx) -> list[Finding]`` plus what it declares.

    ``evidence``: key -> meaning of what its findings' ``evidence`` may hold (``window_start_ns`` is added to
    every finding by the runner). ``cross_rank``: it needs every rank of the run at once (the parallel path
    runs it after the reduce instead of on a worker).
    """

    id: str
    analyze: Callable[[AnalysisContext], list[Finding]]
    settings: tuple[Setting, ...] = ()
    evidence: tuple[tuple[str, str], ...] = ()
    cross_rank: bool = False

    def setting(self, key: str) -> Setting:
        for s in self.settings:
            if s.key == key:
                return s
        raise KeyError(key)

    @property
    def defaults(self) -> dict[str, Any]:
        return {s.key: s.default for s in self.settings}


SEVERITY_OVERRIDES = (
    fraction("medium_fraction", None, "own override of severity.medium_fraction (estimated saving / window)"),
    fraction("high_fraction", None, "own override of severity.high_fraction"),
)
"""The keys an analyzer that follows the general severity rule may declare to override its thresholds."""

GENERAL_SEVERITY = (
    fraction("medium_fraction", 0.05, "a problem costing at least this fraction of the steady-state window is medium"),
    fraction("high_fraction", 0.15, "... at least this fraction is high"),
    fraction("low_fraction", 0.01, "below this fraction it is info, between this and medium_fraction low"),
)
"""The ``[analyzers.severity]`` section: the rule every analyzer's severity follows unless it says otherwise."""
