"""Drift against another model file (the previous release, or the float source of an int8
deployment): the same images explained by both, for the class the deployed model predicts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .statistics import rank_correlation, ssim, top_overlap


@dataclass
class Drift:
    other: str
    agreement: float  # share of images predicted alike
    per_image: list[dict]  # rank correlation, top-10 % overlap, SSIM, other prediction

    @property
    def correlation(self) -> float:
        return float(np.mean([row["rank_correlation"] for row in self.per_image]))

    def most_changed(self, count: int = 6) -> list[int]:
        return [int(i) for i in np.argsort([row["rank_correlation"] for row in self.per_image])[:count]]


def compare(other: str, predictions: np.ndarray, other_predictions: np.ndarray, heatmaps: np.ndarray,
            other_heatmaps: np.ndarray) -> Drift:
    rows = [{"rank_correlation": rank_correlation(a, b), "top_overlap": top_overlap(a, b), "ssim": ssim(a, b),
             "other_prediction": int(p)} for a, b, p in zip(heatmaps, other_heatmaps, other_predictions)]
    return Drift(other, float(np.mean(predictions == other_predictions)), rows)
