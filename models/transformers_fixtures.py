"""Hugging Face transformers image classifiers, built from configs, exported by torch.onnx (dev-only).

Setup: transformers beside the project's torch, never inside the .venv (no second torch/numpy):

    /work/main/.venv/bin/pip install --no-deps --target /work/hf-site transformers huggingface_hub \
        tokenizers safetensors regex pyyaml filelock packaging requests tqdm fsspec \
        httpx2 httpcore2 anyio idna truststore h11 sniffio certifi click hf-xet
    PYTHONPATH=/work/hf-site .venv/bin/python models/transformers_fixtures.py   # writes tests/fixtures/transformers/*

(transformers 5.25 was what PyPI served; its huggingface_hub needs the httpx2 family.) No
pretrained weights: every model is its library class built from a tiny config (few channels,
depths 1-2, 32x32 inputs, 10 classes) with seeded random weights; BatchNorm affine parameters
randomised and running statistics calibrated with train-mode passes (models/export_torchvision.py),
LayerNorm weights ~ 1 + 0.3 N(0, 1), every bias ~ 0.1 N(0, 1), ConvNeXt's layer scale ~ 0.5 + 0.2 N.

    hf_resnet     ResNetForImageClassification: 7x7 stem + BN + ReLU + MaxPool, basic blocks with
                  1x1 projection shortcuts, pooler, Flatten + Linear head
    hf_convnext   ConvNextForImageClassification: 4x4 patchify stem + channels-first LayerNorm (a
                  permuted nn.LayerNorm), 7x7 depthwise conv, channels-last LayerNorm, Linear /
                  GELU (erf) / Linear, layer scale, LayerNorm before the head
    hf_regnet     RegNetForImageClassification (layer_type "y"): grouped bottlenecks with
                  squeeze-excitation (ReLU, Sigmoid gate)

Each is exported by the TorchScript exporter (dynamo=False, opset 17, input "pixel_values",
dynamic batch) as <name>.onnx. The script also tries the dynamo exporter on hf_resnet: with
torch 2.14.1 and transformers 5.25 torch.export fails (a data-dependent guard in
ResNetConvLayer's BatchNorm), so no dynamo file is written. optimum-onnx 0.1.0 (optimum 2.3.0)
does not import against transformers 5.25 (transformers.modeling_utils.get_parameter_dtype is
gone), so there is no optimum export either. The model's forward returns an
ImageClassifierOutput; a wrapper hands the exporter its .logits. reference.npz holds x (float32 [2, 3, 32, 32] seeded noise) and per
name: logits_NAME (float64 torch), targets_NAME, relevance_NAME (float64 torch autograd,
gradient x input of the top logit through the model with GELU's gate, the SE sigmoid and every
LayerNorm's standard deviation detached, models/detach.py: an LRP-0 reference).
"""
from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.detach import _detached_output, _gelu, _layer_norm  # noqa: E402
from models.export_torchvision import calibrate_batchnorm, randomize_batchnorm  # noqa: E402
from transformers import (ConvNextConfig, ConvNextForImageClassification, RegNetConfig,  # noqa: E402
                          RegNetForImageClassification, ResNetConfig, ResNetForImageClassification)
from transformers.activations import GELUActivation  # noqa: E402
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm  # noqa: E402
from transformers.models.regnet.modeling_regnet import RegNetSELayer  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "transformers"
SIZE, CLASSES = 32, 10


def configs() -> dict:
    return {
        "hf_resnet": ResNetForImageClassification(ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic",
            downsample_in_first_stage=False, num_labels=CLASSES)),
        "hf_convnext": ConvNextForImageClassification(ConvNextConfig(
            num_channels=3, patch_size=4, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
            layer_scale_init_value=1.0, num_labels=CLASSES)),
        "hf_regnet": RegNetForImageClassification(RegNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], groups_width=4,
            layer_type="y", num_labels=CLASSES)),
    }


def randomize(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
                elif isinstance(module, nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
                elif name == "layer_scale_parameter":
                    p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=generator))
                elif p.dim() > 1:  # conv and dense weights: He init
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=generator) * (2 / fan_in) ** 0.5)
    randomize_batchnorm(model, generator)
    calibrate_batchnorm(model, generator, size=SIZE)
    return model.eval()


class Logits(nn.Module):
    """The classifier's logits (its forward returns an ImageClassifierOutput)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def detached(model: nn.Module) -> nn.Module:
    """A copy whose GELUs, SE gates and LayerNorms have their factor / standard deviation
    detached (models/detach.py's forms; the transformers classes are not in its tables)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, GELUActivation):
            module.forward = _gelu(nn.GELU())
        elif isinstance(module, RegNetSELayer):
            sigmoid = module.attention[-1]
            assert isinstance(sigmoid, nn.Sigmoid)
            sigmoid.forward = _detached_output(sigmoid)
        elif isinstance(module, ConvNextLayerNorm):
            inner = _layer_norm(module)
            module.forward = ((lambda x, f=inner: f(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
                              if module.data_format == "channels_first" else inner)
        elif isinstance(module, nn.LayerNorm):
            module.forward = _layer_norm(module)
    return model


def reference(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model64 = Logits(model).double()
    x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = model64(x64)
    targets = logits.argmax(1)
    logits[torch.arange(len(x)), targets].sum().backward()
    return logits.detach().numpy(), targets.numpy(), (x64.grad * x64).detach().numpy()


def export(model: nn.Module, path: Path, dynamo: bool = False) -> Path:
    example = torch.randn(1, 3, SIZE, SIZE)
    if dynamo:
        torch.onnx.export(Logits(model), (example,), str(path), dynamo=True, opset_version=18,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=1024)}},
                          external_data=False)
    else:
        torch.onnx.export(Logits(model), example, str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    x = np.random.RandomState(0).randn(2, 3, SIZE, SIZE).astype(np.float32)
    ref = {"x": x}
    for seed, (name, model) in enumerate(configs().items()):
        model = randomize(model, seed)
        plain_logits = Logits(copy.deepcopy(model)).double()(torch.tensor(x, dtype=torch.float64)).detach().numpy()
        logits, targets, relevance = reference(detached(model), x)
        assert np.abs(plain_logits - logits).max() < 1e-10  # detaching changes no value
        ref.update({f"logits_{name}": logits, f"targets_{name}": targets, f"relevance_{name}": relevance})
        paths = [export(model, OUT / f"{name}.onnx")]
        if name == "hf_resnet":
            try:
                paths.append(export(model, OUT / f"{name}_dynamo.onnx", dynamo=True))
            except Exception as exc:  # torch 2.14: a data-dependent guard in the BatchNorm of ResNetConvLayer
                print(f"dynamo export of {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        for path in paths:
            ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            print(f"wrote {path.name} ({path.stat().st_size} bytes): {dict(ops)}")
    np.savez_compressed(OUT / "reference.npz", **ref)
    print("wrote", OUT / "reference.npz")


if __name__ == "__main__":
    main()
