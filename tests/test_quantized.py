"""An int8 ResNet-18 as onnxruntime.quantization writes it (models/quantized_fixtures.py): QDQ
format (explained as deployed) and QOperator format (refused, naming the node)."""
import numpy as np

from conftest import ROOT
from onnxlrp import Explainer, OnnxLrpError, analyse
import pytest

FIXTURES = ROOT / "tests" / "fixtures" / "quantized"


def test_qdq_logits_are_the_quantized_models_own(monkeypatch):
    """The relevance graph runs the reference Q/DQ arithmetic (weights dequantized to float, the
    activations' QuantizeLinear/DequantizeLinear kept), and so does onnxruntime with graph
    optimisations off: the two agree to float32 rounding on any CPU. The deployed kernels
    (default optimisations: fused QLinearConv etc.) round as the CPU has them: bit-identical on
    AVX-512 VNNI, 1.24 off on AVX2 for models/audit/clean_int8.onnx; they are only reported
    (the audit's deployed-kernels figure). Here they are also simulated 3 output quantisation
    steps further off (tests/simulated_kernels.py): the comparison does not move."""
    import simulated_kernels
    from onnxlrp.audit.identity import output_step, own_logits, own_session, reference_session

    model = FIXTURES / "resnet18_qdq.onnx"
    step = output_step(model)
    ref = np.load(FIXTURES / "resnet18.npz")
    result = Explainer(model, cache=False).explain(ref["x"], warn=False)
    for simulated in (0, 3):
        with monkeypatch.context() as patch:
            simulated_kernels.install(patch, model, simulated * step)
            reference = own_logits(reference_session(model), ref["x"])
            deployed = own_logits(own_session(model), ref["x"])
        # float32 rounding: logits up to 1.3, float32 spacing 1.2e-7 there; 1e-5 allows ~80 ulps of
        # summation-order differences (measured: 0, the same kernels in the same order)
        assert np.abs(result.logits - reference).max() <= 1e-5
        print(f"deployed kernels, {simulated} step(s) simulated: "
              f"{np.abs(deployed - reference).max() / step:.2f} output quantisation steps from the reference")


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
