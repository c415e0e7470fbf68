"""Gates x * g (squeeze-excitation, SiLU): held constant for LRP, differentiated for gradients.

References: torch autograd in float64 on the same weights. With the gate detached the network
is piecewise linear in its input, so LRP-0 with a proportional split (no stabiliser) equals
gradient x input of that detached model; the `gradient` preset equals the true gradient.
"""
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_graphs as tg
from conftest import ROOT
from float32_bounds import U
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R


def _se_net(gate_op: str):
    """stem -> ReLU -> squeeze-excitation (mean, conv, ReLU, conv, gate) -> x * g, merged with
    the stem's output -> SiLU (x * sigmoid(x)) -> head."""
    tg.RNG.seed(31)
    b = tg.Builder()
    w = {k: tg.weights(*shape) for k, shape in dict(stem=(6, 3, 3, 3), down=(3, 6, 1, 1), up=(6, 3, 1, 1),
                                                    body=(6, 6, 3, 3), fc=(4, 6)).items()}
    c = {k: tg.weights(n, scale=0.3) for k, n in dict(stem=6, down=3, up=6, body=6, fc=4).items()}
    x = b.op("Relu", [b.op("Conv", ["x", b.const(w["stem"]), b.const(c["stem"])], name="stem", kernel_shape=[3, 3], pads=[1] * 4)])
    h = b.op("Conv", [x, b.const(w["body"]), b.const(c["body"])], name="body", kernel_shape=[3, 3], pads=[1] * 4)
    s = b.op("ReduceMean", [h], axes=[2, 3], keepdims=1)
    s = b.op("Relu", [b.op("Conv", [s, b.const(w["down"]), b.const(c["down"])], kernel_shape=[1, 1])])
    g = b.op(gate_op, [b.op("Conv", [s, b.const(w["up"]), b.const(c["up"])], kernel_shape=[1, 1])], name="gate")
    y = b.op("Add", [x, b.op("Mul", [h, g], name="se_mul")], name="merge")
    y = b.op("Mul", [y, b.op("Sigmoid", [y], name="silu_sigmoid")], name="silu")
    logits = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1), b.const(w["fc"]), b.const(c["fc"])],
                  name="fc", transB=1)
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}
    params.update({f"{k}_b": torch.tensor(v, dtype=torch.float64) for k, v in c.items()})
    return b.model(logits, input_shape=("N", 3, 8, 8)), params


def _torch(x, p, gate_op: str, detach: bool):
    squash = torch.sigmoid if gate_op == "Sigmoid" else (lambda t: torch.clamp(0.2 * t + 0.5, 0, 1))
    cut = (lambda t: t.detach()) if detach else (lambda t: t)
    x = F.relu(F.conv2d(x, p["stem"], p["stem_b"], padding=1))
    h = F.conv2d(x, p["body"], p["body_b"], padding=1)
    s = F.relu(F.conv2d(h.mean(dim=(2, 3), keepdim=True), p["down"], p["down_b"]))
    y = x + h * cut(squash(F.conv2d(s, p["up"], p["up_b"])))
    y = y * cut(torch.sigmoid(y))
    return F.linear(y.mean(dim=(2, 3)), p["fc"], p["fc_b"])


@pytest.mark.parametrize("gate_op", ["Sigmoid", "HardSigmoid"])
def test_lrp0_holds_the_gate_constant(gate_op, tmp_path):
    model, params = _se_net(gate_op)
    path = tg.save(model, tmp_path / "se.onnx")
    analysis = analyse(path)
    assert [m.node for m in analysis.merges] == ["merge"]
    rules = {row["node"]: row["rule"] for row in analysis.rule_table()}
    assert rules["se_mul"] == rules["silu"] == "gate held constant"
    x = np.random.RandomState(4).randn(3, 3, 8, 8).astype(np.float32)
    zero = {op: R.epsilon(0.0) for op in ("Conv", "Gemm", "GlobalAveragePool", "ReduceMean")}
    result = Explainer(path, rules=zero, split=Split("proportional", stabilizer=0.0)).explain(x)
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    _torch(inputs, params, gate_op, detach=True)[torch.arange(3), torch.from_numpy(result.targets)].sum().backward()
    expected = (inputs * inputs.grad).detach().numpy()
    # float32 against float64 through 4 layers of at most 54 terms, away from kinks (random
    # inputs): typical error sqrt(54) u per layer; 20 x that for 4 layers leaves room for tails
    bound = 20 * 4 * np.sqrt(54) * U
    assert np.linalg.norm(result.relevance - expected) / np.linalg.norm(expected) < bound


