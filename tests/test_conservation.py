"""Conservation: with biases excluded, conserving presets keep the initial relevance."""
import numpy as np
import pytest

import float32_bounds
from conftest import SIZE, relative_error
from onnxlrp import SPLITS, Explainer
from test_zennit import reference_and_bound

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

# What conserving rules may still lose, in exact arithmetic: every division's stabiliser takes
# R eps / (z + eps) (eps = 1e-6), and a z+ unit with no positive input absorbs what a split
# sends it. Zennit in float64 loses 6e-6 (resnet18) and 1.2e-5 (resnet50) of the relevance on
# these models with the proportional split; 1e-4 leaves room for the other splits routing
# relevance to other units, and for float32 rounding (float32_bounds.floor: about 1e-5).
LEAK = 1e-4
#: elements of the largest merge tensor: layer1, at a quarter of the input size
MERGE_TERMS = {"resnet18": 64 * (SIZE // 4) ** 2, "resnet50": 256 * (SIZE // 4) ** 2}


@pytest.mark.parametrize("split", [s for s in SPLITS if s != "copy"])  # copy counts relevance twice by design
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_epsilon_plus_flat_conserves_without_bias(arch, split, images, request):
    net = request.getfixturevalue(arch)
    result = Explainer(net.folded, preset="epsilon-plus-flat", split=split, bias=False).explain(images)
    assert np.all(result.conservation_error < LEAK), result.conservation_error
    sums = result.merge_sums.astype(np.float64)
    R, R_skip, R_main = sums[..., 0], sums[..., 1], sums[..., 2]
    # Each merge total is a float32 sum whose terms are essentially of one sign (the input map
    # has sum |R| / |sum R| = 1 + 1e-7 in float64 Zennit): within sum_rtol of its terms' sum.
    # R_skip + R_main = R per element up to the split's 3 roundings, and, for the proportional
    # split, its stabiliser's share 1e-6 / |y| (1e-6 for merge outputs y of order 1, far inside
    # 2 sum_rtol >= 1.2e-4).
    sum_rtol = float32_bounds.sum_rtol(MERGE_TERMS[arch])
    np.testing.assert_allclose(R_skip + R_main, R, rtol=2 * sum_rtol + 3 * float32_bounds.U)
    # no merge loses or creates relevance either: each carries the initial relevance
    np.testing.assert_allclose(R, np.broadcast_to(result.initial[:, None], R.shape), rtol=LEAK + sum_rtol)


def test_biases_absorb_relevance_and_it_is_reported(resnet50, images):
    """With biases kept, relevance leaks into them; the result says how much, per merge too."""
    result = Explainer(resnet50.folded, preset="epsilon-plus-flat", split="proportional").explain(images)
    kept = result.input_sum / result.initial
    # the property, with wide margins: Zennit in float64 keeps 0.41 and 0.39 here
    assert np.all((kept > 0.05) & (kept < 0.95)), kept
    # what is kept (so absorbed = initial - kept) is Zennit's, in float64, up to float32 rounding
    # bounded by the totals' own sensitivity (float32_bounds.py, shared with test_zennit)
    reference, _, _, total_bound = reference_and_bound(resnet50.model, images, "epsilon-plus-flat")
    reference_totals = reference.reshape(len(reference), -1).sum(axis=1)
    assert relative_error(result.input_sum, reference_totals) <= total_bound
    np.testing.assert_array_equal(result.absorbed, result.initial.astype(np.float64) - result.input_sum)  # as documented
    report = result.merge_report(0)
    assert len(report) == 16 and {"node", "kind", "R", "R_skip", "R_main"} <= set(report[0])
    # relevance reaching the merges shrinks from the output towards the input (biases absorb it
    # on the way down; Zennit in float64 keeps 0.4 at the input): a property, not a tolerance
    per_merge = result.merge_sums[0, :, 0]
    assert per_merge[-1] > per_merge[0]
