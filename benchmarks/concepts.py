"""K conditional maps in one run against K separate explains, side by side in one run.

    python benchmarks/concepts.py [--model models/demo/tiny_resnet.onnx] [--batch 16] [--k 1 4 16]
    python benchmarks/concepts.py --arch resnet18 --size 224 --batch 4   # and zennit-crp beside it

For each K: the time of one explain of a batch (the heatmap), of one run with K conditions
(the heatmap and K conditional maps, lrp.conditional), and the ratio of that run to K explains
(what K maps would cost one at a time). With --arch, a torchvision model with seeded weights
is exported and zennit-crp's CondAttribution (torch, float32, EpsilonPlusFlat) computes the
same K maps per image beside it. Median of --repeats runs after a warm-up; onnxruntime and
torch on the CPU with their default threads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxlrp import Explainer

ROOT = Path(__file__).resolve().parent.parent


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: onnxruntime's first run allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo" / "tiny_resnet.onnx")
    parser.add_argument("--layer", default="last")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--arch", help="a torchvision model (seeded weights) instead of --model, with zennit-crp beside")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch_model = None
    if args.arch:
        sys.path.insert(0, str(ROOT))  # the repo's model zoo
        from models.export_torchvision import build, export

        torch_model = build(args.arch, seed=0, calibration_size=args.size)
        args.model = export(torch_model, Path(tempfile.mkdtemp()) / f"{args.arch}.onnx", size=args.size)
    plain = Explainer(args.model, batch_size=args.batch)
    conditional = Explainer(args.model, concept_layer=args.layer, batch_size=args.batch * max(args.k))
    height, width = plain.input_shape[2:] if plain.summary.image.layout == "NCHW" else plain.input_shape[1:3]
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, height, width, plain.images.channels), np.uint8)
    x = plain.images.normalize(pixels)
    one = median_seconds(lambda: plain.explain(x, warn=False), args.repeats)
    print(f"{args.model.name}, batch {args.batch}, layer {conditional.summary.concept_layer}")
    crp = _zennit_crp(torch_model, x, args.layer) if torch_model is not None else None
    print(f"{'K':>4} {'explain':>10} {'K maps, one run':>16} {'K explains':>11} {'ratio':>6}"
          + (f" {'zennit-crp':>11} {'ratio':>6}" if crp else ""))
    for k in args.k:
        run = median_seconds(lambda: conditional.explain(x, concepts=k, warn=False), args.repeats)
        line = f"{k:>4} {one * 1e3:>8.1f}ms {run * 1e3:>14.1f}ms {k * one * 1e3:>9.1f}ms {run / (k * one):>6.2f}"
        if crp:
            theirs = median_seconds(lambda: crp(k), max(1, args.repeats // 3))
            line += f" {theirs * 1e3:>9.1f}ms {theirs / run:>6.2f}"
        print(line)


def _zennit_crp(model, x: np.ndarray, layer: str):
    """K conditional maps per image with zennit-crp (its top-K channels of the last block),
    as a function of K."""
    import torch
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    attribution = CondAttribution(model.eval())
    name = "layer4" if layer == "last" else layer
    data = torch.tensor(x)

    def run(k: int) -> None:
        for image in data:
            conditions = [{name: [c], "y": [0]} for c in range(k)]
            attribution(image[None].clone().requires_grad_(True), conditions,
                        EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))

    return run


if __name__ == "__main__":
    main()
