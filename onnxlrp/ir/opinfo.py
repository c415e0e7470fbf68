"""What the IR needs to know about an op on the data path: the protocol that onnxlrp.lrp.ops'
adapters satisfy. The IR reads only these facts, so it never depends on how relevance is emitted.

The facts are declared by the adapters themselves (onnxlrp/lrp/ops): each adapter class says
which op family it belongs to (:class:`Family`) and what is known about its op. The IR sees
them in two ways, both without importing onnxlrp.lrp (imports flow ir/ -> lrp/, never back):

- on the adapter instances a caller's :data:`OpFactory` makes (graph.build_graph), for ops
  on the data path: :class:`OpInfo`;
- by op type, for code that sees only an onnx NodeProto before any adapter exists (reading
  the input layout, folding computed shapes in ir/model.py): :func:`facts`. The adapter
  classes register themselves here as they are defined (:func:`register`). A registry, not
  an argument, because those functions run inside one fixed pipeline (analysis.analyse)
  that imports the adapters anyway, and every caller would pass the same table; the IR
  refuses to answer from an empty registry rather than silently knowing nothing.
"""
from __future__ import annotations

from enum import Enum
from typing import Callable, Protocol

import onnx_graphsurgeon as gs

from ..errors import OnnxLrpError


class Family(str, Enum):
    """The closed set of op families (as zennit.types' Convolution, Linear, AvgPool, Activation,
    BatchNorm): what presets give rules to, and what the IR reads instead of op-type strings.
    A str, so a family is its own readable, serialisable name ("convolution")."""

    CONVOLUTION = "convolution"  # Conv: a kernel slid over the spatial axes
    DENSE = "dense"  # Gemm, MatMul with a constant weight
    AVERAGE_POOLING = "average pooling"  # AveragePool: a window mean
    GLOBAL_POOLING = "global pooling"  # GlobalAveragePool, ReduceMean, ReduceSum: a mean/sum over axes
    MAX_POOLING = "max pooling"  # MaxPool: each window's winner
    SHAPE = "shape"  # reshapes, transposes, slices, concatenation, pads, casts: values moved, none computed
    ACTIVATION = "activation"  # element-wise, unbounded (ReLU, LeakyReLU, Softplus)
    BOUNDED_ACTIVATION = "bounded activation"  # element-wise into a fixed interval (Clip, Sigmoid, Softmax, Erf)
    ELEMENTWISE = "element-wise"  # other element-wise maps a factor is computed with (Sqrt, Reciprocal, Pow)
    GATE = "gate"  # a signal times a factor computed from the data (x * g, x / s, HardSwish, Gelu)
    BATCH_NORM = "batch norm"  # BatchNormalization: a per-channel affine map
    NORMALISATION = "normalisation"  # Layer/Group/InstanceNormalization: statistics of the data
    AFFINE = "affine"  # constant arithmetic: x + c, x * c, ...
    MERGE = "merge"  # sums of computed tensors (a residual Add, a difference a - b)
    QUANTIZATION = "quantization"  # QuantizeLinear / DequantizeLinear pairs


class OpFacts(Protocol):
    """What an adapter class declares about its op, readable without a node."""

    family: Family
    shape_inputs: tuple[int, ...]  # the inputs that are shapes, sizes, pads or axes (not data)
    weight_input: int | None  # the input that holds the learned kernel (Conv, Gemm, MatMul), else None
    channel_axis: int | None  # the axis of channels the op reads (1 by ONNX's convention), None: no such axis


class OpInfo(OpFacts, Protocol):
    """What the IR needs to know about an op on the data path."""

    node: gs.Node
    kind: str  # "merge" for a residual Add; "reshape", "linear", "gate", ...
    data_inputs: list[gs.Tensor]  # the computed inputs
    x: gs.Tensor  # the main data input
    output: gs.Tensor
    keeps_sign: bool  # output >= 0 whenever every data input is >= 0
    makes_nonneg: bool  # output >= 0 whatever the input
    pools_globally: bool  # a mean over the spatial axes: its input is a last conv block's output


IsData = Callable[[gs.Tensor], bool]
#: (node, is_data, path) -> the node's adapter, or a one-line error naming the node
OpFactory = Callable[[gs.Node, IsData, str], OpInfo]

_REGISTRY: dict[str, OpFacts] = {}


def register(op_type: str, adapter: OpFacts) -> None:
    """Called by each adapter class as it is defined: it handles `op_type`."""
    known = _REGISTRY.get(op_type)
    if known is not None and known is not adapter:
        raise TypeError(f"op type {op_type} has two adapters: {known.__name__} and {adapter.__name__}")
    _REGISTRY[op_type] = adapter


def facts(op_type: str) -> OpFacts | None:
    """The facts the adapter of `op_type` declares; None for an op type no adapter handles."""
    if not _REGISTRY:
        raise OnnxLrpError("internal error: no op adapters registered (import onnxlrp.lrp.ops first)")
    return _REGISTRY.get(op_type)
