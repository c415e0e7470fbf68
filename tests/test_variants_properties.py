"""Property-based tests on random networks with gates, concatenation, slicing and
normalisations (hypothesis), the op kinds beyond test_properties' ReLU ResNets.

With every gate factor (squeeze-excitation's sigmoid, SiLU's sigmoid, HardSwish's hard
sigmoid, GELU's Phi) and every normalisation's standard deviation held constant, the
network is piecewise linear in its input, and LRP-0 (epsilon 0 on every linear op, the
proportional split without stabiliser at merges, the gate rule at gates) equals gradient x
input of that detached model: an independent reference computed by torch autograd in
float64 from an explicit functional forward (`detach=True`). The same forward with
`detach=False` is the true model, whose gradient the `gradient` preset must give.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import float32_bounds
import tiny_graphs as tg
from float32_bounds import U
from onnxlrp import Explainer, Split, analyse
from onnxlrp import rules as R

ACTIVATIONS = ("relu", "leaky", "relu6", "silu", "hardswish", "gelu", "hardsigmoid-gate", "none")
NORMS = ("none", "layer", "group")
SE_GATES = ("none", "sigmoid", "hardsigmoid")
LEAK = 0.1
EPS = 1e-5
CLASSES = 5


class Recorder:
    """What the explicit forward saw, in float64: every tensor fed to a function with a kink
    (where float32 rounding may land on the other side) and, for every sum LRP-0 divides by,
    (sum of |terms|) / |sum|: how much that division amplifies rounding in the terms."""

    def __init__(self):
        self.kinks: list[tuple[torch.Tensor, tuple[float, ...]]] = []
        self.conditions: list[float] = [1.0]

    def kink(self, t, *points):
        self.kinks.append((t.detach(), points))

    def sum(self, *terms):
        total = sum(terms).detach().abs()
        spread = sum(t.detach().abs() for t in terms)
        ratio = spread / total
        finite = torch.isfinite(ratio)
        if finite.any():
            self.conditions.append(float(ratio[finite].max()))


def _cut(t, detach):
    return t.detach() if detach else t


def activate(kind, h, detach, rec):
    """The activation in explicit functional form; gate factors detached when asked."""
    if kind == "relu":
        rec.kink(h, 0.0)
        return F.relu(h)
    if kind == "leaky":
        rec.kink(h, 0.0)
        return F.leaky_relu(h, LEAK)
    if kind == "relu6":
        rec.kink(h, 0.0, 6.0)
        return torch.clamp(h, 0.0, 6.0)
    if kind == "silu":
        return h * _cut(torch.sigmoid(h), detach)
    if kind in ("hardswish", "hardsigmoid-gate"):  # the factor relu6(h + 3) / 6, kinks at -3 and 3
        rec.kink(h, -3.0, 3.0)
        return h * _cut(torch.clamp(h + 3.0, 0.0, 6.0) / 6.0, detach)
    if kind == "gelu":
        return h * _cut(0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))), detach)
    return h


def activation_module(kind):
    """The same activation as torch.nn writes it, for export."""
    return {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(LEAK), "relu6": nn.ReLU6(), "silu": nn.SiLU(),
            "hardswish": nn.Hardswish(), "gelu": nn.GELU(), "none": nn.Identity()}.get(kind)


class Norm(nn.Module):
    """LayerNorm over channels (channels-last, as ConvNeXt) or GroupNorm."""

    def __init__(self, kind, channels, groups):
        super().__init__()
        self.kind, self.groups = kind, groups
        self.norm = nn.LayerNorm(channels, eps=EPS) if kind == "layer" else nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, h, detach=None, rec=None):
        if detach is None:
            if self.kind == "layer":
                return self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.norm(h)
        n, c, height, width = h.shape
        # the normalised groups as rows: channels at each pixel, or channel groups over the image
        rows = h.permute(0, 2, 3, 1).reshape(-1, c) if self.kind == "layer" else h.reshape(n * self.groups, -1)
        mean = rows.mean(1, keepdim=True)
        centred = rows - mean
        std = torch.sqrt((centred * centred).mean(1, keepdim=True) + EPS)
        rows = centred / _cut(std, detach)
        if self.kind == "layer":
            rows = rows.reshape(n, height, width, c).permute(0, 3, 1, 2)
        else:
            rows = rows.reshape(n, c, height, width)
        scaled = rows * self.norm.weight.view(1, -1, 1, 1)
        rec.sum(scaled, self.norm.bias.view(1, -1, 1, 1).expand_as(scaled))
        return scaled + self.norm.bias.view(1, -1, 1, 1)


class Conv(nn.Module):
    """conv -> norm -> activation -> squeeze-excitation gate, with an optional identity skip."""

    def __init__(self, cin, cout, kernel, groups, bias, norm, norm_groups, act, se, skip, post):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = Norm(norm, cout, norm_groups) if norm != "none" else None
        self.act, self.se, self.skip, self.post = act, se, skip, post
        self.act_module = activation_module(act)
        if se != "none":
            squeeze = max(2, cout // 2)
            self.down = nn.Conv2d(cout, squeeze, 1)
            self.up = nn.Conv2d(squeeze, cout, 1)

    def forward(self, x, detach=None, rec=None):
        h = self.conv(x)
        if self.norm is not None:
            h = self.norm(h, detach, rec)
        if detach is None:
            h = h * F.hardsigmoid(h) if self.act == "hardsigmoid-gate" else self.act_module(h)
        else:
            h = activate(self.act, h, detach, rec)
        if self.se != "none":
            s = self.down(h.mean((2, 3), keepdim=True))
            if rec is not None:
                rec.kink(s, 0.0)
            s = self.up(F.relu(s))
            if self.se == "sigmoid":
                g = torch.sigmoid(s)
            else:
                if rec is not None:
                    rec.kink(s, -3.0, 3.0)
                g = F.hardsigmoid(s)
            h = h * _cut(g, bool(detach))
        if self.skip:
            if rec is not None:
                rec.sum(x, h)
            h = x + h
        if detach is None:
            return activation_module(self.post)(h)
        return activate(self.post, h, detach, rec)


class Concat(nn.Module):
    """Two branches concatenated on channels: two convs, or the input and a conv (DenseNet)."""

    def __init__(self, cin, ca, cb, dense, act):
        super().__init__()
        self.dense, self.act = dense, act
        self.a = None if dense else nn.Conv2d(cin, ca, 3, padding=1, bias=False)
        self.b = nn.Conv2d(cin, cb, 1, bias=False)

    def forward(self, x, detach=None, rec=None):
        a = x if self.dense else self.a(x)
        b = self.b(x)
        if detach is None:
            return torch.cat([a, activation_module(self.act)(b)], 1)
        return torch.cat([a, activate(self.act, b, detach, rec)], 1)


class Split_(nn.Module):
    """Channels split in two (slice, torch.split or chunk); one part through a conv; the parts
    concatenated again or added."""

    def __init__(self, cin, way, at, combine):
        super().__init__()
        self.way, self.at, self.combine = way, at, combine
        width = cin - at if combine == "add" else at
        self.conv = nn.Conv2d(at, width, 3, padding=1, bias=False)

    def parts(self, x):
        if self.way == "slice":
            return x[:, :self.at], x[:, self.at:]
        if self.way == "split":
            return torch.split(x, [self.at, x.shape[1] - self.at], 1)
        return torch.chunk(x, 2, 1)

    def forward(self, x, detach=None, rec=None):
        p, q = self.parts(x)
        h = self.conv(p)
        if self.combine == "add":
            if rec is not None:
                rec.sum(h, q)
            return h + q
        return torch.cat([q, h], 1)


class Net(nn.Module):
    """stem conv -> blocks -> global average pool -> dense head. forward(x) is the model as
    exported (torch.nn modules); forward(x, detach, rec) the explicit functional form."""

    def __init__(self, stem, blocks, channels, bias):
        super().__init__()
        self.stem = nn.Conv2d(3, stem["width"], 3, padding=1, bias=bias)
        self.stem_act = stem["act"]
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(channels, CLASSES, bias=bias)

    def forward(self, x, detach=None, rec=None):
        h = self.stem(x)
        h = activation_module(self.stem_act)(h) if detach is None else activate(self.stem_act, h, detach, rec)
        for block in self.blocks:
            h = block(h, detach, rec)
        return self.fc(h.mean((2, 3)))


def _divisors(n):
    return [d for d in (1, 2, n) if n % d == 0]


@st.composite
def networks(draw):
    """The structure: widths, block types and their options; a seed for weights and inputs."""
    width = draw(st.sampled_from([4, 6, 8]))
    bias = draw(st.booleans())
    stem = {"width": width, "act": draw(st.sampled_from(["relu", "leaky", "relu6", "silu", "hardswish", "gelu"]))}
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "concat", "split"]))
        if kind == "conv":
            out = draw(st.sampled_from([width, width + 2, 2 * width]))
            groups = draw(st.sampled_from(_divisors(2) if width % 2 == 0 and out % 2 == 0 else [1]))
            norm = draw(st.sampled_from(NORMS))
            skip = out == width and draw(st.booleans())
            blocks.append(Conv(width, out, draw(st.sampled_from([1, 3])), groups, bias, norm,
                               draw(st.sampled_from(_divisors(out))), draw(st.sampled_from(ACTIVATIONS)),
                               draw(st.sampled_from(SE_GATES)), skip,
                               draw(st.sampled_from(["none", "relu", "leaky"])) if skip else "none"))
        elif kind == "concat":
            dense = draw(st.booleans())
            ca = width if dense else draw(st.sampled_from([2, 4]))
            cb = draw(st.sampled_from([2, 4]))
            blocks.append(Concat(width, ca, cb, dense, draw(st.sampled_from(["relu", "gelu", "silu", "none"]))))
            out = ca + cb
        else:
            way = draw(st.sampled_from(["slice", "split", "chunk"]))
            at = width // 2 if way == "chunk" else draw(st.integers(1, width - 1))
            combine = draw(st.sampled_from(["cat", "add"])) if at * 2 == width else "cat"
            blocks.append(Split_(width, way, at, combine))
            out = width - at if combine == "add" else width
        width = out
    model = Net(stem, blocks, width, bias).eval()
    return model, draw(st.integers(6, 10)), draw(st.integers(0, 2**16))


def initialise(model, seed):
    """Seeded weights, drawn in float64 and stored in the float32 model: conv and dense weights
    N(0, 1.5^2 / fan-in) (activations stay of order 1, so ReLU6 and HardSwish's ramp both
    clip and pass), norm scales N(1, 0.5^2), biases N(0, 0.5^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                value = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                    value *= 1.5 / math.sqrt(p[0].numel())
                elif name == "weight":
                    value = 1 + 0.5 * value
                else:
                    value *= 0.5
                p.copy_(value)
    return model


def exported(model, size, path):
    torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return path


def reference(model, x, detach, targets=None):
    """(gradient of the target logit, targets, the Recorder) in float64 by torch autograd on the
    explicit forward; gate factors and standard deviations held constant if `detach`."""
    rec = Recorder()
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = model.double()(inputs, detach, rec)
    if targets is None:
        targets = logits.argmax(1).numpy()
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), torch.from_numpy(targets)].sum(), inputs)
    model.float()
    return grad.numpy(), targets, rec
