"""What a check is: a name, a threshold, what it needs, and run(data) that measures.

A check measures; it does not judge. run() returns an Outcome: the value Audit.checks records
under its name, and observations, each a value with what to say about it; the audit
(audit.run) judges every observation against the check's threshold (or its --fail-on
threshold) and makes a Finding where it crosses. A check whose needs the data does not meet
does not run: where the data could have had it (labels, masks), Audit.not_run says why;
where nobody asked for it (no --against, no sanity images), it is simply absent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:
    from ..data import AuditData

#: what a check may need, and what Audit.not_run says when the data lacks it (None: the user
#: did not ask for it, so the check is absent without a word, as a drift check without --against)
NEEDS: dict[str, str | None] = {
    "explained": None,  # the model was explained (not the no-rule case, where only the rules check runs)
    "labels": "no labels",  # class folders or a labels file
    "masks": "no masks",  # object masks for (some of) the images
    "against": None,  # a second model (--against)
    "faithfulness": None,  # Insertion/Deletion curves (--faithfulness)
    "sanity images": None,  # images explained again by the sanity checks (--sanity-images)
    "concepts": "no concepts (--no-concepts, or no last conv block)",  # a concept layer (audit.concepts)
}
DIRECTIONS = ("above", "below")


@dataclass(frozen=True)
class Observation:
    """A measured value to judge against the check's threshold, and what a finding would say."""

    value: float
    message: str
    class_: str | None = None  # the class it concerns, where there is one
    images: tuple[str, ...] = ()  # the images that support it


@dataclass(frozen=True)
class Outcome:
    """What one check measured."""

    value: Any  # what Audit.checks records under the check's name
    observations: tuple[Observation, ...] = ()
    records: Mapping[str, Any] = field(default_factory=dict)  # further entries of Audit.checks
    detail: Any = None  # what the audit keeps beside the value, for the report (Audit.details)
    recorded: bool = True  # False: the check ran but has no value for Audit.checks


@dataclass(frozen=True)
class NotRun:
    """The check could not run on this data; why goes to Audit.not_run."""

    why: str


class Check:
    """One audit check. Subclasses set the class attributes and write run(); @register adds
    them to the registry (checks/__init__.py), which findings.CHECKS, --fail-on, the report
    and report.json read."""

    name: ClassVar[str]
    threshold: ClassVar[float]
    direction: ClassVar[str]  # "above": a value above the threshold is a finding; "below": under it
    summary: ClassVar[str]
    order: ClassVar[int]  # where it stands among the checks (the order they run in and are listed)
    informational: ClassVar[bool] = False  # reported (a warning above the threshold), never failing: not for --fail-on
    warn_at: ClassVar[float | None] = None  # a second threshold, short of the first: crossing it is a warning
    fails_by_default: ClassVar[bool] = False  # in the fail-on set unless --fail-on says otherwise
    needs: ClassVar[tuple[str, ...]] = ("explained",)  # names from NEEDS, checked in this order

    def run(self, data: AuditData) -> Outcome | NotRun | None:
        """Measure on the collected data (None: nothing to record)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<check {self.name}: {self.direction} {self.threshold}>"


_FOUND: dict[str, Check] = {}


def register(cls: type[Check]) -> type[Check]:
    """Class decorator: one instance of the check in the registry."""
    missing = [a for a in ("name", "threshold", "direction", "summary", "order") if not hasattr(cls, a)]
    if missing or cls.direction not in DIRECTIONS or not set(cls.needs) <= set(NEEDS):
        raise TypeError(f"check {cls.__name__}: declare name, threshold, direction ({'/'.join(DIRECTIONS)}), "
                        f"summary, order and needs from {', '.join(NEEDS)} (missing: {', '.join(missing) or 'none'})")
    if cls.name in _FOUND:
        raise TypeError(f"two checks named '{cls.name}'")
    _FOUND[cls.name] = cls()
    ordered = sorted(_FOUND.items(), key=lambda item: item[1].order)  # in place: the registry is this dict
    _FOUND.clear()
    _FOUND.update(ordered)
    return cls


def unregister(name: str) -> None:
    """Take a check out of the registry (a test's own check, when the test is done)."""
    del _FOUND[name]
