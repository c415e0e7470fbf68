"""How far a float32 result may land from its float64 reference: bounds derived from the
problem and the float32 format, never from the error seen on one machine.

A float32 pass computes, to first order, the exact result for slightly different weights:
a dot product of n terms of mixed signs returns the exact dot product with each weight off
by a relative error of typical size sqrt(n) u (u = 2**-24, the unit roundoff; the random-walk
estimate for recursive summation; blocked and pairwise summation, as BLAS, MLAS and oneDNN
use, do better). So we rerun the float64 reference on a few copies of the model whose weights
carry such relative noise; how far those float64 results spread around the unperturbed one is
how far any float32 implementation can be expected to land. It is float64 and seeded, so the
same number on every machine.

`bound` = MULTIPLE x that spread + FLOOR:
  * MULTIPLE = 3: the perturbation is one consistent change shared by the forward pass, the
    rules' denominators and their transposed products; a float32 implementation rounds the
    three independently, and independent errors add in quadrature (sqrt 3 = 1.7). The spread
    comes from three seeds, whose results vary several-fold where the problem is
    ill-conditioned (a few near-zero denominators dominate): another factor 1.7.
  * FLOOR, for what independent noise per weight misses: a sum of n terms of one sign (z+
    denominators, the relevance pass's transposed products) is off by about sqrt(n/3) u in
    float32 but only by about u under independent noise. Two such sums per layer, independent
    across layers: u sqrt(2/3 sum n) over the model's conv and dense layers
    (resnet18: 8.7e-6, resnet50: 1.1e-5).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from conftest import relative_error

U = 2.0 ** -24  # float32 unit roundoff
SEEDS = (0, 1, 2)
MULTIPLE = 3


def fan_ins(model: torch.nn.Module) -> list[int]:
    """Terms per output of every conv and dense layer."""
    return [m.weight[0].numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def floor(model: torch.nn.Module) -> float:
    return U * math.sqrt(2 / 3 * sum(fan_ins(model)))


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A float64 copy whose conv and dense weights carry relative Gaussian noise of size
    sqrt(fan-in) u, and every other parameter (biases, BatchNorm) of size u: one rounding."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        for module in model.modules():
            dot = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
            for name, p in module.named_parameters(recurse=False):
                size = math.sqrt(p[0].numel()) * U if dot and name == "weight" else U
                p.mul_(1 + size * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return model


def spreads(run, model: torch.nn.Module, references) -> list[float]:
    """RMS over SEEDS of the relative distance of run(perturbed model) from the references,
    one per output of `run` (a function of a model returning a tuple of arrays)."""
    squares = np.zeros(len(references))
    for seed in SEEDS:
        for k, (out, ref) in enumerate(zip(run(perturbed(model, seed)), references)):
            squares[k] += relative_error(np.asarray(out, np.float64), np.asarray(ref, np.float64)) ** 2
    return list(np.sqrt(squares / len(SEEDS)))


def bounds(run, model: torch.nn.Module, references) -> list[float]:
    """Relative-error bound (L2 norm, as conftest.relative_error) for each output of `run`."""
    return [MULTIPLE * s + floor(model) for s in spreads(run, model, references)]


def sum_rtol(n: int, lam: float = 8.0) -> float:
    """Relative error of a float32 sum of n terms of one sign, in any order: lam sqrt(n) u
    (Higham & Mary 2019, probabilistic rounding error analysis: exceeded with probability below
    2n exp(-lam^2/2), below 3e-8 for lam = 8 and n < 1e6, whatever the order of summation). The
    worst case (n-1) u needs every rounding to err the same way."""
    return lam * math.sqrt(n) * U


def one_sign_rtol(model: torch.nn.Module, x: np.ndarray, lam: float = 8.0) -> float:
    """Relative error, per element, of relevance a float32 chain of one-sign rules (z+ with
    a norm rule at pools) computes: at every conv, dense or average-pool layer, a denominator
    summing its fan-in and a transposed product summing its fan-out, each within
    sum_rtol of its terms (same sign: no cancellation), and about 3 more roundings (quotient,
    product, stored result). First-order errors add along the chain; summing over all layers,
    shortcuts included, bounds any path."""
    terms = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            terms.append((module.in_channels // module.groups * k, module.out_channels // module.groups * k))
        elif isinstance(module, torch.nn.Linear):
            terms.append((module.in_features, module.out_features))
        elif isinstance(module, torch.nn.AvgPool2d):
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            terms.append((k * k, k * k))  # square windows only, as networks() draws them
        elif isinstance(module, torch.nn.AdaptiveAvgPool2d):
            terms.append((inputs[0].shape[2] * inputs[0].shape[3], 1))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.as_tensor(x[:1], dtype=next(model.parameters()).dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(sum_rtol(n_in, lam) + sum_rtol(n_out, lam) + 3 * U for n_in, n_out in terms)


# --- The same argument for an ONNX model (no PyTorch module to run in float64) ---------------
#: Noise for onnx_bounds, in float32 roundings: large enough that the float32 rounding of the
#: runs measuring it is 1/SCALE of what they measure (the spread is the problem's sensitivity,
#: the same on any machine), small enough to stay in the first-order regime the scaling back
#: (spread / SCALE) assumes.
SCALE = 2.0 ** 8
DOT_OPS = ("Conv", "Gemm", "MatMul")


def _dot_weights(model) -> dict[str, int]:
    """Initializer name -> terms per output (fan-in) of every Conv, Gemm or MatMul weight."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in DOT_OPS and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            found[node.input[1]] = (w.size // w.shape[0] if node.op_type == "Conv" or transposed else w.shape[0])
    return found


