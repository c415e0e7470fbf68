"""Agreement with Zennit 1.0 (an independent LRP implementation) on torchvision ResNets.

Same rules, BatchNorm merged (Zennit's ResNetCanonizer), our `proportional` split
(Zennit's Sum gets Norm), output relevance one-hot(target) x target logit. Zennit runs
in float64, so the error measured is ours (float32 onnxruntime). Each test's bound is
that problem's own sensitivity to float32-sized perturbations, measured in float64
(float32_bounds.py): the same on every machine, tight where the problem is
well-conditioned and wide only where it is not.
"""
import numpy as np
import pytest
import torch
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

import float32_bounds
from conftest import relative_error
from onnxlrp import Explainer
from zennit_reference import zennit_lrp

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

COMPOSITES = {
    "epsilon-plus-flat": lambda zp: EpsilonPlusFlat(canonizers=[ResNetCanonizer()], zero_params=zp),
    "epsilon-gamma-box": lambda zp: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[ResNetCanonizer()], zero_params=zp),
    "epsilon-alpha2-beta1": lambda zp: EpsilonAlpha2Beta1(canonizers=[ResNetCanonizer()], zero_params=zp),
}


def zennit(model, x, preset, bias=True, dtype=torch.float64):
    return zennit_lrp(model, x, COMPOSITES[preset](None if bias else ["bias"]), dtype)


_CACHE = {}


def reference_and_bound(model, x, preset, bias=True):
    """Zennit's float64 relevance, its targets, and how far a float32 pass may land from it:
    bounds on the relative error of the map and of its per-image totals."""
    key = (id(model), id(x), preset, bias)
    if key not in _CACHE:
        reference, targets = zennit(model, x, preset, bias)

        def run(perturbed):
            relevance, perturbed_targets = zennit(perturbed, x, preset, bias)
            np.testing.assert_array_equal(perturbed_targets, targets)  # else the spread measures a class change
            return relevance, totals(relevance)

        bound, total_bound = float32_bounds.bounds(run, model, [reference, totals(reference)])
        _CACHE[key] = reference, targets, bound, total_bound
    return _CACHE[key]


def totals(relevance):
    return relevance.reshape(len(relevance), -1).sum(axis=1)


def ours(path, x, preset, bias=True):
    return Explainer(path, preset=preset, split="proportional", bias=bias, low=-3.0, high=3.0).explain(x)


@pytest.mark.parametrize("preset", sorted(COMPOSITES))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_matches_zennit(arch, preset, images, request):
    net = request.getfixturevalue(arch)
    reference, targets, bound, _ = reference_and_bound(net.model, images, preset)
    result = ours(net.folded, images, preset)
    np.testing.assert_array_equal(result.targets, targets)
    error = relative_error(result.relevance, reference)
    assert error <= bound, (error, bound)


@pytest.mark.parametrize("preset", sorted(COMPOSITES))
def test_matches_zennit_without_bias(preset, resnet18, images):
    """epsilon-gamma-box without biases divides by near-zero sums: ill-conditioned in any
    float32 implementation (float64 Zennit moves by about 6 % under float32-sized weight
    noise), so its bound is wide; the other two stay well-conditioned, so theirs is tight."""
    reference, targets, bound, _ = reference_and_bound(resnet18.model, images, preset, bias=False)
    result = ours(resnet18.folded, images, preset, bias=False)
    np.testing.assert_array_equal(result.targets, targets)
    error = relative_error(result.relevance, reference)
    assert error <= bound, (error, bound)
