"""Export torchvision ResNets to ONNX, with real weights or seeded random ones.

    python models/export_torchvision.py resnet50 -o resnet50.onnx --weights IMAGENET1K_V2
    python models/export_torchvision.py resnet18 -o r18.onnx --seed 0 --size 64 --keep-batchnorm

Real weights come from torchvision's weight enums (downloaded by torch.hub on first use).
Random weights are seeded; their BatchNorm parameters are randomised (about 10 % negative
scales, as in trained networks) and their running statistics calibrated with train-mode
passes over random images, or activations degenerate through the depth of the network.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)


def randomize_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """BN scale ~ N(1, 0.8^2) (about 10 % negative), shift ~ N(0, 0.1^2)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(1 + 0.8 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def calibrate_batchnorm(model: torch.nn.Module, generator: torch.Generator, size: int = 64,
                        batches: int = 4, batch_size: int = 16) -> None:
    """Set BatchNorm running statistics from train-mode passes over random images."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 3, size, size, generator=generator))
    model.eval()


def build(arch: str, weights: str | None = None, seed: int = 0, num_classes: int = 1000,
          calibration_size: int = 64) -> torch.nn.Module:
    """A torchvision classifier in eval mode: real `weights` (an enum name) or seeded random ones."""
    if weights:
        return torchvision.models.get_model(arch, weights=weights).eval()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    randomize_batchnorm(model, generator)
    calibrate_batchnorm(model, generator, size=calibration_size)
    return model


def export(model: torch.nn.Module, path: str | Path, size: int = 224, keep_batchnorm: bool = False,
           dynamo: bool = False, opset: int = 17) -> Path:
    """Export with a dynamic batch axis. keep_batchnorm: BatchNormalization stays as nodes
    (TorchScript exporter without constant folding); otherwise it is folded into the convs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, 3, size, size)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, external_data=False)
    else:
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=not keep_batchnorm)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=ARCHS)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--weights", help="torchvision weight enum name, e.g. IMAGENET1K_V2 (needs internet once)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--keep-batchnorm", action="store_true", help="keep BatchNormalization nodes (for --preset paper)")
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter")
    args = parser.parse_args()
    model = build(args.arch, args.weights, args.seed)
    export(model, args.output, args.size, args.keep_batchnorm, args.dynamo)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
