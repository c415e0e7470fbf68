"""PaddlePaddle test fixtures, exported to ONNX with paddle2onnx (dev-only tools).

Setup (a separate environment; CI never installs PaddlePaddle):

    python3 -m venv /work/venv-paddle && . /work/venv-paddle/bin/activate
    pip install "paddlepaddle==3.3.1" "paddle2onnx==2.1.0" packaging onnxruntime
    python models/paddle_fixtures.py       # writes tests/fixtures/paddle/*.onnx and reference.npz

Two seeded networks, each exported in both of Paddle 3's save formats:

- ``resnet``: a tiny ResNet (conv, BatchNorm, ReLU, a residual Add with a strided 1x1
  projection, global average pool, Linear head);
- ``lcnet``: a tiny PP-LCNet (PaddleClas' CPU net): depthwise 3x3 conv + BN + HardSwish, a
  squeeze-excitation block (avgpool, 1x1 conv, ReLU, 1x1 conv, HardSigmoid, multiply), pointwise
  conv + BN + HardSwish, then global pool, a 1x1 conv + HardSwish "last conv" and the Linear
  head. The first block uses Paddle's own layers (nn.Hardswish, nn.Hardsigmoid); the second
  writes them out as ``x * relu6(x + 3) / 6`` and ``relu6(s + 3) / 6``, as older PaddleClas and
  PaddleDetection code does: paddle2onnx exports that as Add, Clip, Mul, Div.

and the two formats:

- ``*_pir.onnx``: the default of Paddle 3 (PIR program, ``.json``), exported at opset 11;
- ``*_legacy.onnx``: the old program IR (``.pdmodel``, saved with FLAGS_enable_pir_api=0; paddle2onnx
  2 translates it to PIR before exporting), at opset 7, where paddle2onnx writes every weight as
  a ``Constant`` node, not an initializer. Its batch dimensions are then written as
  ``dim_value: -1``, as paddle2onnx before 1.0 (its Python exporter, still what many deployed
  files come from) wrote them; that exporter needs ``paddle.fluid``, gone since Paddle 2.6, so it
  cannot run on Python 3.11 and we write its spelling of the batch here.

Every file keeps BatchNorm unfused (BatchNormalization nodes after a Conv whose bias is a
separate Reshape + Add). What each file holds is printed.

Weights are seeded and random; biases and BatchNorm parameters get non-trivial values (~10 %
negative BN scales), and BatchNorm statistics are calibrated with one train-mode pass over
random images. ``reference.npz`` holds, per network, fixed input images ``<net>_x``, Paddle's
float32 logits ``<net>_logits``, the float64 logits ``<net>_logits64``, the top class
``<net>_targets`` and Paddle autograd's gradient x input of the top logit in float64,
``<net>_relevance``: for the ReLU net plainly; for the LCNet with every gate detached (HardSwish's
relu6(x + 3) / 6 and the SE factor held constant, .detach() in a twin forward), which is what
LRP-0 must equal; and ``<net>_gradient``, the true float64 gradient of the top logit (gates
differentiated), which the ``gradient`` preset must equal.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and "--legacy" in sys.argv:
    os.environ["FLAGS_enable_pir_api"] = "0"  # before paddle is imported

import numpy as np
import onnx
import paddle
import paddle.nn.functional as F
from paddle import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "paddle"
SIZE, CLASSES, IMAGES = 32, 10, 2


def _hardswish(x, detach: bool):
    gate = F.relu6(x + 3.0) / 6.0
    return x * (gate.detach() if detach else gate)


class ResNet(nn.Layer):
    """stem conv-BN-ReLU, one basic block with a strided projection shortcut, avgpool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, stride=2, padding=1), nn.BatchNorm2D(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2D(8, 16, 3, stride=2, padding=1), nn.BatchNorm2D(16), nn.ReLU(),
                                  nn.Conv2D(16, 16, 3, padding=1), nn.BatchNorm2D(16))
        self.proj = nn.Sequential(nn.Conv2D(8, 16, 1, stride=2), nn.BatchNorm2D(16))
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x, detach: bool = False):
        x = self.stem(x)
        x = F.relu(self.proj(x) + self.body(x))
        return self.fc(paddle.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SE(nn.Layer):
    def __init__(self, channels: int, written_out: bool):
        super().__init__()
        self.written_out = written_out
        self.down = nn.Conv2D(channels, channels // 2, 1)
        self.up = nn.Conv2D(channels // 2, channels, 1)
        self.gate = nn.Hardsigmoid()  # slope 1/6, offset 1/2: relu6(s + 3) / 6

    def forward(self, x, detach: bool = False):
        s = self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1))))
        s = F.relu6(s + 3.0) / 6.0 if self.written_out else self.gate(s)
        return x * (s.detach() if detach else s)


