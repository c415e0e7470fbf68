"""Per class: how the model decides, across images.

SpRAy (Lapuschkin et al. 2019): the class's heatmaps, downsized and normalised, are
clustered spectrally (scikit-learn); the number of clusters comes from the eigengap of the
affinity's normalised Laplacian. A large gap after k > 1 eigenvalues means k clearly separate
strategies.

Clever Hans: the class's relevance concentrates on the same small region across images, while
the objects move (a watermark, a tag, a frame). The region is the smallest set of grid cells
holding half of the class's mean heatmap; it is small when it covers at most 6 % of the image.
The score is the mean share of each image's relevance in that region and, where masks are
given, outside the image's object: relevance the object cannot account for.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

#: a region of at most this share of the image is "small"
SMALL_REGION = 0.06


@dataclass
class ClassStrategies:
    name: str
    images: list[int]  # indices into the audited images
    mean_map: np.ndarray  # grid, sums to 1
    region: np.ndarray  # bool grid: the smallest cells holding half of the mean map
    region_area: float
    hans_score: float  # mean share of relevance in the region (outside the objects, with masks)
    hans_images: list[int] = field(default_factory=list)  # the images most concentrated there
    eigengap: float = 0.0
    clusters: list[list[int]] = field(default_factory=list)  # image indices per cluster (SpRAy)


def _region(mean_map: np.ndarray, mass: float = 0.5) -> np.ndarray:
    order = np.argsort(-mean_map.reshape(-1), kind="stable")
    count = int(np.searchsorted(np.cumsum(mean_map.reshape(-1)[order]), mass) + 1)
    region = np.zeros(mean_map.size, bool)
    region[order[:count]] = True
    return region.reshape(mean_map.shape)


def spray(maps: np.ndarray, max_clusters: int = 4) -> tuple[float, list[list[int]]]:
    """(eigengap, clusters as lists of positions in `maps`) for one class's grids."""
    n = len(maps)
    if n < 6:
        return 0.0, [list(range(n))]
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    features = maps.reshape(n, -1)
    neighbours = min(5, n - 1)
    affinity = kneighbors_graph(features, neighbours, include_self=False).toarray()
    affinity = np.maximum(affinity, affinity.T)
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian(affinity, normed=True)))
    limit = min(max_clusters, n - 1)
    gaps = np.diff(eigenvalues[:limit + 1])
    k = int(np.argmax(gaps)) + 1
    if k < 2:  # the largest gap after the first eigenvalue: one strategy
        return 0.0, [list(range(n))]
    with warnings.catch_warnings():  # a graph in separate pieces is what separate strategies look like
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(k, affinity="precomputed", random_state=0).fit_predict(affinity)
    return float(gaps[k - 1]), [np.flatnonzero(labels == c).tolist() for c in range(k)]


def class_strategies(name: str, indices: list[int], grids: np.ndarray, outside: np.ndarray) -> ClassStrategies:
    """One class's images (indices into grids): grids [N, C, C] of their positive relevance
    (statistics.downsized), outside [N, C, C] the cells outside each image's object
    (mean mask under 0.5; all True where an image has no mask)."""
    maps = grids[indices]
    mean_map = maps.mean(axis=0)
    region = _region(mean_map)
    area = float(region.mean())
    shares = []
    for i, grid in zip(indices, maps):
        inside = region & outside[i]
        shares.append(float(grid[inside].sum()))
    score = float(np.mean(shares)) if area <= SMALL_REGION else 0.0
    ranked = [indices[k] for k in np.argsort(shares)[::-1]]
    gap, clusters = spray(maps)
    return ClassStrategies(name, indices, mean_map, region, area, score, ranked[:6], gap,
                           [[indices[k] for k in cluster] for cluster in clusters])
