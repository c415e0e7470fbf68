"""Train the demo model: models/tiny_resnet.py on the synthetic shapes benchmark (models/shapes.py).

    python models/train_demo.py                 # ~5 minutes on 2 CPU cores

Writes models/demo/tiny_resnet.onnx (BatchNorm kept as nodes, so every preset, `paper`
included, runs on it exactly), models/demo/tiny_resnet.json (seed, data, accuracy) and
the benchmark's test split to examples/shapes/ (ImageFolder layout, classes.txt, masks/).
Training data is the shapes stream with seed 1; the held-out test split uses seed 2. The
run is deterministic on a given machine (seeded torch, single-process data).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.export_torchvision import export  # noqa: E402
from models.shapes import CLASSES, generate  # noqa: E402
from models.tiny_resnet import TinyResNet  # noqa: E402

MODEL = ROOT / "models" / "demo" / "tiny_resnet.onnx"
RECORD = ROOT / "models" / "demo" / "tiny_resnet.json"
BENCHMARK = ROOT / "examples" / "shapes"
DEMO_IMAGE = ROOT / "examples" / "demo.png"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # the `imagenet` preprocessing preset
STD = np.array([0.229, 0.224, 0.225], np.float32)
TRAIN_SEED, TEST_SEED = 1, 2


def to_input(images: np.ndarray) -> torch.Tensor:
    x = (images.astype(np.float32) / 255 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(to_input(images[i:i + 256])).argmax(1) for i in range(0, len(images), 256)])
    return float((predicted.numpy() == labels).mean())


def write_benchmark(images: np.ndarray, labels: np.ndarray, masks: np.ndarray, folder: Path, demo_image: Path) -> None:
    """examples/shapes/<class>/<i>.png, masks/<class>/<i>.png, classes.txt; the first image is the demo."""
    for i in range(len(images)):
        name = f"{CLASSES[labels[i]]}/{i:04d}.png"
        for root, array in ((folder, images[i]), (folder / "masks", masks[i].astype(np.uint8) * 255)):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / name)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    Image.fromarray(images[0]).save(demo_image)


def fit(model: torch.nn.Module, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
        seed: int, epochs: int, log=print, start: float | None = None) -> torch.nn.Module:
    """The training loop (AdamW, one-cycle schedule, batches of 128 in a seeded shuffle), with
    the test accuracy logged per epoch; the model in eval mode."""
    start = time.time() if start is None else start
    train_images = len(train_x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = min(128, train_images)
    steps_per_epoch = train_images // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    order_rng = np.random.RandomState(seed)
    inputs, targets = to_input(train_x), torch.from_numpy(train_y)
    for epoch in range(epochs):
        model.train()
        order = order_rng.permutation(train_images)
        for i in range(steps_per_epoch):
            idx = torch.from_numpy(order[i * batch:(i + 1) * batch])
            loss = torch.nn.functional.cross_entropy(model(inputs[idx]), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy(model, test_x, test_y):.4f}"
            f" ({time.time() - start:.0f} s)")
    return model.eval()


def train(seed: int = 0, train_images: int = 12000, test_images: int = 2000, epochs: int = 8,
          log=print) -> tuple[torch.nn.Module, float, dict]:
    """The trained model (eval mode), its held-out accuracy and a record of how it was made."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    start = time.time()
    train_x, train_y, _ = generate(train_images, seed=TRAIN_SEED)
    test_x, test_y, _ = generate(test_images, seed=TEST_SEED)
    model = fit(TinyResNet(num_classes=len(CLASSES)), train_x, train_y, test_x, test_y, seed, epochs, log, start)
    test_accuracy = accuracy(model, test_x, test_y)
    record = {
        "architecture": "models/tiny_resnet.py TinyResNet(num_classes=6)",
        "classes": list(CLASSES),
        "preprocessing": "imagenet",
        "seed": seed, "epochs": epochs,
        "train": {"generator": "models/shapes.py", "seed": TRAIN_SEED, "images": train_images},
        "test": {"generator": "models/shapes.py", "seed": TEST_SEED, "images": test_images},
        "test_accuracy": round(test_accuracy, 4),
        "training_seconds": round(time.time() - start),
        "torch": torch.__version__,
    }
    return model.eval(), test_accuracy, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=12000, help="training images")
    parser.add_argument("--test", type=int, default=2000, help="held-out test images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--benchmark", type=int, default=120, help="test images written to examples/shapes")
    args = parser.parse_args()
    model, test_accuracy, record = train(args.seed, args.train, args.test, args.epochs,
                                         log=lambda line: print(line, flush=True))
    export(model, MODEL, size=64, keep_batchnorm=True)
    images, labels, masks = generate(args.benchmark, seed=TEST_SEED)
    write_benchmark(images, labels, masks, BENCHMARK, DEMO_IMAGE)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(f"test accuracy {test_accuracy:.4f}; wrote {MODEL}, {RECORD}, {BENCHMARK}/")


if __name__ == "__main__":
    main()
