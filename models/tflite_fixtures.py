"""TFLite test fixtures, converted to ONNX by tf2onnx's TFLite front end (dev-only tools).

Setup (a separate environment, never the project's .venv; CI only reads the committed files):

    python3 -m venv /work/venv-tf
    /work/venv-tf/bin/pip install "tensorflow-cpu==2.15.1" "tf2onnx==1.16.1" "numpy<2" "onnx==1.16.2" "protobuf<4.21"
    /work/venv-tf/bin/python models/tflite_fixtures.py     # writes tests/fixtures/tflite/*

One small Keras ReLU ResNet (NHWC, 32x32: stride-2 stem conv + BatchNorm, MaxPool, an identity
and a projection block, an inverted residual with a 3x3 depthwise conv, global average pool, a
two-layer dense head), seeded random weights, non-trivial
biases and BatchNorm parameters, BatchNorm statistics calibrated with a train-mode pass. The
TFLite converter folds every BatchNorm into the conv before it and fuses the ReLUs, then

* ``small_float.tflite``: a float32 TFLite model;
* ``small_int8.tflite``: dynamic-range ("weight-only") quantization, ``Optimize.DEFAULT`` and no
  representative data set: weights of 1024 elements or more are stored as int8 (per output
  channel: axis 0, but axis 3 for the depthwise kernel [1, H, W, C]), the rest stays float. The
  TFLite interpreter runs them with hybrid kernels (the activations are quantized to int8 on the
  fly); tf2onnx writes the int8 weights as initializers behind DequantizeLinear and no
  QuantizeLinear at all: its convs compute in float, but its hybrid dense layer (fc1) gets
  DynamicQuantizeLinear -> DequantizeLinear on its input and on its float bias (uint8 over the
  whole tensor's range, batch included);

each converted by ``python -m tf2onnx.convert --tflite X.tflite --output X.onnx --opset 17``.

``reference.npz`` holds, per model NAME (``float``, ``int8``):

* ``x``: float32 [2, 32, 32, 3] seeded noise images (NHWC, the model's layout);
* ``tflite_logits_NAME``: the TFLite interpreter's own logits (one image per invocation);
* ``logits_NAME``, ``targets_NAME``, ``relevance_NAME``: float64 TF logits, their top-1, and
  gradient x input of the top logit (tf.GradientTape). For ``float`` that is the Keras source
  model itself in float64 (BatchNorm unfolded, same weights); for ``int8`` it is the
  BatchNorm-free net (``folded``) carrying the weights and biases read out of the .tflite file,
  int8 weights dequantized (q - zero) * scale, with fc1's input and bias dynamically quantized
  as the ONNX file does, the input's rounding a detached factor: the function the ONNX model
  computes, and the model whose gradient x input LRP-0 is when relevance passes the quantize
  pairs. Both are ReLU nets otherwise; ``exact_logits_int8``: the same without any activation
  rounding;
* ``onnx_quant_bound_int8``: [2, 10] bound on what fc1's dynamic quantization moves the logits
  from ``exact_logits_int8`` (as below, with step (max - min) / 255 over the tensor, 0 included);
* ``quant_bound_int8``: [2, 10] bound on |TFLite hybrid logit - exact logit|, from the
  activation quantisation step: every hybrid layer rounds its input to int8, an error of at
  most step/2 per element with step = max|a| / 127 (symmetric; the asymmetric form's step
  (max - min) / 255 is smaller), which to first order moves logit k by J_k . noise. Rounding
  errors are modelled as independent and uniform (RMS step / sqrt 12), so 6 standard deviations
  of sqrt(sum over layers of |J_k,l|^2 step_l^2 / 12), J_k,l the float64 Jacobian of logit k at
  the layer's input.

The .tflite sources stay beside the ONNX files. The script prints the quirks found in each ONNX file (DequantizeLinear on weights and no
QuantizeLinear, NHWC input, Transposes) and stops if one is missing.
"""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import tensorflow as tf
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tflite"
SIZE, CLASSES, OPSET = 32, 10, 17
L = tf.keras.layers
WEIGHTED = (L.Conv2D, L.DepthwiseConv2D, L.Dense)  # DepthwiseConv2D is no Conv2D in Keras 2.15


