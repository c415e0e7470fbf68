"""Against a second model file (--against): do the two predict and explain the images alike?"""
from __future__ import annotations

from .base import Check, Observation, Outcome, register


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
