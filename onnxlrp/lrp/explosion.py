"""Relevance that explodes: found, kept out of heatmaps, and reported in one line.

Rules that divide by sums which can vanish (epsilon with a tiny epsilon, gamma and
alpha-beta without biases) can blow relevance up layer by layer until it overflows to
Inf and NaN. A heatmap must never carry that on silently: NaN and Inf become 0, and an
image whose input relevance sums to, or peaks at, more than FACTOR times the initial
relevance is reported, naming the preset, the first merge (going down from the output)
where it was seen, and what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: "Far beyond the initial relevance". A conserving rule keeps the input total at the
#: initial relevance; biases and stabilisers move it by a fraction of it, not a thousandfold.
FACTOR = 1e3
_TINY = float(np.finfo(np.float32).tiny)
MODEL_OUTPUT = "the model's own output"  # Explosion.where when the logits themselves are NaN/Inf


@dataclass(frozen=True)
class Explosion:
    """Exploded images of one run (or of several, combined with `+`)."""

    images: int  # how many images exploded
    of: int  # out of how many
    worst: float  # largest max(|sum R|, max |R|) / |initial relevance|; inf for NaN or Inf
    where: str | None  # the first merge, going down from the output, where it was seen
    indices: tuple[int, ...] = ()  # which images (positions in the run)

    def __add__(self, other: Explosion) -> Explosion:
        return Explosion(self.images + other.images, self.of + other.of, max(self.worst, other.worst),
                         self.where or other.where, self.indices + tuple(self.of + i for i in other.indices))


def including(explosion: Explosion, more: np.ndarray, where: str) -> Explosion:
    """`explosion` with the images `more` (bool [N]) marked too: NaN/Inf found elsewhere in the
    same run (a conditional map), set to 0 there; `where` says where, unless the run's own
    relevance exploded first."""
    if not more.any():
        return explosion
    indices = sorted(set(explosion.indices) | {int(i) for i in np.flatnonzero(more)})
    return Explosion(len(indices), explosion.of, float("inf"), explosion.where or where, tuple(indices))


def sizes(relevance: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """Per image: max(|sum R|, max |R|) / |initial relevance|, inf where R is not finite."""
    flat = relevance.reshape(len(relevance), -1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        size = np.maximum(np.abs(flat.sum(axis=1)), np.abs(flat).max(axis=1, initial=0))
    return np.where(np.isfinite(size), size / np.maximum(np.abs(initial.astype(np.float64)), _TINY), np.inf)


def check(relevance: np.ndarray, initial: np.ndarray, merge_sums: np.ndarray, merge_names: list[str],
          conserving: bool) -> tuple[np.ndarray, Explosion]:
    """(relevance with NaN/Inf set to 0, what exploded).

    conserving: the preset starts and splits as LRP does (not the gradient baselines or the
    copy split, whose totals grow by design); only there is a large total an explosion."""
    ratio = sizes(relevance, initial)
    exploded = ~np.isfinite(ratio) | ((ratio > FACTOR) if conserving else False)
    if not np.isfinite(ratio).all():
        relevance = np.where(np.isfinite(relevance), relevance, np.float32(0))
    if not np.isfinite(initial).all():  # the model itself, not the rules: say so
        where = MODEL_OUTPUT
    else:
        where = next((_first_merge(merge_sums[i], initial[i], merge_names) for i in np.flatnonzero(exploded)), None)
    worst = float(ratio[exploded].max()) if exploded.any() else 0.0
    return relevance, Explosion(int(exploded.sum()), len(relevance), worst, where,
                                tuple(int(i) for i in np.flatnonzero(exploded)))


def _first_merge(totals: np.ndarray, initial: float, names: list[str]) -> str | None:
    """The first merge (from the output down) whose relevance total exploded; merges are listed
    in forward order, and the relevance meets the last one first."""
    scale = max(abs(float(initial)), _TINY)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(totals[:, 0]) | (np.abs(totals[:, 0]) > FACTOR * scale)
    for m in reversed(range(len(names))):
        if bad[m]:
            return f"at merge {names[m]}"
    return f"below merge {names[0]} (in the stem)" if names else None


def message(explosion: Explosion, preset: str, bias: bool) -> str:
    """The one line users read."""
    how = ("NaN/Inf, set to 0" if not np.isfinite(explosion.worst)
           else f"up to {explosion.worst:.1e} x the initial relevance")
    where = f", first {explosion.where}" if explosion.where else ""
    if explosion.where == MODEL_OUTPUT:
        return (f"the model's own output is NaN or Inf on {explosion.images} of {explosion.of} image(s): "
                "nothing to explain there (relevance set to 0); check the model's weights and the inputs")
    if not bias:
        advice = "keep the biases (no --no-bias) or use preset epsilon-plus-flat"
    elif preset == "epsilon-plus-flat":
        advice = "check the model's weights and the inputs for extreme values"
    elif preset == "epsilon":
        advice = "use preset epsilon-plus-flat, or a larger epsilon (rules={'Conv': epsilon(0.25)})"
    else:
        advice = "use preset epsilon-plus-flat, which conserves relevance"
    name = f"preset {preset}" + ("" if bias else " without biases")
    return f"{name}: relevance exploded on {explosion.images} of {explosion.of} image(s) ({how}{where}); {advice}"
