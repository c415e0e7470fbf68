"""Model-zoo test fixtures: gated / normalised ResNet variants from timm and torchvision, with
float64 torch references (dev-only: needs timm, which no test imports).

    pip install timm && python models/zoo_fixtures.py            # writes tests/fixtures/zoo/*
    python models/zoo_fixtures.py --only convnext_tiny --report   # one model; ONNX op summary

Each model is the library's own module classes with the named model's block, stem, norm and
activation choices, only narrower and shallower (num_classes=10, 64x64 inputs), seeded random
weights, BatchNorm affine parameters randomised and running statistics calibrated on random
images (models/export_torchvision.py), GroupNorm / LayerNorm affine parameters randomised too.
Exported by the TorchScript exporter (dynamo=False, opset 17, BatchNorm folded, input "input",
dynamic batch axis only) to tests/fixtures/zoo/<name>.onnx. What each one exercises:

    ecaresnet26t        ECA channel attention (global pool -> Conv1d over channels -> Sigmoid -> Mul),
                        tiered deep stem, average-pool downsampling shortcuts
    resnest14d          split attention: radix-2 grouped conv, Softmax over the radix axis, weighted sum
    resnetv2_50x1_bit   pre-activation ResNet-V2: GroupNorm (+ReLU), StdConv2d weight standardisation,
                        BiT "fixed" stem (ConstantPad2d + MaxPool)
    mobilenet_v2        depthwise convs, ReLU6 actually clipping (non-depthwise BatchNorm scales x4),
                        linear bottlenecks with residual adds
    mobilenet_v3_small  HardSwish, squeeze-excitation with HardSigmoid gates
    regnet_y_400mf      grouped bottlenecks with squeeze-excitation (ReLU, Sigmoid)
    efficientnet_b0     SiLU, squeeze-excitation with SiLU inside and a Sigmoid gate
    convnext_tiny       7x7 depthwise convs, LayerNorm (channels-last and LayerNorm2d), GELU,
                        per-channel layer scale, 2x2 patchify downsampling

Next to each .onnx, <name>.npz holds x (float32 [2, 3, 64, 64] seeded noise), logits (the
float64 torch model's), targets (their top-1, int64), relevance (float64 gradient x input of
the target logit through the model with every gate and norm scale detached, models/detach.py:
an LRP-0 reference for the gated ops) and relevance_gradient (the plain float64 gradient of the
target logit, a reference for the "gradient" preset). Files are byte-for-byte reproducible.
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
import zipfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.detach import audit, detached_gates  # noqa: E402
from models.export_torchvision import calibrate_batchnorm, export, randomize_batchnorm  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "zoo"
SIZE = 64
NUM_CLASSES = 10


# --- builders: the real module classes, reduced sizes ---------------------------------------------

def ecaresnet26t() -> nn.Module:
    from timm.models.resnet import Bottleneck, ResNet
    # timm: Bottleneck, (2, 2, 2, 2), stem_width=32, deep_tiered, avg_down, attn_layer="eca"; widths / 8
    return ResNet(Bottleneck, (2, 2, 2, 2), num_classes=NUM_CLASSES, channels=(8, 16, 32, 64),
                  stem_width=8, stem_type="deep_tiered", avg_down=True, block_args=dict(attn_layer="eca"))


def resnest14d() -> nn.Module:
    from timm.models.resnest import ResNestBottleneck
    from timm.models.resnet import ResNet
    # timm: ResNestBottleneck, (1, 1, 1, 1), deep stem 32, avg_down, radix 2, avd; widths / 8
    return ResNet(ResNestBottleneck, (1, 1, 1, 1), num_classes=NUM_CLASSES, channels=(8, 16, 32, 64),
                  stem_type="deep", stem_width=8, avg_down=True, base_width=64, cardinality=1,
                  block_args=dict(radix=2, avd=True, avd_first=False))


def resnetv2_50x1_bit() -> nn.Module:
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2
    # timm: (3, 4, 6, 3), channels (256, ..., 2048), stem 64, stem_type="fixed",
    # StdConv2d(eps=1e-8), GroupNormAct(32 groups). Widths / 8, so 32 / 8 = 4 groups keeps the
    # channels per group of every norm as in the full model. The exporter stores each conv
    # weight twice (see summary), hence fewer blocks.
    return ResNetV2((1, 2, 3, 1), channels=(32, 64, 128, 256), num_classes=NUM_CLASSES, stem_chs=8,
                    stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
                    norm_layer=partial(GroupNormAct, num_groups=4))


def mobilenet_v2() -> nn.Module:
    from torchvision.models.mobilenetv2 import MobileNetV2
    return MobileNetV2(num_classes=NUM_CLASSES, width_mult=0.25)


def mobilenet_v3_small() -> nn.Module:
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return MobileNetV3(setting, last_channel, num_classes=NUM_CLASSES)


def regnet_y_400mf() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet
    # torchvision: depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25
    # -> depths [1, 3, 6, 6], widths [48, 104, 208, 440]; here [1, 1, 3, 1], [8, 16, 32, 72]
    params = BlockParams.from_init_params(depth=6, w_0=8, w_a=10, w_m=2.09, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=NUM_CLASSES, stem_width=16)


def efficientnet_b0() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.5)
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.0, num_classes=NUM_CLASSES,
                        last_channel=last_channel)


def convnext_tiny() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    # torchvision: (96, 192, 384, 768) x (3, 3, 9, 3); here widths / 6, depths (1, 1, 2, 1)
    setting = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 2),
               CNBlockConfig(128, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=0.0, num_classes=NUM_CLASSES)


#: name -> (builder, BatchNorm scale factor before calibration)
MODELS: dict[str, tuple[Callable[[], nn.Module], float]] = {
    "ecaresnet26t": (ecaresnet26t, 1.0),
    "resnest14d": (resnest14d, 1.0),
    "resnetv2_50x1_bit": (resnetv2_50x1_bit, 1.0),
    "mobilenet_v2": (mobilenet_v2, 4.0),  # ReLU6-BatchNorm scales x4: ReLU6 clips ~6 % of activations
    "mobilenet_v3_small": (mobilenet_v3_small, 1.0),
    "regnet_y_400mf": (regnet_y_400mf, 1.0),
    "efficientnet_b0": (efficientnet_b0, 1.0),
    "convnext_tiny": (convnext_tiny, 1.0),
}


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """GroupNorm / LayerNorm (incl. LayerNorm2d) affine parameters as randomize_batchnorm sets
    BatchNorm's; ConvNeXt's layer scales (1e-6 at init, which would mute every block) ~ N(0.5, 0.25^2)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.8 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if hasattr(module, "layer_scale") and isinstance(module.layer_scale, nn.Parameter):
                module.layer_scale.copy_(0.5 + 0.25 * torch.randn(module.layer_scale.shape, generator=generator))


