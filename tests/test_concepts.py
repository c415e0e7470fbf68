"""Concept Relevance Propagation in the compiled graph (lrp.conditional): completeness, the
skip connections it leaves out, the ranking, batching, precisions and errors. Agreement
with zennit-crp is in test_concepts_crp (the reference tier)."""
import math

import numpy as np
import pytest

import float32_bounds
from conftest import ROOT, relative_error
from onnxlrp import PRESETS, Explainer
from onnxlrp.errors import SettingError

DEMO = ROOT / "models" / "demo" / "tiny_resnet.onnx"
INT8 = ROOT / "models" / "audit" / "clean_int8.onnx"
INNER = "/stages/stages.5/relu/Relu"  # inside the last block: the skip from stages.4 bypasses it
CHANNELS = 64  # the demo model's last blocks


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)


def _all_channels(path, x, targets, layer="last", **options):
    explainer = Explainer(path, cache=False, concept_layer=layer, **options)
    result = explainer.explain(x, targets, concepts=list(range(explainer.summary.concept_channels)), warn=False)
    return result


#: the presets the fast tier runs; the reference tier runs every one
FAST = ("epsilon-plus-flat",)


#: guided backprop clips the backward signal at every ReLU (max(g, 0)): not linear in the
#: relevance, so its conditional maps do not add up to its heatmap, in any implementation
LINEAR = [p for p in PRESETS if p != "guided-backprop"]


@pytest.mark.parametrize("preset", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in LINEAR])
def test_the_maps_of_all_channels_add_up_to_the_heatmap(preset, x, tmp_path):
    """At the last block's output all relevance passes through the layer, so the conditional
    maps of its 64 channels sum to the unconditional input relevance. Bound: each map and the
    heatmap are within their float32 spread (onnx_bounds, measured in the problem) of the exact
    ones; the sum of K maps' errors is at most sqrt(K) times their joint L2 error."""
    targets = Explainer(DEMO, cache=False).explain(x).targets
    options = dict(preset=preset, low=-3.0, high=3.0)

    def run(path):
        result = _all_channels(path, x, targets, **options)
        return result.relevance, result.concepts.relevance

    plain, conditional = run(DEMO)
    bound, concept_bound = float32_bounds.onnx_bounds(run, DEMO, tmp_path)
    assert conditional.shape == (3, CHANNELS) + x.shape[1:]
    error = np.linalg.norm(conditional.sum(axis=1, dtype=np.float64) - plain)
    allowed = bound * np.linalg.norm(plain) + math.sqrt(CHANNELS) * concept_bound * np.linalg.norm(conditional)
    assert error <= allowed, (error, allowed)
    assert error > 0 or preset == "gradient" or np.abs(plain).max() == 0  # two computations, not one copied


def test_relevance_entering_a_skip_that_bypasses_the_layer_is_left_out(x):
    """Inside the last block, with rules that conserve (epsilon-plus-flat-conserve without
    biases, proportional split), each conditional map carries exactly its channel's
    relevance to the input, and all of them together only what passed the layer: less than
    the heatmap, whose remainder came down the skip. Bound: the float32 error of a pass through
    the model's layers (layered_bound) on the map's total magnitude."""
    explainer = Explainer(DEMO, cache=False, concept_layer=INNER, preset="epsilon-plus-flat-conserve", bias=False,
                          split="proportional")
    result = explainer.explain(x, concepts=list(range(CHANNELS)))
    concepts = result.concepts
    totals = concepts.relevance.reshape(3, CHANNELS, -1).sum(axis=2, dtype=np.float64)
    magnitude = np.abs(concepts.relevance).reshape(3, CHANNELS, -1).sum(axis=2, dtype=np.float64)
    tolerance = float32_bounds.layered_bound(explainer.analysis) * (magnitude + np.abs(concepts.channel_relevance))
    np.testing.assert_array_less(np.abs(totals - concepts.channel_relevance), tolerance + 1e-30)
    passed, whole = totals.sum(axis=1), result.input_sum
    assert np.all(passed < 0.95 * whole), (passed, whole)  # the skip carried a share of every image's logit
    assert concepts.layer.startswith("/stages/stages.5/relu/")


def test_top_k_picks_the_most_relevant_channels_and_equals_naming_them(x):
    explainer = Explainer(DEMO, cache=False, concept_layer="last")
    ranked = explainer.explain(x, concepts=5).concepts
    best = np.argsort(-ranked.channel_relevance, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ranked.channels, best)
    assert np.all(np.diff(ranked.chosen_shares, axis=1) <= 0)
    np.testing.assert_allclose(np.abs(ranked.shares).sum(axis=1), 1.0, rtol=1e-6)  # float64 normalisation
    named = explainer.explain(x, concepts=best).concepts
    np.testing.assert_array_equal(named.relevance, ranked.relevance)  # the same rows through the same graph
    assert ranked.heatmap().shape == (3, 5, 64, 64)
    one = explainer.explain(x, concepts=[int(best[0, 0])]).concepts
    assert one.channels.shape == (3, 1) and np.all(one.channels == best[0, 0])


