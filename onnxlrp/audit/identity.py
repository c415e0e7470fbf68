"""What was audited, and whether the compiled explainer is faithful to the model itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from .. import __version__
from ..runtime.cache import file_digest
from ..runtime.session import providers, run_batched


def identity(path: Path, explainer) -> dict:
    """File, producer, opset, input, runtime and explainer facts, for the report's first table."""
    model = onnx.load(str(path), load_external_data=False)
    summary = explainer.summary
    image = summary.image
    merges = {kind: sum(m.kind == kind for m in summary.merges) for kind in ("identity", "projection", "other")}
    return {
        "model": str(path),
        "sha256": file_digest(path),
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
        "heatmap": summary.heatmap + (f" at {summary.heatmap_layer}" if summary.heatmap_layer else ""),
        "classes": summary.num_classes,
        "merges": merges,
        "notes": list(summary.notes),
        "warnings": list(summary.warnings),
    }


def output_step(path: Path) -> float | None:
    """One quantisation step of the model's output, where a DequantizeLinear writes it (an int8
    model): onnxruntime's int8 kernels and the reference Q/DQ arithmetic may round the logits
    one step apart."""
    model = onnx.load(str(path), load_external_data=False)
    output = model.graph.output[0].name
    producer = next((n for n in model.graph.node if output in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scales = {init.name: init for init in model.graph.initializer}
    scale = scales.get(producer.input[1])
    return float(np.max(np.abs(onnx.numpy_helper.to_array(scale)))) if scale is not None else None


def own_session(path: Path, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """The model file in plain onnxruntime (default session options), as deployed; on CUDA with
    TF32 off, as onnxlrp's own sessions, so that the two logits can agree to float32 rounding."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers(device))


def own_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The model's own logits (its first output) from a plain session (own_session)."""
    first = session.get_inputs()[0]
    fixed = first.shape[0] if isinstance(first.shape[0], int) else None
    return next(iter(run_batched(session, {first.name: x}, batch_size, fixed).values()))
