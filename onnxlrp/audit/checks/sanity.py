"""Sanity of the explainer on the first images (Adebayo et al. 2018): the maps must change when
the weights are randomised, and when another class is explained."""
from __future__ import annotations

import numpy as np

from .. import sanity
from ..statistics import rank_correlation
from .base import Check, NotRun, Observation, Outcome, register


@register
class Randomisation(Check):
    name, order, threshold, direction = "randomisation", 100, 0.5, "above"
    summary = ("rank correlation of |heatmap| with that of the model with every layer's weights randomised "
               "(they must change)")
    needs = ("explained", "sanity images")

    def run(self, data):
        maps = data.sanity
        cascade = sanity.Randomisation([(label, count, sanity.correlation(maps.heatmaps, randomised))
                                        for label, count, randomised in maps.randomised])
        if not cascade.steps:  # no float weights to randomise (an int8 model): nothing recorded
            return Outcome(None, detail=cascade, recorded=False)
        return Outcome({label: corr for label, _, corr in cascade.steps},
                       (Observation(cascade.final, f"with every layer's weights randomised, the heatmaps keep a rank "
                                                   f"correlation of {cascade.final:.2f} with the model's own: they say "
                                                   "little about the model"),), detail=cascade)


@register
class RandomLogit(Check):
    name, order, threshold, direction = "random-logit", 110, 0.9, "above"
    summary = ("rank correlation of |heatmap| for the predicted class and for a random other class (they "
               "must differ)")
    needs = ("explained", "sanity images")

    def run(self, data):
        maps = data.sanity
        if maps.other_class is None:
            return NotRun("one output (no other class to explain)")
        value = float(np.mean([rank_correlation(np.abs(a), np.abs(b)) for a, b in zip(maps.heatmaps, maps.other_class)]))
        return Outcome(value, (Observation(value, f"explaining a random other class gives nearly the same maps (rank "
                                                  f"correlation {value:.2f}): the explanations barely depend on the "
                                                  "class"),))
