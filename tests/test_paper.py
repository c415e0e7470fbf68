"""The `paper` preset reproduces the published implementation (variants (i)-(iv)).

Reference: tests/paper_reference.py, an independent float64 PyTorch implementation
of shared/paper-method.md written without looking at onnxlrp's code. Each comparison
is bounded by that quantity's own sensitivity to float32-sized perturbations of the
weights, measured in float64 (float32_bounds.py), so the bounds hold on any machine.
"""
import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

import float32_bounds
from conftest import SIZE, relative_error
from onnxlrp import PAPER_VARIANTS, Explainer, OnnxLrpWarning
from paper_reference import paper_lrp_traced

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

U = float32_bounds.U


@dataclass
class Reference:
    relevance: np.ndarray  # [N, 3, H, W]
    probabilities: np.ndarray  # [N] initial relevance
    kept: np.ndarray  # [N] input relevance / initial relevance
    merge_sums: np.ndarray  # [N, M, 3] totals of R, R_skip, R_main, merges in forward order
    targets: np.ndarray


def run_reference(model, x, split, include_identity) -> Reference:
    relevance, targets, probabilities, trace = paper_lrp_traced(model, torch.tensor(x), split, include_identity)
    merge_sums = torch.stack(trace["merge_sums"][::-1], dim=1)
    return Reference(relevance.numpy(), probabilities.numpy(), (trace["input"] / trace["output"]).numpy(),
                     merge_sums.numpy(), targets.numpy())


_CACHE = {}


def reference_and_bounds(model, x, split="ratio", include_identity=True) -> tuple[Reference, Reference]:
    """The float64 reference, and the float32 bound on each of its fields (as a Reference of floats)."""
    key = (id(model), split, include_identity)
    if key not in _CACHE:
        reference = run_reference(model, x, split, include_identity)

        def run(perturbed):
            r = run_reference(perturbed, x, split, include_identity)
            np.testing.assert_array_equal(r.targets, reference.targets)  # else the spread measures a class change
            return r.relevance, r.probabilities, r.kept, r.merge_sums

        fields = (reference.relevance, reference.probabilities, reference.kept, reference.merge_sums)
        _CACHE[key] = reference, Reference(*float32_bounds.bounds(run, model, fields), targets=None)
    return _CACHE[key]


def fused(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a BN-folding exporter sees it: each BatchNorm fused into its conv
    (in float64, so the reference carries no rounding of its own) and replaced by Identity."""
    model = copy.deepcopy(model).double().eval()
    model.conv1, model.bn1 = fuse_conv_bn_eval(model.conv1, model.bn1), torch.nn.Identity()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            for i in (1, 2, 3):
                if hasattr(block, f"bn{i}"):
                    setattr(block, f"conv{i}", fuse_conv_bn_eval(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                    setattr(block, f"bn{i}", torch.nn.Identity())
            if block.downsample is not None:
                block.downsample[0] = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
                block.downsample[1] = torch.nn.Identity()
    return model


@pytest.mark.parametrize("variant", sorted(PAPER_VARIANTS))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_paper_matches_reference_on_batchnorm_graph(arch, variant, images, request):
    net = request.getfixturevalue(arch)
    split, include_identity = PAPER_VARIANTS[variant]
    explainer = Explainer(net.kept, preset="paper", split=split, include_identity=include_identity)
    assert explainer.analysis.graph.canonical.batchnorms > 0  # BN is kept and passes relevance
    ours = explainer.explain(images)
    reference, bound = reference_and_bounds(net.model, images, split, include_identity)
    np.testing.assert_array_equal(ours.targets, reference.targets)
    # softmax probability of float32 logits: the forward pass's sensitivity, measured as above
    assert relative_error(ours.initial, reference.probabilities) <= bound.probabilities
    error = relative_error(ours.relevance, reference.relevance)
    assert error <= bound.relevance, (error, bound.relevance)
    # exact: z+ multiplies and divides non-negative numbers only, and rounding keeps signs
    assert ours.relevance.min() >= 0


def test_variants_differ(resnet18, images):
    """The switches do something: (i)-(iv) give four different maps. Two maps equal in exact
    arithmetic would each be within its float32 bound of the same reference, so closer than
    the sum of their bounds; every pair must be further apart than that."""
    maps, bounds = [], []
    for split, include_identity in PAPER_VARIANTS.values():
        maps.append(Explainer(resnet18.kept, preset="paper", split=split, include_identity=include_identity).explain(images).relevance)
        bounds.append(reference_and_bounds(resnet18.model, images, split, include_identity)[1].relevance)
    for a in range(4):
        for b in range(a + 1, 4):
            assert relative_error(maps[a], maps[b]) > bounds[a] + bounds[b], (a, b)


def test_paper_conserves_but_at_maxpool(resnet18, images):
    """Every step conserves up to eps except the 2x2-average MaxPool (a few % lost,
    paper-method.md): the relevance kept at the input, and the totals at every merge, are
    the reference's."""
    result = Explainer(resnet18.kept, preset="paper").explain(images)
    reference, bound = reference_and_bounds(resnet18.model, images)  # variant (iv), the preset's default
    assert np.all(reference.kept < 1)  # the method loses relevance (at the MaxPool), so must we:
    kept = result.input_sum / result.initial  # float64 sums of our float32 map: no rounding of their own
    assert relative_error(kept, reference.kept) <= bound.kept, (kept, reference.kept)
    # Merge totals are float32 sums, of up to 64 x (SIZE/4)^2 non-negative terms (layer1):
    # the reference's bound plus one float32 summation of that many terms.
    sum_rtol = float32_bounds.sum_rtol(64 * (SIZE // 4) ** 2)
    sums = result.merge_sums.astype(np.float64)
    assert relative_error(sums, reference.merge_sums) <= bound.merge_sums + sum_rtol
    # R_skip + R_main = R: exact per element up to the split's 3 roundings (3u), then each of
    # the three totals within sum_rtol of its terms' sum
    np.testing.assert_allclose(sums[:, :, 1] + sums[:, :, 2], sums[:, :, 0], rtol=2 * sum_rtol + 3 * U)


def test_paper_on_folded_graph_warns_and_matches_the_fused_model(resnet18, images):
    """On a BN-folded graph `paper` runs z+ (bias dropped) on BN-scaled weights and splits on
    the same tensors: exactly the reference on the model with each BN fused into its conv.
    That is not the published method (negative BN scales change what z+ keeps): it warns."""
    with pytest.warns(OnnxLrpWarning, match="approximates the published implementation"):
        explainer = Explainer(resnet18.folded, preset="paper")
    ours = explainer.explain(images)
    model = fused(resnet18.model)
    reference, bound = reference_and_bounds(model, images)
    np.testing.assert_array_equal(ours.targets, reference.targets)
    error = relative_error(ours.relevance, reference.relevance)
    assert error <= bound.relevance, (error, bound.relevance)
    # the warning is warranted: in float64, folding moves the map far beyond float32 noise
    published, published_bound = reference_and_bounds(resnet18.model, images)
    assert relative_error(reference.relevance, published.relevance) > 10 * (bound.relevance + published_bound.relevance)
