"""The audit's checks, one class each, found here: every module of this package defines
checks with @register (base.py), and REGISTRY holds them in their declared order.

    integrity.py   rules, logits, deployed kernels, NaN/Inf, conservation: is the explainer
                   faithful to the model it explains?
    reach.py       how much of the explained logit reaches the input
    accuracy.py    labelled images predicted right
    strategies.py  per class: Clever Hans regions and separate SpRAy strategies
    sanity.py      model-parameter randomisation and random logit
    drift.py       against a second model: predictions and explanations

A new check is one class in one of these modules (or in a new module here): findings.CHECKS,
DEFAULT_FAIL_ON, --fail-on, the report and report.json read the registry.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import _FOUND, NEEDS, Check, NotRun, Observation, Outcome, register, unregister

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

#: every check, by name, in the order they run and are listed (register() keeps it so)
REGISTRY: dict[str, Check] = _FOUND

__all__ = ["NEEDS", "REGISTRY", "Check", "NotRun", "Observation", "Outcome", "register", "unregister"]
