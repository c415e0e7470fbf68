"""timm test fixtures: ResNet-D, ResNeXt, wide and SE ResNets at reduced width (dev-only: timm).

    pip install timm && python models/timm_fixtures.py     # writes tests/fixtures/timm_*.onnx

Each is timm's own ResNet class with the block types, stem and shortcut options of the named
model (deep 3-conv stem and average-pool + 1x1 conv projection shortcuts for the "d"
variants, grouped convs for ResNeXt, wider bottlenecks for wide ResNets); only the channel
widths are divided by 8 and the input is 64x64, so the files stay small. Seeded random
weights with calibrated BatchNorm statistics, exported by torch.onnx with BatchNorm folded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.export_torchvision import calibrate_batchnorm, export, randomize_batchnorm  # noqa: E402

OUT = ROOT / "tests" / "fixtures"
CHANNELS = (8, 16, 32, 64)  # timm's (64, 128, 256, 512) / 8
DEEP = dict(stem_width=8, stem_type="deep", avg_down=True)  # timm's stem_width=32, scaled alike

#: name -> (block, layers, options), as timm defines resnet18d, resnet26d, resnext26d_32x4d, wide_resnet50_2
MODELS = {
    "resnet18d": (BasicBlock, (2, 2, 2, 2), DEEP),
    "resnet26d": (Bottleneck, (2, 2, 2, 2), DEEP),
    # 1/8 width leaves ResNeXt no channel per group: it gets 1/4 (32 groups of 1, 2, 4, 8 channels)
    "resnext26d_32x4d": (Bottleneck, (2, 2, 2, 2), dict(cardinality=32, base_width=4, channels=tuple(2 * c for c in CHANNELS), **DEEP)),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), dict(base_width=128)),
    # squeeze-excitation gating (Sigmoid, Mul): onnxlrp has no rule for it and must say so
    "seresnet18": (BasicBlock, (2, 2, 2, 2), dict(block_args=dict(attn_layer="se"))),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    block, layers, options = MODELS[name]
    torch.manual_seed(seed)
    model = ResNet(block, layers, num_classes=10, **{"channels": CHANNELS, **options})
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, generator)
    calibrate_batchnorm(model, generator, size=64)
    return model


def main() -> None:
    for i, name in enumerate(MODELS):
        print("wrote", export(build(name, seed=i), OUT / f"timm_{name}.onnx", size=64))


if __name__ == "__main__":
    main()
