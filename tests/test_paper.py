"""The `paper` preset reproduces the published implementation (variants (i)-(iv)).

Reference: tests/paper_reference.py, an independent float64 PyTorch implementation
of shared/paper-method.md written without looking at onnxlrp's code.
"""
import numpy as np
import pytest
import torch

from conftest import relative_error
from onnxlrp import PAPER_VARIANTS, Explainer, OnnxLrpWarning
from paper_reference import paper_lrp


@pytest.mark.parametrize("variant", sorted(PAPER_VARIANTS))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_paper_matches_reference_on_batchnorm_graph(arch, variant, images, request):
    net = request.getfixturevalue(arch)
    split, include_identity = PAPER_VARIANTS[variant]
    explainer = Explainer(net.kept, preset="paper", split=split, include_identity=include_identity)
    assert explainer.analysis.graph.canonical.batchnorms > 0  # BN is kept and passes relevance
    ours = explainer.explain(images)
    relevance, targets, probabilities = paper_lrp(net.model, torch.tensor(images), split, include_identity)
    np.testing.assert_array_equal(ours.targets, targets.numpy())
    np.testing.assert_allclose(ours.initial, probabilities.numpy(), rtol=1e-4)  # softmax probability (float32 logits)
    assert relative_error(ours.relevance, relevance.numpy()) < 1e-4
    assert ours.relevance.min() >= 0  # z+ everywhere: no negative relevance


def test_variants_differ(resnet18, images):
    """The switches do something: (i)-(iv) give four different maps."""
    maps = [Explainer(resnet18.kept, preset="paper", split=s, include_identity=i).explain(images).relevance
            for s, i in PAPER_VARIANTS.values()]
    for a in range(4):
        for b in range(a + 1, 4):
            assert relative_error(maps[a], maps[b]) > 1e-3


def test_paper_conserves_but_at_maxpool(resnet18, images):
    """Every step conserves up to eps except the 2x2-average MaxPool (a few % lost, paper-method.md)."""
    result = Explainer(resnet18.kept, preset="paper").explain(images)
    kept = result.input_sum / result.initial
    assert np.all((kept > 0.85) & (kept < 1.0))
    first_merge = result.merge_sums[:, 0, 0]  # relevance entering the first block from above
    np.testing.assert_allclose(result.merge_sums[:, :, 1] + result.merge_sums[:, :, 2], result.merge_sums[:, :, 0], rtol=1e-5)
    assert np.all(first_merge <= result.initial * (1 + 1e-4))


def test_paper_on_folded_graph_warns_and_approximates(resnet18, images):
    with pytest.warns(OnnxLrpWarning, match="approximates the published implementation"):
        explainer = Explainer(resnet18.folded, preset="paper")
    ours = explainer.explain(images)
    relevance, _, _ = paper_lrp(resnet18.model, torch.tensor(images))
    # BN scales < 0 change what z+ keeps: not the same map, but the same kind of map.
    assert 1e-3 < relative_error(ours.relevance, relevance.numpy()) < 1.5