def reinit(model: nn.Module) -> None:
    """torch's default init for every Linear (torchvision and timm's ResNetV2 draw classifiers
    from N(0, 0.01^2), which leaves logits around 1e-2), for ResNetV2's 1x1-conv classifier, and
    for ConvNeXt's convs (trunc-normal std 0.02 would make every block a near-identity)."""
    convnext = type(model).__name__ == "ConvNeXt"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and (convnext or name == "head.fc")):
            module.reset_parameters()


def floor_running_var(model: nn.Module, fraction: float = 0.01) -> None:
    """Raise each BatchNorm's running variances to at least `fraction` of the layer's median.
    Calibration on noise leaves near-dead channels (a depthwise conv over a ReLU6 that rarely
    fires) with variances ~1e-7, whose gains |gamma| / sqrt(var + eps) of ~3000, folded into
    the convs, cancel against their biases and cost float32 four digits of the logits."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            var = module.running_var
            var.clamp_(min=fraction * var.median().item())


def scale_relu6_batchnorm(model: nn.Module, factor: float) -> None:
    """Multiply the BatchNorm scales of the conv-BN-ReLU6 triples whose conv is not depthwise
    (stem, 1x1 expansions, last 1x1 conv), so that ReLU6 clips several percent of activations.
    Scaling the depthwise ones too saturates single channels and leaves the next depthwise
    BatchNorms with near-zero variances: float32 then loses 1e-3 of the logits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[2], nn.ReLU6):
                conv, norm = module[0], module[1]
                if isinstance(norm, nn.BatchNorm2d) and not (conv.groups > 1 and conv.groups == conv.in_channels):
                    norm.weight.mul_(factor)


def build(name: str, seed: int) -> nn.Module:
    """Seeded, randomised and calibrated float32 model in eval mode."""
    builder, bn_scale = MODELS[name]
    torch.manual_seed(seed)
    model = builder()
    reinit(model)
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, generator)
    if bn_scale != 1.0:
        scale_relu6_batchnorm(model, bn_scale)
    randomize_norms(model, generator)
    calibrate_batchnorm(model, generator, size=SIZE)
    floor_running_var(model)
    return model.eval()


# --- references ------------------------------------------------------------------------------------

def _target_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    if targets is None:
        targets = logits.argmax(dim=1)
    logits.gather(1, targets[:, None]).sum().backward()
    return logits.detach(), targets, x.grad.detach()


