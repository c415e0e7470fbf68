"""Example heatmaps of each method on the shipped benchmark, drawn as the paper draws them
(heat quantization to 8 levels, positive relevance normalised at 98 %, jet at alpha 0.4):

    python examples/figure_methods.py        # writes examples/results/methods.png
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from onnxlrp.evaluation.baselines import methods  # noqa: E402
from onnxlrp.evaluation.evaluate import load_dataset  # noqa: E402
from onnxlrp.io.image import paper_overlay  # noqa: E402
from onnxlrp.io.preprocessing import get_preprocessing, load_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo" / "tiny_resnet.onnx"
TITLES = {"lrp-captum": "LRP (Captum)", "integrated-gradients": "Integrated Grad.", "guided-backprop": "Guided Backprop",
          "grad-cam": "Grad-CAM", "score-cam": "Score-CAM", "paper-iii": "LRP (iii)", "paper-iv": "LRP (iv)",
          "relevance-cam": "Relevance-CAM", "gated-lrp": "Gated LRP"}
METHODS = tuple(TITLES)


def main(count: int = 4) -> Path:
    data = load_dataset(ROOT / "examples" / "shapes")
    picks = [int(np.flatnonzero(data.labels == c)[0]) for c in range(count)]  # one image of each of the first classes
    pixels = np.stack([load_image(data.files[i], 64, 64) for i in picks])
    prep = get_preprocessing("imagenet")
    x, labels = prep.normalize(pixels), data.labels[picks]
    registry = methods(MODEL, prep.normalize(np.zeros((1, 64, 64, 3), np.uint8))[0])
    maps = {name: registry[name]()(x, labels) for name in METHODS}
    fig, axes = plt.subplots(count, len(METHODS) + 1, figsize=(1.6 * (len(METHODS) + 1), 1.7 * count))
    for row, i in enumerate(picks):
        axes[row, 0].imshow(pixels[row])
        axes[row, 0].set_ylabel(data.classes[data.labels[i]], fontsize=8)
        for col, name in enumerate(METHODS, 1):
            axes[row, col].imshow(paper_overlay(pixels[row], maps[name][row], min_size=64))
            if row == 0:
                axes[row, col].set_title(TITLES[name], fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = ROOT / "examples" / "results" / "methods.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


if __name__ == "__main__":
    print("wrote", main())
