"""The graph stage: canonicalisation, residual merges and their skip kinds, rule tables."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import tiny_graphs as tg
from onnxlrp import Explainer, OnnxLrpError, analyse
from onnxlrp import rules as R
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


@pytest.mark.parametrize("skip, kind, detail", [("identity", "identity", ""), ("projection", "projection", ""),
                                                ("avgpool", "projection", "pooled"), ("maxpool", "other", "")])
def test_skip_kinds(skip, kind, detail, tmp_path):
    """ResNet-D's AvgPool + 1x1 conv has weights like any projection; pooling alone is 'other'."""
    analysis = analyse(tg.save(tg.residual_net(skip), tmp_path / "net.onnx"))
    (merge,) = analysis.merges
    assert (merge.kind, merge.detail, merge.node) == (kind, detail, "merge")
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
        # folding rounds W * s to float32 once per layer (~1e-7 relative); through 20 layers and float32 sums of
        # up to 4608 terms the logits move by ~1e-5 at most, 10x under the bound
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
    probabilities = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # The explained logits are the Softmax's input: their softmax is the model's output (float32
    # softmax of 5 values: rtol 1e-5 is ~100 units of float32 rounding), and they are not it.
    shifted = np.exp(result.logits - result.logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(shifted / shifted.sum(axis=1, keepdims=True), probabilities, rtol=1e-5, atol=1e-7)
    assert np.abs(result.logits - probabilities).max() > 0.1


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
    # the same arithmetic in another order (explicit Pad + unpadded conv vs padded conv): ~100 units of rounding
    np.testing.assert_allclose(explicit.explain(x).relevance, implicit.explain(x).relevance, rtol=1e-5, atol=1e-7)


def test_unsupported_ops_name_the_node(tmp_path):
    gated = analyse(tg.save(tg.gated_net(), tmp_path / "se.onnx"))  # a Sigmoid gate: explained (test_gates.py)
    assert gated.graph.ops["se_mul"].kind == "gate"
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


def test_rule_overrides_change_exactly_the_nodes_they_name(demo_model):
    """The first-layer rule belongs to the first conv; an override that takes that conv does
    not hand the first-layer rule on to the next conv or to the dense layer."""
    default = {row["node"]: row["rule"] for row in analyse(demo_model).rule_table()}
    convs = [name for name, rule in default.items() if name.endswith("Conv")]
    stem, gemm = convs[0], next(name for name in default if name.endswith("Gemm"))
    assert default[stem].startswith("flat") and default[gemm].startswith("epsilon")

    def table(rules):
        return {row["node"]: row["rule"] for row in analyse(demo_model, rules=rules).rule_table()}

    by_type = table({"Conv": R.epsilon(0.25)})
    assert all(by_type[name] == "epsilon(eps=0.25)" for name in convs)
    assert {n: r for n, r in by_type.items() if n not in convs} == {n: r for n, r in default.items() if n not in convs}
    by_name = table({stem: R.zplus()})
    assert by_name[stem].startswith("zplus")
    assert {n: r for n, r in by_name.items() if n != stem} == {n: r for n, r in default.items() if n != stem}


def _padded_conv_net(fill: float) -> onnx.ModelProto:
    """ReLU, then a Pad with a constant fill, then one conv: the conv's input is non-negative
    only where the fill is."""
    b = tg.Builder()
    tg.RNG.seed(11)
    x = b.op("Relu", ["x"], name="relu")
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    x = b.op("Pad", [x, pads, b.const(np.array(fill, np.float32))], name="pad")
    x = b.op("Conv", [x, b.const(tg.weights(2, 3, 3, 3))], name="conv", kernel_shape=[3, 3])
    return b.model(b.head(x, 2, classes=3), input_shape=("N", 3, 6, 6))


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_pad_with_a_negative_fill_is_not_non_negative(fill, tmp_path):
    """z+ drops the negative-input term only where the input is known >= 0; after a Pad with a
    negative fill it is not. Checked against z+ written out in numpy for the one conv."""
    path = tg.save(_padded_conv_net(fill), tmp_path / "pad.onnx")
    explainer = Explainer(path, rules={"Conv": R.zplus()}, probe="conv_out")
    if fill < 0:  # a zero Pad merges into the conv's own padding; this one stays, and is not >= 0
        assert "pad" in explainer.analysis.graph.ops and "pad_out" not in explainer.analysis.graph.nonneg
    x = np.random.RandomState(5).randn(1, 3, 6, 6).astype(np.float32)
    result = explainer.explain(x)
    r_out = result.probe[1][0].astype(np.float64)  # relevance at the conv output [2, 6, 6]
    a = np.pad(np.maximum(x[0], 0).astype(np.float64), ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    w = onnx.numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer
                                        if i.name == explainer.analysis.graph.ops["conv"].node.inputs[1].name)).astype(np.float64)
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    r_in = np.zeros_like(a)
    for o in range(2):
        for i in range(6):
            for j in range(6):
                patch = a[:, i:i + 3, j:j + 3]
                zp = (wp[o] * np.maximum(patch, 0) + wn[o] * np.minimum(patch, 0))
                r_in[:, i:i + 3, j:j + 3] += zp * r_out[o, i, j] / (zp.sum() + 1e-6)
    expected = r_in[:, 1:-1, 1:-1]  # the Pad's transpose drops what fell on the padding
    # float32 against float64 over 27-term sums: 1e-5 relative is ~100 units of float32 rounding
    np.testing.assert_allclose(result.relevance[0], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_building_the_relevance_graph_leaves_the_analysis_as_it_was(demo_model, tmp_path):
    """The builder works on its own copy: no renamed tensors, no extra MaxPool output, and the
    same analysis whether the explainer was built or found in the cache."""
    import shutil
    model = tmp_path / "model.onnx"
    shutil.copyfile(demo_model, model)

    def snapshot(analysis):
        graph = analysis.graph.canonical.graph
        return ([(n.name, n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes],
                [t.name for t in graph.inputs], [t.name for t in graph.outputs])

    before = snapshot(analyse(model, preset="paper"))
    built = Explainer(model, preset="paper", cache=False)  # builds from its analysis
    assert built._analysis is not None and snapshot(built.analysis) == before
    pools = [n for n in built.analysis.graph.canonical.graph.nodes if n.op == "MaxPool"]
    assert pools and all(len(n.outputs) == 1 for n in pools)
    Explainer(model, preset="paper")  # in the cache now, if it was not already
    found = Explainer(model, preset="paper")  # a cache hit: analyses on demand
    assert found._analysis is None and snapshot(found.analysis) == before
