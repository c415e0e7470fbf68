"""Run the relevance graph in onnxruntime (CPU, or CUDA when asked)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ModelError, OnnxLrpError, SettingError, first_line

DEVICES = ("cpu", "cuda")
#: onnxruntime's Pad fusion folds a zero Pad into the MaxPool after it, which pads with -inf:
#: wrong wherever a border window is all negative (found on BiT's pre-activation stem, where
#: the plain forward of `evaluate` was off by 5e-3 of the largest logit).
DISABLED_OPTIMIZERS = ["Pad_Fusion"]
#: CUDA provider settings. TF32 (on by default in onnxruntime, on Ampere and later GPUs) rounds
#: float32 convolution inputs to 10 mantissa bits, about 1e-3 relative: far beyond the 1e-4 at
#: which GPU relevance should equal the CPU's. float16 graphs are not affected.
CUDA_OPTIONS = {"use_tf32": "0"}


def providers(device: str) -> list:
    """onnxruntime's provider list for `device` (the CUDA provider with CUDA_OPTIONS)."""
    if device == "cuda":
        return [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def quiet() -> None:
    """Silence onnxruntime's process-wide logger, which prints a failed CUDA provider's library
    errors (in colour, twice) before onnxlrp's one-line error says the same (the CLI)."""
    ort.set_default_logger_severity(4)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The session options onnxlrp runs every graph with."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # onnxruntime's warnings are not the user's business
    # A relevance graph holds many tensors from the forward pass to the backward pass; the
    # memory pattern (one block laid out from the first run) fragments around them and needs
    # about twice the memory of plain arena allocation, at no measurable gain in speed.
    options.enable_mem_pattern = False
    # A quantized model's weights are float constants in the relevance graph; onnxruntime's QDQ
    # rewrites would then drop Q/DQ pairs and change the logits (0.27 on the int8 ResNet-18
    # fixture). Without them the forward pass is the reference Q/DQ arithmetic, bit for bit
    # what onnxruntime computes for the model itself.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def session(model: onnx.ModelProto | bytes | str, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session on `device`; a one-line error if that device cannot run it."""
    if device not in DEVICES:
        raise SettingError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SettingError(
            "device cuda: this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
        )
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) or from torch;
        # it prints its warnings, which would land in a command's output
        with contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()
    options = session_options(threads)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        sess = ort.InferenceSession(data, options, providers=providers(device), disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as exc:
        raise ModelError(f"onnxruntime {ort.__version__} cannot load the relevance graph{_versions(data)} "
                           f"({first_line(exc)})") from None
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise SettingError(
            "device cuda: the CUDA execution provider could not start (no GPU, or CUDA/cuDNN libraries "
            "missing: pip install 'onnxruntime-gpu[cuda,cudnn]')"
        )
    return sess


def _versions(data: bytes | str) -> str:
    """' (IR version i, opset o)' of a graph onnxruntime refused: the usual cause is one newer
    than the installed onnxruntime reads."""
    try:
        model = onnx.load(data, load_external_data=False) if isinstance(data, str) else onnx.ModelProto.FromString(data)
    except Exception:
        return ""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
    return f" (IR version {model.ir_version}, opset {opset})"


def _run_bound(sess: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One run with IO binding: inputs copied to the device once, outputs fetched after the run."""
    device = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, device)
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def run_batched(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch_size: int, fixed_batch: int | None = None,
    io_binding: bool | None = None,
) -> dict[str, np.ndarray]:
    """Run in chunks along axis 0 and concatenate; a graph with a fixed batch size gets padded chunks.
    io_binding (default: on a GPU provider) binds inputs and outputs instead of plain run()."""
    n = len(next(iter(feeds.values())))
    size = fixed_batch or max(1, batch_size)
    names = [o.name for o in sess.get_outputs()]
    if io_binding is None:
        io_binding = sess.get_providers()[0] != "CPUExecutionProvider"
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, size):
        part = {k: v[start:start + size] for k, v in feeds.items()}
        count = len(next(iter(part.values())))
        if fixed_batch and count < fixed_batch:
            part = {k: np.concatenate([v, np.repeat(v[-1:], fixed_batch - count, axis=0)]) for k, v in part.items()}
        try:
            results = _run_bound(sess, names, part) if io_binding else sess.run(names, part)
        except Exception as exc:
            raise OnnxLrpError(f"onnxruntime failed on the relevance graph ({first_line(exc)})") from None
        for name, value in zip(names, results):
            chunks[name].append(value[:count])
    return {name: np.concatenate(values) for name, values in chunks.items()}


class Runner:
    """A session on a device, run in batches: padded to the batch size a graph fixes, with IO
    binding on GPU providers."""

    def __init__(self, sess: ort.InferenceSession, fixed_batch: int | None = None):
        self.session = sess
        self.fixed_batch = fixed_batch

    def run(self, feeds: dict[str, np.ndarray], batch_size: int = 16) -> dict[str, np.ndarray]:
        return run_batched(self.session, feeds, batch_size, self.fixed_batch)
