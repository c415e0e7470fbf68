"""LeakyReLU and Clip (ReLU6): LRP-0 with a proportional split equals gradient x input.

The network is piecewise linear, so LRP-0 (epsilon 0, proportional split without stabiliser)
must equal gradient x input of the same function, computed here with torch autograd in
float64 from the same weights (an independent reference).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_graphs as tg
from float32_bounds import U
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R

ALPHA, LOW, HIGH = 0.2, 0.0, 6.0


def _net():
    """stem conv -> LeakyReLU -> conv (scaled up, so ReLU6's cap is reached) -> Clip(0, 6),
    merged with the stem's output, -> Clip(0, 6) -> head."""
    tg.RNG.seed(21)
    b = tg.Builder()
    w1, w2, wf, bf = tg.weights(6, 3, 3, 3), tg.weights(6, 6, 3, 3, scale=2.0), tg.weights(4, 6), tg.weights(4, scale=0.1)
    c1, c2 = tg.weights(6, scale=0.5), tg.weights(6, scale=0.5)
    x = b.op("Conv", ["x", b.const(w1), b.const(c1)], name="stem", kernel_shape=[3, 3], pads=[1] * 4)
    x = b.op("LeakyRelu", [x], name="leaky", alpha=ALPHA)
    y = b.op("Conv", [x, b.const(w2), b.const(c2)], name="conv", kernel_shape=[3, 3], pads=[1] * 4)
    y = b.op("Clip", [y, b.const(np.array(LOW, np.float32)), b.const(np.array(HIGH, np.float32))], name="relu6")
    z = b.op("Clip", [b.op("Add", [x, y], name="merge"), b.const(np.array(LOW, np.float32)),
                      b.const(np.array(HIGH, np.float32))], name="out_relu6")
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [z])], axis=1)
    logits = b.op("Gemm", [pooled, b.const(wf), b.const(bf)], name="fc", transB=1)
    weights = [torch.tensor(a, dtype=torch.float64) for a in (w1, c1, w2, c2, wf, bf)]
    return b.model(logits, input_shape=("N", 3, 8, 8)), weights


def _torch(x, w1, c1, w2, c2, wf, bf):
    h = F.leaky_relu(F.conv2d(x, w1, c1, padding=1), ALPHA)
    y = torch.clamp(F.conv2d(h, w2, c2, padding=1), LOW, HIGH)
    z = torch.clamp(h + y, LOW, HIGH)
    return F.linear(z.mean(dim=(2, 3)), wf, bf)


def test_lrp0_equals_gradient_times_input(tmp_path):
    model, weights = _net()
    path = tg.save(model, tmp_path / "net.onnx")
    assert [m.node for m in analyse(path).merges] == ["merge"]
    x = np.random.RandomState(3).randn(4, 3, 8, 8).astype(np.float32) * 2
    zero = {op: R.epsilon(0.0) for op in ("Conv", "Gemm", "GlobalAveragePool")}
    zero["Clip"] = R.GRADIENT  # LRP-0 takes ReLU6 by its gradient (the Zennit presets pass relevance through, as Zennit)
    result = Explainer(path, rules=zero, split=Split("proportional", stabilizer=0.0)).explain(x)
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = _torch(inputs, *weights)
    clipped = (F.conv2d(F.leaky_relu(F.conv2d(inputs, weights[0], weights[1], padding=1), ALPHA),
                        weights[2], weights[3], padding=1) > HIGH).double().mean()
    assert 0.02 < float(clipped) < 0.98  # ReLU6's cap is reached, and not everywhere
    targets = torch.from_numpy(result.targets)
    out[torch.arange(4), targets].sum().backward()
    expected = (inputs * inputs.grad).detach().numpy()
    # float32 against float64 through 3 layers of at most 54 terms each, at points away from the
    # kinks (random inputs: no pre-activation sits within rounding of 0 or 6): the typical error
    # is sqrt(54) u per layer; 20 x that for 3 layers leaves room for the tails (2.6e-5).
    bound = 20 * 3 * np.sqrt(54) * U
    error = np.linalg.norm(result.relevance - expected) / np.linalg.norm(expected)
    assert error < bound, (error, bound)


@pytest.mark.parametrize("op, nonneg", [("leaky", False), ("relu6", True), ("out_relu6", True)])
def test_relu6_output_is_known_non_negative(op, nonneg, tmp_path):
    """z+ may drop the negative-input term after ReLU6 (its floor is 0), not after LeakyReLU."""
    model, _ = _net()
    graph = analyse(tg.save(model, tmp_path / "net.onnx")).graph
    assert (f"{op}_out" in graph.nonneg) == nonneg
