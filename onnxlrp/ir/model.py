"""Read an ONNX classifier and describe its image input.

Everything that can be wrong with the file itself is found here and reported as one
line naming the file: unreadable or truncated protobuf, invalid graph, several inputs,
an input that is not an image batch, an opset too old to convert.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import numpy_helper

from ..errors import ModelError, first_line
from . import opinfo
from .opinfo import Family

#: The relevance graph uses ScatterElements(reduction="add") (opset 16) and ReduceSum
#: with axes as an input (13); older models are converted up to this opset.
MIN_OPSET = 17
#: Image size used when the model leaves height and width dynamic.
DEFAULT_IMAGE_SIZE = 224

_FLOAT, _FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def load(path: str | Path) -> onnx.ModelProto:
    """Read, validate and (if needed) opset-convert an ONNX model."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; expected an ONNX model file")
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, external data raises OSError, ...
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model, or an empty one (the graph has no nodes)")
    try:
        # The path form also handles models with external data over 2 GB.
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ModelError(
                f"{path}: cannot convert opset {opset} to {MIN_OPSET} ({first_line(exc)})"
            ) from None
    constants_to_initializers(model)
    return model


#: Constant attributes that hold a number or a list of numbers, and their dtype
_CONSTANT_VALUES = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn the main graph's Constant nodes into initializers of the same name, in place; how many.

    Some exporters (paddle2onnx at low opsets, tf2onnx for some ops) write every weight as a
    Constant node. The function is the same; code that finds weights among the initializers
    (the input's channel count from the first Conv, the image input among the graph inputs)
    then sees them. Sparse and string constants stay nodes."""
    graph = model.graph
    taken = {init.name for init in graph.initializer} | {out.name for out in graph.output}
    kept, moved = [], 0
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        tensor = None
        if attr is not None and attr.name == "value" and attr.t.data_type != onnx.TensorProto.STRING:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
        elif attr is not None and attr.name in _CONSTANT_VALUES:
            tensor = numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(attr), _CONSTANT_VALUES[attr.name]))
        if tensor is None or node.output[0] in taken or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        taken.add(tensor.name)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
        # IR < 4 wants every initializer listed among the graph inputs; onnxruntime reads newer IR
        model.ir_version = max(model.ir_version, 4)
    return moved


@lru_cache(maxsize=None)
def readable_ir_version(wanted: int) -> int:
    """The IR version to write a graph at: `wanted`, or the newest one the installed onnxruntime
    reads where that is older (onnx 1.23 writes IR 14, which onnxruntime 1.31 refuses).
    onnxlrp writes the relevance graph itself, so it need not inherit what it cannot run."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    import onnxruntime as ort  # probed once per process

    options = ort.SessionOptions()
    options.log_severity_level = 4
    for version in range(wanted, 7, -1):
        model.ir_version = version
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return version
        except Exception:  # "Unsupported model IR version": one older
            continue
    return wanted


def is_float16(model: onnx.ModelProto) -> bool:
    initializers = {init.name for init in model.graph.initializer}
    return any(i.type.tensor_type.elem_type == _FLOAT16 for i in model.graph.input if i.name not in initializers)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 model in float32: weights, constants, casts, inputs and outputs.

    The relevance rules divide by small sums; they run in float32 (the relevance pass itself
    can still run in float16 with Explainer(precision="fp16")).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())

    def widen(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == _FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name))

    for init in model.graph.initializer:
        widen(init)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == _FLOAT16:
                attr.i = _FLOAT
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.type.tensor_type.elem_type == _FLOAT16:
            value.type.tensor_type.elem_type = _FLOAT
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


@dataclass(frozen=True)
class ImageInput:
    """The model's image input: name, layout and sizes (None where the graph leaves it dynamic)."""

    name: str
    layout: str  # "NCHW" or "NHWC"
    channels: int
    height: int | None
    width: int | None
    batch: int | None  # a batch size fixed in the graph, None when dynamic

    @property
    def channel_axis(self) -> int:
        return 1 if self.layout == "NCHW" else 3

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        if self.layout == "NCHW":
            return (batch, self.channels, height, width)
        return (batch, height, width, self.channels)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    """The dims, None where dynamic: a dim_param, no value, or a negative dim_value (paddle2onnx
    before 1.0 wrote the batch as -1, as Paddle itself spells a dynamic size)."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in shape.dim]


def _negative_dims_to_params(model: onnx.ModelProto) -> None:
    """Write every negative dim_value of the graph's inputs, outputs and value infos as a dim_param:
    ONNX has no negative sizes, and shape inference and onnxruntime take -1 literally."""
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = f"{value.name}_dim{axis}"


def image_input(model: onnx.ModelProto, path: str | Path = "model") -> ImageInput:
    """Find the single image input and its layout; raise a one-line error otherwise."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise ModelError(
            f"{path}: model has {len(inputs)} inputs ({names}); onnxlrp explains "
            "classifiers with a single image input"
        )
    inp = inputs[0]
    tensor_type = inp.type.tensor_type
    dims = _dims(inp)
    shown = [d if d is not None else "?" for d in dims]
    if not inp.type.HasField("tensor_type") or tensor_type.elem_type != _FLOAT:
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "non-tensor"
        raise ModelError(
            f"{path}: input '{inp.name}' has element type {dtype}; expected a float32 image batch"
        )
    if len(dims) != 4:
        raise ModelError(
            f"{path}: input '{inp.name}' has shape {shown}; expected an image batch of rank 4 "
            "(NCHW or NHWC)"
        )
    layout = _layout(model, inp.name, dims)
    if layout is None:
        raise ModelError(
            f"{path}: input '{inp.name}' has shape {shown}; cannot tell which axis holds the "
            "colour channels (expected 1 or 3 channels, NCHW or NHWC)"
        )
    if layout == "NCHW":
        channels, height, width = dims[1], dims[2], dims[3]
    else:
        height, width, channels = dims[1], dims[2], dims[3]
    if channels is None:
        channels = _channels_from_first_conv(model, inp.name)
    if channels is None:
        raise ModelError(f"{path}: input '{inp.name}' has shape {shown}; its channel count is not fixed")
    return ImageInput(inp.name, layout, channels, height, width, dims[0])


