"""The graph stage: canonicalisation, residual merges and their skip kinds, rule tables."""
import json

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import tiny_graphs as tg
from onnxlrp import Explainer, OnnxLrpError, analyse
from onnxlrp.cli import app


def kinds(analysis):
    return [m.kind for m in analysis.merges]


@pytest.mark.parametrize("arch, merges, projections", [("resnet18", 8, 3), ("resnet50", 16, 4)])
def test_torchvision_merges(arch, merges, projections, request):
    net = request.getfixturevalue(arch)
    for path in (net.folded, net.kept):
        found = kinds(analyse(path))
        assert len(found) == merges
        assert found.count("projection") == projections
        assert found.count("identity") == merges - projections


def test_graph_cli_json(resnet50):
    result = CliRunner().invoke(app, ["graph", str(resnet50.folded), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["merges"]) == 16
    assert payload["merge_counts"] == {"identity": 12, "projection": 4, "other": 0}
    projection = next(m for m in payload["merges"] if m["kind"] == "projection")
    assert len(projection["skip_branch"]) == 1 and projection["skip_branch"][0].endswith("Conv")
    rules = {row["op_type"]: row["rule"] for row in payload["nodes"]}
    assert rules["Add"] == "ratio split" and rules["Gemm"].startswith("epsilon")


def test_graph_cli_table(demo_model):
    result = CliRunner().invoke(app, ["graph", str(demo_model), "--preset", "paper"])
    assert result.exit_code == 0, result.output
    assert "6 residual merges (4 identity, 2 projection, 0 other)" in result.stdout
    assert "zplus-ones" in result.stdout  # the paper's stem rule


@pytest.mark.parametrize("skip, kind", [("identity", "identity"), ("projection", "projection"),
                                        ("avgpool", "other"), ("maxpool", "other")])
def test_skip_kinds(skip, kind, tmp_path):
    analysis = analyse(tg.save(tg.residual_net(skip), tmp_path / "net.onnx"))
    (merge,) = analysis.merges
    assert merge.kind == kind and merge.node == "merge"
    assert merge.main_branch[-1] == "main2"
    assert merge.fork == "stem_relu"


def test_add_of_a_constant_is_not_a_merge(tmp_path):
    path = tg.save(tg.residual_net("identity", bias_add=True), tmp_path / "net.onnx")
    kept = analyse(path, preset="paper")  # no folding: the Add of a constant stays, as an affine op
    assert [m.node for m in kept.merges] == ["merge"]
    assert kept.graph.ops["bias_add"].kind == "affine"
    assert kept.merges[0].main_branch[-1] == "bias_add"
    folded = analyse(path)  # folded into the conv before it, like a BatchNorm shift
    assert "bias_add" not in folded.graph.ops and folded.merges[0].main_branch[-1] == "main2"


def test_batchnorm_folding_keeps_the_function(resnet18, images):
    """Folding BN changes the graph, not the logits: compare with the original model in onnxruntime."""
    original = ort.InferenceSession(str(resnet18.kept), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    folded = Explainer(resnet18.kept, preset="epsilon-plus-flat")
    kept = Explainer(resnet18.kept, preset="paper")
    assert folded.analysis.graph.canonical.batchnorms == 0
    assert folded.analysis.graph.canonical.folded_batchnorms == 20
    assert kept.analysis.graph.canonical.batchnorms == 20
    for explainer in (folded, kept):
        np.testing.assert_allclose(explainer.explain(images).logits, original, rtol=1e-4, atol=1e-4)


def test_identity_dropout_and_softmax_are_stripped(tmp_path):
    b = tg.Builder()
    x = b.op("Identity", ["x"], name="id")
    x = b.op("Relu", [b.conv(x, 3, 4, name="stem")])
    x = b.op("Dropout", [x], name="drop")
    probs = b.op("Softmax", [b.head(x, 4)], name="final_softmax", axis=1)
    path = tg.save(b.model(probs), tmp_path / "net.onnx")
    analysis = analyse(path)
    ops = {op.node.op for op in analysis.graph.ops.values()}
    assert not ops & {"Identity", "Dropout", "Softmax"}
    assert any("Softmax 'final_softmax'" in note for note in analysis.notes)
    x = np.random.RandomState(1).randn(2, 3, 16, 16).astype(np.float32)
    result = Explainer(path).explain(x)
    np.testing.assert_allclose(result.logits.sum(axis=1) != 1, True)  # logits, not probabilities


def test_zero_pad_merges_into_conv_and_maxpool(tmp_path):
    """An explicit zero Pad before Conv / MaxPool (as tf2onnx writes it) explains like the conv's own padding."""
    def net(explicit: bool):
        b = tg.Builder()
        tg.RNG.seed(3)
        w = tg.weights(8, 3, 3, 3)
        pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        x = b.op("Pad", ["x", pads], name="pad1") if explicit else "x"
        x = b.op("Conv", [x, b.const(w)], name="conv", kernel_shape=[3, 3], pads=[0] * 4 if explicit else [1] * 4)
        x = b.op("Relu", [x], name="relu")
        x = b.op("Pad", [x, pads], name="pad2") if explicit else x
        x = b.op("MaxPool", [x], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[0] * 4 if explicit else [1] * 4)
        tg.RNG.seed(4)
        return tg.save(b.model(b.head(x, 8)), tmp_path / f"net{explicit}.onnx")

    x = np.random.RandomState(2).randn(2, 3, 16, 16).astype(np.float32)
    explicit, implicit = Explainer(net(True)), Explainer(net(False))
    assert "Pad" not in {op.node.op for op in explicit.analysis.graph.ops.values()}
    np.testing.assert_allclose(explicit.explain(x).relevance, implicit.explain(x).relevance, rtol=1e-5, atol=1e-7)


def test_unsupported_ops_name_the_node(tmp_path):
    with pytest.raises(OnnxLrpError, match=r"se.onnx: node 'se_sigmoid' \(Sigmoid\): no LRP rule for op type Sigmoid"):
        analyse(tg.save(tg.gated_net(), tmp_path / "se.onnx"))
    b = tg.Builder()
    x = b.op("Relu", [b.conv("x", 3, 8, name="stem")])
    product = b.op("Mul", [x, b.op("Relu", [b.conv(x, 8, 8)])], name="gate_mul")
    with pytest.raises(OnnxLrpError, match=r"node 'gate_mul' \(Mul\): no LRP rule for Mul of two computed tensors"):
        analyse(tg.save(b.model(b.head(product, 8)), tmp_path / "mul.onnx"))
    with pytest.raises(OnnxLrpError, match=r"node 'act_tanh' \(Tanh\): no LRP rule for op type Tanh"):
        analyse(tg.save(tg.tanh_net(), tmp_path / "tanh.onnx"))


def test_first_layer_rule_goes_to_the_first_conv_only(resnet18):
    rules = analyse(resnet18.folded, preset="epsilon-plus-flat").rule_table()
    convs = [row for row in rules if row["op_type"] == "Conv"]
    assert convs[0]["rule"].startswith("flat") and all(r["rule"].startswith("zplus") for r in convs[1:])
    gemm = next(row for row in rules if row["op_type"] == "Gemm")
    assert gemm["rule"].startswith("epsilon")
    alpha_beta = analyse(resnet18.folded, preset="epsilon-alpha2-beta1").rule_table()
    assert all(r["rule"].startswith("alpha-beta") for r in alpha_beta if r["op_type"] == "Conv")
