"""Agreement with Zennit 1.0 on torchvision's mobilenet_v2: the Zennit-named presets on a
ReLU6 network.

Zennit gives every activation module its Pass rule, ReLU6 included; torch exports ReLU6 as
Clip(0, 6), which the presets therefore pass as well. Where a unit is held at its cap of 6
the two readings part: Pass hands its relevance on, the gradient (zero there) stops it. So
the network is built to saturate: the BatchNorm scales in front of every ReLU6 are doubled
before calibration, which holds about 2 % of all ReLU6 inputs above 6 (checked below). That
is plenty: the conv rules favour large inputs, so taking the Clips by their gradient loses
about 97 % of the relevance and misses Zennit by 0.97-0.99 (relative), against bounds of
1e-4 to 3e-4 and errors of about 1e-5.

What the reference is, module by module:
  * BatchNorm merged into the conv before it by Zennit's SequentialMergeBatchNorm (every
    Conv2dNormActivation, and each block's projection, is a Sequential conv -> BN); onnxlrp
    sees the exporter's folded graph.
  * InvertedResidual adds its skip functionally (`x + self.conv(x)`), not as a module: no
    rule hooks it, so Zennit's modified gradient sends the whole relevance down both branches.
    That is onnxlrp's split="copy", identity skips included. (Zennit 1.0 has no canonizer
    that turns this add into a Sum module for Norm, as ResNetCanonizer does for ResNets.)
  * torchvision pools functionally too (`adaptive_avg_pool2d` in `_forward_impl`), which
    would leave Zennit's pool to the gradient while the presets give a pool Norm, as Zennit
    does to every AvgPool module. The model is therefore given as the same modules in a
    Sequential with an AdaptiveAvgPool2d module, the layout of torchvision's ResNets: the
    composite's Norm applies, and the exported graph is the same GlobalAveragePool. (Taken as
    torchvision has it, Zennit's map differs from the preset's by about 3e-3, some 30 times
    the bound; with the pool's rule overridden to the gradient onnxlrp matches it again: the
    last test.)
Output relevance one-hot(target) x target logit; Zennit in float64; bounds from
float32_bounds, as in test_zennit.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torchvision
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat

import float32_bounds
from conftest import SIZE, relative_error
from models.export_torchvision import calibrate_batchnorm, export, randomize_batchnorm
from onnxlrp import Explainer
from onnxlrp.lrp import rules as R
from zennit_reference import zennit_lrp

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

GAIN = 2.0  # BatchNorm scales in front of ReLU6, so that some inputs exceed 6

COMPOSITES = {
    "epsilon-plus-flat": lambda: EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]),
    "epsilon-gamma-box": lambda: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[SequentialMergeBatchNorm()]),
    "epsilon-alpha2-beta1": lambda: EpsilonAlpha2Beta1(canonizers=[SequentialMergeBatchNorm()]),
}


def build(seed: int = 0, gain: float = GAIN, functional_pool: bool = False) -> torch.nn.Module:
    """Seeded mobilenet_v2 as models/export_torchvision.build makes its networks (randomised,
    calibrated BatchNorm), the scales of BatchNorms followed by ReLU6 multiplied by `gain`
    before calibration; its pool a module (see the module docstring) unless `functional_pool`."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torchvision.models.mobilenet_v2(weights=None)
    randomize_batchnorm(net, generator)
    for block in net.modules():
        if isinstance(block, torchvision.ops.Conv2dNormActivation) and isinstance(block[-1], torch.nn.ReLU6):
            with torch.no_grad():
                block[1].weight.mul_(gain)
    calibrate_batchnorm(net, generator, size=SIZE)
    if functional_pool:
        return net.eval()
    return torch.nn.Sequential(net.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), net.classifier).eval()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    model = build()
    return model, export(model, tmp_path_factory.mktemp("mobilenet_v2") / "mobilenet_v2.onnx", size=SIZE)


def relu6_inputs(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    """Every ReLU6 input on x, flattened and concatenated."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().flatten().clone()))
             for m in model.modules() if isinstance(m, torch.nn.ReLU6)]
    try:
        with torch.no_grad():
            model(torch.as_tensor(x))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(seen)


def zennit(model, x, preset, dtype=torch.float64):
    return zennit_lrp(model, x, COMPOSITES[preset](), dtype)


def reference_and_bound(model, x, preset):
    reference, targets = zennit(model, x, preset)

    def run(perturbed):
        relevance, perturbed_targets = zennit(perturbed, x, preset)
        np.testing.assert_array_equal(perturbed_targets, targets)  # else the spread measures a class change
        return (relevance,)

    (bound,) = float32_bounds.bounds(run, model, [reference])
    return reference, targets, bound


def ours(path, x, preset, rules=None):
    return Explainer(path, preset=preset, split="copy", include_identity=True, low=-3.0, high=3.0,
                     rules=rules).explain(x)


def test_relu6_saturates(mobilenet, images):
    """Some ReLU6 inputs exceed 6 (else Pass and the gradient would agree and the test below
    could not tell them apart), and a ReLU6 input of the exported graph is a Clip."""
    model, path = mobilenet
    pre = relu6_inputs(model, images)
    assert (pre > 6).float().mean() > 0.01
    import onnx
    assert any(node.op_type == "Clip" for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("preset", sorted(COMPOSITES))
def test_matches_zennit(preset, mobilenet, images):
    model, path = mobilenet
    reference, targets, bound = reference_and_bound(model, images, preset)
    result = ours(path, images, preset)
    np.testing.assert_array_equal(result.targets, targets)
    error = relative_error(result.relevance, reference)
    assert error <= bound, (error, bound)


def test_functional_pool_takes_the_gradient(mobilenet, images):
    """torchvision's own MobileNetV2 (same weights): its functional pool gets no rule from
    Zennit, so its relevance is the pool's gradient; onnxlrp agrees once its GlobalAveragePool
    is given the gradient too, and the exported graph is the same."""
    model, path = mobilenet
    raw = build(functional_pool=True)
    with torch.no_grad():
        torch.testing.assert_close(raw(torch.as_tensor(images)), model(torch.as_tensor(images)), rtol=0, atol=0)
    reference, targets, bound = reference_and_bound(raw, images, "epsilon-plus-flat")
    result = ours(path, images, "epsilon-plus-flat", rules={"GlobalAveragePool": R.GRADIENT})
    np.testing.assert_array_equal(result.targets, targets)
    error = relative_error(result.relevance, reference)
    assert error <= bound, (error, bound)
