"""Every exporter: TFLite models through tf2onnx (float, and dynamic-range int8 with weights behind
DequantizeLinear) and Hugging Face transformers classifiers through torch.onnx.

Fixtures and references come from models/tflite_fixtures.py and models/transformers_fixtures.py
(dev-only environments; nothing here imports tensorflow or transformers). Each reference.npz
holds the framework's own logits (the TFLite interpreter; torch) and float64 gradient x input of
the top logit (tf.GradientTape; torch autograd with GELU, SE gates and LayerNorm sigma detached):
the models are piecewise linear once those are detached, so LRP-0 with a proportional split
(no stabiliser, biases in the denominators) must equal it.
"""
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import float32_bounds
from conftest import ROOT
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R
from onnxlrp.cli import app

TFLITE, HF = ROOT / "tests" / "fixtures" / "tflite", ROOT / "tests" / "fixtures" / "transformers"
TFLITE_NAMES = ("float", "int8")
HF_NAMES = ("hf_resnet", "hf_convnext", "hf_regnet")
#: (identity, projection, other) merges
HF_MERGES = {"hf_resnet": (2, 1, 0), "hf_convnext": (2, 0, 0), "hf_regnet": (1, 2, 0)}


def _fixture(name):
    """(path, references with this fixture's arrays under plain names)."""
    folder, key = (TFLITE, f"small_{name}") if name in TFLITE_NAMES else (HF, name)
    data = np.load(folder / "reference.npz")
    ref = {k[: -len(name) - 1]: data[k] for k in data.files if k.endswith("_" + name)}
    ref["x"] = data["x"]
    return folder / f"{key}.onnx", ref


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_float32_bound = float32_bounds.layered_bound  # float32 through L layers of fan-in at most F


def _lrp0(path, ref):
    analysis = analyse(path)
    zero = {node: R.epsilon(0.0) for node, op in analysis.graph.ops.items() if op.linear}  # LRP-0 on every linear op
    explainer = Explainer(path, rules=zero, split=Split("proportional", stabilizer=0.0), cache=False)
    return analysis, explainer.explain(ref["x"], target=ref["targets"], warn=False)


# --- what the exporters wrote ---------------------------------------------------------------------

def test_tflite_fixtures_have_the_exporters_quirks():
    """NHWC input, a Transpose to NCHW; int8: weights as int8 initializers behind DequantizeLinear
    (per output channel, axis 0, 4-D and 2-D), no QuantizeLinear, and the hybrid dense layer's
    input and bias through DynamicQuantizeLinear -> DequantizeLinear."""
    for name in TFLITE_NAMES:
        model = onnx.load(str(TFLITE / f"small_{name}.onnx"))
        ops = Counter(n.op_type for n in model.graph.node)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims[1:]] == [32, 32, 3] and ops["Transpose"] >= 1
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        weights = [inits[n.input[0]] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8]
        assert ops["QuantizeLinear"] == 0
        if name == "int8":
            assert len(weights) == 8 and {w.ndim for w in weights} == {2, 4} and ops["DynamicQuantizeLinear"] == 2
        else:
            assert not weights and "DequantizeLinear" not in ops


def test_int8_tflite_rules_pass_the_quantize_pairs():
    analysis = analyse(TFLITE / "small_int8.onnx")
    rules = {row["op_type"]: row["rule"] for row in analysis.rule_table()}
    assert rules["DynamicQuantizeLinear"] == rules["DequantizeLinear"] == "pass"
    assert sum(op.node.op == "Conv" for op in analysis.graph.ops.values()) == 9  # every weight dequantized


@pytest.mark.parametrize("name", HF_NAMES)
def test_transformers_merges(name):
    kinds = Counter(m.kind for m in analyse(HF / f"{name}.onnx").merges)
    assert (kinds["identity"], kinds["projection"], kinds["other"]) == HF_MERGES[name]


# --- logits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TFLITE_NAMES + HF_NAMES)
def test_logits_are_the_exact_models(name):
    """Against float64 TF / torch: the float32 bound, relative to the largest logit. int8: the
    exact model is the one the ONNX file computes (dequantized weights, the dense layer's dynamic
    quantization of input and bias; models/tflite_fixtures.py)."""
    path, ref = _fixture(name)
    result = Explainer(path, cache=False).explain(ref["x"], warn=False)
    error = np.abs(result.logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert error < _float32_bound(analyse(path)), error


def test_float_tflite_logits_are_the_interpreters():
    """Two float32 implementations (TFLite's XNNPACK kernels, ours), each within the float32
    bound of float64: apart by at most twice it."""
    path, ref = _fixture("float")
    result = Explainer(path, cache=False).explain(ref["x"], warn=False)
    error = np.abs(result.logits - ref["tflite_logits"]).max() / np.abs(ref["tflite_logits"]).max()
    assert error < 2 * _float32_bound(analyse(path)), error


def test_int8_tflite_logits_are_the_interpreters_within_the_quantisation_step():
    """The interpreter's hybrid kernels round every int8-weight layer's input to int8 (step
    max|a| / 127) where the ONNX file computes in float, except for the dense layer's
    DynamicQuantizeLinear (uint8, step range / 255, input and bias). Each is bounded against the
    exact float64 function by 6 standard deviations of uniform rounding through the float64
    Jacobian (quant_bound, onnx_quant_bound in reference.npz), plus float32 rounding of ours."""
    path, ref = _fixture("int8")
    result = Explainer(path, cache=False).explain(ref["x"], warn=False)
    float32 = _float32_bound(analyse(path)) * np.abs(ref["logits"]).max()
    bound = ref["quant_bound"] + ref["onnx_quant_bound"] + float32
    error = np.abs(result.logits - ref["tflite_logits"])
    assert np.all(error <= bound), (error.max(), bound.min())
    # and not trivially: the interpreter's activation rounding is visible, far above float32's
    assert error.max() > 100 * float32


def test_int8_tflite_logits_are_onnxruntimes_own():
    """onnxruntime on the file itself: the DynamicQuantizeLinear of the constant bias, computed
    in canonicalisation, must be the one onnxruntime computes (a flipped rounding moves a logit by
    a bias step times its weight, ~1e-3, far above the two float32 passes' 2x bound)."""
    from onnxlrp.audit.identity import own_logits, own_session

    path, ref = _fixture("int8")
    result = Explainer(path, cache=False).explain(ref["x"], warn=False)
    own = own_logits(own_session(path), ref["x"])
    assert np.abs(result.logits - own).max() / np.abs(own).max() < 2 * _float32_bound(analyse(path))


# --- relevance ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TFLITE_NAMES + HF_NAMES)
def test_lrp0_equals_gradient_x_input(name):
    path, ref = _fixture(name)
    analysis, result = _lrp0(path, ref)
    np.testing.assert_array_equal(result.targets, ref["targets"])
    assert _relative(result.relevance, ref["relevance"]) < _float32_bound(analysis)


@pytest.mark.parametrize("name", TFLITE_NAMES + HF_NAMES)
def test_default_preset_explains_without_nan(name):
    path, ref = _fixture(name)
    result = Explainer(path, cache=False).explain(ref["x"], warn=False)
    assert np.all(np.isfinite(result.relevance)) and np.abs(result.relevance).sum() > 0


def test_explain_cli_on_the_int8_tflite_model(tmp_path):
    out = tmp_path / "int8.png"
    result = CliRunner().invoke(app, ["explain", str(TFLITE / "small_int8.onnx"), str(ROOT / "examples" / "demo.png"),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
