"""Detached-gate torch references: a model whose forward is unchanged but whose gradient
treats every multiplicative gate and every normalisation's scale as a constant.

    with detached_gates(model) as patched:   # patched: {class name: count}
        logits = model(x)                     # same values as without the context
        (logits[range(n), targets].sum()).backward()   # gradient x input is then an LRP-0 reference

What is detached (the output of the named callable is `.detach()`-ed, nothing else):

* squeeze-excitation / ECA gates: torchvision SqueezeExcitation (`scale_activation`), timm
  SEModule and EcaModule (`gate`): `x * gate(x).detach()`;
* ResNeSt's radix attention: timm RadixSoftmax (the softmax, or sigmoid for radix 1);
* x * g(x) activations: SiLU `x * sigmoid(x).detach()`, HardSwish `x * (relu6(x + 3) / 6).detach()`,
  GELU `x * Phi(x).detach()` (erf form; tanh form for approximate="tanh");
* normalisations: GroupNorm (and timm GroupNormAct / GroupNorm1Act, which then apply their
  drop and act), LayerNorm, and torchvision's / timm's LayerNorm2d are computed explicitly as
  `(x - mean) / std.detach() * w + b` -- the mean is not detached, so the centring stays in the
  gradient and only the division by the standard deviation becomes a constant rescaling.

BatchNorm in eval mode is affine already; ReLU, ReLU6, max/avg pooling are piecewise linear
and need nothing. timm's StdConv2d standardises its weights, not its input, so it is linear in
the input too. `audit(model)` lists the module classes this module does not know to be safe,
so that a reference is never silently built over an unhandled non-linearity.
timm is optional: without it only the torch / torchvision classes are handled.
"""
from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchvision.models.convnext import LayerNorm2d as TvLayerNorm2d
    from torchvision.ops.misc import SqueezeExcitation as TvSqueezeExcitation
except ImportError:  # pragma: no cover
    TvLayerNorm2d = TvSqueezeExcitation = None

try:
    from timm.layers.eca import CecaModule, EcaModule
    from timm.layers.norm import LayerNorm2d as TimmLayerNorm2d
    from timm.layers.norm_act import GroupNorm1Act, GroupNormAct
    from timm.layers.split_attn import RadixSoftmax
    from timm.layers.squeeze_excite import SEModule
except ImportError:  # pragma: no cover
    CecaModule = EcaModule = TimmLayerNorm2d = GroupNorm1Act = GroupNormAct = RadixSoftmax = SEModule = None


def _classes(*classes) -> tuple[type, ...]:
    return tuple(c for c in classes if c is not None)


# --- detached forwards ------------------------------------------------------------------------

def _detached_output(module: nn.Module) -> Callable:
    forward = type(module).forward

    def detached(*args, **kwargs):
        return forward(module, *args, **kwargs).detach()
    return detached


def _silu(module: nn.SiLU) -> Callable:
    return lambda x: x * torch.sigmoid(x).detach()


def _hardswish(module: nn.Hardswish) -> Callable:
    return lambda x: x * (F.relu6(x + 3) / 6).detach()


def _gelu(module: nn.GELU) -> Callable:
    if module.approximate == "tanh":
        def gelu(x):
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
            return x * (0.5 * (1 + torch.tanh(inner))).detach()
    else:
        def gelu(x):
            return x * (0.5 * (1 + torch.erf(x / math.sqrt(2)))).detach()
    return gelu


def _normalise(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x - mean) / std.detach() over dims (biased variance, as the norms use)."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    std = torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps)
    return centred / std.detach()


def _layer_norm(module: nn.LayerNorm) -> Callable:
    dims = tuple(range(-len(module.normalized_shape), 0))

    def layer_norm(x):
        y = _normalise(x, dims, module.eps)
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y
    return layer_norm


