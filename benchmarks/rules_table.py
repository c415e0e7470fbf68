"""The relevance that reaches the input, and faithfulness, for the Zennit presets and for
the conserving variant, on every architecture: the README's table (issue 21).

    python benchmarks/rules_table.py [--images 48] [--models models/mobile/*.onnx ...]

For each model: the median share of the explained logit at the input, with and without biases
(evaluate's `reach`), and on the shapes benchmark (examples/shapes, masks included) the
tie-robust Insertion/Deletion/ID and the mask metrics, for epsilon-plus-flat (Zennit's),
epsilon-plus-flat-conserve (the stabilisers' share goes on by the flat rule) and the same with
the w^2 rule instead (registered here, for comparison). The seeded zoo
models (tests/fixtures/zoo) were never trained: their faithfulness columns say nothing about
the rules, only their reach does; the trained ones (models/demo, models/mobile) say both.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxlrp.evaluation.evaluate import evaluate, load_dataset  # noqa: E402
from onnxlrp.lrp.composites import PRESETS  # noqa: E402

BASE, CONSERVE, W2 = "epsilon-plus-flat", "epsilon-plus-flat-conserve", "epsilon-plus-flat-conserve-w2"
VARIANTS = (CONSERVE, W2)


def register() -> None:
    """The w^2 variant, for this process only: the conserving preset with w^2 for flat."""
    conserve = PRESETS[CONSERVE]
    layers = {op: dataclasses.replace(rule, fallback="w2") if getattr(rule, "fallback", None) else rule
              for op, rule in conserve.layers.items()}
    PRESETS.setdefault(W2, dataclasses.replace(conserve, name=W2, layers=layers))


def measure(model: str, dataset, images: int) -> dict[str, dict[str, float]]:
    methods = [BASE, *VARIANTS]
    rows: dict[str, dict[str, float]] = {}
    results = evaluate(model, dataset, methods, protocols=("exact",), levels=0, limit=images, batch_size=16)
    for method in methods:
        values = results.values[method]
        rows[method] = {key: float(np.mean(values[key])) for key in
                        ("exact:insertion", "exact:deletion", "exact:id", "mass_accuracy", "pointing_game")
                        if key in values}
        rows[method]["reach"] = float(np.median(values["reach"]))
    return rows


def reach_without_bias(model: str, files, method: str) -> float:
    from onnxlrp import Explainer

    explanation, _ = Explainer(model, preset=method, bias=False).explain_files(files)
    return float(np.median(explanation.reach))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()
    register()
    models = args.models or (sorted(glob.glob(str(ROOT / "models" / "mobile" / "*.onnx")))
                             + [str(ROOT / "models" / "demo" / "tiny_resnet.onnx")]
                             + sorted(glob.glob(str(ROOT / "tests" / "fixtures" / "zoo" / "*.onnx"))))
    dataset = load_dataset(ROOT / "examples" / "shapes")
    # the first images of every class, so that a limit keeps the classes balanced
    order = np.argsort([i % 20 for i in range(len(dataset.files))], kind="stable")
    dataset = dataclasses.replace(dataset, files=[dataset.files[i] for i in order],
                                  labels=dataset.labels[order], masks=[dataset.masks[i] for i in order])
    files = dataset.files[:args.images]
    print(f"| model | method | reach (biases) | reach (no biases) | ID | insertion | deletion | mass acc. | pointing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in models:
        start = time.perf_counter()
        rows = measure(model, dataset, args.images)
        for method, row in rows.items():
            no_bias = reach_without_bias(model, files, method)
            cells = [f"{100 * row['reach']:.3g} %", f"{100 * no_bias:.4g} %"] + [
                f"{100 * row.get(k, float('nan')):.1f}" for k in
                ("exact:id", "exact:insertion", "exact:deletion", "mass_accuracy", "pointing_game")]
            print(f"| {Path(model).stem} | {method} | " + " | ".join(cells) + " |", flush=True)
        print(f"<!-- {Path(model).stem}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
