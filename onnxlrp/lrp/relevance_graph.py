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
             absorbed           [N, F]    relevance each family of ops did not hand on (lrp.reach.FAMILIES:
                                          biases and stabilisers, saturated activations, other)
             heatmap            [N, H, W] with a layer or gated heatmap (lrp.heatmaps): the map
             concept_relevance  [N, K, ...] with concept_layer: the relevance at the input of each
                                          of K conditions (input `concept` [N, K, S]: a set of S
                                          channels of the layer, each a channel or -r: the image's
                                          r-th most relevant one), the pass from that layer with every
                                          other channel's relevance set to 0 (lrp.conditional), after
                                          the same forward pass
             concept_channels   [N, K, S] the channels of each condition
             channel_relevance  [N, C]    the relevance total of each channel of concept_layer
             channel_activation [N, C]    each channel's largest activation there
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

from . import conditional, heatmaps, reach
from .emit import Emitter
from ..errors import ModelError, SettingError, first_line
from ..ir.canonicalise import quiet_graphsurgeon
from ..ir.graph import ModelGraph, build_graph
from .ops import make_op
from .rules import Rule, RuleContext

INPUT, TARGET = "images", "target"
LOGITS, RELEVANCE, TARGETS, INITIAL, MERGE_SUMS, LAYER_SUMS = (
    "logits", "relevance", "targets", "initial_relevance", "merge_relevance", "layer_relevance",
)
PROBE_ACTIVATION, PROBE_RELEVANCE = "probe_activation", "probe_relevance"
HEATMAP = "heatmap"
CONCEPT, CONCEPT_RELEVANCE, CONCEPT_CHANNELS, CHANNEL_RELEVANCE, CHANNEL_ACTIVATION = (
    "concept", "concept_relevance", "concept_channels", "channel_relevance", "channel_activation")
ABSORBED = "absorbed"
TRACE_KEY = "onnxlrp.trace"


def _claim_name(graph: gs.Graph, tensor: gs.Tensor, name: str) -> None:
    """Rename `tensor` to `name`, moving any other tensor of that name out of the way."""
    other = graph.tensors().get(name)
    if other is not None and other is not tensor:
        other.name = f"{name}__model"
    tensor.name = name


class _Box:
    """The z^B box bounds, given at the image input, replayed to a layer's input through the
    ops in between (in-graph preprocessing: reshapes, transposes, a channel Gather, a Slice
    crop, Pad, Concat, Expand, Cast, constant Mul/Add/Sub/Div).

    The ops themselves are run on the two bounds in onnxruntime, so nothing is re-implemented.
    Each of them maps an element to one element (or to a constant) monotonically, so the
    elementwise min and max of the two results bound what the layer can see. An op that does
    not carry bounds (Op.carries_bounds) is a one-line error naming it."""

    def __init__(self, graph: ModelGraph, low: np.ndarray, high: np.ndarray, ir_version: int):
        self.graph, self.given, self.replayed = graph, {"low": low, "high": high}, {}
        self.ir_version = ir_version

    def at(self, x: gs.Tensor):
        """The bound accessor RuleContext takes: "low"/"high" -> the bound at tensor `x`."""
        def bound(which: str) -> np.ndarray:
            if x.name not in self.replayed:
                self.replayed[x.name] = self._replay(x)
            return self.replayed[x.name][which]
        return bound

    def _replay(self, x: gs.Tensor) -> dict[str, np.ndarray]:
        canonical = self.graph.canonical
        if x is canonical.input:
            return self.given
        sub = canonical.graph.copy()
        tensors = sub.tensors()
        sub.inputs, sub.outputs = [tensors[canonical.input.name]], [tensors[x.name]]
        sub.cleanup()
        for node in sub.nodes:
            op = self.graph.ops.get(node.name)
            if op is not None and not op.carries_bounds:
                raise op.error(f"z^B box bounds cannot be carried through it to the layer input '{x.name}' "
                               "(choose a preset without z^B, or give that layer another rule)")
        sub.outputs[0].dtype = np.float32
        import onnxruntime as ort  # only where a layer's box bounds are not the input's own

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        batch = canonical.input.shape[0] if isinstance(canonical.input.shape[0], int) else 1
        try:
            model = gs.export_onnx(sub, do_type_check=False)
            model.ir_version = self.ir_version  # gs would write the imported model's own
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            a, b = (session.run(None, {canonical.input.name: np.repeat(v, batch, axis=0)})[0][:1]
                    for v in (self.given["low"], self.given["high"]))
        except Exception as exc:
            raise ModelError(f"z^B box bounds: cannot replay the ops before '{x.name}' ({first_line(exc)})") from None
        return {"low": np.minimum(a, b).astype(np.float32), "high": np.maximum(a, b).astype(np.float32)}


def build(graph: ModelGraph, rules: dict[str, Rule], **options) -> onnx.ModelProto:
    """The model graph extended with its relevance pass, as a new ONNX model (see _build)."""
    with quiet_graphsurgeon():
        return _build(graph, rules, **options)