class DepthwiseSeparable(nn.Layer):
    """PP-LCNet's block: depthwise 3x3 conv-BN-HardSwish, SE, pointwise conv-BN-HardSwish."""

    def __init__(self, cin: int, cout: int, stride: int, written_out: bool):
        super().__init__()
        self.written_out = written_out
        self.dw = nn.Sequential(nn.Conv2D(cin, cin, 3, stride=stride, padding=1, groups=cin, bias_attr=False),
                                nn.BatchNorm2D(cin))
        self.se = SE(cin, written_out)
        self.pw = nn.Sequential(nn.Conv2D(cin, cout, 1, bias_attr=False), nn.BatchNorm2D(cout))
        self.act = nn.Hardswish()

    def _act(self, x, detach):
        return _hardswish(x, detach) if self.written_out or detach else self.act(x)

    def forward(self, x, detach: bool = False):
        x = self.se(self._act(self.dw(x), detach), detach)
        return self._act(self.pw(x), detach)


class LCNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, stride=2, padding=1, bias_attr=False), nn.BatchNorm2D(8))
        self.act = nn.Hardswish()
        self.blocks = nn.LayerList([DepthwiseSeparable(8, 16, 1, written_out=False),
                                    DepthwiseSeparable(16, 16, 2, written_out=True)])
        self.last_conv = nn.Conv2D(16, 32, 1)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x, detach: bool = False):
        x = self.stem(x)
        x = _hardswish(x, True) if detach else self.act(x)
        for block in self.blocks:
            x = block(x, detach)
        x = self.last_conv(F.adaptive_avg_pool2d(x, 1))
        x = _hardswish(x, True) if detach else self.act(x)
        return self.fc(paddle.flatten(x, 1))


NETS = {"resnet": ResNet, "lcnet": LCNet}


