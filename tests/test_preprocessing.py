"""Images in: presets, box bounds, layouts (NCHW / NHWC), fixed batch sizes, input checks."""
import numpy as np
import pytest
from PIL import Image

import tiny_graphs as tg
from onnxlrp import PREPROCESSING, Explainer, OnnxLrpError
from onnxlrp.preprocessing import get_preprocessing, load_image

PIXELS = np.random.RandomState(0).randint(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_normalize_roundtrip(name):
    prep = get_preprocessing(name)
    for layout in ("NCHW", "NHWC"):
        x = prep.normalize(PIXELS, layout)
        assert x.shape == ((2, 3, 8, 8) if layout == "NCHW" else (2, 8, 8, 3)) and x.dtype == np.float32
        np.testing.assert_array_equal(prep.denormalize(x, layout), PIXELS)


def test_caffe_is_bgr_minus_mean():
    red = np.zeros((1, 1, 1, 3), np.uint8)
    red[..., 0] = 255
    x = get_preprocessing("caffe").normalize(red, "NHWC")[0, 0, 0]
    np.testing.assert_allclose(x, [-103.939, -116.779, 255 - 123.68], rtol=1e-6)


def test_bounds_are_the_pixel_range_after_preprocessing():
    low, high = get_preprocessing("imagenet").bounds(3)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(low, -mean / std, rtol=1e-6)
    np.testing.assert_allclose(high, (1 - mean) / std, rtol=1e-6)
    extreme = np.stack([np.zeros((4, 4, 3)), np.full((4, 4, 3), 255)]).astype(np.uint8)
    x = get_preprocessing("imagenet").normalize(extreme)
    np.testing.assert_allclose(x[0, :, 0, 0], low, rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0], high, rtol=1e-6)


def test_load_image_scales_and_crops_the_centre(tmp_path):
    picture = np.zeros((50, 100, 3), np.uint8)
    picture[:, 25:75] = 255  # a white band in the middle half
    Image.fromarray(picture).save(tmp_path / "wide.png")
    loaded = load_image(tmp_path / "wide.png", 32, 32)
    assert loaded.shape == (32, 32, 3)
    assert loaded[:, 2:-2].min() > 200  # the centre crop sees only the band
    gray = load_image(tmp_path / "wide.png", 32, 32, channels=1)
    assert gray.shape == (32, 32, 1)


def _nets(tmp_path):
    """The same network with an NCHW input, and with an NHWC input followed by a Transpose."""
    paths = []
    for layout in ("NCHW", "NHWC"):
        tg.RNG.seed(7)
        b = tg.Builder()
        x = b.op("Transpose", ["x"], perm=[0, 3, 1, 2]) if layout == "NHWC" else "x"
        x = b.op("Relu", [b.conv(x, 3, 6, bias=True, name="stem")])
        x = b.op("Relu", [b.op("Add", [x, b.conv(b.op("Relu", [b.conv(x, 6, 6)]), 6, 6)], name="merge")])
        shape = ("N", 12, 12, 3) if layout == "NHWC" else ("N", 3, 12, 12)
        paths.append(tg.save(b.model(b.head(x, 6), input_shape=shape), tmp_path / f"{layout}.onnx"))
    return paths


@pytest.mark.parametrize("preset", ["epsilon-gamma-box", "epsilon-plus-flat", "paper"])
def test_nhwc_model_explains_like_its_nchw_twin(preset, tmp_path):
    nchw, nhwc = _nets(tmp_path)
    x = np.random.RandomState(1).randn(2, 3, 12, 12).astype(np.float32)
    a = Explainer(nchw, preset=preset).explain(x)
    explainer = Explainer(nhwc, preset=preset)
    assert explainer.analysis.image.layout == "NHWC"
    b = explainer.explain(x.transpose(0, 2, 3, 1))
    assert b.relevance.shape == (2, 12, 12, 3)
    np.testing.assert_allclose(b.relevance.transpose(0, 3, 1, 2), a.relevance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.heatmap(), a.heatmap(), rtol=1e-5, atol=1e-6)


def test_box_bounds_reach_the_first_conv(tmp_path):
    """Per-channel z^B bounds differ per channel: a wrong channel order would change the map."""
    nchw, _ = _nets(tmp_path)
    x = np.random.RandomState(1).randn(1, 3, 12, 12).astype(np.float32)
    default = Explainer(nchw, preset="epsilon-gamma-box").explain(x).relevance
    reordered = Explainer(nchw, preset="epsilon-gamma-box", low=[-2.1, -2.0, -1.8], high=[2.2, 2.4, 2.6]).explain(x).relevance
    explicit = Explainer(nchw, preset="epsilon-gamma-box", low=[-2.1179, -2.0357, -1.8044], high=[2.2489, 2.4286, 2.64]).explain(x).relevance
    np.testing.assert_allclose(default, explicit, rtol=1e-3, atol=1e-6)  # imagenet bounds, 4 digits
    assert np.abs(default - reordered).max() > 1e-4
    with pytest.raises(OnnxLrpError, match="low bound has 2 values; the model has 3 channels"):
        Explainer(nchw, preset="epsilon-gamma-box", low=[0, 1])


def test_fixed_batch_model_runs_in_chunks(tmp_path):
    b = tg.Builder()
    x = b.op("Relu", [b.conv("x", 3, 4, name="stem")])
    path = tg.save(b.model(b.head(x, 4), input_shape=(1, 3, 8, 8)), tmp_path / "fixed.onnx")
    explainer = Explainer(path)
    x = np.random.RandomState(2).randn(3, 3, 8, 8).astype(np.float32)
    together = explainer.explain(x)
    alone = [explainer.explain(x[i:i + 1]).relevance for i in range(3)]
    np.testing.assert_allclose(together.relevance, np.concatenate(alone), rtol=1e-6)


def test_explain_checks_the_input_shape(demo_model):
    explainer = Explainer(demo_model)
    with pytest.raises(OnnxLrpError, match=r"input batch has shape \[1, 3, 32, 32\]; the model expects \[N, 3, 64, 64\]"):
        explainer.explain(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(OnnxLrpError, match="2 targets for 1 images"):
        explainer.explain(np.zeros((1, 3, 64, 64), np.float32), target=[1, 2])
