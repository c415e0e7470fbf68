"""Rewrite the graph into the canonical form the LRP rules expect.

Each pass is a small function over an onnx-graphsurgeon graph, applied in order by
:func:`canonicalize`. The forward function of the model never changes, only its
spelling:

- quantized constants (int8 weights, int32 biases behind DequantizeLinear) dequantized;
- constants folded (Constant nodes, Identity on weights, static shape arithmetic; shapes
  the graph computes from its input were evaluated before, in onnxlrp.ir.model);
- Split turned into one Slice per output, so that every op has one data output;
- Identity and Dropout removed;
- a final Softmax / LogSoftmax (or Sigmoid on a one-logit head) removed, and recorded
  (Canonical.output_activation): relevance starts at the logits before it;
- Gemm normalised (alpha = beta = 1), MatMul on a 2-D input plus a constant Add
  turned into one Gemm, so the dense layer's bias is part of the layer;
- ``auto_pad`` resolved into explicit pads;
- a constant zero Pad merged into the Conv / pool after it, so rules that ignore
  input values (flat, w^2, z^B) see the zero padding as padding;
- BatchNormalization folded into the Conv before it, and so are per-channel constant
  Mul / Add / Sub / Div chains after a Conv (BatchNorm as tf2onnx writes an unfused Keras
  BatchNormalization). Optional: the ``paper`` preset keeps them, as the published
  implementation ignores BatchNorm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelError
from .model import ImageInput


def quiet_graphsurgeon():
    """onnx-graphsurgeon's warnings (constant folding's chatter) are not for users: silenced
    while onnxlrp works on a graph, the user's own setting back afterwards."""
    return gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.ERROR)


# The rewrites below match ONNX graph patterns (a Pad before a Conv or pool, BatchNorm after a
# Conv, MatMul + Add as Gemm) by op type: they are rewrites of ONNX, before any adapter exists,
# not facts about ops (those live on the adapters in onnxlrp/lrp/ops).
POOLS = ("MaxPool", "AveragePool")  # window ops with pads and auto_pad (a graph pattern, not op knowledge)
#: the output activations a classifier ships with, stripped by _logits (Sigmoid on a one-logit head only)
OUTPUT_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")


@dataclass
class Canonical:
    """A canonical graph with its image input and logits tensor, plus notes on what changed."""

    graph: gs.Graph
    input: gs.Variable
    logits: gs.Variable
    folded_batchnorms: int = 0
    stripped_softmax: str | None = None  # name of the removed output-activation node
    notes: list[str] = field(default_factory=list)
    # the output activation removed after the logits (OUTPUT_ACTIVATIONS), None where there was
    # none: whoever compares with the model's own output applies it to the logits again
    output_activation: str | None = None

    @property
    def batchnorms(self) -> int:
        return sum(node.op == "BatchNormalization" for node in self.graph.nodes)


def canonicalize(
    model: onnx.ModelProto, image: ImageInput, fold_batchnorm: bool = True, path: str = "model"
) -> Canonical:
    with quiet_graphsurgeon():
        return _canonicalize(model, image, fold_batchnorm, path)


