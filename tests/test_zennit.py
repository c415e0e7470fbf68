"""Agreement with Zennit 1.0 (an independent LRP implementation) on torchvision ResNets.

Same rules, BatchNorm merged (Zennit's ResNetCanonizer), our `proportional` split
(Zennit's Sum gets Norm), output relevance one-hot(target) x target logit. Zennit runs
in float64, so the error measured is ours (float32 onnxruntime).
"""
import copy

import numpy as np
import pytest
import torch
from zennit.attribution import Gradient
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from conftest import relative_error
from onnxlrp import Explainer

COMPOSITES = {
    "epsilon-plus-flat": lambda zp: EpsilonPlusFlat(canonizers=[ResNetCanonizer()], zero_params=zp),
    "epsilon-gamma-box": lambda zp: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[ResNetCanonizer()], zero_params=zp),
    "epsilon-alpha2-beta1": lambda zp: EpsilonAlpha2Beta1(canonizers=[ResNetCanonizer()], zero_params=zp),
}
TOLERANCE = {"resnet18": 1e-3, "resnet50": 1e-2}


def zennit(model, x, preset, bias=True, dtype=torch.float64):
    model = copy.deepcopy(model).to(dtype)
    inputs = torch.tensor(x, dtype=dtype, requires_grad=True)
    with Gradient(model, COMPOSITES[preset](None if bias else ["bias"])) as attributor:
        logits = model(inputs)
        target = logits.argmax(1)
        rows = torch.arange(len(target))
        start = torch.zeros_like(logits)
        start[rows, target] = logits[rows, target]
        _, relevance = attributor(inputs, start)
    return relevance.detach().double().numpy(), target.numpy()


def ours(path, x, preset, bias=True):
    return Explainer(path, preset=preset, split="proportional", bias=bias, low=-3.0, high=3.0).explain(x)


@pytest.mark.parametrize("preset", sorted(COMPOSITES))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_matches_zennit(arch, preset, images, request):
    net = request.getfixturevalue(arch)
    reference, targets = zennit(net.model, images, preset)
    result = ours(net.folded, images, preset)
    np.testing.assert_array_equal(result.targets, targets)
    assert relative_error(result.relevance, reference) <= TOLERANCE[arch]


@pytest.mark.parametrize("preset", ["epsilon-plus-flat", "epsilon-alpha2-beta1"])
def test_matches_zennit_without_bias(preset, resnet18, images):
    reference, _ = zennit(resnet18.model, images, preset, bias=False)
    assert relative_error(ours(resnet18.folded, images, preset, bias=False).relevance, reference) <= 1e-3


def test_gamma_without_bias_is_as_accurate_as_zennit_float32(resnet18, images):
    """Gamma with biases dropped divides by near-zero sums: ill-conditioned in any float32
    implementation. We must be no further from the float64 result than Zennit's own float32."""
    reference, _ = zennit(resnet18.model, images, "epsilon-gamma-box", bias=False)
    zennit32, _ = zennit(resnet18.model, images, "epsilon-gamma-box", bias=False, dtype=torch.float32)
    result = ours(resnet18.folded, images, "epsilon-gamma-box", bias=False)
    assert relative_error(result.relevance, reference) <= relative_error(zennit32, reference)
