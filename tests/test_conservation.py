"""Conservation: with biases excluded, conserving presets keep the initial relevance."""
import numpy as np
import pytest

from onnxlrp import SPLITS, Explainer


@pytest.mark.parametrize("split", [s for s in SPLITS if s != "copy"])  # copy counts relevance twice by design
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_epsilon_plus_flat_conserves_without_bias(arch, split, images, request):
    net = request.getfixturevalue(arch)
    result = Explainer(net.folded, preset="epsilon-plus-flat", split=split, bias=False).explain(images)
    assert np.all(result.conservation_error < 1e-4), result.conservation_error
    sums = result.merge_sums.astype(np.float64)
    R, R_skip, R_main = sums[..., 0], sums[..., 1], sums[..., 2]
    np.testing.assert_allclose(R_skip + R_main, R, rtol=1e-5, atol=1e-7)
    # no merge loses or creates relevance either: each carries the initial relevance
    np.testing.assert_allclose(R, np.broadcast_to(result.initial[:, None], R.shape), rtol=1e-4)


def test_biases_absorb_relevance_and_it_is_reported(resnet50, images):
    """With biases kept, relevance leaks into them; the result says how much, per merge too."""
    result = Explainer(resnet50.folded, preset="epsilon-plus-flat", split="proportional").explain(images)
    kept = result.input_sum / result.initial
    assert np.all((kept > 0.05) & (kept < 0.95)), kept  # Zennit keeps about half on random resnet50
    np.testing.assert_allclose(result.absorbed, result.initial - result.input_sum)
    report = result.merge_report(0)
    assert len(report) == 16 and {"node", "kind", "R", "R_skip", "R_main"} <= set(report[0])
    # relevance reaching the merges shrinks from the output towards the input
    per_merge = result.merge_sums[0, :, 0]
    assert per_merge[-1] > per_merge[0]