def _build(
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
    concept_layer: str | None = None,
    concept_axis: int = 1,
) -> onnx.ModelProto:
    """The model graph extended with its relevance pass, as a new ONNX model. `graph` itself
    is not changed: the builder works on its own copy. heatmap: a layer or gated map (output
    `heatmap`) from the relevance at tensor `layer` (channel axis `layer_axis`).
    concept_layer: the tensor whose channels (axis `concept_axis`) are concepts: input
    `concept` and the concept outputs (lrp.conditional)."""
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

    box = _Box(graph, low, high, ir_version) if low is not None else None
    contributions: dict[str, list[gs.Tensor]] = defaultdict(list)
    contributions[logits.name].append(start)
    merge_sums: dict[str, gs.Tensor] = {}
    layer_sums: dict[str, gs.Tensor] = {}
    lost: dict[str, list[gs.Tensor]] = {family: [] for family in reach.FAMILIES}
    probed = layered = conditioned = None
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
            if op.output.name == concept_layer:
                conditioned = R
            ctx = RuleContext(bias=bias, x_nonneg=op.x.name in graph.nonneg,
                              bounds=box.at(op.x) if box else None, merge=merge)
            inputs = rules[name].relevance(e, op, R, ctx)
            ranks = {t.name: len(t.shape) for t in op.data_inputs}
            # Totals are taken as soon as the relevance exists, and the relevance goes on only
            # afterwards, so that no map stays in memory until the end of the pass (Emitter.after).
            wait = None
            if merge is not None or trace or op.loss_family is not None:
                total = e.sum_per_sample(R, len(op.output.shape))
                sums = {t: e.sum_per_sample(r, ranks[t]) for t, r in inputs.items()}
                if op.loss_family is not None:  # what the rule did not hand on
                    wait = e.sub(total, e.sum(list(sums.values())))
                    lost[op.loss_family].append(wait)
                if merge is not None:  # R, R_skip, R_main (a skip that gets nothing, or y = x + x: R_skip 0)
                    own_skip = merge.skip in sums and merge.skip != merge.main
                    skip_sum = sums[merge.skip] if own_skip else e.mul(total, np.float32(0))
                    wait = merge_sums[name] = _stack(e, [total, skip_sum, sums[merge.main]])
                if trace:
                    magnitude = e.sum_per_sample(e.op("Abs", R), len(op.output.shape))
                    wait = layer_sums[name] = _stack(e, [total, e.sum(list(sums.values())), magnitude])
            for tensor, r in inputs.items():
                contributions[tensor].append(e.after(r, ranks[tensor], wait) if wait is not None else r)

    found = concept = None
    if concept_layer is not None:  # before the interface names are claimed: it reads the model's
        if conditioned is None:
            raise SettingError(f"concept layer '{concept_layer}' is not on the path from the image to the logits")
        concept = gs.Variable("lrp/concept", dtype=np.int64, shape=[batch, "conditions", "channels"])
        found = conditional.emit(e, graph, rules, concept, conditioned, concept_layer, concept_axis, images,
                              lambda name, op: RuleContext(bias=bias, x_nonneg=op.x.name in graph.nonneg,
                                                           bounds=box.at(op.x) if box else None,
                                                           merge=graph.merge_at(name)))
    parts = contributions.pop(images.name, None)
    if not parts:
        raise ModelError("no relevance reaches the image input")
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
            raise ModelError("a residual merge receives no relevance")
        outputs.append(_output(g, MERGE_SUMS, e.op("Concat", *sums, axis=1), [batch, len(sums), 3]))
    # before the optional outputs, so that its nodes (and their names) are the same whatever follows
    zero = e.mul(initial_sum, np.float32(0))
    columns = [e.op("Unsqueeze", e.sum(lost[f]) if lost[f] else zero, e.ints([1])) for f in reach.FAMILIES]
    outputs.append(_output(g, ABSORBED, e.op("Concat", *columns, axis=1), [batch, len(reach.FAMILIES)]))
    if probe is not None:
        if probed is None:
            raise SettingError(f"probe tensor '{probe}' is not on the path from the image to the logits")
        shape = list(probed[0].shape)
        outputs += [_output(g, PROBE_ACTIVATION, probed[0], shape), _output(g, PROBE_RELEVANCE, probed[1], shape)]
    if heatmap is not None and heatmap.needs_layer:
        if layered is None:
            raise SettingError(f"heatmap layer '{layer}' is not on the path from the image to the logits")
        height, width = (images.shape[a] for a in _spatial_axes(len(images.shape), pixel_axis))
        outputs.append(_output(g, HEATMAP, heatmaps.emit(e, heatmap, input_relevance, pixel_axis, layered, layer_axis,
                                                         height, width), [batch, height, width]))
    inputs = [images, target]
    if found is not None:
        _claim_name(g, concept, CONCEPT)
        inputs.append(concept)
        outputs += [_output(g, CONCEPT_RELEVANCE, found.relevance, [batch, "conditions"] + list(images.shape[1:])),
                    _output(g, CONCEPT_CHANNELS, found.channels, [batch, "conditions", "channels"], np.int64),
                    _output(g, CHANNEL_RELEVANCE, found.channel_sums, [batch, found.count]),
                    _output(g, CHANNEL_ACTIVATION, found.activation, [batch, found.count])]
    traced = [name for name in graph.ops if name in layer_sums]  # forward order
    if trace:
        outputs.append(_output(g, LAYER_SUMS, e.op("Concat", *(layer_sums[n] for n in traced), axis=1), [batch, len(traced), 3]))
    g.inputs = inputs
    g.outputs = outputs
    g.cleanup().toposort()
    model = gs.export_onnx(g, do_type_check=False)
    model.ir_version = ir_version  # as asked: gs would write the imported model's own
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