def build(bn: bool = True, dtype: str = "float32") -> tf.keras.Model:
    """The network (bn=False: without its BatchNorms)."""
    def conv(x, filters, kernel, stride, name, padding="same"):
        return L.Conv2D(filters, kernel, strides=stride, padding=padding, name=name, dtype=dtype)(x)

    def norm(x, name):
        return L.BatchNormalization(name=name, dtype=dtype)(x) if bn else x

    relu = lambda x: L.ReLU(dtype=dtype)(x)  # noqa: E731
    inputs = tf.keras.Input((SIZE, SIZE, 3), name="input", dtype=dtype)
    x = relu(norm(conv(inputs, 16, 3, 2, "stem_conv"), "stem_bn"))
    x = L.MaxPooling2D(2, name="pool", dtype=dtype)(x)
    h = relu(norm(conv(x, 16, 3, 1, "b0_conv1"), "b0_bn1"))
    h = norm(conv(h, 16, 3, 1, "b0_conv2"), "b0_bn2")
    x = relu(L.Add(dtype=dtype)([x, h]))
    s = norm(conv(x, 32, 1, 2, "b1_proj", "valid"), "b1_proj_bn")
    h = relu(norm(conv(x, 32, 3, 2, "b1_conv1"), "b1_bn1"))
    h = norm(conv(h, 32, 3, 1, "b1_conv2"), "b1_bn2")
    x = relu(L.Add(dtype=dtype)([s, h]))
    # an inverted residual (MobileNetV2's block, ReLU): 1x1 expansion, 3x3 depthwise, 1x1 projection
    h = relu(norm(conv(x, 128, 1, 1, "b2_expand"), "b2_bn1"))
    h = relu(norm(L.DepthwiseConv2D(3, padding="same", name="b2_depthwise", dtype=dtype)(h), "b2_bn2"))
    x = L.Add(dtype=dtype)([x, norm(conv(h, 32, 1, 1, "b2_project"), "b2_bn3")])
    x = L.GlobalAveragePooling2D(dtype=dtype)(x)
    x = L.Dense(64, activation="relu", name="fc1", dtype=dtype)(x)
    return tf.keras.Model(inputs, L.Dense(CLASSES, name="fc2", dtype=dtype)(x), name="small")


