"""Agreement with zennit-crp 0.6 (the reference implementation of Concept Relevance
Propagation) on torchvision ResNet-18 and a VGG-11 with seeded weights: conditional heatmaps
of single channels and the channels' relevance shares, under EpsilonPlusFlat.

zennit-crp runs in float64 on Zennit 1.0, so the error measured is ours; each bound is the
problem's own float32 spread, measured in float64 on perturbed copies (float32_bounds), as
for the Zennit presets. Its default exclude_parallel=True is what onnxlrp does: relevance
entering a skip connection that bypasses the layer is left out.
"""
import copy

import numpy as np
import pytest
import torch
from crp import attribution as crp  # zennit-crp: the README's test command installs it
from crp.concepts import ChannelConcept
from torchvision.models.vgg import VGG, cfgs, make_layers
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

import float32_bounds
from conftest import relative_error
from onnxlrp import Explainer

pytestmark = pytest.mark.slow  # the reference tier

K = 3  # conditions per image: the image's three most relevant channels


def crp_reference(model, x, layer, channels, targets, canonizers):
    """zennit-crp in float64: conditional heatmaps [N, K, H, W] for channels [N, K] of `layer`
    (a module name) and the channels' relevance shares [N, C] of the unconditional pass."""
    model = copy.deepcopy(model).double().eval()
    attribution = crp.CondAttribution(model)
    composite = EpsilonPlusFlat(canonizers=canonizers())
    maps = []
    for image, chosen, target in zip(x, channels, targets):
        data = torch.tensor(image[None], dtype=torch.float64, requires_grad=True)
        conditions = [{layer: [int(c)], "y": [int(target)]} for c in chosen]
        maps.append(attribution(data, conditions, composite).heatmap.numpy())
    data = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    plain = attribution(data, [{"y": [int(t)]} for t in targets], composite, record_layer=[layer])
    shares = ChannelConcept().attribute(plain.relevances[layer], abs_norm=True).numpy()
    return np.stack(maps), shares


def check(model, path, x, module, tensor, canonizers):
    explainer = Explainer(path, preset="epsilon-plus-flat", split="proportional", concept_layer=tensor, cache=False)
    result = explainer.explain(x, concepts=K)
    concepts = result.concepts
    reference, shares = crp_reference(model, x, module, concepts.channels, result.targets, canonizers)

    def run(perturbed):
        return crp_reference(perturbed, x, module, concepts.channels, result.targets, canonizers)

    bound, share_bound = float32_bounds.bounds(run, model, [reference, shares])
    error = relative_error(concepts.heatmap(), reference)
    assert error <= bound, (error, bound)
    share_error = relative_error(concepts.shares, shares)
    assert share_error <= share_bound, (share_error, share_bound)
    # the channels are the most relevant ones by the reference's ranking too
    np.testing.assert_array_equal(np.argsort(-shares, axis=1, kind="stable")[:, :K], concepts.channels)


@pytest.mark.parametrize("module, tensor", [
    ("layer4", "last"),  # the last block's output: everything passes it
    ("layer4.0.conv1", "/layer4/layer4.0/relu/Relu"),  # inside a block that the downsampling skip bypasses
])
def test_resnet18_matches_zennit_crp(module, tensor, resnet18, images):
    check(resnet18.model, resnet18.folded, images, module, tensor, lambda: [ResNetCanonizer()])


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """VGG-11 at 1/8 width, seeded, 64x64 (test_frameworks exports it at 224): the five pools
    leave 2x2, which the head reads directly (an adaptive pool up to 7x7 does not export)."""
    from models.export_torchvision import export

    torch.manual_seed(0)
    model = VGG(make_layers([c if c == "M" else c // 8 for c in cfgs["A"]]), num_classes=10)
    model.avgpool = torch.nn.Identity()
    model.classifier = torch.nn.Sequential(torch.nn.Linear(64 * 2 * 2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.normal_(m.bias, std=0.05)
    model.eval()
    return model, export(model, tmp_path_factory.mktemp("vgg") / "vgg11.onnx", size=64)


def test_vgg_matches_zennit_crp(vgg, images):
    model, path = vgg
    last_conv = max(i for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d))
    check(model, path, images, f"features.{last_conv}", f"/features/features.{last_conv}/Conv", lambda: [])
