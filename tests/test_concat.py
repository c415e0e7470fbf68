"""Concatenation and slicing route relevance back to each part exactly (DenseNet-style
concatenation, ResNeSt-style channel groups).

Reference: torch autograd in float64 on the same weights; the network is piecewise linear, so
LRP-0 (epsilon 0, no split here) equals gradient x input.
"""
import numpy as np
import torch
import torch.nn.functional as F

import tiny_graphs as tg
from float32_bounds import U
from onnxlrp import Explainer, analyse
from onnxlrp import rules as R


def _net():
    """stem -> ReLU -> two convs concatenated on channels, plus the stem's output twice (the same
    tensor in two places) -> conv -> ReLU -> channels 2..9 sliced out -> head."""
    tg.RNG.seed(41)
    b = tg.Builder()
    w = {k: tg.weights(*shape) for k, shape in dict(stem=(4, 3, 3, 3), a=(3, 4, 3, 3), b=(5, 4, 1, 1),
                                                    mix=(10, 16, 3, 3), fc=(3, 7)).items()}
    fc_b = tg.weights(3, scale=0.1)
    x = b.op("Relu", [b.op("Conv", ["x", b.const(w["stem"])], name="stem", kernel_shape=[3, 3], pads=[1] * 4)])
    pa = b.op("Relu", [b.op("Conv", [x, b.const(w["a"])], kernel_shape=[3, 3], pads=[1] * 4)])
    pb = b.op("Relu", [b.op("Conv", [x, b.const(w["b"])], kernel_shape=[1, 1])])
    cat = b.op("Concat", [pa, x, pb, x], name="cat", axis=1)  # 3 + 4 + 5 + 4 = 16 channels
    h = b.op("Relu", [b.op("Conv", [cat, b.const(w["mix"])], kernel_shape=[3, 3], pads=[1] * 4)])
    part = b.op("Slice", [h, b.const(np.array([2], np.int64)), b.const(np.array([9], np.int64)),
                          b.const(np.array([1], np.int64))], name="slice")
    logits = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [part])], axis=1), b.const(w["fc"]),
                           b.const(fc_b)], name="fc", transB=1)
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}
    params["fc_b"] = torch.tensor(fc_b, dtype=torch.float64)
    return b.model(logits, input_shape=("N", 3, 8, 8)), params


def _torch(x, p):
    x = F.relu(F.conv2d(x, p["stem"], padding=1))
    cat = torch.cat([F.relu(F.conv2d(x, p["a"], padding=1)), x, F.relu(F.conv2d(x, p["b"])), x], dim=1)
    h = F.relu(F.conv2d(cat, p["mix"], padding=1))[:, 2:9]
    return F.linear(h.mean(dim=(2, 3)), p["fc"], p["fc_b"])


def test_lrp0_equals_gradient_times_input(tmp_path):
    model, params = _net()
    path = tg.save(model, tmp_path / "cat.onnx")
    x = np.random.RandomState(8).randn(3, 3, 8, 8).astype(np.float32)
    zero = {op: R.epsilon(0.0) for op in ("Conv", "Gemm", "GlobalAveragePool")}
    result = Explainer(path, rules=zero).explain(x)
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    _torch(inputs, params)[torch.arange(3), torch.from_numpy(result.targets)].sum().backward()
    expected = (inputs * inputs.grad).detach().numpy()
    # float32 against float64 through 4 layers of at most 144 terms, away from kinks (random
    # inputs): typical error sqrt(144) u per layer; 20 x that for 4 layers leaves room for tails
    bound = 20 * 4 * np.sqrt(144) * U
    assert np.linalg.norm(result.relevance - expected) / np.linalg.norm(expected) < bound


def test_flat_rules_conserve_through_concat_and_slice(tmp_path):
    """Flat everywhere conserves whatever the weights; Concat hands each part its own share
    (all of it), Slice hands back what it took; nothing is absorbed on the way."""
    path = tg.save(_net()[0], tmp_path / "cat.onnx")
    assert {row["op_type"] for row in analyse(path).rule_table()} >= {"Concat", "Slice"}
    flat = {op: R.flat() for op in ("Conv", "Gemm", "GlobalAveragePool")}
    result = Explainer(path, rules=flat, trace=True).explain(np.random.RandomState(9).randn(2, 3, 8, 8).astype(np.float32))
    for row in result.layer_report(1):
        # flat divides by (fan-in + 1e-6): 1e-6 / 36 relative at most, plus float32 sums of at
        # most 1024 terms (Higham-Mary: 8 sqrt(1024) u = 1.5e-5)
        assert abs(row["absorbed"]) < 3e-5, row
