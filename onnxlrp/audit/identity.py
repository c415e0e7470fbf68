"""What was audited, and whether the compiled explainer is faithful to the model itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from .. import __version__
from ..errors import SettingError
from ..ir.digest import model_digest
from ..runtime.session import providers, run_batched


def identity(path: Path, explainer) -> dict:
    """File, producer, opset, input, runtime and explainer facts, for the report's first table."""
    model = onnx.load(str(path), load_external_data=False)
    summary = explainer.summary
    image = summary.image
    merges = {kind: sum(m.kind == kind for m in summary.merges) for kind in ("identity", "projection", "other")}
    return {
        "model": str(path),
        "sha256": model_digest(path),
        "size_bytes": path.stat().st_size,
        "producer": f"{model.producer_name} {model.producer_version}".strip() or "unknown",
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "metadata": {p.key: p.value for p in model.metadata_props},
        "input": {"name": image.name, "layout": image.layout, "channels": image.channels,
                  "height": summary.height, "width": summary.width},
        "preprocessing": explainer.preprocessing.name,
        "onnxruntime": ort.__version__,
        "execution_provider": explainer.session.get_providers()[0],
        "onnxlrp": __version__,
        "preset": summary.preset,
        "split": summary.split,
        "include_identity": summary.include_identity,
        "bias": explainer.options.bias,
        "low": list(explainer.options.low) if explainer.options.low is not None else None,
        "high": list(explainer.options.high) if explainer.options.high is not None else None,
        "precision": explainer.options.precision,
        "output_activation": summary.output_activation,
        "heatmap": summary.heatmap + (f" at {summary.heatmap_layer}" if summary.heatmap_layer else ""),
        "classes": summary.num_classes,
        "merges": merges,
        "notes": list(summary.notes),
        "warnings": list(summary.warnings),
    }


def output_step(path: Path) -> float | None:
    """One quantisation step of the model's output, where a DequantizeLinear writes it (an int8
    model): the unit the deployed int8 kernels' difference from the reference Q/DQ arithmetic
    is counted in, and the one step by which a float32 rounding difference before the last
    QuantizeLinear (x.5 ties rounding the other way) can move the reference logits."""
    model = onnx.load(str(path), load_external_data=False)
    output = model.graph.output[0].name
    producer = next((n for n in model.graph.node if output in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scales = {init.name: init for init in model.graph.initializer}
    scale = scales.get(producer.input[1])
    return float(np.max(np.abs(onnx.numpy_helper.to_array(scale)))) if scale is not None else None


def own_session(path: Path, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """The model file in plain onnxruntime (default session options), as deployed: the deployed
    kernels, which for an int8 model are onnxruntime's fused int8 kernels (QLinearConv, ...),
    whose rounding depends on the CPU (AVX2, AVX-512 VNNI). On CUDA with TF32 off, as onnxlrp's
    own sessions, so that float logits can agree to float32 rounding."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers(device))


def reference_session(path: Path, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """The model file in onnxruntime with graph optimisations off: the graph as written, so an
    int8 (QDQ) model runs the reference Q/DQ arithmetic (weights dequantized to float, float
    Conv/Gemm, the activations' QuantizeLinear/DequantizeLinear), on any CPU: the arithmetic of
    the relevance graph (runtime.session disables the QDQ rewrites there), so the two agree to
    float32 rounding. The integrity gate compares with this; own_session is the deployed one."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers(device))


def own_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The model's own output (its first; the logits, or their output activation) from a session
    on the model file (reference_session, own_session)."""
    first = session.get_inputs()[0]
    fixed = first.shape[0] if isinstance(first.shape[0], int) else None
    return next(iter(run_batched(session, {first.name: x}, batch_size, fixed).values()))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def activated(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """The model's output from the relevance graph's logits: the output activation canonicalisation
    stripped (Summary.output_activation: Softmax, LogSoftmax, Sigmoid), or the logits themselves."""
    z = np.asarray(logits, dtype=np.float64)
    if activation is None:
        return z
    if activation == "Softmax":
        return _softmax(z)
    if activation == "LogSoftmax":
        shifted = z - z.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if activation == "Sigmoid":
        return 1 / (1 + np.exp(-z))
    raise SettingError(f"unknown output activation '{activation}'")


def confidences(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """Per image and class, the probability the model gives: a one-logit Sigmoid head's sigmoid,
    else the softmax of the logits (whatever the model's own output is)."""
    return activated(logits, "Sigmoid") if activation == "Sigmoid" else _softmax(np.asarray(logits, np.float64))
