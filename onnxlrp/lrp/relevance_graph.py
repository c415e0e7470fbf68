"""Build the relevance graph, one ONNX model for forward and LRP pass.

The model graph is extended with the backward walk: starting from the initial
relevance at the logits, every op (in reverse topological order) turns the relevance
at its output into relevance at its inputs with its rule, and the contributions of
all consumers of a tensor are summed. The result is a plain ONNX model:

    inputs : images  [N, ...]  the model's preprocessed input
             target  [N] int64 class to explain per image; -1 = the top-1 prediction, -r = the r-th best
    outputs: logits             [N, K]
             relevance          [N, ...]  same shape and layout as `images`
             targets            [N]       the classes explained
             initial_relevance  [N]       target logit (or probability) the pass starts from
             merge_relevance    [N, M, 3] sum of R, R_skip, R_main at each merge (if M > 0)
             probe_activation, probe_relevance   with probe=<tensor>: that tensor and the
                                          relevance (or, for gradient presets, gradient) there
             heatmap            [N, H, W] with a layer or gated heatmap (lrp.heatmaps): the map
             layer_relevance    [N, L, 3] with trace=True: per op, the relevance total at its output,
                                          the total it passes to its inputs, and the sum of |R| at
                                          its output (the scale float32 totals are rounded on) (op names in the
                                          model's metadata, key onnxlrp.trace)

It runs in onnxruntime on any execution provider, without onnxlrp installed.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import heatmaps
from .emit import Emitter
from ..errors import OnnxLrpError
from ..ir.graph import ModelGraph, build_graph
from .ops import make_op
from .rules import Rule, RuleContext

INPUT, TARGET = "images", "target"
LOGITS, RELEVANCE, TARGETS, INITIAL, MERGE_SUMS, LAYER_SUMS = (
    "logits", "relevance", "targets", "initial_relevance", "merge_relevance", "layer_relevance",
)
PROBE_ACTIVATION, PROBE_RELEVANCE = "probe_activation", "probe_relevance"
HEATMAP = "heatmap"
TRACE_KEY = "onnxlrp.trace"


def _claim_name(graph: gs.Graph, tensor: gs.Tensor, name: str) -> None:
    """Rename `tensor` to `name`, moving any other tensor of that name out of the way."""
    other = graph.tensors().get(name)
    if other is not None and other is not tensor:
        other.name = f"{name}__model"
    tensor.name = name


def _bounds_at(graph: ModelGraph, box: dict[str, np.ndarray], x: gs.Tensor):
    """The z^B box bounds, given at the image input, carried through reshapes to tensor `x`."""

    def bound(which: str) -> np.ndarray:
        chain, tensor = [], x
        while tensor is not graph.canonical.input:
            producer = tensor.inputs[0] if tensor.inputs else None
            op = graph.ops.get(producer.name) if producer is not None else None
            if op is None or op.kind != "reshape":
                raise OnnxLrpError(
                    f"z^B box bounds: the layer input '{x.name}' is not the image up to reshapes "
                    f"(node '{producer.name if producer else '?'}' is in between)"
                )
            chain.append(op)
            tensor = op.x
        value = box[which]
        for op in reversed(chain):  # replay the reshapes on the bound tensor, in numpy
            value = _replay(op, value)
        return value

    return bound


def _replay(op, value: np.ndarray) -> np.ndarray:
    node = op.node
    if node.op == "Transpose":
        return np.transpose(value, node.attrs.get("perm"))
    target = [1] + list(op.output.shape[1:])
    return value.reshape(target)


def build(
    graph: ModelGraph,
    rules: dict[str, Rule],
    *,
    initial: str = "logit",
    bias: bool = True,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    ir_version: int = 8,
    opset: int = 17,
    trace: bool = False,
    probe: str | None = None,
    heatmap: heatmaps.Heatmap | None = None,
    layer: str | None = None,
    layer_axis: int = 1,
    pixel_axis: int = 1,
) -> onnx.ModelProto:
    """The model graph extended with its relevance pass, as a new ONNX model. `graph` itself
    is not changed: the builder works on its own copy. heatmap: a layer or gated map (output
    `heatmap`) from the relevance at tensor `layer` (channel axis `layer_axis`)."""
    graph = _own_copy(graph)
    canonical = graph.canonical
    g = canonical.graph
    e = Emitter(g)
    images, logits = canonical.input, canonical.logits
    batch = images.shape[0]
    num_classes = logits.shape[1]
    # Tensors keep the model's names during the walk (merges refer to them); the
    # interface names are claimed at the end.
    target = gs.Variable("lrp/target", dtype=np.int64, shape=[batch])

    with e.scope("output"):
        # target -r picks the r-th best class (-1: the top-1 prediction)
        _, ranked = e.op("TopK", logits, e.ints([num_classes]), axis=1, outputs=2)
        place = e.op("Clip", e.op("Sub", e.op("Neg", target), np.int64(1)), np.int64(0), np.int64(num_classes - 1))
        best = e.op("Squeeze", e.op("GatherElements", ranked, e.op("Unsqueeze", place, e.ints([1])), axis=1), e.ints([1]))
        chosen = e.op("Where", e.op("Less", target, np.int64(0)), best, target)
        classes = np.arange(num_classes, dtype=np.int64).reshape(1, -1)
        onehot = e.op("CastLike", e.op("Equal", e.op("Unsqueeze", chosen, e.ints([1])), e.const(classes)), logits)
        if initial == "one":  # gradients: d(target logit)
            start = onehot
        else:
            start = e.mul(onehot, logits if initial == "logit" else e.op("Softmax", logits, axis=1))
        initial_sum = e.reduce_sum(start, [1])

    box = {"low": low, "high": high} if low is not None else None
    contributions: dict[str, list[gs.Tensor]] = defaultdict(list)
    contributions[logits.name].append(start)
    merge_sums: dict[str, gs.Tensor] = {}
    layer_sums: dict[str, gs.Tensor] = {}
    probed = layered = None
    for name in reversed(list(graph.ops)):
        op = graph.ops[name]
        parts = contributions.pop(op.output.name, None)
        if not parts:
            continue
        merge = graph.merge_at(name)
        with e.scope(name):
            R = e.sum(parts)
            if op.output.name == probe:
                probed = (op.output, R)
            if op.output.name == layer:
                layered = R
            ctx = RuleContext(bias=bias, x_nonneg=op.x.name in graph.nonneg,
                              bounds=_bounds_at(graph, box, op.x) if box else None, merge=merge)
            inputs = rules[name].relevance(e, op, R, ctx)
            ranks = {t.name: len(t.shape) for t in op.data_inputs}
            # Totals are taken as soon as the relevance exists, and the relevance goes on only
            # afterwards, so that no map stays in memory until the end of the pass (Emitter.after).
            wait = None
            if merge is not None or trace:
                total = e.sum_per_sample(R, len(op.output.shape))
                sums = {t: e.sum_per_sample(r, ranks[t]) for t, r in inputs.items()}
                if merge is not None:  # R, R_skip, R_main (a skip that gets nothing, or y = x + x: R_skip 0)
                    own_skip = merge.skip in sums and merge.skip != merge.main
                    skip_sum = sums[merge.skip] if own_skip else e.mul(total, np.float32(0))
                    wait = merge_sums[name] = _stack(e, [total, skip_sum, sums[merge.main]])
                if trace:
                    magnitude = e.sum_per_sample(e.op("Abs", R), len(op.output.shape))
                    wait = layer_sums[name] = _stack(e, [total, e.sum(list(sums.values())), magnitude])
            for tensor, r in inputs.items():
                contributions[tensor].append(e.after(r, ranks[tensor], wait) if wait is not None else r)

    parts = contributions.pop(images.name, None)
    if not parts:
        raise OnnxLrpError("no relevance reaches the image input")
    input_relevance = e.sum(parts)
    if layer == images.name:
        layered = input_relevance
    _claim_name(g, images, INPUT)
    _claim_name(g, target, TARGET)
    _claim_name(g, logits, LOGITS)
    outputs = [
        _output(g, LOGITS, logits, [batch, num_classes]),
        _output(g, RELEVANCE, input_relevance, list(images.shape)),
        _output(g, TARGETS, chosen, [batch], np.int64),
        _output(g, INITIAL, initial_sum, [batch]),
    ]
    if graph.merges:
        sums = [merge_sums[m.node] if m.node in merge_sums else None for m in graph.merges]
        if any(s is None for s in sums):
            raise OnnxLrpError("a residual merge receives no relevance")
        outputs.append(_output(g, MERGE_SUMS, e.op("Concat", *sums, axis=1), [batch, len(sums), 3]))
    if probe is not None:
        if probed is None:
            raise OnnxLrpError(f"probe tensor '{probe}' is not on the path from the image to the logits")
        shape = list(probed[0].shape)
        outputs += [_output(g, PROBE_ACTIVATION, probed[0], shape), _output(g, PROBE_RELEVANCE, probed[1], shape)]
    if heatmap is not None and heatmap.needs_layer:
        if layered is None:
            raise OnnxLrpError(f"heatmap layer '{layer}' is not on the path from the image to the logits")
        height, width = (images.shape[a] for a in _spatial_axes(len(images.shape), pixel_axis))
        outputs.append(_output(g, HEATMAP, heatmaps.emit(e, heatmap, input_relevance, pixel_axis, layered, layer_axis,
                                                         height, width), [batch, height, width]))
    traced = [name for name in graph.ops if name in layer_sums]  # forward order
    if trace:
        outputs.append(_output(g, LAYER_SUMS, e.op("Concat", *(layer_sums[n] for n in traced), axis=1), [batch, len(traced), 3]))
    g.inputs = [images, target]
    g.outputs = outputs
    g.cleanup().toposort()
    model = gs.export_onnx(g, do_type_check=False, ir_version=ir_version)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    model.producer_name = "onnxlrp"
    for node in [n for n in g.nodes if n.name.startswith("lrp/")]:  # let go of the rules' weights
        node.inputs.clear()
        node.outputs.clear()
    if trace:
        onnx.helper.set_model_props(model, {TRACE_KEY: json.dumps(traced)})
    return model


def _own_copy(graph: ModelGraph) -> ModelGraph:
    """A copy of the analysed graph for the builder to extend (its nodes and tensors are new;
    weights are shared, never written): the analysis stays as it was, whether an explainer
    was built or found in the cache."""
    copy = graph.canonical.graph.copy()
    tensors = copy.tensors()
    canonical = dataclasses.replace(graph.canonical, graph=copy, input=tensors[graph.canonical.input.name],
                                    logits=tensors[graph.canonical.logits.name])
    path = next(iter(graph.ops.values())).path if graph.ops else "model"
    return build_graph(canonical, make_op, path)


def _spatial_axes(rank: int, channel_axis: int) -> list[int]:
    return [a for a in range(1, rank) if a != channel_axis]


def _stack(e: Emitter, sums: list[gs.Tensor]) -> gs.Tensor:
    """[N] totals -> [N, 1, len(sums)]."""
    columns = [e.op("Unsqueeze", t, e.ints([1])) for t in sums]
    return e.op("Unsqueeze", e.op("Concat", *columns, axis=1), e.ints([1]))


def _output(g: gs.Graph, name: str, tensor: gs.Tensor, shape, dtype=np.float32) -> gs.Variable:
    """Expose `tensor` as a graph output called `name` (through an Identity when it has another name)."""
    if tensor.name != name:
        out = gs.Variable(name)
        g.nodes.append(gs.Node("Identity", f"lrp/output/{name}", inputs=[tensor], outputs=[out]))
        tensor = out
    tensor.dtype, tensor.shape = dtype, shape
    return tensor


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The relevance graph in float16, inputs and outputs kept float32 (onnxruntime's converter).

    MaxPool's scatter stays in float32 (onnxruntime has no float16 kernel for it), so do the
    Casts that feed it.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = DEFAULT_OP_BLOCK_LIST + ["ScatterElements", "ConstantOfShape", "Cast"]
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True, op_block_list=keep)