def test_conditions_beyond_the_batch_size_run_in_several_passes(x, tmp_path):
    """K = 6 conditions with batch size 4: rows of one image per run, the conditions in two
    groups; the same maps as one run, within two float32 runs' distance (apart)."""
    explainer = Explainer(DEMO, cache=False, concept_layer="last")
    whole = explainer.explain(x, concepts=6, batch_size=64).concepts
    parts = explainer.explain(x, concepts=6, batch_size=4).concepts
    np.testing.assert_array_equal(parts.channels, whole.channels)
    bound, = float32_bounds.onnx_bounds(
        lambda path: (Explainer(path, cache=False, concept_layer="last").explain(x, concepts=whole.channels,
                                                                                 warn=False).concepts.relevance,),
        DEMO, tmp_path)
    assert relative_error(parts.relevance, whole.relevance) <= 2 * bound


@pytest.mark.slow  # six perturbed copies of two models: the reference tier
def test_an_int8_model_and_float16(x, tmp_path):
    """The QDQ int8 model as deployed, and the demo model in float16: all channels still add
    up to the heatmap. float16 keeps 11 bits: the bound is float16_rtol of the float32 one."""
    targets = Explainer(INT8, cache=False).explain(x, warn=False).targets
    result = _all_channels(INT8, x, targets)
    total = result.concepts.relevance.sum(axis=1, dtype=np.float64)
    bound, concept_bound = float32_bounds.onnx_bounds(
        lambda path: (lambda r: (r.relevance, r.concepts.relevance))(_all_channels(path, x, targets)), INT8, tmp_path)
    allowed = bound * np.linalg.norm(result.relevance) + math.sqrt(CHANNELS) * concept_bound * np.linalg.norm(
        result.concepts.relevance)
    assert np.linalg.norm(total - result.relevance) <= allowed
    # float16's unit roundoff is 2**13 times float32's, and first-order rounding errors scale
    # with it: the float32 spread of the maps (onnx_bounds), times 2**13, bounds float16's.
    targets = Explainer(DEMO, cache=False).explain(x).targets
    half = _all_channels(DEMO, x, targets, precision="fp16").concepts.relevance
    full = _all_channels(DEMO, x, targets).concepts.relevance
    _, concept_bound = float32_bounds.onnx_bounds(
        lambda path: (lambda r: (r.relevance, r.concepts.relevance))(_all_channels(path, x, targets)), DEMO, tmp_path)
    assert relative_error(half, full) <= 2.0 ** 13 * concept_bound


def test_errors_name_the_problem(x):
    with pytest.raises(SettingError, match="concepts need an Explainer with a concept layer"):
        Explainer(DEMO).explain(x, concepts=3)
    explainer = Explainer(DEMO, concept_layer="last")
    with pytest.raises(SettingError, match=r"channel 64 out of range: the concept layer '.*' has 64 channels"):
        explainer.explain(x, concepts=[3, 64])
    with pytest.raises(SettingError, match="concepts 65: the concept layer"):
        explainer.explain(x, concepts=65)
    with pytest.raises(SettingError, match="no node or tensor 'nowhere'"):
        Explainer(DEMO, concept_layer="nowhere")
    with pytest.raises(SettingError, match="colour channels are no concepts"):
        Explainer(DEMO, concept_layer="input")
    plain = explainer.explain(x)  # a concept graph explains as any other
    assert plain.concepts is None
    np.testing.assert_array_equal(plain.relevance, explainer.explain(x, concepts=2).relevance)


