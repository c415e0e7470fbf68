"""ResNet variants from real exporters (models/zoo_fixtures.py): gates, concatenation, slices,
normalisations, ReLU6, HardSwish, GELU, shapes computed in the graph.

The reference for every fixture is torch autograd in float64 (tests/fixtures/zoo/*.npz, written
by models/zoo_fixtures.py with models/detach.py): gradient x input of the model in which every
gate factor and every normalisation's standard deviation is detached. That model is piecewise
linear in its input, so LRP-0 with a proportional split (no stabiliser) must equal it.
"""
import math

import numpy as np
import pytest

import float32_bounds
from conftest import ROOT
from float32_bounds import U
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R
from onnxlrp.cli import app
from typer.testing import CliRunner

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

ZOO = ROOT / "tests" / "fixtures" / "zoo"
#: fixture -> (identity, projection, other) merges: what each architecture has
MERGES = {
    "convnext_tiny": (5, 0, 0),  # one identity merge per block, no projections (downsampling sits between stages)
    "ecaresnet26t": (4, 4, 0),  # two bottlenecks per stage, the first with an avg-pool + 1x1 projection
    "efficientnet_b0": (4, 0, 0),  # MBConv blocks with equal in/out channels and stride 1
    "mobilenet_v2": (11, 0, 0),
    "mobilenet_v3_small": (7, 0, 0),
    "regnet_y_400mf": (2, 4, 0),  # the first block of each of 4 stages projects
    "resnest14d": (0, 4, 0),  # one block per stage, each with a projection
    "resnetv2_50x1_bit": (3, 4, 0),
}
NAMES = sorted(MERGES)


def _load(name):
    return str(ZOO / f"{name}.onnx"), np.load(ZOO / f"{name}.npz")


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", NAMES)
def test_graph_reports_merges_and_a_rule_for_every_node(name):
    path, _ = _load(name)
    analysis = analyse(path)
    kinds = tuple(sum(m.kind == k for m in analysis.merges) for k in ("identity", "projection", "other"))
    assert kinds == MERGES[name]
    table = analysis.rule_table()
    assert len(table) == len(analysis.graph.ops) and all(row["rule"] for row in table)


_lrp0_bound = float32_bounds.layered_bound  # float32 through L layers of fan-in at most F


@pytest.mark.parametrize("name", NAMES)
def test_lrp0_equals_gradient_x_input_with_gates_and_sigma_detached(name):
    path, ref = _load(name)
    analysis = analyse(path)
    zero = {node: R.epsilon(0.0) for node, op in analysis.graph.ops.items() if op.linear}  # LRP-0 on every linear op
    zero["Clip"] = R.GRADIENT  # and ReLU6 by its gradient (the preset's Pass is Zennit's, not LRP-0's)
    explainer = Explainer(path, rules=zero, split=Split("proportional", stabilizer=0.0), cache=False)
    result = explainer.explain(ref["x"], target=ref["targets"], warn=False)
    assert _relative(result.relevance, ref["relevance"]) < _lrp0_bound(analysis)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_preset_is_the_true_gradient(name):
    """Gates and normalisation statistics differentiated (the reference is not detached)."""
    path, ref = _load(name)
    result = Explainer(path, preset="gradient", cache=False).explain(ref["x"], target=ref["targets"], warn=False)
    assert _relative(result.relevance, ref["relevance_gradient"]) < _lrp0_bound(analyse(path))


@pytest.mark.parametrize("name", NAMES)
def test_epsilon_preset_is_close_to_lrp0(name):
    """epsilon 1e-6 on every linear op: within 1e-2 of LRP-0 (the issue's bound; the stabiliser
    and float32 rounding at ReLU inputs within 1e-6 of zero; measured 4e-4 to 7e-3)."""
    path, ref = _load(name)
    result = Explainer(path, preset="epsilon", split="proportional", cache=False).explain(
        ref["x"], target=ref["targets"], warn=False)
    assert _relative(result.relevance, ref["relevance"]) < 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_flat_rule_conserves_per_op(name):
    """Flat on every conv, dense layer and pool, sigma held on the norms (LRP-0 without bias
    conserves), every stabiliser zero: each op hands on what it gets, up to flat's stabiliser
    (1e-6 of a receptive field's count) and the float32 totals. Those are rounded on the sum
    of |R| (where skip and main branch nearly cancel, as on BiT's pre-activation merges, the
    total is a small fraction of it), with random-walk error sqrt(n) u for n terms; 3x that
    for the two totals compared and the spread. The exception by design: Clip absorbs
    relevance where it holds its output at the cap (measured: at most 8e-6 elsewhere)."""
    path, ref = _load(name)
    analysis = analyse(path)
    rules = {node: (R.epsilon(0.0) if op.kind == "norm" else R.PASS if op.kind == "affine" else R.flat())
             for node, op in analysis.graph.ops.items() if op.linear}
    explainer = Explainer(path, rules=rules, split=Split("proportional", stabilizer=0.0), bias=False, trace=True,
                          cache=False)
    result = explainer.explain(ref["x"], target=ref["targets"], warn=False)
    for image in range(len(ref["x"])):
        for row in result.layer_report(image):
            op = analysis.graph.ops[row["node"]]
            if op.node.op == "Clip":
                continue
            terms = max(int(np.prod(t.shape[1:])) for t in [op.output, *op.data_inputs])
            assert abs(row["leak"]) < 1e-6 + 3 * math.sqrt(terms) * U, row


def test_explain_writes_a_heatmap_for_every_fixture(tmp_path):
    runner = CliRunner()
    for name in NAMES:
        out = tmp_path / f"{name}.png"
        result = runner.invoke(app, ["explain", str(ZOO / f"{name}.onnx"), str(ROOT / "examples" / "demo.png"),
                                     "-o", str(out)])
        assert result.exit_code == 0, (name, result.output)
        assert out.stat().st_size > 0


def test_plain_forward_runs_without_onnxruntimes_pad_fusion():
    """BiT's stem pads with zeros before its MaxPool; onnxruntime's Pad fusion folds that into
    the pool, which pads with -inf: wrong where a border window is all negative (the relevance
    graph escapes it, as its MaxPool also returns the argmax). onnxlrp's sessions run without
    that fusion; here the plain forward of `evaluate` (Forward). Bound: float32 forward against
    float64, as for the relevance (with the fusion the error is 5e-3 of the largest logit)."""
    from onnxlrp.evaluation.baselines import Forward

    path, ref = _load("resnetv2_50x1_bit")
    forward = Forward(path)
    logits = forward.session.run(None, {forward.session.get_inputs()[0].name: ref["x"]})[0]
    error = np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert error < _lrp0_bound(analyse(path))
