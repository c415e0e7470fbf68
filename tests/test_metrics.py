"""Metrics and heatmap post-processing, checked on examples small enough to compute by hand, and
the black image evaluate() uses, on the demo model."""
import numpy as np
import pytest

from conftest import ROOT
from onnxlrp.evaluation import metrics
from onnxlrp.evaluation.evaluate import evaluate, load_dataset
from onnxlrp.io.image import cumulative_threshold, normalize, quantize

SALIENCY = np.array([[4.0, 2.0], [2.0, 1.0]])  # two pixels tie at 2
X = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # one channel: the "model" scores sum(x) / 10
RANKS = np.array([0, 1, 3])  # three steps: thresholds at the 1st, 2nd and 4th ranked pixel


def score(batch: np.ndarray) -> np.ndarray:
    p = batch.reshape(len(batch), -1).sum(axis=1) / 10
    return np.stack([p, 1 - p], axis=1)


def test_paper_protocol_by_hand():
    curves = metrics.insertion_deletion(score, X, SALIENCY, 0, np.zeros_like(X), "paper", ranks=RANKS)
    # thresholds 4, 2, 1: inserted {4}, then {4, 2, 2} (the tie goes in at once), then all; sums of tenths
    # in float64, so assert_allclose's default 1e-7 relative covers the rounding
    np.testing.assert_allclose(curves.insertion, [0.1, 0.6, 1.0])
    np.testing.assert_allclose(curves.deletion, [0.9, 0.4, 0.0])
    scores = curves.scores  # closed forms; approx (1e-6 relative) absorbs float64 rounding only
    assert scores["insertion"] == pytest.approx((0.1 + 0.6 + 1.0 - 0.05 - 0.5) / 2)  # 0.575
    assert scores["deletion"] == pytest.approx((0.9 + 0.4 + 0.0 - 0.45 - 0.0) / 2)  # 0.425
    assert scores["id"] == pytest.approx(0.15)


def test_exact_protocol_differs_only_at_ties():
    paper = metrics.step_masks(SALIENCY, "paper", RANKS)
    exact = metrics.step_masks(SALIENCY, "exact", RANKS)
    assert exact.reshape(3, -1).sum(axis=1).tolist() == [1, 2, 4]  # exactly rank + 1 pixels per step
    np.testing.assert_array_equal(paper[[0, 2]], exact[[0, 2]])
    assert not np.array_equal(paper[1], exact[1]) and exact[1][0, 0] and exact[1][1, 1] == 0
    curves = metrics.insertion_deletion(score, X, SALIENCY, 0, np.zeros_like(X), "exact", ranks=RANKS)
    assert curves.insertion[1] in (pytest.approx(0.3), pytest.approx(0.4))  # 4 plus one of the tied 2s
    distinct = np.array([[4.0, 3.0], [2.0, 1.0]])
    np.testing.assert_array_equal(metrics.step_masks(distinct, "paper", RANKS), metrics.step_masks(distinct, "exact", RANKS))
    ties = np.zeros((10, 10))  # 100 tied pixels: an unseeded order would differ between calls
    first = metrics.step_masks(ties, "exact", np.arange(100))
    np.testing.assert_array_equal(metrics.step_masks(ties, "exact", np.arange(100)), first)  # fixed order


def test_paper_ranks_at_224():
    ranks = metrics.paper_ranks(224 * 224)
    assert len(ranks) == 101 and ranks[0] == 500 and ranks[98] == 49500 and ranks[-1] == 50175


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])  # torchvision's normalisation constants
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def test_black_is_the_preprocessed_black_image(demo_model, monkeypatch):
    """evaluate() hands insertion_deletion pixel value 0 through the preprocessing as black, and
    the first insertion step shows black outside the top pixels, the first deletion step there."""
    calls = []
    real = metrics.insertion_deletion

    def spy(score, x, saliency, label, black, *args, **kwargs):
        batches = []
        calls.append((x, saliency, black, batches))
        return real(lambda batch: batches.append(batch.copy()) or score(batch), x, saliency, label, black,
                    *args, **kwargs)

    monkeypatch.setattr(metrics, "insertion_deletion", spy)
    data = load_dataset(ROOT / "examples" / "shapes")
    evaluate(demo_model, data, ["gradient"], protocols=("paper",), limit=1)
    assert len(calls) == 1  # one image, one method, one protocol
    x, saliency, black, batches = calls[0]
    expected = np.broadcast_to((-IMAGENET_MEAN / IMAGENET_STD)[:, None, None], (3, 64, 64))  # (0 - mean) / std
    # normalize() works in float32: a few roundings of 2^-24 relative each
    np.testing.assert_allclose(black, expected, rtol=1e-6)
    both = np.concatenate(batches)
    assert both.shape == (2 * 101, 3, 64, 64)  # 101 insertion steps, then 101 deletion steps
    # step 0: the pixels ranked up to 500 * 64^2 // 224^2 = 40 (ties at its value included) are in
    top = saliency >= np.sort(saliency.reshape(-1))[::-1][500 * 64 * 64 // (224 * 224)]
    assert 0 < top.sum() < top.size and np.all(x != black)  # so each pixel tells which one it shows
    np.testing.assert_array_equal(both[0], np.where(top, x, black))  # inserted into black
    np.testing.assert_array_equal(both[101], np.where(top, black, x))  # deleted: set to black
    np.testing.assert_array_equal(both[100], x)  # the last insertion step is the whole image
    np.testing.assert_array_equal(both[201], np.broadcast_to(black, x.shape))  # ... and deletion all black


def test_ground_truth_metrics_by_hand():
    saliency = np.array([[3.0, -1.0], [1.0, 0.0]])
    mask = np.array([[True, False], [False, False]])
    assert metrics.mass_accuracy(saliency, mask) == pytest.approx(3 / 4)  # positive relevance only
    assert metrics.rank_accuracy(saliency, mask) == 1.0
    assert metrics.pointing_game(saliency, mask) == 1.0
    assert metrics.pointing_game(-saliency, mask) == 0.0
    two = np.array([[True, True], [False, False]])
    assert metrics.rank_accuracy(saliency, two) == 0.5  # top 2: (0,0) and (1,0)


def test_heat_quantization_by_hand():
    heat = np.array([0.0, 0.1, 0.5, 0.74, 0.76, 1.0])
    # bins = linspace(0, 1, 5) = 0, .25, .5, .75, 1: each value drops to its bin's lower edge, max stays
    np.testing.assert_allclose(quantize(heat, 5), [0.0, 0.0, 0.5, 0.5, 0.75, 1.0])
    assert len(np.unique(quantize(np.random.RandomState(0).randn(100), 8))) <= 8


def test_normalisation_at_the_cumulative_threshold():
    values = np.array([1.0] * 98 + [50.0, 50.0])  # sum 198: 98 % is reached at the first 50
    assert cumulative_threshold(values, 98) == 50.0
    assert cumulative_threshold(np.array([1.0] * 100), 98) == 1.0
    heat = np.array([-4.0, 2.0, 1.0, 1.0])
    positive = normalize(heat, "positive")
    assert positive.min() == 0 and positive.max() == 1.0
    signed = normalize(heat, "all")
    assert signed[0] == -1.0 and np.all(np.abs(signed) <= 1)
    np.testing.assert_allclose(normalize(heat, "absolute"), np.abs(signed))