def test_explain_concepts_writes_each_maps_beside_the_heatmap(tmp_path, demo_image):
    """explain --concepts K: K conditional maps per heatmap, named after it, and the result line
    names the channels with their shares; the maps are the API's."""
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(DEMO), str(demo_image), str(demo_image), "--concepts", "2",
                                      "-o", str(out), "--npy", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"demo_lrp{copy}{concept}.{kind}" for copy in ("", "_1") for concept in ("", "_concept1", "_concept2")
        for kind in ("png", "npy"))
    explainer = Explainer(DEMO, concept_layer="last")
    x = explainer.images.normalize(explainer.read_images([demo_image]))
    expected = explainer.explain(np.concatenate([x, x]), concepts=2)  # the batch the command ran
    concepts = expected.concepts
    channels = [int(c) for c in concepts.channels[0]]
    line = result.stdout.splitlines()[0]
    assert f"channel {channels[0]} {concepts.chosen_shares[0, 0]:.1%}, channel {channels[1]}" in line
    assert line.endswith("out/demo_lrp_concept2.npy")
    np.testing.assert_array_equal(np.load(out / "demo_lrp_concept1.npy"), concepts.heatmap()[0, 0])
    np.testing.assert_array_equal(np.load(out / "demo_lrp.npy"), expected.heatmap()[0])
    bad = CliRunner().invoke(app, ["explain", str(DEMO), str(demo_image), "--concepts", "65", "-o", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "--concepts 65: layer" in bad.output and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_explain_concepts_on_ray_writes_the_same_files(tmp_path):
    """explain --concepts on Ray actors (FileSink with concept maps, written by the actors): the
    same files, byte for byte, and the same lines as in one process (the same batches)."""
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    folder = ROOT / "examples" / "shapes" / "star"
    args = ["explain", str(DEMO), str(folder), "--concepts", "2", "--batch-size", "5", "--npy"]
    alone = CliRunner().invoke(app, args + [str(tmp_path / "one")])
    spread = CliRunner().invoke(app, args + [str(tmp_path / "ray"), "--ray", "--concurrency", "2"])
    assert alone.exit_code == 0 and spread.exit_code == 0, (alone.output, spread.output)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir()) and any("_concept2" in n for n in names)
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert sorted(spread.stdout.splitlines()) == sorted(alone.stdout.replace("/one/", "/ray/").splitlines())


def test_a_condition_may_be_a_set_of_channels(x, tmp_path):
    """A condition that is a set of channels masks the layer to all of them: under rules linear
    in the relevance, its map is the sum of its channels' maps (bound: each map within its
    float32 spread, onnx_bounds, and the sum of three errors at most sqrt(3) times their joint
    L2). A channel named twice counts once: (a, a) is a alone, to the bit (the same rows)."""
    explainer = Explainer(DEMO, cache=False, concept_layer="last")
    top = explainer.explain(x, concepts=2).concepts.channels
    a, b = int(top[0, 0]), int(top[0, 1])
    result = explainer.explain(x, concepts=[(a, b), a, b]).concepts
    assert result.sets.shape == (3, 3, 2) and result.channels.tolist() == [[a, a, b]] * 3
    np.testing.assert_allclose(result.chosen_shares[:, 0], result.chosen_shares[:, 1] + result.chosen_shares[:, 2])
    together, apart = result.relevance[:, 0], result.relevance[:, 1] + result.relevance[:, 2]
    bound, = float32_bounds.onnx_bounds(
        lambda path: (Explainer(path, cache=False, concept_layer="last").explain(
            x, concepts=[(a, b), a, b], warn=False).concepts.relevance,), DEMO, tmp_path)
    allowed = math.sqrt(3) * bound * np.linalg.norm(result.relevance)
    assert np.linalg.norm(together - apart) <= allowed
    twice = explainer.explain(x, concepts=[(a, a), (b, b)]).concepts
    once = explainer.explain(x, concepts=[a, b]).concepts
    np.testing.assert_array_equal(twice.relevance, once.relevance)
    with pytest.raises(SettingError, match="an empty set"):
        explainer.explain(x, concepts=[(a,), ()])


def test_a_conditional_map_that_explodes_is_reported_as_an_explosion(x):
    """NaN/Inf in a conditional map are set to 0 and counted with the run's explosions (the line
    every command prints), not passed on and not a warning of their own that runs never see."""
    from onnxlrp.lrp import relevance_graph as rg
    from onnxlrp.lrp.explosion import message

    explainer = Explainer(DEMO, concept_layer="last")
    real = explainer.runner.run

    def broken(feeds, batch_size):
        out = real(feeds, batch_size)
        out[rg.CONCEPT_RELEVANCE][1, 0, 0, 0, 0] = np.nan
        return out

    explainer.runner.run = broken
    result = explainer.explain(x, concepts=2, warn=False)
    assert np.isfinite(result.concepts.relevance).all() and result.concepts.relevance[1, 0, 0, 0, 0] == 0
    assert result.explosion.indices == (1,) and result.explosion.images == 1 and result.explosion.of == 3
    assert "in a conditional map below /stages/stages.5/relu_1/Relu_output_0" in message(
        result.explosion, "epsilon-plus-flat", True)
    with pytest.warns(Warning, match="relevance exploded on 1 of 3 image"):
        explainer.explain(x, concepts=2)
