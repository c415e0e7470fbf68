"""Quantized models as deployed (QDQ format, as onnxruntime.quantization writes them).

Weights and biases behind DequantizeLinear are dequantized into constants when the graph is
canonicalised (onnxlrp.ir.canonicalise); the activations keep their QuantizeLinear ->
DequantizeLinear pairs, so the forward pass, logits included, is the quantized model's own.
Relevance passes through a pair unchanged (the straight-through reading of rounding).

quantize_static drops the ReLUs: a zero point at the low end of the integer range clamps
negative values to 0. Such a DequantizeLinear output is >= 0, which rules like z+ use.
"""
from __future__ import annotations

import numpy as np

from .base import Op, const_value, given

_LOWEST = {np.dtype(np.int8): -128, np.dtype(np.uint8): 0, np.dtype(np.int16): -32768, np.dtype(np.uint16): 0}


class QuantizeLinear(Op):
    """float -> integer on a scale: relevance (and gradient) passes straight through."""

    kind = "quantize"
    shape_preserving = True
    keeps_sign = True  # rounding is monotone and 0 maps to the zero point: x >= 0 stays >= 0

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1:
            raise self.error("its scale or zero point is computed at run time; onnxlrp needs constants")

    def transpose(self, e, g, weight=None):
        return g


class DequantizeLinear(QuantizeLinear):
    """integer -> float: relevance passes; the output is >= 0 where the zero point is the
    lowest integer (the clamp of a ReLU that quantisation removed)."""

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        zero = const_value(given(node, 2)) if given(node, 2) is not None else None
        lowest = _LOWEST.get(np.dtype(zero.dtype)) if zero is not None else None
        self.makes_nonneg = lowest is not None and bool(np.all(zero == lowest))


#: QOperator ops: integer kernels with no float graph to take relevance through
QOPERATOR = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
             "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QGemm", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeLinear"}

OPS = {"QuantizeLinear": QuantizeLinear, "DequantizeLinear": DequantizeLinear}