def _layout(model: onnx.ModelProto, name: str, dims: list[int | None]) -> str | None:
    image_channels = (1, 3)
    if dims[1] in image_channels:
        return "NCHW"
    if dims[3] in image_channels:
        return "NHWC"
    # Channel dims left dynamic: look at what consumes the input.
    for node in model.graph.node:
        if name in node.input:
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm == [0, 3, 1, 2]:
                    return "NHWC"
            conv = _convolution(node.op_type)
            if conv is not None and conv.channel_axis == 1:
                return "NCHW"
    return None


def _convolution(op_type: str) -> opinfo.OpFacts | None:
    """The facts of a convolution's adapter (the op whose weight tells its input's channels),
    read through the registry the adapters fill (see opinfo), else None."""
    facts = opinfo.facts(op_type)
    return facts if facts is not None and facts.family is Family.CONVOLUTION else None


def _channels_from_first_conv(model: onnx.ModelProto, name: str) -> int | None:
    weights = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        conv = _convolution(node.op_type)
        if conv is None or node.input[0] != name or node.input[conv.weight_input] not in weights:
            continue
        # an ONNX convolution's weight is [C_out, C_in / group, *kernel]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return weights[node.input[conv.weight_input]].dims[1] * group
    return None


def with_image_size(
    model: onnx.ModelProto, image: ImageInput, height: int, width: int, path: str | Path = "model"
) -> onnx.ModelProto:
    """Fix the input's spatial size and infer every intermediate shape.

    The relevance rules need static spatial shapes (transposed convolutions, constant
    bound tensors); the batch dimension stays as the model has it.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _negative_dims_to_params(model)
    inp = next(i for i in model.graph.input if i.name == image.name)
    dims = inp.type.tensor_type.shape.dim
    spatial = (2, 3) if image.layout == "NCHW" else (1, 2)
    for axis, size in zip(spatial, (height, width)):
        if dims[axis].HasField("dim_value") and dims[axis].dim_value != size:
            raise ModelError(
                f"{path}: input '{image.name}' has a fixed size "
                f"{image.height}x{image.width}; cannot use {height}x{width}"
            )
        dims[axis].dim_value = size
    if not dims[image.channel_axis].HasField("dim_value"):  # read off the first Conv's weight
        dims[image.channel_axis].dim_value = image.channels
    if image.batch is None:
        dims[0].dim_param = "batch"
    model = _infer_shapes(model, path)
    if _fold_computed_shapes(model, image, height, width, path):
        model = _infer_shapes(model, path)
    while _floor_ceil_mode_pool(model):  # one pool at a time: its new size changes what follows
        model = _infer_shapes(model, path)
    return model


#: the shape inputs of ops no adapter handles, met in exporters' shape arithmetic off the data
#: path (an op an adapter handles declares its own: Op.shape_inputs)
_OFF_PATH_SHAPE_INPUTS = {"Tile": (1,), "ConstantOfShape": (0,), "Resize": (1, 2, 3)}


def _shape_inputs(op_type: str) -> tuple[int, ...]:
    """The inputs of an op that are shapes, sizes, pads or axes (not data)."""
    facts = opinfo.facts(op_type)
    return facts.shape_inputs if facts is not None else _OFF_PATH_SHAPE_INPUTS.get(op_type, ())


def _fold_computed_shapes(model: onnx.ModelProto, image: ImageInput, height: int, width: int, path) -> bool:
    """Shape inputs computed by a subgraph (Shape -> Gather -> Concat ...), as exporters write them
    to keep the batch dynamic, replaced by their values once the input size is fixed; True if any.

    The values come from onnxruntime, run on zeros at two batch sizes: a value that is the same
    for both becomes a constant. A Reshape or Expand target becomes the shape its output had,
    with the batch axis -1 (Reshape: the size left over) or 1 (Expand: broadcast keeps the
    input's batch) where only that axis followed the batch size. Anything else stays computed
    (and the rules that need it say so)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    wanted: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index in _shape_inputs(node.op_type):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                wanted.setdefault(node.input[index], []).append((node, index))
    if not wanted:
        return False
    import onnxruntime as ort  # only for models that compute their shapes

    # A Reshape's or Expand's target is read off its actual output (a target may hold -1 or 0 too)
    # (ONNX's semantics of a target shape, as canonicalise's rewrites read graph patterns: not an adapter's fact)
    outputs = {node.output[0]: node for uses in wanted.values() for node, _ in uses if node.op_type in ("Reshape", "Expand")}
    fetch = list(wanted) + [name for name in outputs if name not in wanted]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.ir_version = readable_ir_version(probe.ir_version)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in fetch)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    batches = (image.batch,) if image.batch else (2, 3)
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        runs = [dict(zip(fetch, sess.run(fetch, {image.name: np.zeros(image.shape(b, height, width), np.float32)})))
                for b in batches]
    except Exception as exc:
        raise ModelError(f"{path}: cannot compute the graph's shape inputs ({first_line(exc)})") from None
    folded = False
    for name, uses in wanted.items():
        values = [np.asarray(run[name]) for run in runs]
        if all(node.op_type in ("Reshape", "Expand") and index == 1 for node, index in uses):
            for node, index in uses:
                seen = [list(run[node.output[0]].shape) for run in runs]
                if any(shape[1:] != seen[0][1:] for shape in seen):
                    continue  # more than the batch axis follows the batch size
                target = list(seen[0])
                if len(seen) > 1 and seen[0][0] != seen[1][0]:
                    if [shape[0] for shape in seen] != list(batches):
                        continue  # axis 0 is not the batch
                    target[0] = -1 if node.op_type == "Reshape" else 1
                constant = f"{node.output[0]}/shape"
                model.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), constant))
                node.input[index] = constant
                folded = True
            continue
        if len(values) > 1 and not np.array_equal(values[0], values[1]):
            continue  # a size or pad that depends on the batch: not a constant
        constant = f"{name}/folded"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values[0]), constant))
        for node, index in uses:
            node.input[index] = constant
        folded = True
    return folded


