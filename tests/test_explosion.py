"""Relevance that explodes is reported, and never reaches a heatmap as NaN or Inf.

Seeded random resnet50 at 64x64 reproduces what a real pretrained ResNet-50 shows: with
biases dropped, `epsilon` (1e-6) divides by bias-free sums that vanish and overflows to
Inf/NaN, and `epsilon-gamma-box` multiplies relevance by orders of magnitude; the
conserving `epsilon-plus-flat` stays at the initial relevance.
"""
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from onnxlrp import Explainer, OnnxLrpWarning
from onnxlrp.lrp import explosion
from onnxlrp.cli import app

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out


@pytest.fixture(scope="module")
def x(images):
    return images


def test_epsilon_without_bias_overflows_and_is_reported(resnet50, x):
    with pytest.warns(OnnxLrpWarning, match=r"preset epsilon without biases: relevance exploded on 2 of 2 image\(s\) "
                                            r"\(NaN/Inf, set to 0, first at merge /layer\d/layer\d\.\d+/Add\); keep the biases"):
        result = Explainer(resnet50.folded, preset="epsilon", bias=False).explain(x)
    assert np.isfinite(result.relevance).all() and np.isfinite(result.heatmap()).all()
    assert result.explosion.images == 2 and result.explosion.worst == np.inf


def test_gamma_without_bias_blows_up_and_is_reported(resnet50, x):
    with pytest.warns(OnnxLrpWarning, match=r"preset epsilon-gamma-box without biases: relevance exploded") as caught:
        result = Explainer(resnet50.folded, preset="epsilon-gamma-box", bias=False).explain(x)
    assert len(caught) == 1
    ratio = explosion.sizes(result.relevance, result.initial)
    # what is reported is what the relevance shows: more than FACTOR times the initial relevance
    assert result.explosion.images == int((ratio > explosion.FACTOR).sum()) >= 1
    assert result.explosion.worst == pytest.approx(ratio.max(), rel=1e-6)


def test_a_conserving_preset_is_not_reported(resnet50, x, recwarn):
    result = Explainer(resnet50.folded, preset="epsilon-plus-flat", bias=False).explain(x)
    assert result.explosion.images == 0
    assert not [w for w in recwarn if issubclass(w.category, OnnxLrpWarning)]


def test_baselines_that_grow_by_design_are_not_reported(resnet18, x, recwarn):
    """The copy split counts relevance once per branch: its totals grow with depth, by design."""
    result = Explainer(resnet18.folded, preset="captum").explain(x)
    assert result.explosion.images == 0 and not recwarn.list


def test_check_sets_nan_and_inf_to_zero_and_names_the_first_merge():
    relevance = np.ones((2, 1, 2, 2), np.float32)
    relevance[1, 0, 0, 0] = np.nan
    relevance[1, 0, 1, 1] = np.inf
    initial = np.array([4.0, 4.0], np.float32)
    # merges in forward order: m0 is met last going down; m1 exploded for image 1
    sums = np.array([[[4, 2, 2], [4, 2, 2]], [[np.inf, 0, 0], [5e3, 0, 0]]], np.float32)
    cleaned, found = explosion.check(relevance, initial, sums, ["m0", "m1"], conserving=True)
    assert np.isfinite(cleaned).all() and cleaned[1, 0, 0, 0] == 0 and cleaned[1, 0, 0, 1] == 1
    assert found == explosion.Explosion(1, 2, np.inf, "at merge m1", (1,))
    big = np.full((1, 1, 2, 2), 2e3, np.float32)  # sums to 8e3 = 2e3 x the initial relevance
    _, found = explosion.check(big, initial[:1], np.zeros((1, 1, 3), np.float32), ["m0"], conserving=True)
    assert found.images == 1 and found.where == "below merge m0 (in the stem)"
    _, found = explosion.check(big, initial[:1], np.zeros((1, 1, 3), np.float32), ["m0"], conserving=False)
    assert found.images == 0


def test_cli_says_so_in_one_line(resnet50, demo_image, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):  # two batches: still one line
        Image.open(demo_image).rotate(90 * k).save(folder / f"{k}.png")
    result = CliRunner().invoke(app, ["explain", str(resnet50.folded), str(folder), "--preset", "epsilon", "--no-bias",
                                      "--batch-size", "2", "-o", str(tmp_path / "out"), "--npy", str(tmp_path / "npy")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search(r"relevance exploded on 3 of 3 image\(s\)", warnings[0]), result.stderr
    for k in range(3):
        assert np.isfinite(np.load(tmp_path / "npy" / f"{k}_lrp.npy")).all()


def test_a_model_whose_own_output_is_nan_is_told_apart():
    relevance = np.full((1, 1, 2, 2), np.nan, np.float32)
    cleaned, found = explosion.check(relevance, np.array([np.nan], np.float32), np.zeros((1, 0, 3), np.float32), [],
                                     conserving=True)
    assert not cleaned.any() and found.where == "the model's own output"
    assert explosion.message(found, "epsilon-plus-flat", True).startswith(
        "the model's own output is NaN or Inf on 1 of 1 image(s)")


def test_explosions_of_several_runs_keep_their_image_positions():
    first = explosion.Explosion(1, 3, 5e3, "at merge m1", (2,))
    second = explosion.Explosion(2, 4, np.inf, None, (0, 3))
    assert (first + second).indices == (2, 3, 6)
