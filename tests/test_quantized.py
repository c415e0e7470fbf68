"""An int8 ResNet-18 as onnxruntime.quantization writes it (models/quantized_fixtures.py): QDQ
format (explained as deployed) and QOperator format (refused, naming the node)."""
import numpy as np

from conftest import ROOT
from onnxlrp import Explainer, OnnxLrpError, analyse
import pytest

FIXTURES = ROOT / "tests" / "fixtures" / "quantized"


def test_qdq_logits_are_the_quantized_models_own():
    """onnxruntime's own logits for the QDQ model, computed here, on this machine's kernels
    (default optimisations; models/quantized_fixtures.py found them bit-identical to the
    reference Q/DQ arithmetic with optimisations off). The relevance graph runs that reference
    arithmetic, so they agree to float32 rounding."""
    from onnxlrp.audit.identity import own_logits, own_session

    ref = np.load(FIXTURES / "resnet18.npz")
    result = Explainer(FIXTURES / "resnet18_qdq.onnx", cache=False).explain(ref["x"], warn=False)
    assert np.abs(result.logits - own_logits(own_session(FIXTURES / "resnet18_qdq.onnx"), ref["x"])).max() <= 1e-5


def test_qdq_graph_keeps_its_merges_and_passes_relevance_through_qdq():
    analysis = analyse(FIXTURES / "resnet18_qdq.onnx")
    kinds = [m.kind for m in analysis.merges]
    assert kinds.count("identity") == 5 and kinds.count("projection") == 3  # as the float model
    rules = {row["op_type"]: row["rule"] for row in analysis.rule_table()}
    assert rules["QuantizeLinear"] == rules["DequantizeLinear"] == "pass"
    # ReLUs are gone: a zero point at the low end of int8 clamps, and says the output is >= 0
    convs = [op for op in analysis.graph.ops.values() if op.node.op == "Conv"]
    assert sum(op.x.name in analysis.graph.nonneg for op in convs) >= 10


def test_qdq_heatmaps_are_close_to_the_float_models():
    """epsilon-plus-flat on the int8 model vs its float source, same inputs and classes: the
    activations are rounded to 256 levels, so the maps differ, by 0.07 to 0.14 (rel. L2) here."""
    ref = np.load(FIXTURES / "resnet18.npz")
    quantized = Explainer(FIXTURES / "resnet18_qdq.onnx", cache=False).explain(ref["x"], warn=False)
    float_ = Explainer(FIXTURES / "resnet18_float.onnx", cache=False).explain(ref["x"], target=quantized.targets,
                                                                             warn=False)
    for q, f in zip(quantized.relevance, float_.relevance):
        assert np.linalg.norm(q - f) / np.linalg.norm(f) < 0.25


def test_qoperator_model_is_refused_naming_the_node():
    with pytest.raises(OnnxLrpError, match=r"node '/conv1/Conv_quant' \(QLinearConv\).*QDQ"):
        analyse(FIXTURES / "resnet18_qoperator.onnx")
