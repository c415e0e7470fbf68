"""How much of the explained logit reaches the input, and where the rest went."""
from __future__ import annotations

import numpy as np

from ...lrp import reach
from .base import Check, NotRun, Observation, Outcome, register


@register
class Reach(Check):
    # A heatmap drawn from 0.01 % of the logit still looks like one: below 1 % the explanations
    # say little about the model; below 10 % they are worth a look.
    name, order, threshold, direction = "reach", 50, 0.01, "below"
    summary = ("median share of the explained logit that reaches the input (the rest is taken by biases, "
               "stabilisers and saturated activations)")
    warn_at = 0.10
    fails_by_default = True

    def run(self, data):
        reached = np.asarray(data.images.reach, np.float64)
        finite = np.isfinite(reached)
        if not finite.any():
            return NotRun("gradients conserve nothing")
        median = float(np.median(reached[finite]))
        taken = np.median(np.asarray(data.images.taken, np.float64)[finite], axis=0)
        worst = [data.names[i] for i in np.argsort(np.where(finite, reached, np.inf))[:6]]
        advice = reach.advice(data.options.bias, taken[None], data.options.preset.name)
        message = (f"only {reach.describe(median, taken)} (median over {int(finite.sum())} images): the heatmaps are "
                   f"drawn from that remainder; {advice}")
        return Outcome(median, (Observation(median, message, images=tuple(worst)),),
                       records={"reach_taken": {family: float(t) for family, t in zip(reach.FAMILIES, taken)}})