def randomize(model: nn.Layer, seed: int) -> None:
    """He-normal weights, biases ~ 0.05 N(0, 1), BN scale ~ 1 + 0.8 N(0, 1) (about 10 % negative),
    shift ~ 0.1 N(0, 1); BN statistics from one train-mode pass (momentum 0 for it)."""
    rng = np.random.RandomState(seed)
    for layer in model.sublayers():
        if isinstance(layer, (nn.Conv2D, nn.Linear)):
            shape = layer.weight.shape
            fan_in = np.prod(shape[1:]) if isinstance(layer, nn.Conv2D) else shape[0]
            layer.weight.set_value(rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32))
            if layer.bias is not None:
                layer.bias.set_value(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
        if isinstance(layer, nn.BatchNorm2D):
            n = layer.weight.shape[0]
            layer.weight.set_value((1 + 0.8 * rng.randn(n)).astype(np.float32))
            layer.bias.set_value((0.1 * rng.randn(n)).astype(np.float32))
            layer._momentum = 0.0
    model.train()
    with paddle.no_grad():
        model(paddle.to_tensor(rng.randn(32, 3, SIZE, SIZE).astype(np.float32)))
    model.eval()
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            layer._momentum = 0.9
            assert float(layer._variance.abs().sum()) > 0 and not np.allclose(layer._mean.numpy(), 0)


def save(model: nn.Layer, folder: Path) -> Path:
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    paddle.jit.save(model, str(folder / "model"), input_spec=spec)
    return next(folder / name for name in ("model.json", "model.pdmodel") if (folder / name).exists())


def export(program: Path, path: Path, opset: int) -> None:
    import paddle2onnx

    paddle2onnx.export(str(program), str(program.with_suffix(".pdiparams")), str(path), opset_version=opset,
                       auto_upgrade_opset=False)


def batch_to_minus_one(path: Path) -> None:
    """The batch axis of input and output as paddle2onnx < 1.0 wrote it: dim_value -1."""
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1
    onnx.save(model, str(path))


def describe(path: Path) -> str:
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    weights = sum(n.op_type == "Constant" and len(onnx.helper.get_attribute_value(n.attribute[0]).dims) >= 1
                  and np.prod(onnx.helper.get_attribute_value(n.attribute[0]).dims) > 8 for n in model.graph.node)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    return (f"{path.name}: {path.stat().st_size} bytes, opset {model.opset_import[0].version}, "
            f"input batch {batch}".replace("\n", " ") +
            f", {len(model.graph.initializer)} initializers, {weights} weight Constant nodes, "
            f"{ops['BatchNormalization']} BatchNormalization, {len(clips)} Clip (decomposed hardswish / hardsigmoid), "
            f"{ops.get('HardSigmoid', 0)} HardSigmoid, {ops.get('HardSwish', 0)} HardSwish; ops {dict(ops)}")


def references(nets: dict[str, nn.Layer]) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(123)
    out = {}
    for name, model in nets.items():
        x = rng.rand(IMAGES, 3, SIZE, SIZE).astype(np.float32) * 2 - 1
        logits = model(paddle.to_tensor(x)).numpy()
        model64 = copy.deepcopy(model)
        model64.to(dtype="float64")
        model64.eval()
        inputs = paddle.to_tensor(x.astype(np.float64), stop_gradient=False)
        logits64 = model64(inputs, detach=True)
        targets = logits.argmax(1)
        picked = paddle.take_along_axis(logits64, paddle.to_tensor(targets[:, None]), axis=1).sum()
        picked.backward()
        through = paddle.to_tensor(x.astype(np.float64), stop_gradient=False)
        plain = model64(through)
        assert np.allclose(plain.numpy(), logits64.numpy(), rtol=1e-12, atol=1e-12)  # detaching changes no value
        paddle.take_along_axis(plain, paddle.to_tensor(targets[:, None]), axis=1).sum().backward()
        out[f"{name}_gradient"] = through.grad.numpy()  # the true gradient: gates differentiated
        out.update({f"{name}_x": x, f"{name}_logits": logits, f"{name}_logits64": logits64.numpy(),
                    f"{name}_targets": targets.astype(np.int64),
                    f"{name}_relevance": (inputs.grad * inputs).numpy()})
    return out


def build(legacy: bool) -> None:
    """Build, save and export in one IR mode (a process runs in one: the flag is read at import)."""
    paddle.seed(0)
    mode = "legacy" if legacy else "pir"
    nets = {}
    for seed, (name, cls) in enumerate(NETS.items()):
        model = cls()
        randomize(model, seed)
        nets[name] = model
        with tempfile.TemporaryDirectory() as tmp:
            program = save(model, Path(tmp))
            assert program.suffix == (".pdmodel" if legacy else ".json"), program
            path = OUT / f"paddle_{name}_{mode}.onnx"
            export(program, path, opset=7 if legacy else 11)
        if legacy:
            batch_to_minus_one(path)
        print(describe(path))
    if not legacy:
        refs = references(nets)
        np.savez_compressed(OUT / "reference.npz", **refs)
        print("wrote", OUT / "reference.npz", {k: v.shape for k, v in refs.items()})


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if "--legacy" in sys.argv or "--pir" in sys.argv:
        build(legacy="--legacy" in sys.argv)
        return
    import subprocess

    for flag in ("--pir", "--legacy"):  # same seeds, so both formats hold the same weights
        subprocess.run([sys.executable, __file__, flag], check=True)


if __name__ == "__main__":
    main()
