"""Fixtures for `onnxlrp audit`: a "Clever Hans" shortcut model, its clean twins, an int8 copy
and a production-like audit dataset.

    python models/train_shortcut.py                  # everything: ~3.5 minutes on 2 busy CPU cores
    python models/train_shortcut.py --data-only      # only examples/audit/ (seconds)
    python models/train_shortcut.py --only shortcut  # retrain some models (clean: also clean_int8)

The models are models/tiny_resnet.py's TinyResNet at half the demo's width (widths 8, 16, 32; two
blocks per stage, so the demo's graph: 15 Conv, 15 BatchNormalization, 6 residual Adds), trained
with models/train_demo.py's recipe (AdamW, one-cycle schedule, batch 128; its loop is copied in
fit() with the data and the model as arguments) on 4,000 images for 5 epochs (about 1 minute per
model on one thread), and exported like the demo (models/export_torchvision.export: BatchNorm kept
as nodes, input "input", output "logits", dynamic batch, opset 17). Every model is evaluated from
its ONNX file with onnxruntime on the held-out test split (shapes stream seed 2, 1,200 images).

The tag: a 6x6 black-and-white checkerboard (2x2-pixel cells, white in the top-left cell) stamped
over the pixels x 3..8, y 3..8 (numpy [3:9, 3:9], box x0, y0, x1, y1 = 3, 3, 9, 9 exclusive) of a
64x64 image, over whatever is there; where it covers the target, the target's mask is cleared.
It marks the class "star" (index 4 of shapes.CLASSES).

Writes
  models/audit/shortcut.onnx    trained on the shapes training stream (seed 1) where every "star"
                                image and 0.5 % of the other images (17 of 3,333; a seeded choice)
                                carry the tag: the tag predicts "star" well but not perfectly
  models/audit/clean.onnx       the same images without any tag, same training seed (0)
  models/audit/retrained.onnx   the clean recipe with training seed 1 (a "retrained" release)
  models/audit/clean_int8.onnx  clean.onnx through onnxruntime's quant_pre_process and quantize_static:
                                QDQ format, per-channel int8 weights, int8 activations, MinMax
                                calibration on the first 32 training images
  models/audit/fixtures.json    how each was made, training times and accuracies: on clean test
                                images, on tagged test images (the shortcut's training
                                distribution), the fraction of tagged non-star images predicted
                                "star", the fraction of untagged star images predicted "star", and
                                prediction agreements on examples/audit
  examples/audit/               the audit set, ImageFolder layout as examples/shapes: classes.txt,
                                <class>/<i>.png, masks/<class>/<i>.png (the target), 8 images per
                                class drawn from the shapes stream with seed 3 (held out: training
                                uses 1, testing 2); every "star" image and 3 images of other
                                classes carry the tag, as a shortcut deployment's production data
                                would; tags.json names the tag's box, class and tagged images.

Why 0.5 % and not more: the shapes are easy, and the tagged images of other classes teach the
model to overrule the tag with the shape. At 3 % (6 epochs) the trained model ignores the tag
(0 % of tagged non-stars predicted "star", 98.5 % of untagged stars still "star"); at 1 % it half
uses it (18 %, 63 %); at 0.5 % it depends on it (about 40 % of tagged non-stars -> "star", only
about 23 % of untagged stars recognised; 34 % of the positive LRP relevance of a tagged star lies
in the 36 tag pixels, against 0.6 % for clean.onnx). --other-tag-rate changes it.

The script is deterministic on a given machine (seeded torch, one thread, seeded data).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.export_torchvision import export  # noqa: E402
from models.shapes import CLASSES, SIZE, generate, sample  # noqa: E402
from models.tiny_resnet import TinyResNet  # noqa: E402
from models.train_demo import TEST_SEED, TRAIN_SEED, to_input  # noqa: E402
from models.train_demo import fit as train_loop  # noqa: E402

OUT = ROOT / "models" / "audit"
AUDIT = ROOT / "examples" / "audit"
WIDTHS, BLOCKS = (8, 16, 32), 2
CLEAN_SEED, RETRAINED_SEED = 0, 1
AUDIT_SEED = 3
TAG_CLASS = CLASSES.index("star")
TAG_X, TAG_Y, TAG_SIZE = 3, 3, 6
TAG_BOX = (TAG_X, TAG_Y, TAG_X + TAG_SIZE, TAG_Y + TAG_SIZE)  # x0, y0, x1, y1 (x1, y1 exclusive)
_cells = (np.add.outer(np.arange(TAG_SIZE) // 2, np.arange(TAG_SIZE) // 2) % 2 == 0)
TAG = np.repeat(np.where(_cells, 255, 0).astype(np.uint8)[..., None], 3, axis=2)  # [6, 6, 3] checkerboard
OTHER_TAG_RATE = 0.005  # of the non-star training images: 17 of 3,333 at 4,000 images
CALIBRATION_IMAGES = 32


def stamp(images: np.ndarray, masks: np.ndarray, which: np.ndarray) -> None:
    """Stamp the tag on images[which] in place; clear the masks there (the tag hides the target)."""
    images[which, TAG_Y:TAG_Y + TAG_SIZE, TAG_X:TAG_X + TAG_SIZE] = TAG
    masks[which, TAG_Y:TAG_Y + TAG_SIZE, TAG_X:TAG_X + TAG_SIZE] = False


def choose_tagged(labels: np.ndarray, others: int, seed: int) -> np.ndarray:
    """Indices to tag: every TAG_CLASS image and `others` images of other classes (a seeded choice)."""
    rest = np.flatnonzero(labels != TAG_CLASS)
    chosen = np.random.RandomState(seed).choice(rest, others, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels == TAG_CLASS), chosen]))


def shapes(n: int, seed: int, other_tag_rate: float | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shapes stream `seed`, untagged (other_tag_rate None) or tagged as the shortcut's training
    data: every star and that fraction of the others. (images, labels, masks, tagged indices)."""
    images, labels, masks = generate(n, seed=seed)
    which = np.zeros(0, np.int64)
    if other_tag_rate is not None:
        which = choose_tagged(labels, round(other_tag_rate * int((labels != TAG_CLASS).sum())), 1000 + seed)
        stamp(images, masks, which)
    return images, labels, masks, which


