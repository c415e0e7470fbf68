"""Against a second model file (--against): do the two predict and explain the images alike?"""
from __future__ import annotations

import numpy as np

from .base import Check, NotRun, Observation, Outcome, register


@register
class DriftAgreement(Check):
    name, order, threshold, direction = "drift-agreement", 120, 0.95, "below"
    summary = "share of images the other model predicts alike"
    fails_by_default = True
    needs = ("explained", "against")

    def run(self, data):
        drift = data.drift
        changed = tuple(data.names[i] for i in drift.most_changed())
        return Outcome(drift.agreement, (Observation(drift.agreement, f"the other model predicts {drift.agreement:.1%} "
                                                                      "of the images alike", images=changed),))


@register
class DriftExplanation(Check):
    name, order, threshold, direction = "drift-explanation", 130, 0.95, "below"
    summary = "mean rank correlation of the two models' heatmaps"
    needs = ("explained", "against")

    def run(self, data):
        drift = data.drift
        changed = tuple(data.names[i] for i in drift.most_changed())
        return Outcome(drift.correlation, (Observation(drift.correlation, f"the two models' heatmaps have a mean rank "
                                                                          f"correlation of {drift.correlation:.2f}",
                                                       images=changed),))


@register
class ConceptDrift(Check):
    # Five concepts per class: one of them changing is 0.8; below 0.6 two or more did.
    name, order, threshold, direction = "drift-concepts", 140, 0.6, "below"
    summary = ("per class, the share of its top concepts that the --against model's predictions rest on too "
               "(channels matched by their activations)")
    informational = True
    needs = ("explained", "against", "concepts")

    def run(self, data):
        agreement = data.concepts.agreement
        if agreement is None:
            return NotRun(f"no layer {data.concepts.layer} in the --against model")
        value = float(np.mean(list(agreement.values()))) if agreement else float("nan")
        return Outcome(value, tuple(
            Observation(share, f"class '{name}': {share:.0%} of its top concepts are the --against model's too",
                        name) for name, share in agreement.items()), records={"drift-concepts-per-class": agreement})
