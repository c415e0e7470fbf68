"""Small trained depthwise classifiers on the shapes benchmark (evidence for issue 21: relevance
that reaches the pixels on MobileNet- and EfficientNet-class models).

    python models/train_mobile.py                      # all three: ~9 minutes on 2 busy CPU cores
    python models/train_mobile.py --only efficientnet  # one of mobilenet, efficientnet, xception

Three architectures, each a few hundred thousand parameters or fewer, for 64x64 inputs and the
6 classes of models/shapes.py:

  mobilenet     MobileNetV2-style: 3x3/2 stem conv + BN + ReLU6, inverted residuals (1x1 expand
                + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 linear projection + BN, residual
                add where input and output shapes match), 1x1 head conv + BN + ReLU6, global
                average pool, linear classifier
  efficientnet  EfficientNet-style: 3x3/2 stem + BN + SiLU, MBConv blocks (1x1 expand + BN +
                SiLU, depthwise 3x3 or 5x5 + BN + SiLU, squeeze-excitation: global pool, 1x1
                reduce, SiLU, 1x1 expand, Sigmoid gate, Mul; 1x1 linear projection + BN,
                residual add where shapes match), 1x1 head + BN + SiLU, pool, linear
  xception      Xception-style: 3x3/2 stem + BN + ReLU, entry blocks of two separable convs
                (depthwise 3x3 + pointwise 1x1, BN, ReLU between them) and a 3x3/2 MaxPool,
                with a 1x1 stride-2 conv + BN shortcut, a middle block with an identity
                shortcut (three ReLU + separable conv + BN), a separable exit conv + BN + ReLU,
                pool, linear

Each is trained with models/train_demo.py's loop (`fit`: AdamW, one-cycle schedule, batch 128,
seeded shuffle) on the shapes training stream (seed 1) and watched on the held-out stream
(seed 2), then exported with models/export_torchvision.export with BatchNorm folded into the
convs, as deployed (TorchScript exporter, opset 17, input "input", output "logits", dynamic
batch), to models/mobile/<name>.onnx. models/mobile/<name>.json records the seed, steps, image
counts, the parameter count, the accuracy on the held-out stream and on the 120 images of
examples/shapes, both evaluated from the .onnx file with onnxruntime. Defaults: 4,800 training
images, 5 epochs of 37 batches = 185 steps, 1,200 test images, torch seed 0, 2 torch threads.
Time on 2 CPU cores shared with other jobs: mobilenet 327 s, efficientnet 61 s, xception 129 s
(about 9 minutes for all three with data generation; the load on the cores dominates). Results
(models/mobile/*.json): held-out accuracy 0.985 / 0.9975 / 1.0, examples/shapes 0.9667 / 0.9917 /
1.0; 67,238 / 92,366 / 73,158 parameters; 0.28 / 0.39 / 0.30 MB .onnx files. The run is
deterministic on a given machine (seeded torch, seeded data, fixed thread count).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.export_torchvision import export  # noqa: E402
from models.shapes import CLASSES, SIZE, generate  # noqa: E402
from models.train_demo import BENCHMARK, TEST_SEED, TRAIN_SEED, fit, to_input  # noqa: E402

OUT = ROOT / "models" / "mobile"


def conv_bn(inputs: int, outputs: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(outputs)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --- MobileNetV2-style ---------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, expand: int):
        super().__init__()
        hidden = inputs * expand
        layers = [conv_bn(inputs, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, outputs, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNet(nn.Module):
    # (expansion, outputs, repeats, stride), as torchvision's MobileNetV2 settings, smaller
    SETTINGS = ((1, 16, 1, 2), (3, 24, 2, 1), (3, 32, 2, 2), (3, 64, 2, 2))

    def __init__(self, num_classes: int = 6, stem: int = 12, head: int = 128):
        super().__init__()
        layers, inputs = [conv_bn(3, stem, 3, 2, act=nn.ReLU6)], stem
        for expand, outputs, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(inputs, outputs, stride if i == 0 else 1, expand))
                inputs = outputs
        layers.append(conv_bn(inputs, head, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --- EfficientNet-style --------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.act, self.gate = nn.SiLU(), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = inputs * expand
        layers = [conv_bn(inputs, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcitation(hidden, max(4, inputs // 4)), conv_bn(hidden, outputs, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNet(nn.Module):
    # (expansion, kernel, outputs, repeats, stride), as EfficientNet-B0's stages, smaller
    SETTINGS = ((1, 3, 16, 1, 2), (3, 3, 24, 2, 1), (3, 5, 40, 2, 2), (3, 3, 64, 2, 2))

    def __init__(self, num_classes: int = 6, stem: int = 16, head: int = 128):
        super().__init__()
        layers, inputs = [conv_bn(3, stem, 3, 2, act=nn.SiLU)], stem
        for expand, kernel, outputs, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(MBConv(inputs, outputs, kernel, stride if i == 0 else 1, expand))
                inputs = outputs
        layers.append(conv_bn(inputs, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --- Xception-style ------------------------------------------------------------------------------
class SeparableConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, no norm between them (as Xception), then BN."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__(nn.Conv2d(inputs, inputs, 3, 1, 1, groups=inputs, bias=False),
                         nn.Conv2d(inputs, outputs, 1, bias=False), nn.BatchNorm2d(outputs))


class EntryBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, first: bool):
        super().__init__()
        layers = [] if first else [nn.ReLU()]  # the stem already ends with a ReLU
        layers += [SeparableConv(inputs, outputs), nn.ReLU(), SeparableConv(outputs, outputs), nn.MaxPool2d(3, 2, 1)]
        self.main = nn.Sequential(*layers)
        self.shortcut = conv_bn(inputs, outputs, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class MiddleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Sequential(*[m for _ in range(3) for m in (nn.ReLU(), SeparableConv(channels, channels))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class Xception(nn.Module):
    def __init__(self, num_classes: int = 6, widths: tuple[int, ...] = (24, 48, 96), stem: int = 16, head: int = 128):
        super().__init__()
        layers, inputs = [conv_bn(3, stem, 3, 2, act=nn.ReLU)], stem
        for i, width in enumerate(widths):
            layers.append(EntryBlock(inputs, width, first=i == 0))
            inputs = width
        layers += [MiddleBlock(inputs), SeparableConv(inputs, head), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


ARCHITECTURES = {"mobilenet": MobileNet, "efficientnet": EfficientNet, "xception": Xception}


# --- training, export, evaluation ----------------------------------------------------------------
def benchmark_images() -> tuple[np.ndarray, np.ndarray]:
    """examples/shapes (the 120-image test split written by train_demo.py): uint8 images, labels."""
    files = sorted(p for c in CLASSES for p in (BENCHMARK / c).glob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return images, np.array([CLASSES.index(f.parent.name) for f in files])


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    run = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    predicted = np.concatenate([run.run(None, {"input": to_input(images[i:i + 256]).numpy()})[0].argmax(1)
                                for i in range(0, len(images), 256)])
    return float((predicted == labels).mean())


def train_one(name: str, seed: int, train: tuple, test: tuple, epochs: int, threads: int, log=print) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = ARCHITECTURES[name](num_classes=len(CLASSES))
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{name}: {parameters} parameters, {len(train[0])} images, {epochs} epochs, seed {seed}")
    start = time.time()
    model = fit(model, *train, *test, seed=seed, epochs=epochs, log=lambda line: log(f"  {line}"), start=start)
    seconds = time.time() - start
    path = export(model, OUT / f"{name}.onnx", size=SIZE, keep_batchnorm=False)
    shapes_x, shapes_y = benchmark_images()
    record = {
        "architecture": f"models/train_mobile.py {ARCHITECTURES[name].__name__}(num_classes=6)",
        "file": path.name, "classes": list(CLASSES), "preprocessing": "imagenet",
        "export": "models/export_torchvision.export(size=64, keep_batchnorm=False): BatchNorm folded, opset 17",
        "seed": seed, "epochs": epochs, "batch": 128, "steps": epochs * (len(train[0]) // 128),
        "parameters": parameters,
        "train": {"generator": "models/shapes.py", "seed": TRAIN_SEED, "images": len(train[0])},
        "test": {"generator": "models/shapes.py", "seed": TEST_SEED, "images": len(test[0]),
                 "accuracy": round(onnx_accuracy(path, *test), 4)},
        "examples_shapes_accuracy": round(onnx_accuracy(path, shapes_x, shapes_y), 4),
        "onnx_bytes": path.stat().st_size,
        "training_seconds": round(seconds), "threads": threads,
        "torch": torch.__version__, "onnxruntime": ort.__version__,
    }
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"  wrote {path}: test {record['test']['accuracy']}, examples/shapes {record['examples_shapes_accuracy']},"
        f" {parameters} parameters, {record['onnx_bytes']} bytes, {seconds:.0f} s")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=tuple(ARCHITECTURES), help="train only these")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4800, help="training images")
    parser.add_argument("--test", type=int, default=1200, help="held-out test images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    log = lambda line: print(line, flush=True)  # noqa: E731
    OUT.mkdir(parents=True, exist_ok=True)
    train_x, train_y, _ = generate(args.train, seed=TRAIN_SEED)
    test_x, test_y, _ = generate(args.test, seed=TEST_SEED)
    for name in args.only or ARCHITECTURES:
        train_one(name, args.seed, (train_x, train_y), (test_x, test_y), args.epochs, args.threads, log)


if __name__ == "__main__":
    main()