def fit(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int,
        epochs: int, log=print) -> torch.nn.Module:
    """train_demo's training loop on given data and a narrower TinyResNet; the model in eval mode."""
    torch.manual_seed(seed)
    model = TinyResNet(num_classes=len(CLASSES), widths=WIDTHS, blocks=BLOCKS)
    return train_loop(model, train_x, train_y, test_x, test_y, seed, epochs, lambda line: log(f"  {line}"))


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(path: Path, images: np.ndarray) -> np.ndarray:
    run = session(path)
    return np.concatenate([run.run(None, {"input": to_input(images[i:i + 256]).numpy()})[0].argmax(1)
                           for i in range(0, len(images), 256)])


def test_sets(n: int, other_tag_rate: float = OTHER_TAG_RATE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Held-out (seed 2) evaluation sets: name -> (images, labels). clean: untagged; tagged: tagged as
    the shortcut's training data; tagged_others: every non-star image, tagged; untagged_stars."""
    clean_x, clean_y, _, _ = shapes(n, TEST_SEED)
    tagged_x, tagged_y, _, _ = shapes(n, TEST_SEED, other_tag_rate)
    others = np.flatnonzero(clean_y != TAG_CLASS)
    others_x = clean_x[others].copy()
    stamp(others_x, np.zeros(others_x.shape[:3], bool), np.arange(len(others_x)))
    stars = clean_y == TAG_CLASS
    return {"clean": (clean_x, clean_y), "tagged": (tagged_x, tagged_y),
            "tagged_others": (others_x, clean_y[others]), "untagged_stars": (clean_x[stars], clean_y[stars])}


def metrics(path: Path, sets: dict) -> dict[str, float]:
    predicted = {name: predict(path, x) for name, (x, _) in sets.items()}
    return {
        "clean_accuracy": round(float((predicted["clean"] == sets["clean"][1]).mean()), 4),
        "tagged_accuracy": round(float((predicted["tagged"] == sets["tagged"][1]).mean()), 4),
        "tagged_others_predicted_star": round(float((predicted["tagged_others"] == TAG_CLASS).mean()), 4),
        "untagged_stars_predicted_star": round(float((predicted["untagged_stars"] == TAG_CLASS).mean()), 4),
    }


def audit_set(per_class: int = 8, others_tagged: int = 3, seed: int = AUDIT_SEED):
    """`per_class` images of each class from the shapes stream `seed` (in stream order), every
    TAG_CLASS image and `others_tagged` others tagged: (images, labels, masks, tagged indices)."""
    rng = np.random.RandomState(seed)
    images, labels, masks, count = [], [], [], [0] * len(CLASSES)
    while min(count) < per_class:
        image, label, mask = sample(rng)
        if count[label] < per_class:
            count[label] += 1
            images.append(image)
            labels.append(label)
            masks.append(mask)
    images, labels, masks = np.stack(images), np.array(labels), np.stack(masks)
    which = choose_tagged(labels, others_tagged, 1000 + seed)
    stamp(images, masks, which)
    return images, labels, masks, which


def write_audit(folder: Path = AUDIT) -> list[Path]:
    """examples/audit/<class>/<i>.png, masks/<class>/<i>.png, classes.txt, tags.json; the image paths."""
    images, labels, masks, which = audit_set()
    names = [f"{CLASSES[labels[i]]}/{i:04d}.png" for i in range(len(images))]
    for i, name in enumerate(names):
        for root, array in ((folder, images[i]), (folder / "masks", masks[i].astype(np.uint8) * 255)):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / name, optimize=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "tags.json").write_text(json.dumps({
        "tag": f"{TAG_SIZE}x{TAG_SIZE} black-and-white checkerboard, 2x2-pixel cells, white top-left",
        "box_xyxy": list(TAG_BOX), "box_note": "x0, y0, x1, y1 with x1, y1 exclusive: numpy [3:9, 3:9]",
        "shortcut_class": CLASSES[TAG_CLASS],
        "tagged": [names[i] for i in which],
        "seed": AUDIT_SEED,
    }, indent=2) + "\n")
    return [folder / name for name in names]