def onnx_floor(path) -> float:
    """floor() over an ONNX model's Conv, Gemm and MatMul weights."""
    import onnx

    return U * math.sqrt(2 / 3 * sum(_dot_weights(onnx.load(str(path))).values()))


def onnx_bounds(run, path, folder, seeds=SEEDS) -> list[float]:
    """bounds() for an ONNX model: run(model path) -> a tuple of float32 arrays. The float32
    initializers carry relative Gaussian noise SCALE x (sqrt(fan-in) u for dot-product weights,
    u for the others, as perturbed()); the RMS over seeds of each output's relative distance
    (L2) from run(path), divided by SCALE, is the float32 spread. run should fix what the
    outputs depend on discretely (the target classes) to its values on the unperturbed model."""
    import onnx
    from onnx import numpy_helper

    references = run(path)
    squares = np.zeros(len(references))
    for seed in seeds:
        model, rng = onnx.load(str(path)), np.random.RandomState(seed)
        dots = _dot_weights(model)
        for init in model.graph.initializer:
            a = numpy_helper.to_array(init)
            if a.dtype == np.float32 and a.size > 1:
                size = SCALE * U * math.sqrt(dots.get(init.name, 1))
                init.CopyFrom(numpy_helper.from_array((a * (1 + size * rng.standard_normal(a.shape))).astype(np.float32),
                                                      init.name))
        noisy = Path(folder) / f"perturbed{seed}_{Path(path).name}"
        onnx.save(model, str(noisy))
        for k, (out, ref) in enumerate(zip(run(noisy), references)):
            squares[k] += relative_error(np.asarray(out, np.float64), np.asarray(ref, np.float64)) ** 2
    floor_ = onnx_floor(path)
    return [MULTIPLE * math.sqrt(s / len(seeds)) / SCALE + floor_ for s in squares]


def float16_rtol(rtol32: float) -> float:
    """Relative distance (L2) of two float32 arrays' float16 roundings when the float32 arrays
    are within rtol32 of each other: each rounding moves an element by at most u16 |x| (normal
    range), so by u16 ||x|| in L2, twice over; subnormals (|x| < 2^-14, spacing 2^-24) are
    handled by the caller's absolute term."""
    return rtol32 + 2 * 2.0 ** -11 * (1 + rtol32)


def apart(model, x, targets, folder, outputs=("relevance",), **options) -> list[float]:
    """How far (relative, L2) two float32 runs of an Explainer on `model` may land from each
    other, per named output of its Explanation (attributes or methods, e.g. "heatmap"), where
    their kernels may sum in other orders (other batch sizes, thread counts, session options,
    processes): each within onnx_bounds of the exact result, so twice that."""
    from onnxlrp import Explainer

    def run(path):
        result = Explainer(path, cache=False, **options).explain(x, targets, warn=False)
        return tuple(value() if callable(value) else value for value in (getattr(result, name) for name in outputs))

    return [2 * b for b in onnx_bounds(run, model, folder)]


def layered_bound(analysis) -> float:
    """float32 against float64 through L linear layers of fan-in at most F (an analysed ONNX
    model): each layer's dot products are off by about sqrt(F) u (random-walk summation, as
    above), the errors of forward and relevance pass add up over the layers; 3x for the
    quadrature of the two passes and seed-to-seed spread, as MULTIPLE."""
    fan_ins = []
    for op in analysis.graph.ops.values():
        if op.kind == "norm":
            fan_ins.append(int(np.prod([op.shape[a] for a in op.axes])))
        elif op.node.op == "Conv":
            fan_ins.append(int(np.prod(op.weight.shape[1:])))
        elif op.node.op in ("Gemm", "MatMul"):
            fan_ins.append(int(op.weight.size // op.outputs if op.node.op == "Gemm" else op.weight.shape[0]))
    return MULTIPLE * len(fan_ins) * math.sqrt(max(fan_ins)) * U