#: ops whose output has their input's shape and type, which onnx's inference leaves out
#: (GroupNormalization-21 is a function it does not expand)
_SAME_SHAPE = {"GroupNormalization"}


def _infer_shapes(model: onnx.ModelProto, path) -> onnx.ModelProto:
    del model.graph.value_info[:]
    for _ in range(1 + sum(node.op_type in _SAME_SHAPE for node in model.graph.node)):
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as exc:
            error = exc
        # one more output known per round: copy the input's inferred type to such an op's output
        partial = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        known = {v.name: v for v in list(partial.graph.value_info) + list(partial.graph.input)}
        given = {v.name for v in model.graph.value_info}
        for node in model.graph.node:
            if node.op_type in _SAME_SHAPE and node.input[0] in known and node.output[0] not in given:
                info = onnx.ValueInfoProto()
                info.CopyFrom(known[node.input[0]])
                info.name = node.output[0]
                model.graph.value_info.append(info)
                break
        else:
            break
    raise ModelError(f"{path}: shape inference failed ({first_line(error)})") from None


def _floor_ceil_mode_pool(model: onnx.ModelProto) -> bool:
    """Set ceil_mode=0 on the first pool where ceil mode adds no window that starts inside
    the input; True if there was one.

    onnxruntime (like PyTorch) drops a last window that would start in the right padding;
    ONNX shape inference keeps it. Where that is the only extra window, ceil mode is floor
    mode, and saying so makes inferred and actual shapes agree.
    """
    shapes = {v.name: _dims(v) for v in list(model.graph.value_info) + list(model.graph.input)}
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type not in ("MaxPool", "AveragePool") or "ceil_mode" not in attrs or not attrs["ceil_mode"].i:
            continue
        dims = shapes.get(node.input[0])
        if not dims or any(d is None for d in dims[2:]):
            continue
        rank = len(dims) - 2
        kernel = list(attrs["kernel_shape"].ints)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * rank
        pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * rank)
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * rank
        floor_is_ceil = True
        for i, size in enumerate(dims[2:]):
            span = size + pads[i] + pads[rank + i] - dilations[i] * (kernel[i] - 1) - 1
            floor_out, ceil_out = span // strides[i] + 1, -(-span // strides[i]) + 1
            if ceil_out != floor_out and (ceil_out - 1) * strides[i] < size + pads[i]:
                floor_is_ceil = False  # a real extra window: keep ceil mode
        if floor_is_ceil:
            attrs["ceil_mode"].i = 0
            return True
    return False
