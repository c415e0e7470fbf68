"""What the IR needs to know about an op on the data path: the protocol that onnxlrp.lrp.ops'
adapters satisfy. The IR reads only these facts, so it never depends on how relevance is emitted."""
from __future__ import annotations

from typing import Callable, Protocol

import onnx_graphsurgeon as gs


class OpInfo(Protocol):
    """What the IR needs to know about an op on the data path."""

    node: gs.Node
    kind: str  # "merge" for a residual Add; "reshape", "linear", "gate", ...
    data_inputs: list[gs.Tensor]  # the computed inputs
    x: gs.Tensor  # the main data input
    output: gs.Tensor
    keeps_sign: bool  # output >= 0 whenever every data input is >= 0
    makes_nonneg: bool  # output >= 0 whatever the input


IsData = Callable[[gs.Tensor], bool]
#: (node, is_data, path) -> the node's adapter, or a one-line error naming the node
OpFactory = Callable[[gs.Node, IsData, str], OpInfo]
