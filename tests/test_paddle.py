"""PaddlePaddle models exported by paddle2onnx (fixtures: models/paddle_fixtures.py, no Paddle here).

What paddle2onnx writes that other exporters do not: a batch axis of ``dim_value: -1`` (before
1.0), every weight as a ``Constant`` node (opset 7), BatchNorm unfused after a Conv whose bias is
a separate Add, and HardSwish / HardSigmoid written out element by element
(``x * Clip(x + 3, 0, 6) / 6``) where the model's code spells them so. The references are
Paddle's own: its float32 logits, and Paddle autograd in float64 (gradient x input of the top
logit with every gate detached, and the true gradient).

The unit tests at the end pin the structural gate: a Mul of two computed tensors is a gate where
one factor is bounded by its structure (a bounded element-wise op, then constant arithmetic), and
stays refused where it is not.
"""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import tiny_graphs as tg
from conftest import ROOT
from float32_bounds import U, sum_rtol
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R
from onnxlrp.cli import app
from onnxlrp.errors import OnnxLrpError

PADDLE = ROOT / "tests" / "fixtures" / "paddle"
NAMES = [f"paddle_{net}_{mode}" for net in ("resnet", "lcnet") for mode in ("pir", "legacy")]
#: merges (identity, projection, other) and gates held constant, by network
MERGES = {"resnet": (0, 1, 0), "lcnet": (0, 0, 0)}
GATES = {"resnet": 0, "lcnet": 8}  # 5 HardSwish/HardSigmoid layers, 3 written out with Clip
EPS = 1e-6  # the default preset's stabiliser


