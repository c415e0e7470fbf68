"""Write the repo's embedded demo: models/demo/tiny_resnet.onnx and examples/demo.png.

    python models/make_demo.py

The model is models/tiny_resnet.py with seeded random weights and calibrated
BatchNorm statistics (it is not trained: its predictions mean nothing, its
heatmaps only show the machinery). BatchNormalization stays as graph nodes so that
every preset, `paper` included, runs on it exactly. The image is the first sample of
the synthetic shapes benchmark (models/shapes.py) with seed 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.export_torchvision import calibrate_batchnorm, export, randomize_batchnorm  # noqa: E402
from models.shapes import CLASSES, generate  # noqa: E402
from models.tiny_resnet import TinyResNet  # noqa: E402

SEED = 0
MODEL = ROOT / "models" / "demo" / "tiny_resnet.onnx"
IMAGE = ROOT / "examples" / "demo.png"


def main() -> None:
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = TinyResNet(num_classes=len(CLASSES))
    randomize_batchnorm(model, generator)
    calibrate_batchnorm(model, generator, size=64)
    export(model, MODEL, size=64, keep_batchnorm=True)
    images, labels, _ = generate(1, seed=2)
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[0]).save(IMAGE)
    print(f"wrote {MODEL} and {IMAGE} (a {CLASSES[labels[0]]})")


if __name__ == "__main__":
    main()
