"""Keras / TensorFlow test fixtures, exported to ONNX with tf2onnx (dev-only tools).

Setup (a separate environment: TF 2.15 with Keras 2 is what tf2onnx 1.16 supports best):

    python3 -m venv .venv-fixtures && . .venv-fixtures/bin/activate
    pip install "tensorflow-cpu==2.15.1" "tf2onnx==1.16.1" "numpy<2" "onnx==1.16.2" "protobuf<4.21" torch
    python models/keras_fixtures.py            # writes tests/fixtures/keras_*.onnx

The ResNets are built by Keras' own application code (keras.src.applications.resnet and
resnet_v2: the same blocks, stacks and layer order as ResNet50/101/50V2), only with 1/8 of
the filters and 64x64 inputs so the files stay small; the graph structure is what tf2onnx
makes of the real architectures. `keras_small.onnx` is a small functional ResNet with an
exact PyTorch twin (same weights, exported by torch.onnx) in `keras_small_torch.onnx`.

Weights are seeded and random; biases and BatchNorm parameters get non-trivial values (tf2onnx
drops zero biases, and ~10 % negative BN scales matter for LRP), and BatchNorm statistics are
calibrated with one train-mode pass over random images.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx
from keras.src.applications import resnet

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
SIZE, CLASSES, OPSET = 64, 10, 15


def _stacks_v1(blocks):
    def stack_fn(x):
        x = resnet.stack1(x, 8, blocks[0], stride1=1, name="conv2")
        for i, (filters, n) in enumerate(zip((16, 32, 64), blocks[1:])):
            x = resnet.stack1(x, filters, n, name=f"conv{i + 3}")
        return x
    return stack_fn


def _stacks_v2(x):
    x = resnet.stack2(x, 8, 3, name="conv2")
    x = resnet.stack2(x, 16, 4, name="conv3")
    x = resnet.stack2(x, 32, 6, name="conv4")
    return resnet.stack2(x, 64, 3, stride1=1, name="conv5")


def keras_resnet(name: str) -> tf.keras.Model:
    """Keras' ResNet50 / ResNet101 / ResNet50V2 code with 1/8 of the filters."""
    args = dict(include_top=True, weights=None, input_shape=(SIZE, SIZE, 3), classes=CLASSES)
    if name == "resnet50":
        return resnet.ResNet(_stacks_v1((3, 4, 6, 3)), False, True, "resnet50", **args)
    if name == "resnet101":
        return resnet.ResNet(_stacks_v1((3, 4, 23, 3)), False, True, "resnet101", **args)
    if name == "resnet50v2":
        return resnet.ResNet(_stacks_v2, True, True, "resnet50v2", **args)
    raise ValueError(name)