@pytest.mark.parametrize("gate_op", ["Sigmoid", "HardSigmoid"])
def test_gradient_goes_through_the_gate(gate_op, tmp_path):
    model, params = _se_net(gate_op)
    path = tg.save(model, tmp_path / "se.onnx")
    x = np.random.RandomState(5).randn(2, 3, 8, 8).astype(np.float32)
    targets = np.array([1, 3])
    ours = Explainer(path, preset="gradient").explain(x, targets).relevance
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    _torch(inputs, params, gate_op, detach=False)[torch.arange(2), torch.from_numpy(targets)].sum().backward()
    detached = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    _torch(detached, params, gate_op, detach=True)[torch.arange(2), torch.from_numpy(targets)].sum().backward()
    reference = inputs.grad.numpy()
    error = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    # the same bound as above; and the gate's own gradient must matter here, or this tests nothing
    assert error < 20 * 4 * np.sqrt(54) * U
    assert np.linalg.norm(detached.grad.numpy() - reference) / np.linalg.norm(reference) > 1e-3


def test_flat_rules_conserve_through_gates(tmp_path):
    """Flat on every layer conserves whatever the weights; the gate hands its signal all of R."""
    path = tg.save(_se_net("Sigmoid")[0], tmp_path / "se.onnx")
    flat = {op: R.flat() for op in ("Conv", "Gemm", "GlobalAveragePool", "ReduceMean")}
    explainer = Explainer(path, rules=flat, split="ratio", trace=True)
    result = explainer.explain(np.random.RandomState(6).randn(2, 3, 8, 8).astype(np.float32))
    for row in result.layer_report(0):
        # flat divides by (fan-in + 1e-6): 1e-6 / 27 relative at most, plus float32 sums of at most
        # 384 terms (Higham-Mary: 8 sqrt(384) u = 9.4e-6)
        assert abs(row["absorbed"]) < 2e-5, row
    assert abs(result.conservation_error[0]) < 1e-4


def test_timm_seresnet18_is_explained(tmp_path):
    """timm's squeeze-excitation ResNet (reduced width, committed fixture): merges found, a rule
    for every node, the gates held constant, flat rules conserving per op."""
    fixture = ROOT / "tests" / "fixtures" / "timm_seresnet18.onnx"
    analysis = analyse(fixture)
    assert Counter(m.kind for m in analysis.merges) == Counter({"identity": 4, "projection": 4})  # reduced width
    gates = [row for row in analysis.rule_table() if row["rule"] == "gate held constant"]
    assert len(gates) == 8  # one squeeze-excitation per block
    flat = {op: R.flat() for op in ("Conv", "Gemm", "MatMul", "GlobalAveragePool", "ReduceMean", "AveragePool")}
    explainer = Explainer(fixture, rules=flat, split="ratio", trace=True)
    result = explainer.explain(np.random.RandomState(7).randn(1, *explainer.input_shape[1:]).astype(np.float32))
    worst = max(abs(row["absorbed"]) for row in result.layer_report(0))
    # flat's stabiliser (1e-6 / fan-in) and float32 sums of up to 512*7*7 terms: 8 sqrt(n) u ~ 1e-4
    assert worst < 2e-4


def test_gate_share_half_sends_half_into_the_gate_branch(tmp_path):
    """GateShare("half"): the Mul hands half of R to the signal and half to the gate (summed
    over the axes it broadcasts along), so it conserves; the branch passes its share on, and
    with flat rules the whole net still conserves."""
    path = tg.save(_se_net("Sigmoid")[0], tmp_path / "se.onnx")
    flat = {op: R.flat() for op in ("Conv", "Gemm", "GlobalAveragePool", "ReduceMean")}
    x = np.random.RandomState(8).randn(2, 3, 8, 8).astype(np.float32)
    held = Explainer(path, rules=flat, split="ratio", cache=False).explain(x)
    shared = Explainer(path, rules={**flat, "se_mul": R.GateShare("half")}, split="ratio", trace=True,
                       cache=False).explain(x)
    rows = {row["node"]: row for row in shared.layer_report(0)}
    assert abs(rows["se_mul"]["absorbed"]) < 2e-5  # the bound of test_flat_rules_conserve_through_gates
    assert rows["gate"]["out"] != 0  # the Sigmoid now receives relevance
    assert np.abs(shared.conservation_error).max() < 1e-4
    assert np.linalg.norm(shared.relevance - held.relevance) > 1e-3 * np.linalg.norm(held.relevance)
    with pytest.raises(ValueError, match="unknown gate share"):
        R.GateShare("third")
