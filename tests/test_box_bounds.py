"""z^B box bounds carried through the ops a deployed graph runs before its first layer
(in-graph preprocessing): each case is compared with the same model with that op folded
into the weights or the input, where the bounds are given directly."""
import numpy as np
import pytest
from typer.testing import CliRunner

from onnxlrp import Explainer
from onnxlrp.cli import app
from onnxlrp.errors import OnnxLrpError

from tiny_graphs import Builder, save, weights

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
LOW, HIGH = -MEAN / STD, (1 - MEAN) / STD  # ImageNet's per-channel bounds: the box is not uniform


def _net(first_conv_weight: np.ndarray, before=None, size: int = 16, name: str = "m"):
    """[before ->] conv(first_conv_weight) -> relu -> conv -> relu -> head; the same weights after
    the first conv for every call (a fresh seeded generator)."""
    b = Builder()
    rng = np.random.RandomState(1)
    x = before(b, "x") if before else "x"
    h = b.op("Relu", [b.op("Conv", [x, b.const(first_conv_weight), b.const((rng.randn(6) * 0.1).astype(np.float32))],
                           name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    w2 = (rng.randn(6, 6, 3, 3) * 0.4).astype(np.float32)
    h = b.op("Relu", [b.op("Conv", [h, b.const(w2)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    fc = (rng.randn(4, 6) * 0.5).astype(np.float32)
    out = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1), b.const(fc)], transB=1)
    return b.model(out, input_shape=("N", 3, size, size))


W1 = weights(6, 3, 3, 3)
X = np.random.RandomState(2).uniform(LOW.reshape(1, 3, 1, 1), HIGH.reshape(1, 3, 1, 1), (2, 3, 16, 16)).astype(np.float32)


def _relevance(model, path, x, low, high):
    explainer = Explainer(save(model, path), preset="epsilon-gamma-box", low=low, high=high, cache=False)
    return explainer.explain(x).relevance


def _close(a, b):
    # Both are float32 evaluations of the same sums (one with a permuted or cropped input, one
    # with the op in the graph): they differ by float32 rounding, a few ulps of the relevance's
    # magnitude over the 3x3x3 windows; 1e-5 of the largest value covers it many times over.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_a_channel_gather_carries_the_per_channel_bounds(tmp_path):
    """RGB -> BGR as a Gather on the channel axis before the first conv: the same relevance as
    the permutation folded into the weights (the bounds are permuted with the channels)."""
    perm = [2, 1, 0]
    gathered = _net(W1, lambda b, x: b.op("Gather", [x, b.const(np.array(perm, np.int64))], axis=1))
    folded = _net(W1[:, perm])  # conv(W, x[:, perm]) = conv(W[:, perm^-1], x), and perm is its own inverse
    _close(_relevance(gathered, tmp_path / "g.onnx", X, LOW, HIGH), _relevance(folded, tmp_path / "f.onnx", X, LOW, HIGH))


def test_a_slice_crop_carries_the_bounds(tmp_path):
    """A centre crop before the first conv: relevance inside the crop is the cropped model's,
    zero outside."""
    big = np.random.RandomState(3).uniform(LOW.reshape(1, 3, 1, 1), HIGH.reshape(1, 3, 1, 1), (2, 3, 20, 20)).astype(np.float32)
    crop = lambda b, x: b.op("Slice", [x, b.const(np.array([2, 2], np.int64)), b.const(np.array([18, 18], np.int64)),
                                       b.const(np.array([2, 3], np.int64))])
    cropped = _relevance(_net(W1, crop, size=20), tmp_path / "c.onnx", big, LOW, HIGH)
    direct = _relevance(_net(W1), tmp_path / "d.onnx", big[:, :, 2:18, 2:18], LOW, HIGH)
    _close(cropped[:, :, 2:18, 2:18], direct)
    assert not cropped[:, :, :2].any() and not cropped[:, :, 18:].any()


def test_in_graph_normalisation_carries_the_bounds(tmp_path):
    """(x - mean) / std and a scale with a negative factor (the bounds swap there) in the graph,
    bounds given on the raw input: the same relevance as the normalised model with the
    normalised bounds."""
    scale = np.array([-1.0, 2.0, 0.5], np.float32).reshape(1, 3, 1, 1)

    def normalise(b, x):
        centred = b.op("Sub", [x, b.const(MEAN.reshape(1, 3, 1, 1))])
        return b.op("Mul", [b.op("Div", [centred, b.const(STD.reshape(1, 3, 1, 1))]), b.const(scale)])

    raw = np.random.RandomState(4).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    normalised = (raw - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1) * scale
    ends = LOW * scale.reshape(-1), HIGH * scale.reshape(-1)
    low, high = np.minimum(*ends), np.maximum(*ends)
    in_graph = _relevance(_net(W1, normalise), tmp_path / "n.onnx", raw, 0.0, 1.0)
    _close(in_graph, _relevance(_net(W1), tmp_path / "p.onnx", normalised, low, high))


def test_an_op_that_does_not_carry_bounds_is_one_line(tmp_path):
    pooled = _net(W1, lambda b, x: b.op("AveragePool", [x], name="blur", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                          strides=[1, 1], count_include_pad=1))
    path = save(pooled, tmp_path / "blur.onnx")
    with pytest.raises(OnnxLrpError, match=r"node 'blur' \(AveragePool\): z\^B box bounds cannot be carried"):
        Explainer(path, preset="epsilon-gamma-box", cache=False)
    image = tmp_path / "img.png"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    result = CliRunner().invoke(app, ["explain", str(path), str(image), "--preset", "epsilon-gamma-box",
                                      "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 1 and "blur" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()
