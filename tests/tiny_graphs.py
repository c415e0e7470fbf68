"""Small hand-built ONNX graphs with known structure, for closed-form and structural tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.RandomState(0)


def weights(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.randn(*shape) * scale).astype(np.float32)


class Builder:
    """Collects nodes and initializers; every node gets a readable name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, array: np.ndarray, name: str | None = None) -> str:
        self.count += 1
        name = name or f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1, **attrs) -> str:
        self.count += 1
        name = name or f"{op_type.lower()}{self.count}"
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1, bias: bool = False, name=None) -> str:
        inputs = [x, self.const(weights(cout, cin, k, k))] + ([self.const(weights(cout, scale=0.1))] if bias else [])
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def head(self, x: str, channels: int, classes: int = 5) -> str:
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        return self.op("Gemm", [flat, self.const(weights(classes, channels)), self.const(weights(classes, scale=0.1))], name="fc", transB=1)

    def model(self, output: str, input_shape=("N", 3, 16, 16), input_name="x", opset=17, extra_inputs=()) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["logits"], name="output_identity"))
        inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in extra_inputs]
        graph = helper.make_graph(self.nodes, "tiny", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def residual_net(skip: str = "identity", bias_add: bool = False) -> onnx.ModelProto:
    """conv-relu, then one residual block whose skip is identity, projection, avgpool or maxpool."""
    b = Builder()
    x = b.op("Relu", [b.conv("x", 3, 8, name="stem")], name="stem_relu")
    main = b.op("Relu", [b.conv(x, 8, 8, stride=2 if skip != "identity" else 1, name="main1")], name="main_relu")
    main = b.conv(main, 8, 8, name="main2")
    if bias_add:  # a per-channel bias added after the conv: an Add with a constant, never a merge
        main = b.op("Add", [main, b.const(weights(1, 8, 1, 1, scale=0.1))], name="bias_add")
    if skip == "identity":
        shortcut = x
    elif skip == "projection":
        shortcut = b.conv(x, 8, 8, k=1, stride=2, pad=0, name="proj")
    elif skip == "avgpool":
        shortcut = b.conv(b.op("AveragePool", [x], name="skip_pool", kernel_shape=[2, 2], strides=[2, 2]), 8, 8, k=1, pad=0, name="proj")
    elif skip == "maxpool":
        shortcut = b.op("MaxPool", [x], name="skip_pool", kernel_shape=[1, 1], strides=[2, 2])
    else:
        raise ValueError(skip)
    out = b.op("Relu", [b.op("Add", [shortcut, main], name="merge")], name="out_relu")
    return b.model(b.head(out, 8))


def gated_net() -> onnx.ModelProto:
    """Squeeze-excitation style gating: x * sigmoid(f(x))."""
    b = Builder()
    x = b.op("Relu", [b.conv("x", 3, 8, name="stem")])
    gate = b.op("Sigmoid", [b.op("GlobalAveragePool", [x])], name="se_sigmoid")
    return b.model(b.head(b.op("Mul", [x, gate], name="se_mul"), 8))


def tanh_net() -> onnx.ModelProto:
    b = Builder()
    return b.model(b.head(b.op("Tanh", [b.conv("x", 3, 8, name="stem")], name="act_tanh"), 8))


def product_net() -> onnx.ModelProto:
    """The product of two computed tensors, neither a gate: no LRP rule."""
    b = Builder()
    x = b.op("Relu", [b.conv("x", 3, 8, name="stem")])
    return b.model(b.head(b.op("Mul", [x, b.op("Relu", [b.conv(x, 8, 8)])], name="product"), 8))
