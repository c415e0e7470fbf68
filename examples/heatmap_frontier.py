"""How far can any map get in (relevance mass accuracy, tie-robust ID) on the shipped benchmark?

An oracle check for the README's reading of the layer and gated maps: maps built from the
ground-truth object mask (which no attribution method has), scored exactly as `onnxlrp
evaluate` scores methods (8-level heat quantization, the tie-robust "exact" protocol):

- the mask itself: all relevance on the object;
- the mask plus a Relevance-CAM (paper variant (iv), last block) scaled to [0, 1], with the
  mask weighted by a: the object first, then its surroundings in the CAM's order;
- and, no oracle, the same Relevance-CAM minus t: the same order, so the same ID, with its
  zero moved up. Mass accuracy counts positive values only, so it rises with t: the pair of
  numbers can be moved by where a map puts its zero, not only by what the map says.

    python examples/heatmap_frontier.py            # about 2 minutes on 2 cores

It prints one line per map: mass accuracy and ID (exact), in percent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxlrp import Explainer
from onnxlrp.evaluation import metrics
from onnxlrp.evaluation.baselines import Forward
from onnxlrp.evaluation.evaluate import load_dataset, load_mask
from onnxlrp.io.image import quantize

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo" / "tiny_resnet.onnx"


def main() -> None:
    dataset = load_dataset(ROOT / "examples" / "shapes")
    explainer = Explainer(MODEL, preset="paper", split="ratio", include_identity=True, heatmap="layer")
    forward = Forward(MODEL)
    size = explainer.summary.height, explainer.summary.width
    x = explainer.images.normalize(explainer.read_images(dataset.files))
    labels = dataset.labels
    black = explainer.images.normalize(np.zeros((1, *size, 3), np.uint8))[0]
    masks = np.stack([load_mask(m, *size) for m in dataset.masks]).astype(np.float64)
    cam = np.maximum(explainer.explain(x, labels).heatmap().astype(np.float64), 0)
    cam /= np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-300)
    candidates = {"mask": masks, **{f"mask x {a:g} + Relevance-CAM": a * masks + cam for a in (0.5, 1, 2, 4)},
                  **{f"Relevance-CAM - {t:g}": cam - t for t in (0.3, 0.5, 0.7)}}
    for name, maps in candidates.items():
        mass, ids = [], []
        for i in range(len(maps)):
            saliency = quantize(maps[i], 8)
            mass.append(metrics.mass_accuracy(saliency, masks[i] > 0))
            curves = metrics.insertion_deletion(forward.probabilities, x[i], saliency, int(labels[i]), black,
                                                "exact", explainer.summary.image.layout)
            ids.append(curves.scores["id"])
        print(f"{name:32s} mass accuracy {100 * np.mean(mass):5.1f}   ID (exact) {100 * np.mean(ids):5.1f}", flush=True)


if __name__ == "__main__":
    main()
