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