def references(model: nn.Module, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """float64 references for a float32 batch x; info: patched classes and the detach's effect."""
    model64 = copy.deepcopy(model).double().eval()
    x64 = torch.from_numpy(x).double()
    unsafe = audit(model64)
    assert not unsafe, f"modules not handled by models/detach.py: {sorted(unsafe)}"
    logits, targets, gradient = _target_gradient(model64, x64, None)
    with detached_gates(model64) as patched:
        logits_detached, _, gradient_detached = _target_gradient(model64, x64, targets)
    forward_error = (logits_detached - logits).abs().max().item()
    assert forward_error <= 1e-12, f"detached forward differs by {forward_error:.3g}"
    relevance, plain = gradient_detached * x64, gradient * x64
    arrays = dict(x=x, logits=logits.numpy(), targets=targets.numpy().astype(np.int64),
                  relevance=relevance.numpy(), relevance_gradient=gradient.numpy())
    info = dict(patched=dict(patched), forward_error=forward_error,
                detach_effect=((relevance - plain).norm() / plain.norm()).item(),
                conservation=(relevance.sum(dim=(1, 2, 3)) / logits.gather(1, targets[:, None])[:, 0]).tolist())
    return arrays, info


def relu6_clipped(model: nn.Module, x: np.ndarray) -> float:
    """Fraction of ReLU6 outputs at the cap 6 on the batch x."""
    clipped, total = [], []

    def hook(module, inputs, output):
        clipped.append(int((output >= 6).sum()))
        total.append(output.numel())
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU6)]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for handle in handles:
        handle.remove()
    return sum(clipped) / max(sum(total), 1)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, but with fixed zip timestamps so that reruns write identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(value), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def onnx_error(path: Path, x: np.ndarray, logits: np.ndarray, optimise: bool) -> float:
    """max |onnxruntime float32 logits - float64 torch logits|, with all or no graph optimisations
    (onnxruntime's Pad fusion folds a zero Pad into a following MaxPool, which pads with -inf:
    wrong wherever a window at the border is all negative, as in the BiT stem)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return float(np.abs(session.run(None, {"input": x})[0] - logits).max())


# --- ONNX summary ----------------------------------------------------------------------------------

#: op -> indices of its inputs that give shapes, pads, axes or slice bounds, or weights
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Pad": (1, 2, 3), "Slice": (1, 2, 3, 4), "Tile": (1,),
                "Resize": (1, 2, 3), "ConstantOfShape": (0,), "Unsqueeze": (1,), "Squeeze": (1,),
                "ReduceSum": (1,), "Split": (1,), "Conv": (1, 2), "Gemm": (1, 2)}


def summary(path: Path) -> tuple[Counter, list[str]]:
    """Op-type multiset, and the shape-like (or weight) inputs that are computed rather than
    initializers or Constant outputs: node name, op, input index, the op types of the subgraph
    computing it, and the tensors whose Shape it reads (none: foldable from constants alone)."""
    import onnx
    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer} | {""}
    producer = {}
    for node in graph.node:
        for output in node.output:
            producer[output] = node
        if node.op_type == "Constant":
            constants.update(node.output)

    def upstream(name: str) -> tuple[list[str], list[str]]:
        """Op types computing `name`, stopping at Shape nodes; and the tensors those read."""
        seen, stack, ops, sources = set(), [name], [], []
        while stack:
            tensor = stack.pop()
            node = producer.get(tensor)
            if tensor in constants or node is None or node.name in seen:
                continue
            seen.add(node.name)
            ops.append(node.op_type)
            if node.op_type == "Shape":
                sources.append(node.input[0])
            else:
                stack.extend(node.input)
        return ops, sources

    computed = []
    for node in graph.node:
        for index in SHAPE_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] not in constants:
                ops, sources = upstream(node.input[index])
                chain = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(Counter(ops).items()))
                computed.append(f"{node.name} ({node.op_type} input {index}) <- {chain}"
                                + (f" from Shape({', '.join(sources)})" if sources else " (constants only)"))
    return Counter(node.op_type for node in graph.node), computed


# --- main ------------------------------------------------------------------------------------------

def make(name: str, seed: int, report: bool = False) -> None:
    model = build(name, seed)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1000 + seed)).numpy()
    arrays, info = references(model, x)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # export draws its example input from the global generator
    path = export(model, OUT / f"{name}.onnx", size=SIZE, opset=17)
    save_npz(OUT / f"{name}.npz", arrays)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name}: {parameters} parameters, {path.stat().st_size / 1e6:.2f} MB onnx; "
          f"logits {np.round(arrays['logits'][:, :4], 3).tolist()}..., targets {arrays['targets'].tolist()}")
    print(f"  detached {info['patched']}; forward difference {info['forward_error']:.1e}; "
          f"relative L2 (detached - plain) / plain gradient x input: {info['detach_effect']:.3f}; "
          f"sum(relevance) / logit: {np.round(info['conservation'], 3).tolist()}")
    print(f"  onnxruntime float32 vs float64 logits: max |diff| {onnx_error(path, x, arrays['logits'], False):.1e} "
          f"unoptimised, {onnx_error(path, x, arrays['logits'], True):.1e} ORT_ENABLE_ALL "
          f"(logits up to {np.abs(arrays['logits']).max():.2f})")
    if any(isinstance(m, nn.ReLU6) for m in model.modules()):
        print(f"  ReLU6 outputs at the cap: {relu6_clipped(model, x):.1%}")
    if report:
        ops, computed = summary(path)
        print("  ops:", ", ".join(f"{op} {n}" for op, n in sorted(ops.items())))
        for line in computed:
            print("  computed shape:", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(MODELS), help="build only these")
    parser.add_argument("--report", action="store_true", help="print op types and computed shape inputs")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # reductions summed in one fixed order: identical files on reruns
    for seed, name in enumerate(MODELS):
        if args.only is None or name in args.only:
            make(name, seed, args.report)


if __name__ == "__main__":
    main()