def keras_small() -> tf.keras.Model:
    """A small functional ResNet: Keras-style stem (ZeroPadding + valid conv, Pad + MaxPool),
    an identity and a projection block, global pooling and a softmax-free dense head.
    Its main-branch BatchNorms are unfused (fused=False): tf2onnx writes them as a Mul and
    an Add of per-channel constants after a Conv with its own bias, and the residual Adds
    then take bias Adds as inputs."""
    L = tf.keras.layers
    inputs = tf.keras.Input((SIZE, SIZE, 3), name="input")
    x = L.ZeroPadding2D(1)(inputs)
    x = L.Conv2D(8, 3, strides=2, name="stem_conv")(x)
    x = L.ReLU()(L.BatchNormalization(name="stem_bn", fused=False)(x))
    x = L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(1)(x))
    for i, (filters, stride) in enumerate(((8, 1), (16, 2))):
        shortcut = x
        if stride != 1:
            shortcut = L.BatchNormalization(name=f"b{i}_proj_bn")(L.Conv2D(filters, 1, strides=stride, name=f"b{i}_proj")(x))
        h = L.Conv2D(filters, 1, strides=stride, name=f"b{i}_conv1")(x)
        h = L.ReLU()(L.BatchNormalization(name=f"b{i}_bn1")(h))
        h = L.Conv2D(filters, 3, padding="same", name=f"b{i}_conv2")(h)
        h = L.BatchNormalization(name=f"b{i}_bn2", fused=False)(h)
        x = L.ReLU()(L.Add(name=f"b{i}_add")([shortcut, h]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(CLASSES, name="fc")(x)
    return tf.keras.Model(inputs, outputs, name="keras_small")


def randomize(model: tf.keras.Model, seed: int) -> None:
    """Seeded weights; non-zero biases; BN scale ~ 1 + 0.8 N(0, 1), shift ~ 0.1 N(0, 1); calibrated BN."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)):
            kernel = layer.kernel.numpy()
            fan_in = np.prod(kernel.shape[:-1])
            layer.kernel.assign(rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype(np.float32))
            if layer.use_bias:
                layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.gamma.assign((1 + 0.8 * rng.randn(*layer.gamma.shape)).astype(np.float32))
            layer.beta.assign((0.1 * rng.randn(*layer.beta.shape)).astype(np.float32))
            layer.momentum = 0.0  # the calibration pass sets the moving statistics to its batch statistics
    model(rng.randn(32, SIZE, SIZE, 3).astype(np.float32), training=True)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.99


def export(model: tf.keras.Model, path: Path) -> Path:
    signature = [tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input")]
    tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET, output_path=str(path))
    return path


def torch_twin(model: tf.keras.Model, path: Path) -> Path:
    """keras_small in PyTorch with the same weights, exported by torch.onnx (NCHW, BN kept)."""
    import torch
    from torch import nn

    def conv(name, stride=1, padding=0):
        layer = model.get_layer(name)
        kernel, bias = (w.numpy() for w in layer.weights)
        module = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], stride, padding)
        module.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
        module.bias.data = torch.tensor(bias)
        return module

    def bn(name):
        layer = model.get_layer(name)
        gamma, beta, mean, var = (w.numpy() for w in layer.weights)
        module = nn.BatchNorm2d(len(gamma), eps=layer.epsilon)
        for param, value in zip((module.weight, module.bias, module.running_mean, module.running_var), (gamma, beta, mean, var)):
            param.data = torch.tensor(value)
        return module

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv("stem_conv", 2, 1), bn("stem_bn"), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            self.proj = nn.Sequential(conv("b1_proj", 2), bn("b1_proj_bn"))
            self.blocks = nn.ModuleList(
                nn.Sequential(conv(f"b{i}_conv1", s), bn(f"b{i}_bn1"), nn.ReLU(), conv(f"b{i}_conv2", 1, 1), bn(f"b{i}_bn2"))
                for i, s in ((0, 1), (1, 2)))
            dense = model.get_layer("fc")
            self.fc = nn.Linear(*dense.kernel.shape)
            self.fc.weight.data = torch.tensor(dense.kernel.numpy().T.copy())
            self.fc.bias.data = torch.tensor(dense.bias.numpy())

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.blocks[0](x))
            x = torch.relu(self.proj(x) + self.blocks[1](x))
            return self.fc(x.mean(dim=(2, 3)))

    twin = Twin().eval()
    probe = np.random.RandomState(1).randn(2, SIZE, SIZE, 3).astype(np.float32)
    expected = model(probe, training=False).numpy()
    got = twin(torch.tensor(probe.transpose(0, 3, 1, 2))).detach().numpy()
    assert np.allclose(expected, got, atol=1e-4), np.abs(expected - got).max()
    torch.onnx.export(twin, torch.randn(1, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
                      do_constant_folding=False)
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(0)
    for i, name in enumerate(("resnet50", "resnet101", "resnet50v2")):
        model = keras_resnet(name)
        randomize(model, seed=i)
        print("wrote", export(model, OUT / f"keras_{name}.onnx"))
    small = keras_small()
    randomize(small, seed=10)
    print("wrote", export(small, OUT / "keras_small.onnx"))
    if "--no-torch" not in sys.argv:
        print("wrote", torch_twin(small, OUT / "keras_small_torch.onnx"))


if __name__ == "__main__":
    main()
