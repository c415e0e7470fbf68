"""Per-image relevance statistics: where the relevance of one explanation sits."""
from __future__ import annotations

import numpy as np

from ..evaluation import metrics

#: the border: the outer 10 % of the image on every side
BORDER = 0.1


def gini(values: np.ndarray) -> float:
    """Gini coefficient of |values|: 0 when spread evenly, towards 1 when on a few pixels."""
    v = np.sort(np.abs(values).reshape(-1).astype(np.float64))
    total = v.sum()
    if total <= 0:
        return 0.0
    n = v.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(v) / (n * total))


def border_share(heatmap: np.ndarray) -> float:
    """Share of |relevance| in the image's outer frame."""
    h, w = heatmap.shape
    bh, bw = max(1, round(h * BORDER)), max(1, round(w * BORDER))
    magnitude = np.abs(heatmap)
    total = magnitude.sum()
    inner = magnitude[bh:h - bh, bw:w - bw].sum()
    return float((total - inner) / total) if total > 0 else 0.0


def positive_share(heatmap: np.ndarray) -> float:
    magnitude = np.abs(heatmap).sum()
    return float(np.clip(heatmap, 0, None).sum() / magnitude) if magnitude > 0 else 0.0


#: image_statistics' names: of every heatmap, and where the image has an object mask
STATISTICS = ("positive_share", "gini", "border_share")
MASK_STATISTICS = ("mass_accuracy", "rank_accuracy", "pointing_game")


def image_statistics(heatmap: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    stats = {"positive_share": positive_share(heatmap), "gini": gini(heatmap), "border_share": border_share(heatmap)}
    if mask is not None:
        stats.update(mass_accuracy=metrics.mass_accuracy(heatmap, mask),
                     rank_accuracy=metrics.rank_accuracy(heatmap, mask),
                     pointing_game=metrics.pointing_game(heatmap, mask))
    return stats


def blocks(array: np.ndarray, cells: int, reduce=np.sum) -> np.ndarray:
    """A 2-D array reduced over a cells x cells grid of (nearly) equal blocks."""
    rows = np.array_split(np.asarray(array, np.float64), cells, axis=0)
    return np.array([[reduce(block) for block in np.array_split(row, cells, axis=1)] for row in rows])


def downsized(heatmap: np.ndarray, cells: int = 16) -> np.ndarray:
    """The positive relevance on a cells x cells grid (block sums), normalised to sum 1."""
    grid = blocks(np.clip(heatmap, 0, None), cells)
    total = grid.sum()
    return grid / total if total > 0 else np.full_like(grid, 1.0 / grid.size)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (scipy)."""
    from scipy.stats import spearmanr

    a, b = a.reshape(-1), b.reshape(-1)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(spearmanr(a, b).statistic)


def top_overlap(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> float:
    """Intersection over union of the two maps' top `share` pixels."""
    k = max(1, int(round(a.size * share)))
    top_a = set(np.argsort(-a.reshape(-1), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b.reshape(-1), kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Structural similarity of two maps, each scaled by its largest |value| (Wang et al. 2004,
    uniform windows; scipy's filters)."""
    from scipy.ndimage import uniform_filter

    a = a / (np.abs(a).max() or 1.0)
    b = b / (np.abs(b).max() or 1.0)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # dynamic range 2: values in [-1, 1]
    mu_a, mu_b = uniform_filter(a, window), uniform_filter(b, window)
    var_a = uniform_filter(a * a, window) - mu_a ** 2
    var_b = uniform_filter(b * b, window) - mu_b ** 2
    cov = uniform_filter(a * b, window) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(value.mean())