def randomize(model: tf.keras.Model, seed: int) -> None:
    """Seeded weights; non-zero biases; BN scale ~ 1 + 0.8 N(0, 1), shift ~ 0.1 N(0, 1); calibrated BN
    (as models/keras_fixtures.py)."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, WEIGHTED):
            kernel = layer.depthwise_kernel if isinstance(layer, L.DepthwiseConv2D) else layer.kernel
            fan_in = np.prod(kernel.shape[:2]) if isinstance(layer, L.DepthwiseConv2D) else np.prod(kernel.shape[:-1])
            kernel.assign(rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype(np.float32))
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
        if isinstance(layer, L.BatchNormalization):
            layer.gamma.assign((1 + 0.8 * rng.randn(*layer.gamma.shape)).astype(np.float32))
            layer.beta.assign((0.1 * rng.randn(*layer.beta.shape)).astype(np.float32))
            layer.momentum = 0.0  # the calibration pass sets the moving statistics to its batch statistics
    model(rng.randn(32, SIZE, SIZE, 3).astype(np.float32), training=True)


def to_tflite(model: tf.keras.Model, path: Path, quantize: bool) -> Path:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    path.write_bytes(converter.convert())
    return path


def to_onnx(tflite: Path) -> Path:
    out = tflite.with_suffix(".onnx")
    subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(out),
                    "--opset", str(OPSET)], check=True, capture_output=True)
    return out


def tflite_constants(path: Path, layers: set[str]) -> tuple[dict, list]:
    """{keras layer name: (kernel in Keras layout, bias)} from the .tflite file (int8 dequantized),
    and the names of the layers whose weights are int8 (run by hybrid kernels)."""
    interpreter = tf.lite.Interpreter(str(path))
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    weights, hybrid = {}, []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        w_index, b_index = op["inputs"][1], (op["inputs"][2] if len(op["inputs"]) > 2 else -1)
        w_detail = details[w_index]
        # "small/b0_conv1/Conv2D", or fused names ("small/b2_bn2/FusedBatchNormV3;small/b2_depthwise/...")
        parts = [part.split("/") for part in w_detail["name"].split(";")]
        name = next(part[1] for part in parts if len(part) > 1 and part[1] in layers)
        w = interpreter.get_tensor(w_index).astype(np.float64)
        if w_detail["dtype"] == np.int8:
            q = w_detail["quantization_parameters"]
            # per output channel: quantized_dimension 0 ([O, H, W, I], [out, in]); 3 for depthwise [1, H, W, C]
            shape = [1] * w.ndim
            shape[q["quantized_dimension"]] = -1
            w = (w - q["zero_points"].reshape(shape)) * q["scales"].astype(np.float64).reshape(shape)
            hybrid.append(name)
        out_channels = w.shape[3] if op["op_name"] == "DEPTHWISE_CONV_2D" else w.shape[0]
        b = interpreter.get_tensor(b_index).astype(np.float64) if b_index >= 0 else np.zeros(out_channels)
        # to the layouts of tf.nn: OHWI -> HWIO, [1, H, W, C] -> [H, W, C, 1], [out, in] -> [in, out]
        kernel = {"CONV_2D": lambda: w.transpose(1, 2, 3, 0), "DEPTHWISE_CONV_2D": lambda: w.transpose(1, 2, 3, 0),
                  "FULLY_CONNECTED": lambda: w.T}[op["op_name"]]()
        weights[name] = (kernel, b)
    return weights, hybrid


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """The interpreter's logits, one image per invocation (hybrid kernels quantize per invocation)."""
    interpreter = tf.lite.Interpreter(str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    logits = []
    for image in x:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(logits)


def grad_x_input(model: tf.keras.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x64 = tf.constant(x.astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(x64)
        logits = model(x64, training=False)
        targets = tf.argmax(logits, axis=1)
        top = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
    grad = tape.gradient(top, x64)
    return logits.numpy(), targets.numpy().astype(np.int64), (grad * x64).numpy()


def dynamic_quantize(t):
    """ONNX DynamicQuantizeLinear then DequantizeLinear, over the whole tensor (batch included)."""
    low, high = tf.minimum(tf.reduce_min(t), 0.0), tf.maximum(tf.reduce_max(t), 0.0)
    scale = (high - low) / 255
    zero = tf.clip_by_value(tf.round(-low / scale), 0, 255)  # tf.round: halves to even, as ONNX
    return (tf.clip_by_value(tf.round(t / scale) + zero, 0, 255) - zero) * scale


def folded(weights: dict, x, offsets: dict | None = None, dynamic: bool = False):
    """The network with BatchNorm folded away, in TF ops on the given (float64) weights: what the
    .tflite file computes with exact arithmetic. offsets: {layer: tensor added to its input}
    ({layer}_bias: to its output). dynamic: the dense layer fc1 as tf2onnx converts TFLite's
    hybrid kernel, input and bias through DynamicQuantizeLinear -> DequantizeLinear, the
    input's rounding as a detached factor (a_q = a * (a_q / a)): the model LRP-0 with relevance
    passing the pair unchanged is gradient x input of."""
    offsets = offsets or {}

    def conv(t, name, stride, padding="SAME"):
        kernel, bias = weights[name]
        t = t + offsets[name] if name in offsets else t
        return tf.nn.conv2d(t, kernel, stride, padding) + bias

    x = tf.nn.relu(conv(x, "stem_conv", 2))
    x = tf.nn.max_pool2d(x, 2, 2, "VALID")
    h = conv(tf.nn.relu(conv(x, "b0_conv1", 1)), "b0_conv2", 1)
    x = tf.nn.relu(x + h)
    h = conv(tf.nn.relu(conv(x, "b1_conv1", 2)), "b1_conv2", 1)
    x = tf.nn.relu(conv(x, "b1_proj", 2, "VALID") + h)
    h = tf.nn.relu(conv(x, "b2_expand", 1))
    kernel, bias = weights["b2_depthwise"]
    h = h + offsets["b2_depthwise"] if "b2_depthwise" in offsets else h
    h = tf.nn.relu(tf.nn.depthwise_conv2d(h, kernel, [1, 1, 1, 1], "SAME") + bias)
    x = x + conv(h, "b2_project", 1)

    def dense(t, name):
        kernel, bias = weights[name]
        t = t + offsets[name] if name in offsets else t
        if dynamic and name == "fc1":  # tf2onnx's DynamicQuantizeLinear -> DequantizeLinear on input and bias
            q = dynamic_quantize(t)
            t = t * tf.stop_gradient(tf.where(t == 0, tf.ones_like(t), q / tf.where(t == 0, tf.ones_like(t), t)))
            bias = dynamic_quantize(tf.constant(bias.astype(np.float32).astype(np.float64)))
        z = tf.matmul(t, kernel) + bias
        return z + offsets[name + "_bias"] if name + "_bias" in offsets else z

    return dense(tf.nn.relu(dense(tf.reduce_mean(x, axis=(1, 2)), "fc1")), "fc2")


def quant_bound(weights: dict, hybrid: list[str], x: np.ndarray) -> np.ndarray:
    """[images, classes] bound on the hybrid kernels' activation rounding (see the docstring)."""
    bound = np.zeros((len(x), CLASSES))
    for i, image in enumerate(x.astype(np.float64)):
        # the input of every layer, then a zero offset there: its gradient is the Jacobian at that input
        inputs = {}
        folded(weights, image[None], {n: _Recorder(inputs, n) for n in hybrid})
        offsets = {n: tf.Variable(tf.zeros_like(inputs[n])) for n in hybrid}
        with tf.GradientTape(persistent=True) as tape:
            logits = folded(weights, image[None], offsets)
            rows = [logits[0, k] for k in range(CLASSES)]  # sliced under the tape, to be differentiated
        for k in range(CLASSES):
            jacobians = tape.gradient(rows[k], [offsets[n] for n in hybrid])
            steps = [float(tf.reduce_max(tf.abs(inputs[n]))) / 127 for n in hybrid]
            bound[i, k] = 6 * np.sqrt(sum(float(tf.reduce_sum(j * j)) * step ** 2 / 12
                                          for j, step in zip(jacobians, steps)))
        del tape
    return bound


def onnx_quant_bound(weights: dict, x: np.ndarray) -> np.ndarray:
    """[images, classes] bound on what the ONNX model's own dynamic quantization (fc1's input and
    bias, uint8 over the tensor's range with 0 included: step (max - min) / 255) moves the logits
    from the exact function, as quant_bound: 6 standard deviations of uniform rounding."""
    x64 = tf.constant(x.astype(np.float64))
    inputs = {}
    folded(weights, x64, {"fc1": _Recorder(inputs, "fc1")})
    offsets = {"fc1": tf.Variable(tf.zeros_like(inputs["fc1"])), "fc1_bias": tf.Variable(tf.zeros([1, 64], tf.float64))}
    steps = {name: (max(float(tf.reduce_max(v)), 0) - min(float(tf.reduce_min(v)), 0)) / 255
             for name, v in (("fc1", inputs["fc1"]), ("fc1_bias", tf.constant(weights["fc1"][1])))}
    bound = np.zeros((len(x), CLASSES))
    with tf.GradientTape(persistent=True) as tape:
        logits = folded(weights, x64, offsets)
        rows = {(i, k): logits[i, k] for i in range(len(x)) for k in range(CLASSES)}
    for (i, k), row in rows.items():
        jac = tape.gradient(row, offsets)
        bound[i, k] = 6 * np.sqrt(sum(float(tf.reduce_sum(jac[n] ** 2)) * steps[n] ** 2 / 12 for n in offsets))
    return bound


class _Recorder:
    """An offset of zero that records the tensor it is added to."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __radd__(self, t):
        self.store[self.name] = t
        return t


def quirks(path: Path) -> Counter:
    model = onnx.load(str(path))
    ops = Counter(node.op_type for node in model.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_weights = sum(n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
                     for n in model.graph.node)
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    print(f"{path.name}: input {model.graph.input[0].name} {dims}; ops {dict(ops)}; "
          f"DequantizeLinear on int8 weights: {dq_weights}")
    return Counter(dq_weights=dq_weights, nhwc=int(dims[-1] == 3), transpose=ops["Transpose"],
                   quantize=ops["QuantizeLinear"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(0)
    model = build()
    randomize(model, seed=0)
    x = np.random.RandomState(1).randn(2, SIZE, SIZE, 3).astype(np.float32)
    ref = {"x": x}
    source64 = build(dtype="float64")
    source64.set_weights(model.get_weights())
    for name, quantize in (("float", False), ("int8", True)):
        tflite = to_tflite(model, OUT / f"small_{name}.tflite", quantize)
        onnx_path = to_onnx(tflite)
        found = quirks(onnx_path)
        assert found["nhwc"] and found["transpose"] and not found["quantize"], found
        assert bool(found["dq_weights"]) == quantize, found
        weights, hybrid = tflite_constants(tflite, {layer.name for layer in model.layers if isinstance(layer, WEIGHTED)})
        if name == "float":  # the Keras source model in float64 (BatchNorm unfolded)
            logits, targets, relevance = grad_x_input(source64, x)
            exact = folded(weights, x.astype(np.float64)).numpy()  # folding BatchNorm only rounds
            assert np.abs(exact - logits).max() < 1e-4, np.abs(exact - logits).max()
        else:  # the function the ONNX model computes: dequantized weights, fc1's dynamic quantization
            logits, targets, relevance = grad_x_input(lambda t, training: folded(weights, t, dynamic=True), x)
            ref["exact_logits_int8"] = folded(weights, x.astype(np.float64)).numpy()  # no activation rounding
            ref["onnx_quant_bound_int8"] = onnx_quant_bound(weights, x)
        own = run_tflite(tflite, x)
        if name == "float":
            assert np.abs(own - logits).max() < 1e-4
        else:
            ref["quant_bound_int8"] = quant_bound(weights, hybrid, x)
            error = np.abs(own - ref["exact_logits_int8"])
            print(f"int8: hybrid layers {hybrid}; |tflite - exact| max {error.max():.2e}, "
                  f"bound min {ref['quant_bound_int8'].min():.2e}, max error / bound {(error / ref['quant_bound_int8']).max():.2f}")
            assert np.all(error <= ref["quant_bound_int8"])
        ref.update({f"tflite_logits_{name}": own, f"logits_{name}": logits, f"targets_{name}": targets,
                    f"relevance_{name}": relevance})
        print("wrote", onnx_path, onnx_path.stat().st_size, "bytes")
    np.savez_compressed(OUT / "reference.npz", **ref)
    print("wrote", OUT / "reference.npz")


if __name__ == "__main__":
    main()
