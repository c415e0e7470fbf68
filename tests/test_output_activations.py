"""A classifier's output activation (Softmax, LogSoftmax, Sigmoid on a one-logit head): stripped
by canonicalisation, recorded as a field (Canonical.output_activation, Summary.output_activation),
and applied by the audit to the relevance graph's logits before it compares them with the
model's own output."""
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT
from onnxlrp import Explainer, analyse
from onnxlrp.audit import audit
from onnxlrp.audit.run import activated
from onnxlrp.compiler import Summary

DEMO = ROOT / "models" / "demo" / "tiny_resnet.onnx"
SHAPES = ROOT / "examples" / "shapes"


def with_activation(path, op: str):
    """The demo model with `op` after its logits; Sigmoid after a one-logit head (logits @ W, [N, 1])."""
    model = onnx.load(str(DEMO))
    source = model.graph.output[0].name
    shape = ["batch", 6]
    if op == "Sigmoid":
        weight = np.random.default_rng(0).standard_normal((6, 1)).astype(np.float32) * 0.5
        model.graph.initializer.append(numpy_helper.from_array(weight, "head_weight"))
        model.graph.node.append(helper.make_node("MatMul", [source, "head_weight"], ["head"], name="head"))
        source, shape = "head", ["batch", 1]
    attrs = {} if op == "Sigmoid" else {"axis": 1}
    model.graph.node.append(helper.make_node(op, [source], ["scores"], name="final", **attrs))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Sigmoid"])
def test_the_output_activation_is_stripped_and_recorded(tmp_path, op):
    path = with_activation(tmp_path / f"{op}.onnx", op)
    analysis = analyse(path)
    assert analysis.graph.canonical.output_activation == op and analysis.output_activation == op
    explainer = Explainer(path, cache=False)
    assert explainer.summary.output_activation == op
    assert Summary.from_json(explainer.summary.to_json()).output_activation == op
    x = np.random.default_rng(1).standard_normal((3, *explainer.input_shape[1:])).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    own = session.run(None, {session.get_inputs()[0].name: x})[0]
    ours = activated(explainer.explain(x, warn=False).logits, op)
    # float32 rounding: the logits (|z| < 10) agree to ~1e-6; the activations' derivative is at most 1
    assert np.abs(ours - own).max() < 1e-5


def test_a_model_without_one_records_none():
    assert analyse(DEMO).graph.canonical.output_activation is None
    assert Explainer(DEMO, cache=False).summary.output_activation is None


def _sample(tmp_path, per_class=1):
    root = tmp_path / "sample"
    root.mkdir()
    for name in (SHAPES / "classes.txt").read_text().split():
        for image in sorted((SHAPES / name).glob("*.png"))[:per_class]:
            shutil.copy(image, root / f"{name}-{image.name}")
    return root


@pytest.mark.parametrize("op", ["LogSoftmax", "Sigmoid"])
def test_the_audit_compares_like_with_like(tmp_path, op):
    """A LogSoftmax model failed the logits check at 722 x its threshold: the audit applied a
    softmax only where a note's text said so. Now the field says which activation to apply."""
    path = with_activation(tmp_path / f"{op}.onnx", op)
    result = audit(path, _sample(tmp_path), sanity_images=0)
    assert result.checks["logits"] < 1
    assert result.identity["output_activation"] == op
    assert not [f for f in result.findings if f.check == "logits"]
    if op == "Sigmoid":  # one logit: the confidence is its sigmoid, not a softmax over one score (1.0)
        assert all(0 < r["confidence"] < 1 for r in result.rows)
