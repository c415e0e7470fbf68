"""Normalisation ops as single ONNX nodes (LayerNormalization, GroupNormalization of opsets 18
and 21, InstanceNormalization): LRP-0 with sigma held equals gradient x input of the torch
model with the standard deviation detached (float64 autograd); the gradient preset is the
true gradient."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_graphs as tg
from float32_bounds import U
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R

C, G, EPS = 6, 3, 1e-5


def _norm(t, kind, scale, bias, detach):
    """(t - mean) / std * scale + bias, std detached or not (the mean never)."""
    n = t.shape[0]
    axes = {"layer": (1, 2, 3), "instance": (2, 3)}.get(kind)
    grouped = t.reshape(n, G, -1) if kind == "group" else t
    dims = (2,) if kind == "group" else axes
    mean = grouped.mean(dim=dims, keepdim=True)
    std = torch.sqrt(((grouped - mean) ** 2).mean(dim=dims, keepdim=True) + EPS)
    y = ((grouped - mean) / (std.detach() if detach else std)).reshape(t.shape)
    return y * scale + bias


def _net(kind: str, opset: int):
    tg.RNG.seed(41)
    b = tg.Builder()
    w = dict(stem=tg.weights(C, 3, 3, 3), fc=tg.weights(4, C))
    c = dict(stem=tg.weights(C, scale=0.3), fc=tg.weights(4, scale=0.3))
    per = {"layer": (C, 8, 8), "group": (G,) if opset < 21 else (C,), "instance": (C,)}[kind]
    scale, bias = 1 + tg.weights(*per, scale=0.3), tg.weights(*per, scale=0.3)
    h = b.op("Conv", ["x", b.const(w["stem"]), b.const(c["stem"])], kernel_shape=[3, 3], pads=[1] * 4)
    op = {"layer": "LayerNormalization", "group": "GroupNormalization", "instance": "InstanceNormalization"}[kind]
    attrs = dict(epsilon=EPS, **({"axis": 1} if kind == "layer" else {"num_groups": G} if kind == "group" else {}))
    h = b.op(op, [h, b.const(scale), b.const(bias)], name="norm", **attrs)
    h = b.op("Relu", [h])
    logits = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1), b.const(w["fc"]), b.const(c["fc"])],
                  transB=1)
    as64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    shape = {"layer": (1, C, 8, 8)}.get(kind, (1, C, 1, 1))
    if kind == "group" and opset < 21:
        scale, bias = np.repeat(scale, C // G), np.repeat(bias, C // G)
    params = dict(stem=as64(w["stem"]), stem_b=as64(c["stem"]), fc=as64(w["fc"]), fc_b=as64(c["fc"]),
                  scale=as64(scale).reshape(shape), bias=as64(bias).reshape(shape))
    model = b.model(logits, input_shape=("N", 3, 8, 8), opset=opset)
    model.ir_version = 10 if opset >= 21 else model.ir_version  # opset 21 needs IR 10
    return model, params


def _torch(x, p, kind, detach):
    h = F.relu(_norm(F.conv2d(x, p["stem"], p["stem_b"], padding=1), kind, p["scale"], p["bias"], detach))
    return F.linear(h.mean(dim=(2, 3)), p["fc"], p["fc_b"])


CASES = [("layer", 17), ("group", 21), ("instance", 17)]  # GroupNormalization-18 is deprecated: the checker refuses it


@pytest.mark.parametrize("kind,opset", CASES)
def test_lrp0_holds_sigma_constant(kind, opset, tmp_path):
    model, params = _net(kind, opset)
    path = tg.save(model, tmp_path / "norm.onnx")
    analysis = analyse(path)
    zero = {name: R.epsilon(0.0) for name, op in analysis.graph.ops.items() if op.linear}
    x = np.random.RandomState(3).randn(3, 3, 8, 8).astype(np.float32)
    result = Explainer(path, rules=zero, split=Split("proportional", stabilizer=0.0), cache=False).explain(x)
    targets = torch.from_numpy(result.targets)
    for detach, preset in ((True, None), (False, "gradient")):
        inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        _torch(inputs, params, kind, detach)[torch.arange(3), targets].sum().backward()
        if preset is None:
            ours, expected = result.relevance, (inputs * inputs.grad).detach().numpy()
        else:
            ours = Explainer(path, preset="gradient", cache=False).explain(x, result.targets).relevance
            expected = inputs.grad.numpy()
        # three layers (conv of 27 inputs, the norm over up to 384 values, dense of 6): random-walk
        # rounding sqrt(384) u per layer; 3 x 3 layers of it as in tests/test_zoo.py
        assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 3 * 3 * np.sqrt(384) * U


def test_group_norm_rule_and_description(tmp_path):
    path = tg.save(_net("group", 21)[0], tmp_path / "norm.onnx")
    rows = {row["node"]: row for row in analyse(path).rule_table()}
    assert rows["norm"]["info"] == "normalised over 3 groups"
    assert rows["norm"]["rule"].startswith("zplus") is False  # a norm is not a conv: it gets epsilon
