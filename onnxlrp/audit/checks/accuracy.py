"""Share of the labelled images the model predicts right."""
from __future__ import annotations

import numpy as np

from .base import Check, Observation, Outcome, register


@register
class Accuracy(Check):
    name, order, threshold, direction = "accuracy", 70, 0.0, "below"
    summary = "share of labelled images predicted right"
    needs = ("explained", "labels")

    def run(self, data):
        if not len(data.names):
            return None
        correct = [bool(label == target) for label, target in zip(data.sample.labels, data.images.targets)]
        accuracy = float(np.mean(correct))
        wrong = tuple(name for name, right in zip(data.names, correct) if not right)[:12]
        return Outcome(accuracy, (Observation(accuracy, f"accuracy {accuracy:.1%}", images=wrong),))
