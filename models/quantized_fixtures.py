"""int8-quantized ResNet-18 fixtures, as onnxruntime.quantization writes them (dev-only).

    python models/quantized_fixtures.py      # writes tests/fixtures/quantized/resnet18_*.onnx, resnet18.npz

torchvision's ResNet class with BasicBlock [2, 2, 2, 2] (resnet18), channel widths divided by
8 (8, 16, 32, 64), 10 classes, 64x64 input; seeded random weights, randomised BatchNorm with
calibrated statistics, exported by torch.onnx with BatchNorm folded (opset 17, input "input",
dynamic batch) to resnet18_float.onnx. That model is run through
onnxruntime.quantization.quant_pre_process (as onnxruntime's docs recommend) and quantized by
quantize_static with MinMax calibration over 32 seeded random images, int8 per-channel symmetric weights
(QuantType.QInt8) and asymmetric activations, in the configurations onnxruntime's docs
recommend for each format (it warns that S8S8 in QOperator format is slow on x64):

    resnet18_qdq.onnx        QuantFormat.QDQ, "S8S8": int8 activations (QuantType.QInt8)
                             -- QuantizeLinear/DequantizeLinear around float ops
    resnet18_qoperator.onnx  QuantFormat.QOperator, "U8S8": uint8 activations (QuantType.QUInt8)
                             -- QLinearConv, QLinearAdd, ...

resnet18.npz holds a seeded float32 batch x (4, 3, 64, 64) and the onnxruntime CPU logits on it:
logits_float (float model), logits_qdq (QDQ model, default session options: onnxruntime fuses
Q/DQ into int8 kernels), logits_qdq_noopt (QDQ model with graph optimisations disabled: the
reference Q/DQ arithmetic) and logits_qoperator (QOperator model, default session options).
The script is deterministic: running it twice writes identical files.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)
from torchvision.models.resnet import BasicBlock, ResNet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.export_torchvision import calibrate_batchnorm, export, randomize_batchnorm  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "quantized"
SIZE = 64
CHANNELS = (8, 16, 32, 64)  # torchvision's (64, 128, 256, 512) / 8
SEED = 0
CALIBRATION_IMAGES = 32
CONFIG = dict(weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
#: file name -> (format, activation type)
FORMATS = {"qdq": (QuantFormat.QDQ, QuantType.QInt8), "qoperator": (QuantFormat.QOperator, QuantType.QUInt8)}


def build(seed: int = SEED) -> torch.nn.Module:
    """torchvision resnet18 at 1/8 width: the stem, stages and classifier rebuilt narrower."""
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10)
    model.inplanes = CHANNELS[0]
    model.conv1 = torch.nn.Conv2d(3, CHANNELS[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(CHANNELS[0])
    model.layer1 = model._make_layer(BasicBlock, CHANNELS[0], 2)
    model.layer2 = model._make_layer(BasicBlock, CHANNELS[1], 2, stride=2)
    model.layer3 = model._make_layer(BasicBlock, CHANNELS[2], 2, stride=2)
    model.layer4 = model._make_layer(BasicBlock, CHANNELS[3], 2, stride=2)
    model.fc = torch.nn.Linear(CHANNELS[3], 10)
    for module in model.modules():  # torchvision's initialisation
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, generator)
    calibrate_batchnorm(model, generator, size=SIZE)
    return model


class RandomImages(CalibrationDataReader):
    """`count` seeded N(0, 1) images, one per batch, under the input name "input"."""

    def __init__(self, count: int = CALIBRATION_IMAGES, seed: int = SEED + 1):
        rng = np.random.default_rng(seed)
        self.images = rng.standard_normal((count, 1, 3, SIZE, SIZE)).astype(np.float32)
        self.rewind()

    def get_next(self):
        return {"input": next(self._iter)} if self._left() else None

    def _left(self) -> bool:
        self._remaining -= 1
        return self._remaining >= 0

    def rewind(self) -> None:
        self._iter = iter(self.images)
        self._remaining = len(self.images)


def run(path: Path, x: np.ndarray, optimise: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # deterministic reductions
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    float_path = export(build(), OUT / "resnet18_float.onnx", size=SIZE)
    print("wrote", float_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "resnet18_prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        for name, (fmt, activations) in FORMATS.items():
            path = OUT / f"resnet18_{name}.onnx"
            quantize_static(str(prepared), str(path), RandomImages(), quant_format=fmt,
                            activation_type=activations, **CONFIG)
            print("wrote", path)
    x = np.random.default_rng(SEED + 2).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    np.savez(OUT / "resnet18.npz", x=x,
             logits_float=run(float_path, x),
             logits_qdq=run(OUT / "resnet18_qdq.onnx", x),
             logits_qdq_noopt=run(OUT / "resnet18_qdq.onnx", x, optimise=False),
             logits_qoperator=run(OUT / "resnet18_qoperator.onnx", x))
    print("wrote", OUT / "resnet18.npz")


if __name__ == "__main__":
    main()
