"""Findings, the thresholds of the checks that produce them (--fail-on), and the verdict.

A finding is a check whose measured value crosses its threshold. Checks named in the
audit's fail-on set make it *fail* (severity "fail", exit 1); the others are reported as
"warning". ``--fail-on CHECK[=THRESHOLD]`` adds a check or moves its threshold.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import SettingError
from .checks import REGISTRY, Check


#: every check, by name (the registry: one class each in audit/checks/)
CHECKS: dict[str, Check] = REGISTRY

#: what fails an audit unless --fail-on says otherwise
DEFAULT_FAIL_ON = tuple(name for name, check in CHECKS.items() if check.fails_by_default)
SEVERITIES = ("fail", "warning")


@dataclass(frozen=True)
class FailOn:
    """The checks that fail the audit, with their thresholds."""

    thresholds: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, specs: list[str] | None) -> FailOn:
        """["clever-hans=0.3", "accuracy=0.9", ...]; None: the defaults. "none" fails on nothing."""
        if not specs:
            return cls(tuple((name, CHECKS[name].threshold) for name in DEFAULT_FAIL_ON))
        chosen: dict[str, float] = {}
        for spec in specs:
            for part in filter(None, (p.strip() for p in spec.split(","))):
                if part == "none":
                    continue
                name, _, value = part.partition("=")
                if name not in CHECKS:
                    raise SettingError(f"--fail-on: unknown check '{name}'; choose from "
                                       f"{', '.join(c.name for c in CHECKS.values() if not c.informational)}")
                if CHECKS[name].informational:
                    raise SettingError(f"--fail-on: '{name}' is informational (reported, never failing the audit)")
                try:
                    chosen[name] = float(value) if value else CHECKS[name].threshold
                except ValueError:
                    raise SettingError(f"--fail-on: '{value}' is not a number (in '{part}')") from None
        return cls(tuple(chosen.items()))

    def threshold(self, name: str) -> float:
        return dict(self.thresholds).get(name, CHECKS[name].threshold)

    def fails(self, name: str) -> bool:
        return name in dict(self.thresholds)


@dataclass
class Finding:
    check: str
    severity: str
    message: str
    value: float
    threshold: float
    class_: str | None = None  # the class it concerns, where there is one
    images: list[str] = field(default_factory=list)  # the images that support it

    def to_dict(self) -> dict:
        data = asdict(self)
        data["class"] = data.pop("class_")
        return data


def crosses(name: str, value: float, threshold: float) -> bool:
    return value > threshold if CHECKS[name].direction == "above" else value < threshold


def finding(fail_on: FailOn, name: str, value: float, message: str, class_: str | None = None,
            images: list[str] | None = None) -> Finding | None:
    """A finding where `value` crosses the check's threshold (or, a warning, its warn_at), else None."""
    threshold = fail_on.threshold(name)
    warn_at = CHECKS[name].warn_at
    if crosses(name, value, threshold):
        severity = "fail" if fail_on.fails(name) else "warning"
    elif warn_at is not None and crosses(name, value, warn_at):
        severity, threshold = "warning", warn_at
    else:
        return None
    return Finding(name, severity, message, float(value), float(threshold), class_, list(images or []))