def _layer_norm_2d(module: nn.LayerNorm) -> Callable:
    """LayerNorm over the channels of NCHW (torchvision's / timm's LayerNorm2d permute to NHWC)."""
    inner = _layer_norm(module)
    return lambda x: inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _group_norm_values(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    grouped = x.reshape(n, module.num_groups, -1)
    y = _normalise(grouped, (2,), module.eps).reshape(x.shape)
    if module.affine:
        view = (1, c) + (1,) * (x.dim() - 2)
        y = y * module.weight.view(view) + module.bias.view(view)
    return y


def _group_norm(module: nn.GroupNorm) -> Callable:
    return lambda x: _group_norm_values(module, x)


def _group_norm_act(module: nn.GroupNorm) -> Callable:
    return lambda x: module.act(module.drop(_group_norm_values(module, x)))


# --- which modules -----------------------------------------------------------------------------

#: (classes, detached-forward factory), first match wins; exact classes where subclasses differ
HANDLERS: list[tuple[tuple[type, ...], Callable[[nn.Module], Callable], bool]] = [
    # (classes, factory, exact type only)
    (_classes(RadixSoftmax), _detached_output, True),
    (_classes(nn.SiLU), _silu, True),
    (_classes(nn.Hardswish), _hardswish, True),
    (_classes(nn.GELU), _gelu, True),
    (_classes(TvLayerNorm2d, TimmLayerNorm2d), _layer_norm_2d, True),
    (_classes(nn.LayerNorm), _layer_norm, True),
    (_classes(GroupNormAct, GroupNorm1Act), _group_norm_act, True),
    (_classes(nn.GroupNorm), _group_norm, True),
]


def _gate_of(module: nn.Module) -> nn.Module | None:
    """The submodule whose output multiplies the input, for the gating modules known here."""
    if TvSqueezeExcitation is not None and type(module) is TvSqueezeExcitation:
        return module.scale_activation
    if SEModule is not None and type(module) in _classes(SEModule, EcaModule, CecaModule):
        return module.gate
    return None


def _factory(module: nn.Module):
    for classes, factory, exact in HANDLERS:
        if (type(module) in classes) if exact else isinstance(module, classes):
            return factory
    return None


@contextmanager
def detached_gates(model: nn.Module) -> Iterator[Counter]:
    """Patch the forwards of `model`'s gates and norms (see the module docstring) for the
    duration of the context; yields a Counter of the patched module classes."""
    patched: list[nn.Module] = []
    counts: Counter = Counter()

    def patch(module: nn.Module, forward: Callable, label: str) -> None:
        if "forward" in module.__dict__:
            raise RuntimeError(f"{label} is patched already")
        module.forward = forward
        patched.append(module)
        counts[label] += 1

    try:
        for module in model.modules():
            gate = _gate_of(module)
            if gate is not None:
                patch(gate, _detached_output(gate), f"{type(module).__name__}.gate")
                continue
            factory = _factory(module)
            if factory is not None:
                patch(module, factory(module), type(module).__name__)
        yield counts
    finally:
        for module in patched:
            del module.forward


# --- audit ---------------------------------------------------------------------------------------

#: modules that are linear or piecewise linear in their input (eval mode), or pure containers
SAFE_NAMES = {
    # torch
    "Conv1d", "Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "ReLU", "ReLU6", "MaxPool2d",
    "AvgPool2d", "AdaptiveAvgPool2d", "Identity", "Flatten", "Dropout", "ConstantPad2d",
    "Sequential", "ModuleList",
    # torchvision (containers whose forward only adds, permutes or stacks)
    "Permute", "StochasticDepth", "Conv2dNormActivation", "InvertedResidual", "MobileNetV2",
    "MobileNetV3", "MBConv", "EfficientNet", "SimpleStemIN", "ResBottleneckBlock",
    "BottleneckTransform", "AnyStage", "RegNet", "CNBlock", "ConvNeXt",
    # timm (StdConv2d standardises its weights, not its input)
    "StdConv2d", "ResNet", "Bottleneck", "BasicBlock", "ResNestBottleneck", "SplitAttn",
    "ResNetV2", "ResNetStage", "PreActBottleneck", "DownsampleConv", "DownsampleAvg",
    "ClassifierHead", "SelectAdaptivePool2d", "DropPath",
}


def audit(model: nn.Module) -> set[str]:
    """Class names in `model` that are neither handled by detached_gates nor known to be safe
    (an empty set means the detached model's gradient x input is an LRP-0 reference)."""
    covered: set[int] = set()
    for module in model.modules():
        gate = _gate_of(module)
        if gate is not None or _factory(module) is not None:
            covered.update(id(m) for m in module.modules())
    return {type(m).__name__ for m in model.modules()
            if id(m) not in covered and type(m).__name__ not in SAFE_NAMES}
