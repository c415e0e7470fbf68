"""The canonical graph as a networkx DAG of the ops relevance flows through.

Vertices are op names (plus one vertex for the image input); an edge carries the
tensors that flow from producer to consumer. Only the *data path* is in the DAG: the
tensors that depend on the image through differentiable ops. Shape arithmetic and
constants are not on it and need no rule.

Each data node gets an op adapter from the factory the caller passes (onnxlrp.lrp.ops
supplies them): the IR reads only the facts in :class:`OpInfo`, so it does not depend
on how relevance is emitted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import onnx_graphsurgeon as gs

from .canonicalise import Canonical
from ..errors import ModelError
from .merges import Merge, find_merges
from .opinfo import OpFactory, OpInfo

#: Ops whose output carries no relevance even when their input does.
NON_DIFFERENTIABLE = {"Shape", "Size"}


@dataclass
class ModelGraph:
    """The canonical model graph, its DAG, its ops (one adapter per data node) and its merges."""

    canonical: Canonical
    dag: nx.DiGraph
    ops: dict[str, OpInfo]  # node name -> op adapter, in topological order
    data: set[str]  # names of tensors on the data path
    merges: list[Merge] = field(default_factory=list)

    @cached_property
    def nonneg(self) -> set[str]:
        """Tensors known to be >= 0 (ReLU outputs and what pools and reshapes make of them)."""
        known: set[str] = set()
        for op in self.ops.values():
            if op.makes_nonneg or (op.keeps_sign and all(t.name in known for t in op.data_inputs)):
                known.add(op.output.name)
        return known

    def merge_at(self, name: str) -> Merge | None:
        return next((m for m in self.merges if m.node == name), None)

    def last_feature_map(self) -> str | None:
        """The tensor the last global pooling averages: the output of the last conv block
        (where Grad-CAM looks)."""
        pools = [op for op in self.ops.values() if op.pools_globally]
        return pools[-1].x.name if pools else None

    def channel_axis(self, tensor: str) -> int:
        """The channel axis of a feature map: the axis the first global pooling over it keeps
        (a ReduceMean over the rows and columns of a channels-last map keeps axis 3), else 1,
        ONNX's convention."""
        pools = [op for op in self.ops.values() if op.x.name == tensor and op.pools_globally]
        kept = pools[0].channel_axis if pools else None
        return 1 if kept is None else kept


def input_vertex(name: str) -> str:
    return f"input:{name}"


def build_graph(canonical: Canonical, make_op: OpFactory, path: str = "model") -> ModelGraph:
    graph = canonical.graph
    data: set[str] = {canonical.input.name}
    dag = nx.DiGraph()
    dag.add_node(input_vertex(canonical.input.name), op="input")
    ops: dict[str, OpInfo] = {}
    producers: dict[str, str] = {canonical.input.name: input_vertex(canonical.input.name)}
    for node in graph.nodes:  # canonicalize() left them in topological order
        data_inputs = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name in data]
        if not data_inputs or node.op in NON_DIFFERENTIABLE:
            continue
        ops[node.name] = make_op(node, lambda t: isinstance(t, gs.Variable) and t.name in data, path)
        out = node.outputs[0]
        data.add(out.name)
        producers[out.name] = node.name
        dag.add_node(node.name, op=node.op)
        for tensor in data_inputs:
            src = producers[tensor.name]
            if dag.has_edge(src, node.name):
                dag.edges[src, node.name]["tensors"].append(tensor.name)
            else:
                dag.add_edge(src, node.name, tensors=[tensor.name])
    if canonical.logits.name not in data:
        raise ModelError(f"{path}: output '{canonical.logits.name}' does not depend on the image input")
    # Keep only what relevance can reach: ancestors of the logits' producer.
    sink = producers[canonical.logits.name]
    keep = nx.ancestors(dag, sink) | {sink}
    dag = dag.subgraph(keep).copy()
    ops = {name: op for name, op in ops.items() if name in keep}
    model_graph = ModelGraph(canonical, dag, ops, data)
    model_graph.merges = find_merges(dag, ops)
    return model_graph
