"""Softplus, the demonstration that a new element-wise op is one adapter class (issue 22):
lrp/ops/activations.Softplus, family activation, and nothing else edited.

Relevance passes through it (the pass rule the presets give the activation family), so with
LRP-0 on the linear layers the explanation has a closed form (below), computed with torch
autograd in float64 from the same weights; the z^B box bounds are replayed through it.

Everything is positive (inputs, weights, no biases), so every sum has terms of one sign and
the float32 error has a derived bound (float32_bounds.sum_rtol), not a fitted one.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_graphs as tg
from float32_bounds import U, sum_rtol
from onnxlrp import Explainer, analyse
from onnxlrp import rules as R
from onnxlrp.lrp.relevance_graph import _Box

C_IN, C, K, SIZE, CLASSES = 3, 6, 3, 8, 4
LRP0 = {op: R.epsilon(0.0) for op in ("Conv", "GlobalAveragePool", "Gemm")}


def _net(first: str = "conv"):
    """conv (no bias) -> Softplus -> global average pool -> dense (no bias), weights >= 0;
    first="softplus": the Softplus before the conv, on the image (for the box bounds)."""
    tg.RNG.seed(5)
    w, wf = np.abs(tg.weights(C, C_IN, K, K)), np.abs(tg.weights(CLASSES, C))
    b = tg.Builder()
    x = b.op("Softplus", ["x"], name="softplus_in") if first == "softplus" else "x"
    x = b.op("Conv", [x, b.const(w)], name="conv", kernel_shape=[K, K], pads=[1] * 4)
    if first != "softplus":
        x = b.op("Softplus", [x], name="softplus")
    logits = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), b.const(wf)], name="fc", transB=1)
    return b.model(logits, input_shape=("N", C_IN, SIZE, SIZE)), [torch.tensor(a, dtype=torch.float64) for a in (w, wf)]


def _images(n: int = 4) -> np.ndarray:
    return np.random.RandomState(7).uniform(0.1, 1.0, (n, C_IN, SIZE, SIZE)).astype(np.float32)


def _layers_rtol() -> float:
    """Per element, as float32_bounds.one_sign_rtol: at conv, pool and dense layer a denominator
    over its fan-in and a transposed product over its fan-out, each within sum_rtol, and 3 more
    roundings."""
    layers = [(C_IN * K * K, C * K * K), (SIZE * SIZE, 1), (C, CLASSES)]
    return sum(sum_rtol(n_in) + sum_rtol(n_out) + 3 * U for n_in, n_out in layers)


#: float32 Softplus of z > 0 (here z > 0: positive terms): log(1 + exp z) has condition number
#: 1 / s <= 1 / log 2 in its argument, which carries exp's ulp (2 u) and the addition's u, plus
#: log's own ulp (2 u); the conv's error in z reaches s with a factor sigmoid(z) z / s <= 1.
SOFTPLUS_RTOL = 3 * U / math.log(2) + 2 * U + sum_rtol(C_IN * K * K)


def test_softplus_passes_relevance_and_lrp0_has_its_closed_form(tmp_path):
    model, (w, wf) = _net()
    path = tg.save(model, tmp_path / "softplus.onnx")
    table = {row["node"]: row for row in analyse(path, rules=LRP0).rule_table()}
    assert table["softplus"]["rule"] == R.PASS.describe()  # the activation family's rule, as for Relu
    x = _images()
    targets = np.arange(4) % CLASSES
    result = Explainer(path, rules=LRP0).explain(x, targets)

    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    z = F.conv2d(inputs, w, padding=1)
    s = F.softplus(z)
    a = s.mean(dim=(2, 3))
    logit = (a * wf[targets]).sum(dim=1)
    # LRP-0 from the target logit down: the dense layer and the pool by their z-rule, the Softplus passes
    r_s = s * (a * wf[targets] / a)[..., None, None] / (SIZE * SIZE)  # R_a = a w_t, spread over the pool
    c = (r_s / z).detach()  # LRP-0 at the conv is gradient x input with R / z held
    (F.conv2d(inputs, w, padding=1) * c).sum().backward()
    reference = (inputs * inputs.grad).detach().numpy()

    rtol = _layers_rtol() + SOFTPLUS_RTOL
    assert np.all(reference > 0)
    assert float(np.max(np.abs(result.relevance - reference) / reference)) <= rtol
    # the pass rule conserves: the input relevance sums to the explained logit
    assert result.initial == pytest.approx(logit.detach().numpy(), rel=rtol)
    totals = result.relevance.astype(np.float64).sum(axis=(1, 2, 3))
    assert totals == pytest.approx(logit.detach().numpy(), rel=rtol + sum_rtol(x[0].size))


def test_gradient_through_softplus_is_sigmoid(tmp_path):
    """Its VJP (the gradient preset) against torch autograd: d logit / dx."""
    model, (w, wf) = _net()
    path = tg.save(model, tmp_path / "softplus.onnx")
    x = _images()
    targets = np.arange(4) % CLASSES
    result = Explainer(path, preset="gradient").explain(x, targets)
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logit = (F.softplus(F.conv2d(inputs, w, padding=1)).mean(dim=(2, 3)) * wf[targets]).sum()
    logit.backward()
    reference = inputs.grad.numpy()
    # one-sign products: the conv's transpose over its fan-out, sigmoid(z) (3 roundings, and z's
    # error with a factor (1 - sigmoid(z)) z <= 1), the pool's and dense layer's scalings
    rtol = sum_rtol(C * K * K) + sum_rtol(C_IN * K * K) + 3 * U + 3 * 3 * U
    assert np.all(reference > 0)
    assert float(np.max(np.abs(result.relevance - reference) / reference)) <= rtol


def test_box_bounds_are_replayed_through_softplus(tmp_path):
    """Softplus is monotone: the z^B box given at the image is carried through it to the conv."""
    model, _ = _net(first="softplus")
    path = tg.save(model, tmp_path / "softplus_first.onnx")
    analysis = analyse(path, preset="epsilon-gamma-box")
    conv = analysis.graph.ops["conv"]
    low, high = np.full((1, C_IN, SIZE, SIZE), -2.0, np.float32), np.full((1, C_IN, SIZE, SIZE), 3.0, np.float32)
    box = _Box(analysis.graph, low, high, analysis.ir_version).at(conv.x)
    # float32 Softplus of a constant: 3 u / s through log's condition number 1 / s, plus log's ulp,
    # with s >= softplus(-2) = 0.127
    for given, which in ((low, "low"), (high, "high")):
        expected = np.log1p(np.exp(given.astype(np.float64)))
        assert float(np.max(np.abs(box(which) - expected) / expected)) <= 3 * U / float(expected.min()) + 2 * U
    result = Explainer(path, preset="epsilon-gamma-box").explain(_images())
    assert np.all(np.isfinite(result.relevance)) and np.abs(result.relevance).sum() > 0