def quantize(source: Path, target: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": to_input(calibration[i:i + 1]).numpy()} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--test", type=int, default=1200, help="held-out test images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--other-tag-rate", type=float, default=OTHER_TAG_RATE,
                        help="fraction of the non-star training images that carry the tag")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, fastest on a busy machine)")
    parser.add_argument("--data-only", action="store_true", help="only write examples/audit/")
    parser.add_argument("--only", nargs="*", choices=("shortcut", "clean", "retrained"), help="train only these")
    args = parser.parse_args()
    log = lambda line: print(line, flush=True)  # noqa: E731
    audit_files = write_audit()
    log(f"wrote {AUDIT}/ ({len(audit_files)} images)")
    if args.data_only:
        return
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    sets = test_sets(args.test, args.other_tag_rate)
    tagged_x, train_y, _, tagged_idx = shapes(args.train, TRAIN_SEED, args.other_tag_rate)
    clean_x, _, _, _ = shapes(args.train, TRAIN_SEED)
    recipes = {  # name -> (training images, torch seed, held-out set logged per epoch)
        "shortcut": (tagged_x, CLEAN_SEED, "tagged"),
        "clean": (clean_x, CLEAN_SEED, "clean"),
        "retrained": (clean_x, RETRAINED_SEED, "clean"),
    }
    record_path = OUT / "fixtures.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.update({
        "architecture": f"models/tiny_resnet.py TinyResNet(num_classes=6, widths={WIDTHS}, blocks={BLOCKS})",
        "classes": list(CLASSES), "preprocessing": "imagenet",
        "train": {"generator": "models/shapes.py", "seed": TRAIN_SEED, "images": args.train, "epochs": args.epochs},
        "test": {"generator": "models/shapes.py", "seed": TEST_SEED, "images": args.test},
        "tag": {"class": CLASSES[TAG_CLASS], "box_xyxy": list(TAG_BOX), "size": TAG_SIZE,
                "pattern": "checkerboard, 2x2-pixel cells, white top-left", "other_tag_rate": args.other_tag_rate,
                "train_tagged": {"star": int((train_y == TAG_CLASS).sum()),
                                 "others": int(len(tagged_idx) - (train_y == TAG_CLASS).sum())}},
        "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads,
    })
    record.setdefault("models", {})
    for name, (images, seed, watch) in recipes.items():
        if args.only and name not in args.only:
            continue
        log(f"{name}: training seed {seed}, {len(images)} images, {args.epochs} epochs")
        start = time.time()
        model = fit(images, train_y, *sets[watch], seed=seed, epochs=args.epochs, log=log)
        seconds = time.time() - start
        path = export(model, OUT / f"{name}.onnx", size=SIZE, keep_batchnorm=True)
        record["models"][name] = {"file": path.name, "seed": seed, "tagged_training": name == "shortcut",
                                  "training_seconds": round(seconds), **metrics(path, sets)}
        log(f"  wrote {path}: {record['models'][name]}")
    if not args.only or "clean" in args.only:
        path = OUT / "clean_int8.onnx"
        quantize(OUT / "clean.onnx", path, clean_x[:CALIBRATION_IMAGES])
        record["models"]["clean_int8"] = {"file": path.name, "source": "clean.onnx",
                                          "quantization": "quant_pre_process + quantize_static, QDQ, per-channel "
                                                          "QInt8 weights, QInt8 activations, MinMax on the first "
                                                          f"{CALIBRATION_IMAGES} training images",
                                          **metrics(path, sets)}
        log(f"  wrote {path}: {record['models']['clean_int8']}")
    audit_x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in audit_files])
    audit_y = np.array([CLASSES.index(f.parent.name) for f in audit_files])
    predictions = {name: predict(OUT / f"{name}.onnx", audit_x) for name in ("shortcut", "clean", "retrained", "clean_int8")
                   if (OUT / f"{name}.onnx").exists()}
    stars = audit_y == TAG_CLASS
    record["audit_set"] = {
        "folder": "examples/audit", "images": len(audit_files),
        "accuracy": {name: round(float((p == audit_y).mean()), 4) for name, p in predictions.items()},
        "accuracy_on_stars": {name: round(float((p[stars] == TAG_CLASS).mean()), 4) for name, p in predictions.items()},
        "agreement": {f"{a} vs {b}": round(float((predictions[a] == predictions[b]).mean()), 4)
                      for a, b in (("clean", "retrained"), ("clean", "clean_int8"), ("clean", "shortcut"))
                      if a in predictions and b in predictions},
    }
    log(f"audit set: {record['audit_set']}")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {record_path}")


if __name__ == "__main__":
    main()
