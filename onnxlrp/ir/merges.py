"""Find the residual merges and tell their skip from their main branch.

A residual merge is an ``Add`` whose two inputs are both computed tensors; an Add with
a constant input is a bias or a BatchNorm shift, never a merge. The two branches of a
merge start where they fork: the latest common ancestor in the DAG (the block input).
The branch with fewer ops is the skip. Its kind:

- ``identity``: no ops, the block input itself;
- ``projection``: one 1x1 Conv, possibly with BatchNorm or a constant scale/shift, and
  possibly after a pooling (ResNet-D's AvgPool + 1x1 conv: detail ``pooled``);
- ``other``: a skip without weights that is not the identity (pooling alone, as in
  pre-activation V2 blocks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import networkx as nx

from .opinfo import Family

if TYPE_CHECKING:
    from .opinfo import OpInfo as Op

SKIP_KINDS = ("identity", "projection", "other")
#: what a projection skip may hold besides its conv: element-wise affine maps (a BatchNorm, a
#: constant scale or shift), the quantize/dequantize pairs of a QDQ model, and window pools
_PROJECTION_EXTRAS = {Family.BATCH_NORM, Family.AFFINE, Family.QUANTIZATION}
_POOLS = {Family.AVERAGE_POOLING, Family.MAX_POOLING}


@dataclass(frozen=True)
class Merge:
    node: str  # the Add node
    skip: str  # tensor name of the skip input (h_s)
    main: str  # tensor name of the main-branch input (h_m)
    kind: str  # identity | projection | other
    fork: str  # the vertex both branches start from (the block input's producer)
    skip_branch: tuple[str, ...]  # op names on the skip branch, in order
    main_branch: tuple[str, ...]
    detail: str = ""  # "pooled": a projection after a pooling (ResNet-D)

    def to_dict(self) -> dict:
        return asdict(self)


def _producer(dag: nx.DiGraph, node: str, tensor: str) -> str:
    return next(src for src in dag.predecessors(node) if tensor in dag.edges[src, node]["tensors"])


def _is_projection(branch: tuple[str, ...], ops: dict[str, Op]) -> bool:
    convs = [ops[name] for name in branch if ops[name].family is Family.CONVOLUTION]
    others = [ops[name] for name in branch if ops[name].family is not Family.CONVOLUTION]
    if len(convs) != 1 or any(op.family not in _PROJECTION_EXTRAS | _POOLS for op in others):
        return False
    kernel = convs[0].node.inputs[convs[0].weight_input].shape[2:]
    return all(k == 1 for k in kernel)


def find_merges(dag: nx.DiGraph, ops: dict[str, Op]) -> list[Merge]:
    order = {vertex: i for i, vertex in enumerate(nx.topological_sort(dag))}

    def upto(vertex: str) -> set[str]:
        return nx.ancestors(dag, vertex) | {vertex}

    merges = []
    for name, op in ops.items():
        if op.kind != "merge":
            continue
        a, b = (t.name for t in op.data_inputs)
        pa, pb = _producer(dag, name, a), _producer(dag, name, b)
        fork = max(upto(pa) & upto(pb), key=order.__getitem__)
        before_fork = upto(fork)

        def branch(vertex: str) -> tuple[str, ...]:
            return tuple(sorted(upto(vertex) - before_fork, key=order.__getitem__))

        branch_a, branch_b = branch(pa), branch(pb)
        # The skip is the shorter branch; on a tie, the one that looks like a projection.
        a_is_skip = (len(branch_a), not _is_projection(branch_a, ops)) <= (
            len(branch_b),
            not _is_projection(branch_b, ops),
        )
        skip, main = (a, b) if a_is_skip else (b, a)
        skip_branch, main_branch = (branch_a, branch_b) if a_is_skip else (branch_b, branch_a)
        detail = ""
        if not skip_branch:
            kind = "identity"
        elif _is_projection(skip_branch, ops):
            kind = "projection"
            detail = "pooled" if any(ops[n].family in _POOLS for n in skip_branch) else ""
        else:
            kind = "other"
        merges.append(Merge(name, skip, main, kind, fork, skip_branch, main_branch, detail))
    return merges
