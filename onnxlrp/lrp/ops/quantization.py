"""Quantized models as deployed (QDQ format, as onnxruntime.quantization writes them).

Weights and biases behind DequantizeLinear are dequantized into constants when the graph is
canonicalised (onnxlrp.ir.canonicalise); the activations keep their QuantizeLinear ->
DequantizeLinear pairs, so the forward pass, logits included, is the quantized model's own.
Relevance passes through a pair unchanged (the straight-through reading of rounding).

Weight-only int8 (a TFLite dynamic-range model through tf2onnx) is the same with no
QuantizeLinear: DequantizeLinear on the weights only, except that tf2onnx writes the TFLite
hybrid dense layer's on-the-fly activation quantization as DynamicQuantizeLinear ->
DequantizeLinear, a pair relevance passes too (and its bias so, computed into constants).

quantize_static drops the ReLUs: a zero point at the low end of the integer range clamps
negative values to 0. Such a DequantizeLinear output is >= 0, which rules like z+ use.
"""
from __future__ import annotations

import numpy as np

from .base import Family, Op, const_value, given

_LOWEST = {np.dtype(np.int8): -128, np.dtype(np.uint8): 0, np.dtype(np.int16): -32768, np.dtype(np.uint16): 0}


class QuantizeLinear(Op):
    """float -> integer on a scale: relevance (and gradient) passes straight through."""

    op_types = ("QuantizeLinear",)
    family = Family.QUANTIZATION
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

    op_types = ("DequantizeLinear",)

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        # scale and zero point: constants, or the run-time outputs of the DynamicQuantizeLinear
        # whose integers it dequantizes (not on the data path; zero point unknown here)
        zero = const_value(given(node, 2)) if given(node, 2) is not None else None
        lowest = _LOWEST.get(np.dtype(zero.dtype)) if zero is not None else None
        self.makes_nonneg = lowest is not None and bool(np.all(zero == lowest))


class DynamicQuantizeLinear(Op):
    """float -> uint8 on a scale and zero point computed from the tensor itself (the range of the
    whole tensor, batch included), as tf2onnx writes TFLite's hybrid (dynamic-range quantized)
    dense layers: DynamicQuantizeLinear -> DequantizeLinear(y, its scale, its zero point).
    The forward pass keeps it; relevance (and gradient) passes straight through, as for a
    QuantizeLinear -> DequantizeLinear pair. Only its first output is on the data path (the
    scale and zero point reach the DequantizeLinear as run-time inputs, not as data)."""

    op_types = ("DynamicQuantizeLinear",)
    family = Family.QUANTIZATION
    kind = "quantize"
    shape_preserving = True
    keeps_sign = True  # 0 maps to the zero point and rounding is monotone: x >= 0 dequantizes to >= 0

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        consumers = {c.op for t in node.outputs for c in t.outputs}
        if consumers - {"DequantizeLinear"}:
            raise self.error(f"its outputs feed {', '.join(sorted(consumers - {'DequantizeLinear'}))}; onnxlrp "
                             "reads it only as the quantize half of a DynamicQuantizeLinear -> DequantizeLinear pair")

    def transpose(self, e, g, weight=None):
        return g


#: QOperator ops: integer kernels with no float graph to take relevance through
QOPERATOR = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
             "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QGemm", "ConvInteger",
             "MatMulInteger"}