def _load(name):
    ref = np.load(PADDLE / "reference.npz")
    net = name.split("_")[1]
    return str(PADDLE / f"{name}.onnx"), net, {k[len(net) + 1:]: ref[k] for k in ref.files if k.startswith(net + "_")}


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fan_ins(analysis) -> list[int]:
    fan_ins = []
    for op in analysis.graph.ops.values():
        if op.node.op == "Conv":
            fan_ins.append(int(np.prod(op.weight.shape[1:])))
        elif op.node.op in ("Gemm", "MatMul"):
            fan_ins.append(int(op.weight.size // op.outputs if op.node.op == "Gemm" else op.weight.shape[0]))
    return fan_ins


def _float32_bound(analysis) -> float:
    """Relative distance of a float32 pass from float64 through L linear layers of fan-in at
    most F: each layer's dot products are off by about sqrt(F) u (random-walk summation, see
    float32_bounds.py) and the errors add over the layers; 3x for the quadrature of forward and
    relevance pass and the spread between inputs, as float32_bounds.MULTIPLE (test_zoo's bound)."""
    fan_ins = _fan_ins(analysis)
    return 3 * len(fan_ins) * math.sqrt(max(fan_ins)) * U


@pytest.mark.parametrize("name", NAMES)
def test_fixtures_hold_paddle2onnx_quirks(name):
    """The files are what the issue is about (so the tests below test something)."""
    path, net, _ = _load(name)
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == {"resnet": 4, "lcnet": 5}[net]  # unfused
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if name.endswith("legacy"):
        assert batch.HasField("dim_value") and batch.dim_value == -1
        assert not model.graph.initializer
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        assert any(n.op_type == "Constant" and n.output[0] == conv.input[1] for n in model.graph.node)
    else:
        assert batch.HasField("dim_param") and model.graph.initializer
    if net == "lcnet":
        assert ops.count("Clip") == 3 and ops.count("HardSigmoid") == 5 and "HardSwish" not in ops


@pytest.mark.parametrize("name", NAMES)
def test_graph_finds_merges_gates_and_folds_batchnorm(name):
    path, net, _ = _load(name)
    analysis = analyse(path)
    kinds = tuple(sum(m.kind == k for m in analysis.merges) for k in ("identity", "projection", "other"))
    assert kinds == MERGES[net]
    table = analysis.rule_table()
    assert len(table) == len(analysis.graph.ops) and all(row["rule"] for row in table)
    assert sum(row["rule"] == "gate held constant" for row in table) == GATES[net]
    assert not any(op.node.op == "BatchNormalization" for op in analysis.graph.ops.values())  # all folded
    assert any("folded" in note for note in analysis.notes)
    assert analysis.image.batch is None and analysis.image.channels == 3 and analysis.height == 32


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_paddles(name):
    """The relevance graph's logits against Paddle's own float32 logits. Both are float32
    computations of one function, each within _float32_bound (relative, of the logit scale) of
    the exact float64 one, so of each other within twice that (2.2e-5 of the largest logit
    here); measured 2.3e-7 (resnet) and 3.3e-7 (lcnet)."""
    path, _, ref = _load(name)
    analysis = analyse(path)
    result = Explainer(path, cache=False).explain(ref["x"], target=ref["targets"], warn=False)
    bound = 2 * _float32_bound(analysis)
    for theirs in (ref["logits"], ref["logits64"]):
        scale = np.abs(theirs).max()
        assert np.abs(result.logits - theirs).max() <= bound * scale


@pytest.mark.parametrize("name", NAMES)
def test_lrp0_equals_paddle_gradient_x_input(name):
    """LRP-0 (epsilon 0 on every linear op, proportional split without stabiliser) equals Paddle
    autograd's gradient x input with every gate detached (plain for the ReLU net): the detached
    model is piecewise linear in its input. Measured 1.6e-7 (resnet) and 2.8e-7 (lcnet), bound 1.1e-5."""
    path, _, ref = _load(name)
    analysis = analyse(path)
    zero = {node: R.epsilon(0.0) for node, op in analysis.graph.ops.items() if op.linear}
    explainer = Explainer(path, rules=zero, split=Split("proportional", stabilizer=0.0), cache=False)
    result = explainer.explain(ref["x"], target=ref["targets"], warn=False)
    assert (result.targets == ref["targets"]).all()
    assert _relative(result.relevance, ref["relevance"]) < _float32_bound(analysis)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_preset_is_paddles_gradient(name):
    """The gradient runs through the gates too: HardSigmoid's and the written-out Clip's VJPs."""
    path, net, ref = _load(name)
    result = Explainer(path, preset="gradient", cache=False).explain(ref["x"], target=ref["targets"], warn=False)
    assert _relative(result.relevance, ref["gradient"]) < _float32_bound(analyse(path))
    if net == "lcnet":  # the gates' own gradient matters, or this would test nothing more
        detached = ref["relevance"] / np.where(ref["x"] == 0, 1, ref["x"])
        assert _relative(detached, ref["gradient"]) > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_default_preset_explains_and_conserves(name):
    """epsilon-plus-flat: no NaN (with biases); without biases only z+ convs absorb (units with
    no positive contribution) and every other op, the gates held constant included, hands on
    what it gets, as do the merges: the stabiliser's share EPS / |z| (|z| >= 0.1 here: the
    target logits are above 0.2) plus float32 rounding of the two totals compared and the op's
    own sums over at most 8 * 16 * 16 terms (as test_frameworks' bound)."""
    path, _, ref = _load(name)
    assert np.isfinite(Explainer(path, cache=False).explain(ref["x"], warn=False).relevance).all()
    explainer = Explainer(path, bias=False, trace=True, cache=False)
    result = explainer.explain(ref["x"], target=ref["targets"], warn=False)
    assert np.isfinite(result.relevance).all() and (np.abs(result.initial) > 0.1).all()
    bound = 3 * sum_rtol(8 * 16 * 16) + EPS / 0.1
    rules = explainer.analysis.rules
    for image in range(len(ref["x"])):
        for row in result.layer_report(image):
            if getattr(rules[row["node"]], "name", "") != "zplus":
                assert abs(row["absorbed"]) <= bound, (row, rules[row["node"]])
        for merge in result.merge_report(image):
            assert abs(merge["R"] - merge["R_skip"] - merge["R_main"]) <= bound * abs(merge["R"]), merge


def test_cli_graph_and_explain_on_every_fixture(tmp_path):
    runner = CliRunner()
    for name in NAMES:
        path = str(PADDLE / f"{name}.onnx")
        graph = runner.invoke(app, ["graph", path])
        assert graph.exit_code == 0, (name, graph.output)
        out = tmp_path / f"{name}.png"
        result = runner.invoke(app, ["explain", path, str(ROOT / "examples" / "demo.png"), "-o", str(out)])
        assert result.exit_code == 0, (name, result.output)
        assert out.stat().st_size > 0


# --- tiny hand-made graphs ---------------------------------------------------------------


def _hardswish_net(form: str, batch="N"):
    """conv -> an activation -> head. `form`: how the activation's factor is written."""
    tg.RNG.seed(41)
    b = tg.Builder()
    w, c = tg.weights(6, 3, 3, 3), tg.weights(6, scale=0.3)
    h = b.op("Conv", ["x", b.const(w), b.const(c)], name="conv", kernel_shape=[3, 3], pads=[1] * 4)
    three, zero, six = (b.const(np.array(v, np.float32)) for v in (3.0, 0.0, 6.0))
    if form == "div_after":  # Div(Mul(x, Clip(x + 3, 0, 6)), 6): the Mul is the gate
        clip = b.op("Clip", [b.op("Add", [h, three]), zero, six], name="clip")
        y = b.op("Div", [b.op("Mul", [h, clip], name="gate_mul"), six], name="div")
    elif form == "div_before":  # x * (Clip(x + 3, 0, 6) / 6), the factor on the left
        clip = b.op("Clip", [b.op("Add", [h, three]), zero, six], name="clip")
        y = b.op("Mul", [b.op("Div", [clip, six]), h], name="gate_mul")
    elif form == "plus_three":  # x * (x + 3): unbounded
        y = b.op("Mul", [h, b.op("Add", [h, three])], name="gate_mul")
    elif form == "relu":  # x * Relu(x): unbounded above
        y = b.op("Mul", [h, b.op("Relu", [h])], name="gate_mul")
    elif form == "clip_min_only":  # x * Clip(x + 3, 0): a ReLU, unbounded above
        y = b.op("Mul", [h, b.op("Clip", [b.op("Add", [h, three]), zero])], name="gate_mul")
    else:
        raise ValueError(form)
    logits = b.head(y, 6)
    return b.model(logits, input_shape=(batch, 3, 8, 8)), (w, c)


def _torch_hardswish(x, w, c, fc, fc_b, detach):
    h = F.conv2d(x, w, c, padding=1)
    gate = torch.clamp(h + 3, 0, 6)
    y = h * (gate.detach() if detach else gate) / 6
    return F.linear(y.mean(dim=(2, 3)), fc, fc_b)


@pytest.mark.parametrize("form", ["div_after", "div_before"])
def test_written_out_hardswish_is_a_gate(form, tmp_path):
    """x * Clip(x + 3, 0, 6) / 6 (either place of the / 6): the Mul holds the Clip's factor
    constant; LRP-0 is gradient x input with it detached, the gradient preset the true gradient
    (through the Clip's VJP). Bound: float32 against float64 through 2 layers of fan-in at most
    27, 3 * L * sqrt(F) u as _float32_bound."""
    model, (w, c) = _hardswish_net(form)
    path = tg.save(model, tmp_path / "hs.onnx")
    analysis = analyse(path)
    rules = {row["node"]: row["rule"] for row in analysis.rule_table()}
    assert rules["gate_mul"] == "gate held constant"
    gate = analysis.graph.ops["gate_mul"].gate
    assert gate.inputs[0].op in ("Clip", "Div")
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    fc_node = next(n for n in model.graph.node if n.name == "fc")
    fc, fc_b = (torch.tensor(init[n], dtype=torch.float64) for n in fc_node.input[1:])
    params = [torch.tensor(v, dtype=torch.float64) for v in (w, c)] + [fc, fc_b]
    x = np.random.RandomState(3).randn(3, 3, 8, 8).astype(np.float32)
    bound = 3 * 2 * math.sqrt(27) * U
    zero = {op: R.epsilon(0.0) for op in ("Conv", "Gemm", "GlobalAveragePool")}
    result = Explainer(path, rules=zero, cache=False).explain(x)
    targets = torch.from_numpy(result.targets)
    for detach, preset in ((True, None), (False, "gradient")):
        inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        _torch_hardswish(inputs, *params, detach=detach)[torch.arange(3), targets].sum().backward()
        if preset is None:
            ours, expected = result.relevance, (inputs * inputs.grad).detach().numpy()
        else:
            ours = Explainer(path, preset=preset, cache=False).explain(x, result.targets).relevance
            expected = inputs.grad.numpy()
        assert _relative(ours, expected) < bound, (detach, _relative(ours, expected))


@pytest.mark.parametrize("form", ["plus_three", "relu", "clip_min_only"])
def test_unbounded_factor_is_still_refused(form, tmp_path):
    path = tg.save(_hardswish_net(form)[0], tmp_path / "mul.onnx")
    with pytest.raises(OnnxLrpError) as info:
        analyse(path)
    message = str(info.value)
    assert "\n" not in message
    assert "node 'gate_mul' (Mul): no LRP rule for Mul of two computed tensors" in message


def test_factor_range_follows_constant_arithmetic(tmp_path):
    from onnxlrp.lrp.ops.gates import factor_range

    analysis = analyse(tg.save(_hardswish_net("div_before")[0], tmp_path / "hs.onnx"))
    op = analysis.graph.ops["gate_mul"]
    is_data = lambda t: t.name in {t.name for o in analysis.graph.ops.values() for t in o.data_inputs + [o.output]}
    assert factor_range(op.gate, is_data) == (0.0, 1.0)
    assert factor_range(op.x, is_data) is None  # the conv's output: no bound


@pytest.mark.parametrize("constant_weights", [False, True])
def test_negative_batch_dim_and_constant_weights(constant_weights, tmp_path):
    """A batch axis written as dim_value -1 is dynamic (it used to stop `graph` with "cannot
    compute the graph's shape inputs (negative dimensions are not allowed)", or, where a Reshape
    target holds a -1 too, "shape inference failed"), and weights in
    Constant nodes count as weights: with the channel axis left open, the channel count comes
    from the first Conv's weight, a Constant node."""
    model, _ = _hardswish_net("div_after")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    if constant_weights:
        dims[1].Clear()
        dims[1].dim_param = "C"
    # flatten with a computed shape (Shape -> Slice -> Concat), as paddle2onnx writes it
    flat = next(n for n in model.graph.node if n.op_type == "Flatten")
    pooled = flat.input[0]
    shape = onnx.helper.make_node("Shape", [pooled], ["pooled_shape"], name="shape")
    first = onnx.helper.make_node("Slice", ["pooled_shape", "s0", "s1"], ["batch_dim"], name="batch_dim")
    target = onnx.helper.make_node("Concat", ["batch_dim", "channels"], ["target"], name="target", axis=0)
    reshape = onnx.helper.make_node("Reshape", [pooled, "target"], list(flat.output), name="flatten")
    nodes = [n for n in model.graph.node if n is not flat]
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Gemm")
    for value, name in ((np.array([0]), "s0"), (np.array([1]), "s1"), (np.array([6]), "channels")):
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.int64), name))
    nodes[at:at] = [shape, first, target, reshape]
    if constant_weights:  # every initializer as a Constant node
        for init in list(model.graph.initializer):
            nodes.insert(0, onnx.helper.make_node("Constant", [], [init.name], name=f"{init.name}_node", value=init))
        del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    path = tg.save(model, tmp_path / "paddle_like.onnx")
    analysis = analyse(path)
    assert analysis.image.batch is None and analysis.image.channels == 3
    result = Explainer(path, cache=False).explain(np.random.RandomState(0).randn(2, 3, 8, 8).astype(np.float32))
    assert np.isfinite(result.relevance).all()


def test_the_audit_randomises_weights_written_as_constant_nodes():
    """The audit's randomisation cascade finds the convolutions of a model whose weights are
    Constant nodes (paddle2onnx at opset 7), as it does where they are initializers."""
    from onnxlrp.audit.sanity import randomisation

    maps = np.random.RandomState(0).rand(2, 32, 32).astype(np.float32)
    x = np.zeros((2, 3, 32, 32), np.float32)
    cascade = randomisation(PADDLE / "paddle_resnet_legacy.onnx", lambda path, x, t: maps, x, np.zeros(2, np.int64),
                            maps)
    assert cascade.steps and cascade.steps[-1][2] == pytest.approx(1.0)  # the same maps back: correlation 1
