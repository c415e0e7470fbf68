"""How good is an explanation: Insertion / Deletion, ground-truth metrics, conservation.

Insertion and Deletion follow the paper's protocol exactly (shared/paper-method.md, section 4):
101 points; at step i the threshold is the value of the pixel ranked min(500 (i + 1), 50175)
(scaled to the image's pixel count: the same fractions of the image as at 224x224), and every
pixel whose value is >= the threshold is inserted into a black image (insertion) or set to
black (deletion); the score is the softmax probability of the label; the AUC is the
trapezoid rule on a uniform [0, 1] axis. With heat-quantized maps many pixels tie, and the
>= rule then inserts or deletes whole tied groups at once, so a tie-robust protocol
(``exact``: exactly that many pixels per step, ties broken in a fixed random order) is
offered beside it. Black is pixel value 0 mapped through the preprocessing.

All steps of one image go through the model as one batch (or a few).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

STEPS = 101
PROTOCOLS = ("paper", "exact")
#: (probabilities [B, K]) of a batch of model inputs; one batch of curve steps at a time
Scorer = Callable[[np.ndarray], np.ndarray]


def paper_ranks(pixels: int, steps: int = STEPS) -> np.ndarray:
    """0-based ranks whose values are the thresholds: min(500 (i + 1), 50175) at 224x224."""
    return np.minimum(((np.arange(steps) + 1) * 500 * pixels) // (224 * 224), pixels - 1)


def step_masks(saliency: np.ndarray, protocol: str = "paper", ranks: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """[steps, H, W] bool: the pixels inserted (or deleted) at each step. ranks: the 0-based
    pixel ranks that set each step's threshold (default: the paper's 101)."""
    values = saliency.reshape(-1)
    ranks = paper_ranks(values.size) if ranks is None else np.asarray(ranks)
    steps = len(ranks)
    if protocol == "paper":
        thresholds = np.sort(values)[::-1][ranks]
        return (values[None, :] >= thresholds[:, None]).reshape((steps,) + saliency.shape)
    if protocol == "exact":
        tiebreak = np.random.RandomState(seed).permutation(values.size)
        order = np.lexsort((tiebreak, -values))  # by value descending, ties in a fixed random order
        position = np.empty(values.size, dtype=np.int64)
        position[order] = np.arange(values.size)
        return (position[None, :] <= ranks[:, None]).reshape((steps,) + saliency.shape)
    raise ValueError(f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")


def auc(scores: np.ndarray) -> float:
    """Trapezoid rule on a uniform [0, 1] axis: (sum p - p_0 / 2 - p_last / 2) / (N - 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float((scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1))


@dataclass(frozen=True)
class Curves:
    insertion: np.ndarray  # [steps] probability of the label
    deletion: np.ndarray

    @property
    def scores(self) -> dict[str, float]:
        ins, dele = auc(self.insertion), auc(self.deletion)
        return {"insertion": ins, "deletion": dele, "id": ins - dele}


def insertion_deletion(
    score: Scorer, x: np.ndarray, saliency: np.ndarray, label: int, black: np.ndarray,
    protocol: str = "paper", layout: str = "NCHW", batch_size: int = 128, ranks: np.ndarray | None = None,
) -> Curves:
    """Curves for one image. x: the model input [C, H, W] (or [H, W, C]); saliency [H, W];
    black: the model input of an all-black image, same shape as x."""
    masks = step_masks(saliency, protocol, ranks)
    masks = masks[:, None] if layout == "NCHW" else masks[..., None]
    inserted = np.where(masks, x[None], black[None]).astype(np.float32)
    deleted = np.where(masks, black[None], x[None]).astype(np.float32)
    both = np.concatenate([inserted, deleted])
    probabilities = np.concatenate([score(both[i:i + batch_size]) for i in range(0, len(both), batch_size)])
    curve = probabilities[:, label]
    return Curves(curve[:len(masks)], curve[len(masks):])


def mass_accuracy(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive relevance that falls inside the ground-truth mask."""
    positive = np.clip(saliency, 0, None)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else 0.0


def rank_accuracy(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the K highest-ranked pixels inside the mask, K = the mask's size."""
    k = int(mask.sum())
    if k == 0:
        return 0.0
    top = np.argsort(-saliency.reshape(-1), kind="stable")[:k]
    return float(mask.reshape(-1)[top].mean())


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float:
    """1 if the most relevant pixel lies inside the mask, else 0."""
    return float(mask.reshape(-1)[int(np.argmax(saliency))])


def conservation_error(input_sum: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """|sum of input relevance - initial relevance| / |initial relevance|, per image."""
    return np.abs(input_sum - initial) / np.maximum(np.abs(initial), 1e-30)
