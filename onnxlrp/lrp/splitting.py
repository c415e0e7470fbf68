"""Relevance Splitting at residual merges (Otsuki et al., ECCV 2024).

At ``y = h_s + h_m`` the relevance R of y is divided into R_s (down the skip) and
R_m (down the main branch), with R_s + R_m = R element-wise:

- ``symmetric``: R_s = R_m = R / 2;
- ``ratio``: R_s = R |h_s| / (|h_s| + |h_m|) -- the paper's method; where both are
  zero (0/0) the relevance is split evenly, every other value is untouched;
- ``proportional``: R_k = h_k R / (y + 1e-6 sign y), the signed z-rule that Zennit's
  ResNet canonizer applies to its Sum module (conservative up to the stabiliser).

``include_identity=False`` sends all relevance of an identity skip down the main
branch (the paper's ablations (i) and (iii)); projection and other skips still split.

``copy`` is no split at all: both branches get the whole R, as the gradient of an Add does.
It serves the gradient baselines and LRP as Captum applies it to ResNets (its residual ``+``
is no module, so gradient flows through it): relevance is then counted twice per merge.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .emit import Emitter
from ..ir.merges import Merge
from .ops import Op
from .rules import Rule, RuleContext, stabilize

SPLITS = ("symmetric", "ratio", "proportional", "copy")


@dataclass(frozen=True)
class Split(Rule):
    method: str = "ratio"
    include_identity: bool = True
    stabilizer: float = 1e-6  # only the proportional split divides by y

    def __post_init__(self):
        if self.method not in SPLITS:
            raise ValueError(f"unknown split '{self.method}'; choose one of {', '.join(SPLITS)}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"split-{self.method}"

    def applies_to(self, op: Op):
        return None if op.kind == "merge" else "splitting is for residual merges"

    def describe(self, op: Op | None = None, merge: Merge | None = None) -> str:
        if merge is not None and merge.kind == "identity" and not self.include_identity:
            return "all to main (identity skip excluded)"
        return f"{self.method} split"

    def relevance(self, e: Emitter, op: Op, R: gs.Tensor, ctx: RuleContext) -> dict[str, gs.Tensor]:
        """{skip: R_skip, main: R_main}; the skip is left out where it gets nothing."""
        merge = ctx.merge
        r_skip, r_main = self.split(e, op, merge, R)
        if merge.skip == merge.main:  # y = x + x: both shares reach the one tensor
            return {merge.main: r_main if r_skip is None else e.add(r_skip, r_main)}
        return {merge.main: r_main} if r_skip is None else {merge.skip: r_skip, merge.main: r_main}

    def split(self, e: Emitter, op: Op, merge: Merge, R: gs.Tensor) -> tuple[gs.Tensor | None, gs.Tensor]:
        """(R_skip, R_main); R_skip is None where the skip gets nothing."""
        h = {t.name: t for t in op.data_inputs}
        h_s, h_m = h[merge.skip], h[merge.main]
        if merge.kind == "identity" and not self.include_identity:
            return None, R
        if self.method == "copy":
            return R, R
        if self.method == "symmetric":
            half = e.mul(R, np.float32(0.5))
            return half, half
        if self.method == "ratio":
            a, b = e.op("Abs", h_s), e.op("Abs", h_m)
            total = e.add(a, b)
            empty = e.op("Equal", total, np.float32(0))
            share = e.div(a, e.op("Where", empty, np.float32(1), total))
            share = e.op("Where", empty, np.float32(0.5), share)
            r_skip = e.mul(R, share)
            return r_skip, e.sub(R, r_skip)
        # y = h_s + h_m, recomputed in the backward pass: cheaper than keeping the forward's y in memory.
        rank = len(op.output.shape)
        y = e.add(e.after(h_s, rank, R), h_m)
        s = e.div(R, stabilize(e, y, self.stabilizer))
        return e.mul(h_s, s), e.mul(h_m, s)