def _canonicalize(model: onnx.ModelProto, image: ImageInput, fold_batchnorm: bool, path: str) -> Canonical:
    graph = gs.import_onnx(model)
    _name_nodes(graph)
    _dequantize_constants(graph)
    try:
        graph.fold_constants(error_ok=True).cleanup()
    except Exception:  # folding is an optimisation; a graph it cannot fold is still usable
        graph.cleanup()
    _split_to_slices(graph)
    _remove_identities(graph)
    logits, activation, stripped = _logits(graph, path)
    graph.outputs = [logits]
    graph.cleanup()
    _normalise_gemm(graph)
    _matmul_add_to_gemm(graph)
    _resolve_auto_pad(graph)
    _merge_pads(graph)
    folded = 0
    while fold_batchnorm:  # again after a conv bias Add folds: paddle2onnx writes Conv, Add(bias), BatchNorm
        step = _fold_batchnorms(graph) + _fold_channel_affine(graph)
        folded, fold_batchnorm = folded + step, step > 0
    graph.cleanup().toposort()
    inp = next(t for t in graph.inputs if t.name == image.name)
    canonical = Canonical(graph, inp, logits, folded, stripped, output_activation=activation)
    if activation:
        canonical.notes.append(f"explaining the logits before the final {activation} '{stripped}'")
    if folded:
        canonical.notes.append(f"folded {folded} BatchNorm / per-channel scale-shift node(s) into the Conv before them")
    return canonical


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: errors and `onnxlrp graph` refer to nodes by name."""
    taken = {node.name for node in graph.nodes if node.name}
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            # A generated name must not be one the model already uses (a node called Relu_1
            # elsewhere): two nodes of one name would merge into one DAG vertex.
            name, k = f"{node.op}_{i}", 1
            while name in taken:
                name, k = f"{node.op}_{i}_{k}", k + 1
            node.name = name
            taken.add(name)
        seen.add(node.name)


def _dequantize_constants(graph: gs.Graph) -> None:
    """DequantizeLinear of constants (a quantized model's weights and biases) -> float constants.

    onnx-graphsurgeon's folding leaves Q/DQ alone on purpose; the rules need the weights as
    numbers. Activations keep their Q/DQ pairs: the forward pass stays the quantized model's.

    A DynamicQuantizeLinear of a constant (tf2onnx quantizes a hybrid TFLite dense layer's
    float bias so) is computed here, as the ONNX spec and onnxruntime do it in float32: its
    integers, scale and zero point become constants for the DequantizeLinear after it."""
    for node in graph.nodes:
        if node.op != "DynamicQuantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
            continue
        x = node.inputs[0].values.astype(np.float32)
        low, high = np.float32(min(float(x.min(initial=0.0)), 0.0)), np.float32(max(float(x.max(initial=0.0)), 0.0))
        scale = np.float32((high - low) / np.float32(255))
        if scale == 0:
            scale = np.float32(1)
        zero = np.clip(np.rint(np.float32(0) - low / scale), 0, 255)  # rint: halves to even, as the spec
        q = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
        for out, value in zip(list(node.outputs), (q, np.array(scale, np.float32), np.array(zero, np.uint8))):
            _reroute(graph, out, gs.Constant(f"{out.name}/computed", value))
        node.outputs.clear()
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
            continue
        # in float32, as onnxruntime computes it: the forward pass stays bit for bit the model's
        q, scale = node.inputs[0].values, node.inputs[1].values.astype(np.float32)
        zero = node.inputs[2].values.astype(np.int64) if len(node.inputs) > 2 and node.inputs[2].name else 0
        axis = int(node.attrs.get("axis", 1))
        if np.ndim(scale) == 1 and q.ndim > 1:  # per-channel along `axis`
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale = scale.reshape(shape)
            zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
        value = ((q.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)
        out = node.outputs[0]
        _bypass(graph, node, gs.Constant(f"{out.name}/dequantized", value))
    graph.cleanup()


def _split_to_slices(graph: gs.Graph) -> None:
    """Split -> one Slice per output (constant sizes): relevance of each part then goes back
    to its own place in the input, and every op on the data path has one data output."""
    for node in list(graph.nodes):
        if node.op != "Split":
            continue
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank is None:
            continue
        axis = int(node.attrs.get("axis", 0)) % rank
        sizes = node.attrs.get("split")
        if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
            sizes = _const(node.inputs[1])
        if sizes is None:  # equal parts (the last one smaller)
            total, parts = x.shape[axis], len(node.outputs)
            if not isinstance(total, int):
                continue
            chunk = -(-total // parts)
            sizes = [min(chunk, total - i * chunk) for i in range(parts)]
        begin = 0
        for out, size in zip(list(node.outputs), [int(v) for v in sizes]):
            bounds = [gs.Constant(f"{out.name}/{what}", np.array([v], dtype=np.int64))
                      for what, v in (("starts", begin), ("ends", begin + size), ("axes", axis))]
            graph.nodes.append(gs.Node("Slice", f"{node.name}/{out.name}", inputs=[x, *bounds], outputs=[out]))
            begin += size
        node.outputs.clear()
    graph.cleanup().toposort()


def _bypass(graph: gs.Graph, node: gs.Node, replacement: gs.Tensor) -> None:
    """Route every consumer of the node's first output to `replacement` instead."""
    _reroute(graph, node.outputs[0], replacement)
    node.outputs.clear()


def _reroute(graph: gs.Graph, out: gs.Tensor, replacement: gs.Tensor) -> None:
    """Every consumer of tensor `out` (and the graph's outputs) reads `replacement` instead."""
    for consumer in list(out.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is out:
                consumer.inputs[i] = replacement
    graph.outputs = [replacement if t is out else t for t in graph.outputs]


def _remove_identities(graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op in ("Identity", "Dropout") and node.inputs:
            _bypass(graph, node, node.inputs[0])
    graph.cleanup()


def _logits(graph: gs.Graph, path: str) -> tuple[gs.Variable, str | None, str | None]:
    """The class-score tensor, and the output activation stripped after it: (logits, its op type
    (one of OUTPUT_ACTIVATIONS) or None, the removed node's name or None). Softmax and LogSoftmax
    over the class axis of [batch, classes]; Sigmoid where it squashes one logit, [batch, 1]
    (a multi-label head's Sigmoid over several classes stays: each score is its own output)."""
    if len(graph.outputs) != 1:
        names = ", ".join(t.name for t in graph.outputs)
        raise ModelError(f"{path}: model has {len(graph.outputs)} outputs ({names}); expected one class-score output")
    logits = graph.outputs[0]
    activation = stripped = None
    producer = logits.inputs[0] if logits.inputs else None
    before = producer.inputs[0] if producer is not None and producer.inputs else None
    shape = before.shape if before is not None else None
    two_d = shape is not None and len(shape) == 2
    if producer is not None and producer.op in ("Softmax", "LogSoftmax") and two_d:
        # opset < 13 defaults to axis 1 (flattened from there), 13 on to -1: on [batch, classes] both the classes
        if int(producer.attrs.get("axis", 1)) in (1, -1):
            activation = producer.op
    elif producer is not None and producer.op == "Sigmoid" and two_d and shape[1] == 1:
        activation = producer.op
    if activation is not None:
        stripped = producer.name
        logits = before
    shape = logits.shape
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        raise ModelError(
            f"{path}: output '{logits.name}' has shape {shape}; expected class scores of shape [batch, classes]"
        )
    logits.dtype = np.float32
    return logits, activation, stripped


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def _normalise_gemm(graph: gs.Graph) -> None:
    """Fold alpha and beta into the constants, so a Gemm is x @ W(^T) + b."""
    for node in graph.nodes:
        if node.op != "Gemm" or len(node.inputs) < 2:
            continue
        weight = _const(node.inputs[1])
        alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
        if weight is not None and alpha != 1.0:
            node.inputs[1] = gs.Constant(f"{node.name}/W", np.asarray(weight * alpha, dtype=weight.dtype))
            node.attrs["alpha"] = 1.0
        if beta != 1.0 and (len(node.inputs) < 3 or not node.inputs[2].name):
            node.attrs["beta"] = 1.0  # no C (absent or the empty optional input): beta scales nothing
        elif beta != 1.0:
            bias = _const(node.inputs[2])
            if bias is not None:
                # np.asarray: a 0-d C (valid ONNX) times a float is a numpy scalar, which gs.Constant refuses
                node.inputs[2] = gs.Constant(f"{node.name}/B", np.asarray(bias * beta, dtype=bias.dtype))
                node.attrs["beta"] = 1.0


def _matmul_add_to_gemm(graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        weight = _const(w)
        if weight is None or weight.ndim != 2 or x.shape is None or len(x.shape) != 2:
            continue
        out = node.outputs[0]
        bias = None
        consumers = list(out.outputs)
        if len(consumers) == 1 and consumers[0].op == "Add" and out not in graph.outputs:
            add = consumers[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            values = _const(other)
            if values is not None and values.size == weight.shape[1] and values.shape[-1] == weight.shape[1]:
                bias = values.reshape(-1).astype(weight.dtype)
                out = add.outputs[0]
                add.outputs.clear()
        inputs = [x, w] + ([gs.Constant(f"{node.name}/B", bias)] if bias is not None else [])
        gemm = gs.Node("Gemm", node.name, attrs={"transB": 0}, inputs=inputs, outputs=[out])
        node.outputs.clear()
        graph.nodes.append(gemm)
    graph.cleanup()


def _spatial(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return list(shape[2:])


def _resolve_auto_pad(graph: gs.Graph) -> None:
    for node in graph.nodes:
        mode = node.attrs.get("auto_pad", "NOTSET")
        if node.op not in ("Conv",) + POOLS or mode == "NOTSET":
            continue
        sizes = _spatial(node.inputs[0])
        if sizes is None:
            continue
        kernel = node.attrs.get("kernel_shape") or list(node.inputs[1].shape[2:])
        strides = node.attrs.get("strides", [1] * len(sizes))
        dilations = node.attrs.get("dilations", [1] * len(sizes))
        begins, ends = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            if mode == "VALID":
                total = 0
            else:
                total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(large if mode == "SAME_LOWER" else small)
            ends.append(small if mode == "SAME_LOWER" else large)
        node.attrs["auto_pad"] = "NOTSET"
        node.attrs["pads"] = begins + ends


def _pad_amounts(node: gs.Node) -> tuple[list[int], list[int]] | None:
    """(begins, ends) over the spatial axes of a constant zero Pad, or None if it is not one."""
    if node.attrs.get("mode", "constant") != "constant":
        return None
    inputs = list(node.inputs) + [None] * 3
    pads, value = node.attrs.get("pads"), node.attrs.get("value", 0.0)  # opset < 11 keeps both as attributes
    if pads is None:
        pads = _const(inputs[1]) if inputs[1] is not None else None
        given = inputs[2]
        if given is not None and given.name:  # the optional constant_value input
            values = _const(given)
            if values is None:
                return None
            value = float(values.reshape(-1)[0]) if values.size else 0.0
    if pads is None or value != 0.0:
        return None
    rank = len(node.inputs[0].shape or [])
    pads = [int(p) for p in pads]
    axes = _const(inputs[3]) if inputs[3] is not None and inputs[3].name else None
    if axes is not None:  # opset 18: pads only for the listed axes
        full = [0] * (2 * rank)
        for i, axis in enumerate(int(a) % rank for a in axes):
            full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
        pads = full
    if rank < 3 or len(pads) != 2 * rank or any(p < 0 for p in pads):
        return None
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:  # pads on batch or channels
        return None
    return pads[2:rank], pads[rank + 2:]


def _merge_pads(graph: gs.Graph) -> None:
    for pad in list(graph.nodes):
        if pad.op != "Pad":
            continue
        amounts = _pad_amounts(pad)
        consumers = list(pad.outputs[0].outputs)
        if amounts is None or len(consumers) != 1 or pad.outputs[0] in graph.outputs:
            continue
        node = consumers[0]
        if node.op not in ("Conv",) + POOLS or node.inputs[0] is not pad.outputs[0]:
            continue
        if node.op == "MaxPool":
            # Zero padding equals MaxPool's own (-inf) padding only on non-negative inputs.
            producer = pad.inputs[0].inputs[0] if pad.inputs[0].inputs else None
            if producer is None or producer.op != "Relu":
                continue
        if node.op == "AveragePool" and any(node.attrs.get("pads", [])) and not node.attrs.get("count_include_pad", 0):
            continue  # mixing counted and uncounted padding has no single attribute
        begins, ends = amounts
        rank = len(begins)
        own = node.attrs.get("pads", [0] * (2 * rank))
        node.attrs["pads"] = [a + b for a, b in zip(own, begins + ends)]
        if node.op == "AveragePool":
            node.attrs["count_include_pad"] = 1
        node.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
    graph.cleanup()


def _conv_bias(conv: gs.Node) -> np.ndarray:
    """The conv's bias in float64, zeros where it has none."""
    given = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
    bias = _const(given) if given is not None else None
    return np.zeros(_const(conv.inputs[1]).shape[0]) if bias is None else bias.astype(np.float64)


def _absorb(conv: gs.Node, follower: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give the conv new (float64) weights and bias and the follower's output: the follower drops out."""
    dtype = _const(conv.inputs[1]).dtype
    conv.inputs[1] = gs.Constant(f"{conv.name}/W", weight.astype(dtype))
    new_bias = gs.Constant(f"{conv.name}/B", bias.astype(dtype))
    if len(conv.inputs) > 2:
        conv.inputs[2] = new_bias
    else:
        conv.inputs.append(new_bias)
    out = follower.outputs[0]
    follower.outputs.clear()
    conv.outputs.clear()
    conv.outputs.append(out)


def _fold_batchnorms(graph: gs.Graph) -> int:
    """Fold BatchNormalization into a preceding Conv: W' = s W, b' = s (b - mean) + beta."""
    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.outputs) != 1:
            continue
        conv_out = bn.inputs[0]
        conv = conv_out.inputs[0] if conv_out.inputs else None
        if conv is None or conv.op != "Conv" or len(conv_out.outputs) != 1 or conv_out in graph.outputs:
            continue
        params = [_const(t) for t in bn.inputs[1:5]]
        weight = _const(conv.inputs[1])
        if weight is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        new_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        _absorb(conv, bn, new_weight, (_conv_bias(conv) - mean) * scale + beta)
        folded += 1
    graph.cleanup()
    return folded


def _channel_constant(values: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """The per-output-channel vector of a constant that broadcasts along axis 1 only, else None."""
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).astype(np.float64)


def _fold_channel_affine(graph: gs.Graph) -> int:
    """Fold Conv -> (Mul | Add | Sub | Div by a per-channel constant)+ into the Conv's weights and bias."""
    folded = 0
    changed = True
    while changed:
        changed = False
        for conv in list(graph.nodes):
            if conv.op != "Conv" or not conv.outputs or len(conv.outputs[0].outputs) != 1 or conv.outputs[0] in graph.outputs:
                continue
            out = conv.outputs[0]
            node = out.outputs[0]
            weight = _const(conv.inputs[1])
            if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2 or weight is None or out.shape is None:
                continue
            other = node.inputs[1] if node.inputs[0] is out else node.inputs[0]
            values = _const(other)
            if values is None or (node.op in ("Sub", "Div") and node.inputs[0] is not out):
                continue
            c = _channel_constant(values, weight.shape[0], len(out.shape))
            if c is None:
                continue
            bias, w = _conv_bias(conv), weight.astype(np.float64)
            if node.op in ("Mul", "Div"):
                scale = c if node.op == "Mul" else 1.0 / c
                w, bias = w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), bias * scale
            else:
                bias = bias + (c if node.op == "Add" else -c)
            _absorb(conv, node, w, bias)
            folded += 1
            changed = True
    graph.cleanup()
    return folded
