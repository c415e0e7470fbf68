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


#: what compared() measures per image (besides the other model's prediction)
MEASURES = ("rank_correlation", "top_overlap", "ssim")


def compared(heatmap: np.ndarray, other_heatmap: np.ndarray) -> dict[str, float]:
    """One image's two maps compared (worked out per batch, as the maps arrive)."""
    return {"rank_correlation": rank_correlation(heatmap, other_heatmap),
            "top_overlap": top_overlap(heatmap, other_heatmap), "ssim": ssim(heatmap, other_heatmap)}


def from_measures(other: str, predictions: np.ndarray, other_predictions: np.ndarray,
                  measures: dict[str, np.ndarray]) -> Drift:
    """The drift from the per-image measures (compared()) and both models' predictions."""
    rows = [{**{k: float(measures[k][i]) for k in MEASURES}, "other_prediction": int(p)}
            for i, p in enumerate(other_predictions)]
    return Drift(other, float(np.mean(predictions == other_predictions)), rows)


def compare(other: str, predictions: np.ndarray, other_predictions: np.ndarray, heatmaps: np.ndarray,
            other_heatmaps: np.ndarray) -> Drift:
    rows = [compared(a, b) for a, b in zip(heatmaps, other_heatmaps)]
    return from_measures(other, predictions, other_predictions,
                         {k: np.array([r[k] for r in rows], np.float64) for k in MEASURES})
