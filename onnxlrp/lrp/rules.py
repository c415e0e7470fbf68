"""LRP rules as small recipes over an op's forward and transpose emitters.

A linear rule is a list of *groups*; a group is a list of *terms*. Each term picks a
variant of the layer input (x, its positive or negative part, ones, or the box bounds)
and of the parameters (modified W and b, folded into constants when the graph is
built). For one group, with R the relevance at the layer output::

    z_k = forward(input_k; W_k, b_k)                  (one forward per term)
    s   = gate * R / stabilize(sum_k sign_k z_k)       (the gradient mapper)
    R_x = coef * sum_k sign_k input_k * transpose(s; W_k)   (the reducer)

and the rule's relevance is the sum over its groups. This is Zennit's BasicHook
(input modifiers, parameter modifiers, gradient mapper, reducer) written for ONNX;
the rules below reproduce Zennit 1.0's, bias handling included.

Other rules: ``Pass`` hands relevance through unchanged (ReLU, BatchNorm in the
paper); ``Gradient`` applies the op's transpose (reshapes; MaxPool, where it is
winner-take-all). Splits at residual merges live in :mod:`onnxlrp.splitting`.

Every rule answers one question, whatever the op and however many inputs it has:
``relevance(e, op, R, ctx) -> {input tensor name: relevance there}``. A rule of a
one-input op writes ``emit`` (the relevance at ``op.x``); a rule of several inputs (a
residual split) overrides ``relevance`` itself. The builder sums what every consumer
hands a tensor before it visits the tensor's producer.
"""
from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .emit import Emitter
from ..ir.merges import Merge
from .ops import LinearOp, MaxPool, Op

Modifier = Callable[[np.ndarray], np.ndarray]


def identity(a: np.ndarray) -> np.ndarray:
    return a


def positive(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0).astype(a.dtype)


def negative(a: np.ndarray) -> np.ndarray:
    return np.minimum(a, 0).astype(a.dtype)


def ones(a: np.ndarray) -> np.ndarray:
    return np.ones_like(a)


def square(a: np.ndarray) -> np.ndarray:
    return a * a


INPUTS = ("x", "pos", "neg", "ones", "low", "high")


@dataclass(frozen=True)
class Term:
    inputs: str  # one of INPUTS
    weight: Modifier
    bias: Modifier | None  # None: the term has no bias
    sign: float = 1.0  # sign in the denominator and the reducer


@dataclass(frozen=True)
class Group:
    terms: tuple[Term, ...]
    coef: float = 1.0
    gate: str | None = None  # "positive" / "negative": only where the layer output is > 0 / < 0


@dataclass(frozen=True)
class RuleContext:
    """What a rule needs to know about its layer beyond the op itself."""

    bias: bool  # the user's switch: False drops every bias (Zennit's zero_params=['bias'])
    x_nonneg: bool  # the layer input is known to be >= 0
    bounds: Callable[[str], np.ndarray] | None = None  # "low"/"high" -> box bound at the layer input
    merge: Merge | None = None  # at a residual merge: which input is the skip, which the main branch


class Rule:
    """Base of every rule; subclasses have a `name`."""

    def applies_to(self, op: Op) -> str | None:
        """None if the rule can explain this op, else why not."""
        return None

    def describe(self, op: Op | None = None, merge: Merge | None = None) -> str:
        return self.name

    def relevance(self, e: Emitter, op: Op, R: gs.Tensor, ctx: RuleContext) -> dict[str, gs.Tensor]:
        """The relevance at each data input of `op`, by tensor name, given R at its output."""
        return {op.x.name: self.emit(e, op, R, ctx)}

    def emit(self, e: Emitter, op: Op, R: gs.Tensor, ctx: RuleContext) -> gs.Tensor:
        """A one-input op's relevance at op.x."""
        raise NotImplementedError


@dataclass(frozen=True)
class Pass(Rule):
    name: str = "pass"

    def applies_to(self, op):
        return None if op.shape_preserving else "it changes the tensor's shape"

    def emit(self, e: Emitter, op: Op, R: gs.Tensor, ctx: RuleContext) -> gs.Tensor:
        return R


@dataclass(frozen=True)
class Gradient(Rule):
    """Relevance through the op's transpose: reshapes keep values, MaxPool's winner takes all."""

    name: str = "gradient"

    def applies_to(self, op):
        return "relevance at a merge is split, not back-propagated" if op.kind == "merge" else None

    def relevance(self, e, op, R, ctx):
        return op.vjp(e, R)  # every data input: a gate's branch too

    def describe(self, op=None, merge=None):
        if op is not None and op.kind == "maxpool":
            return "winner-take-all (gradient)"
        if op is not None and op.kind == "reshape":
            return "reshape back (gradient)"
        return self.name


@dataclass(frozen=True)
class GuidedReLU(Rule):
    """Guided backpropagation: the ReLU's gradient, and only where that gradient is positive."""

    name: str = "guided"

    def applies_to(self, op):
        return None if op.node.op == "Relu" else "guided backpropagation is a ReLU rule"

    def emit(self, e, op, R, ctx):
        keep = e.op("And", e.op("Greater", op.x, np.float32(0)), e.op("Greater", R, np.float32(0)))
        return e.op("Where", keep, R, np.float32(0))


def stabilize(e: Emitter, z: gs.Tensor, epsilon: float, nonneg: bool = False) -> gs.Tensor:
    """z + epsilon * sign(z), with sign(0) = +1 (Zennit's convention); 0 -> inf when epsilon = 0.
    nonneg: z is known to be >= 0, so this is just z + epsilon."""
    if epsilon == 0:
        return e.op("Where", e.op("Equal", z, np.float32(0)), np.float32(np.inf), z)
    if nonneg:
        return e.add(z, np.float32(epsilon))
    shift = e.op("Where", e.op("Less", z, np.float32(0)), np.float32(-epsilon), np.float32(epsilon))
    return e.add(z, shift)


def _sign(values: np.ndarray) -> int:
    """+1 if every value is >= 0, -1 if every value is <= 0, 0 if mixed (all zeros count as +1)."""
    return 1 if np.all(values >= 0) else (-1 if np.all(values <= 0) else 0)


@dataclass(frozen=True)
class LinearRule(Rule):
    name: str
    groups: tuple[Group, ...]
    stabilizer: float = 1e-6
    use_bias: bool = True  # False: this rule always drops biases (the paper's rules)
    view: str | None = None  # "avg2x2": explain a MaxPool as the paper's 2x2 average pool
    params: tuple[tuple[str, float], ...] = field(default=())
    # "w2" or "flat": the relevance the stabiliser would absorb goes to the output's window by
    # that rule instead (where a denominator vanishes, as z+ on a depthwise window with few
    # positive terms, all of it); None: absorbed, as Zennit does
    fallback: str | None = None

    def applies_to(self, op):
        if self.view == "avg2x2":
            return None if isinstance(op, MaxPool) else "the 2x2-average rule is for MaxPool"
        if op.kind == "norm" and any(t.inputs == "ones" for g in self.groups for t in g.terms):
            return "a normalisation centres its input, so a constant input has no contribution"
        return None if op.linear else f"{self.name} needs a linear layer"

    def describe(self, op=None, merge=None):
        args = ", ".join(f"{k}={v:g}" for k, v in self.params + (("eps", self.stabilizer),))
        extra = ("" if self.use_bias else ", no bias") + (f", eps share by {self.fallback}" if self.fallback else "")
        return f"{self.name}({args}{extra})"

    def _input(self, e: Emitter, kind: str, x: gs.Tensor, ctx: RuleContext) -> gs.Tensor | None:
        """The term's input variant; None where it is identically zero."""
        if kind == "x" or (kind == "pos" and ctx.x_nonneg):
            return x
        if kind == "pos":
            return e.op("Relu", x)
        if kind == "neg":
            return None if ctx.x_nonneg else e.op("Min", x, np.float32(0))
        shape = (1,) + tuple(x.shape[1:])
        if kind == "ones":
            return e.const(np.ones(shape, dtype=np.float32))
        return e.const(np.ascontiguousarray(np.broadcast_to(ctx.bounds(kind), shape), dtype=np.float32))

    def emit(self, e: Emitter, op: Op, R: gs.Tensor, ctx: RuleContext) -> gs.Tensor:
        original = op
        if self.view == "avg2x2":
            op = op.average_view(2)
        assert isinstance(op, LinearOp)
        bias = op.bias if (ctx.bias and self.use_bias) else None
        # a fallback that cannot take this op (flat on a normalisation, whose centring gives a
        # constant input no contribution) leaves the stabiliser's share absorbed, as without one
        fallback = FALLBACKS[self.fallback] if self.fallback and self.stabilizer > 0 else None
        if fallback is not None and fallback.applies_to(op):
            fallback = None
        contributions, absorbed = [], []
        for group in self.groups:
            terms = []
            for term in group.terms:
                a = self._input(e, term.inputs, op.x, ctx)
                if a is None:
                    continue
                w = term.weight(op.weight)
                b = term.bias(bias) if (bias is not None and term.bias is not None) else None
                if not np.any(w) and (b is None or not np.any(b)):
                    continue  # all-zero parameters contribute nothing
                terms.append((term, a, w, b))
            if not terms:
                continue
            nonneg = all(self._nonneg(term, w, b, ctx) for term, _, w, b in terms)
            # A non-negative denominator is stabilised by z + eps; where the first term's forward
            # is a layer with a bias input, eps goes into that bias (one op and layout change fewer).
            in_bias = nonneg and self.stabilizer > 0 and op.has_bias and not self._reuses(op, original, *terms[0][:2])
            forwards = []
            for k, (term, a, w, b) in enumerate(terms):
                if in_bias and k == 0:
                    b = np.full(op.forward_bias_shape(), self.stabilizer, np.float32) + (0 if b is None else b)
                forwards.append(self._forward(e, op, original, term, a, w, b, R))
            z = _signed_sum(e, [(term.sign, zk) for (term, _, _, _), zk in zip(terms, forwards)])
            denominator = z if in_bias else stabilize(e, z, self.stabilizer, nonneg)
            s = e.div(R, denominator)
            if group.gate:
                compare = "Greater" if group.gate == "positive" else "Less"
                s = e.op("Where", e.op(compare, original.output, np.float32(0)), s, np.float32(0))
            if fallback is not None:
                # what the stabiliser takes of R: s (denominator - z), the eps put into it
                shift = np.float32(self.stabilizer) if in_bias else e.sub(denominator, z)
                share = e.mul(s, shift)
                absorbed.append(share if group.coef == 1.0 else e.mul(share, np.float32(group.coef)))
            parts = []
            for term, a, w, _ in terms:
                grad = op.transpose(e, s, w)
                parts.append((term.sign, grad if term.inputs == "ones" else e.mul(a, grad)))
            contribution = _signed_sum(e, parts)
            if group.coef != 1.0:
                contribution = e.mul(contribution, np.float32(group.coef))
            contributions.append(contribution)
        if absorbed:  # the stabiliser's share, by the fallback rule, which needs no input values
            contributions.append(fallback.emit(e, op, e.sum(absorbed), ctx))
        if not contributions:  # nothing to attribute to: the layer input gets zero relevance
            return e.mul(op.x, np.float32(0))
        return e.sum(contributions)

    @staticmethod
    def _nonneg(term: Term, w: np.ndarray, b: np.ndarray | None, ctx: RuleContext) -> bool:
        """Whether the term's output is >= 0 whatever the data: input and weight signs agree."""
        signs = {"pos": 1, "neg": -1, "ones": 1, "x": 1 if ctx.x_nonneg else 0}
        input_sign = signs.get(term.inputs)
        if input_sign is None:  # the box bounds: constants
            input_sign = _sign(ctx.bounds(term.inputs))
        weight_sign = _sign(w)
        return term.sign > 0 and input_sign * weight_sign > 0 and (b is None or bool(np.all(b >= 0)))

    @staticmethod
    def _reuses(op, original, term, a) -> bool:
        """Whether the term's forward is the layer's own (its output can stand in for it)."""
        return op is original and a is op.x and term.weight is identity

    @classmethod
    def _forward(cls, e, op, original, term, a, w, b, R):
        """The term's forward output, reusing the layer's own output where it is the same tensor.
        A new forward on data waits for R, so that it runs in the backward pass (see Emitter.after)."""
        if cls._reuses(op, original, term, a):
            if b is op.bias:  # the layer as it is
                return op.output
            if b is None:  # the layer without its bias
                return e.sub(op.output, e.const(op.bias.reshape(op.bias_shape())))
        if isinstance(a, gs.Variable):
            a = e.after(a, len(op.x.shape), R)
        return op.forward(e, a, w, b)


def _signed_sum(e: Emitter, parts: list[tuple[float, gs.Tensor]]) -> gs.Tensor:
    plus = [t for sign, t in parts if sign > 0]
    minus = [t for sign, t in parts if sign < 0]
    total = e.sum(plus) if plus else None
    for t in minus:
        total = e.op("Neg", t) if total is None else e.sub(total, t)
    return total


@dataclass(frozen=True)
class Proportional(Rule):
    """The z-rule over a sum of computed terms (a - b: a normalisation's centring written out):
    each input gets its contribution's share, R_k = z_k R / (y + eps sign y). Conserves up to
    the stabiliser; with eps = 0 it is LRP-0."""

    stabilizer: float = 1e-6
    name: str = "proportional"

    def applies_to(self, op):
        return None if hasattr(op, "terms") else "the proportional rule is for sums of computed tensors"

    def relevance(self, e, op, R, ctx):
        s = e.div(R, stabilize(e, op.output, self.stabilizer))
        return {tensor.name: op.reduce(e, tensor, e.mul(z, s)) for tensor, z in op.terms(e)}


GATE_SHARES = ("constant", "half")


@dataclass(frozen=True)
class GateShare(Rule):
    """How relevance divides at a gate x * g (or x / s).

    - ``constant`` (the default): the gate is held constant; all relevance goes to the signal,
      none into the gate's branch. Conserves; LRP-0 then equals gradient x input of the model
      with the gate detached.
    - ``half``: half to the signal, half to the gate's branch (summed over the axes the gate
      broadcasts along). Conserves at the Mul; the branch passes its share down through its
      own rules (its squashing ops pass relevance as activations do), to the same input.
    """

    share: str = "constant"

    def __post_init__(self):
        if self.share not in GATE_SHARES:
            raise ValueError(f"unknown gate share '{self.share}'; choose one of {', '.join(GATE_SHARES)}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "gate held constant" if self.share == "constant" else f"gate share {self.share}"

    def applies_to(self, op):
        return None if op.kind == "gate" and op.shape_preserving else "a gate share is for gates"

    def relevance(self, e, op, R, ctx):
        gate = getattr(op, "gate", None)
        if self.share == "constant" or gate is None:  # a one-op gate (HardSwish) has no branch to share with
            return {op.x.name: R}
        half = e.mul(R, np.float32(0.5))
        to_gate = e.reduce_sum(half, op.gate_axes, keepdims=1) if op.gate_axes else half
        return {op.x.name: half, gate.name: to_gate}


# The rules, with Zennit 1.0's parameters and bias handling.

PASS = Pass()
GATE = GateShare()  # x * g: all relevance to the signal x (ops.GateMul)
PROPORTIONAL = Proportional()
GRADIENT = Gradient()
GUIDED = GuidedReLU()


def epsilon(epsilon: float = 1e-6) -> LinearRule:
    """LRP-epsilon: R_i = x_i sum_j w_ij R_j / (z_j + eps sign z_j). epsilon=0 is LRP-0."""
    return LinearRule("epsilon", (Group((Term("x", identity, identity),)),), stabilizer=epsilon)


def norm(stabilizer: float = 1e-6) -> LinearRule:
    """Epsilon with a fixed small stabilizer, for pools (Zennit's Norm)."""
    return LinearRule("norm", (Group((Term("x", identity, identity),)),), stabilizer=stabilizer)


def zplus(stabilizer: float = 1e-6, use_bias: bool = True, ones_input: bool = False) -> LinearRule:
    """z+ (alpha1-beta0): positive contributions only. ones_input: the paper's stem, a = 1."""
    if ones_input:
        return LinearRule("zplus-ones", (Group((Term("ones", positive, None),)),), stabilizer, use_bias)
    terms = (Term("pos", positive, positive), Term("neg", negative, None))
    return LinearRule("zplus", (Group(terms),), stabilizer, use_bias)


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> LinearRule:
    # alpha - beta = 1 up to rounding: 1.4 - 0.4 is 0.9999999999999999 in floating point.
    if alpha < 0 or beta < 0 or not math.isclose(alpha - beta, 1.0, rel_tol=0, abs_tol=1e-9):
        raise ValueError("alpha-beta needs alpha, beta >= 0 and alpha - beta = 1")
    positive_part = Group((Term("pos", positive, positive), Term("neg", negative, None)), coef=alpha)
    negative_part = Group((Term("pos", negative, negative), Term("neg", positive, None)), coef=-beta)
    return LinearRule("alpha-beta", (positive_part, negative_part), stabilizer,
                      params=(("alpha", alpha), ("beta", beta)))


def _more_positive(a: np.ndarray, gamma: float) -> np.ndarray:
    return (a + gamma * np.maximum(a, 0)).astype(a.dtype)


def _more_negative(a: np.ndarray, gamma: float) -> np.ndarray:
    return (a + gamma * np.minimum(a, 0)).astype(a.dtype)


def gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> LinearRule:
    """Generalised gamma: favour positive contributions where the output is positive, and vice versa."""
    # partials of module-level functions, not closures: a rule pickles and fingerprints as data
    more_positive, more_negative = partial(_more_positive, gamma=gamma), partial(_more_negative, gamma=gamma)
    up = Group((Term("pos", more_positive, more_positive), Term("neg", more_negative, None)), gate="positive")
    down = Group((Term("pos", more_negative, more_negative), Term("neg", more_positive, None)), gate="negative")
    return LinearRule("gamma", (up, down), stabilizer, params=(("gamma", gamma),))


def flat(stabilizer: float = 1e-6) -> LinearRule:
    """Flat: relevance spread uniformly over each output's receptive field."""
    return LinearRule("flat", (Group((Term("ones", ones, None),)),), stabilizer)


def wsquare(stabilizer: float = 1e-6) -> LinearRule:
    return LinearRule("w2", (Group((Term("ones", square, square),)),), stabilizer)


#: the fallback rules a LinearRule's stabiliser share can go by: input-independent, so they
#: never vanish where the window has weights
FALLBACKS = {"w2": replace(wsquare(), use_bias=False), "flat": flat()}  # no bias: it would take a share again


def with_fallback(rule: LinearRule, fallback: str = "w2") -> LinearRule:
    """`rule`, with the relevance its stabiliser would absorb sent to the window by the w^2 (or
    flat) rule: conserving where the rule's denominators vanish."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback '{fallback}'; choose one of {', '.join(FALLBACKS)}")
    return replace(rule, fallback=fallback)


def zbox(stabilizer: float = 1e-6) -> LinearRule:
    """z^B for bounded inputs; the bounds come from the preprocessing (RuleContext.bounds)."""
    terms = (
        Term("x", identity, identity),
        Term("low", positive, positive, sign=-1.0),
        Term("high", negative, negative, sign=-1.0),
    )
    return LinearRule("zbox", (Group(terms),), stabilizer)


def avg2x2(stabilizer: float = 1e-5) -> LinearRule:
    """The paper's MaxPool rule: relevance as through a 2x2 average pool with stride 2."""
    return LinearRule("avg2x2", (Group((Term("x", identity, identity),)),), stabilizer, view="avg2x2")


#: the rules a text spec can name (the CLI's --rule), by name: factories take their parameters
FACTORIES: dict[str, Callable[..., Rule]] = {
    "epsilon": epsilon, "norm": norm, "zplus": zplus, "alpha_beta": alpha_beta, "gamma": gamma, "flat": flat,
    "w2": wsquare, "wsquare": wsquare, "zbox": zbox, "avg2x2": avg2x2,
    "pass": lambda: PASS, "gradient": lambda: GRADIENT, "guided": lambda: GUIDED, "gate": lambda: GATE,
}


def parse(spec: str) -> tuple[str, Rule]:
    """'KEY=RULE(ARGS)' -> (KEY, the rule): KEY a node name or an op type, RULE one of FACTORIES
    with numbers as arguments, by position or name (`Conv=epsilon(0.25)`, `/layer4/Conv=gamma(
    gamma=0.1)`, `Conv=zplus(fallback=flat)`: a LinearRule's fallback). A ValueError says what
    is wrong with the spec."""
    import ast

    key, _, text = spec.partition("=")  # the first '=': node names hold none, arguments may
    if not key or not text:
        raise ValueError(f"'{spec}' is not NODE_OR_OP_TYPE=RULE(ARGS), e.g. Conv=epsilon(0.25)")
    if text.strip() in FACTORIES:  # a bare name (pass is a Python keyword, so not a call)
        return key.strip(), FACTORIES[text.strip()]()
    try:
        tree = ast.parse(text.strip() if "(" in text else f"{text.strip()}()", mode="eval").body
    except SyntaxError:
        raise ValueError(f"'{text}' is not RULE(ARGS)") from None
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name) or tree.func.id not in FACTORIES:
        raise ValueError(f"'{text}': unknown rule; choose one of {', '.join(FACTORIES)}")

    def value(node, word: bool = False):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
            return node.value
        if word and isinstance(node, (ast.Name, ast.Constant)):  # fallback=flat or fallback="flat"
            return node.id if isinstance(node, ast.Name) else str(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        raise ValueError(f"'{text}': arguments must be numbers")

    args = [value(a) for a in tree.args]
    kwargs = {k.arg: value(k.value, word=k.arg == "fallback") for k in tree.keywords}
    fallback = kwargs.pop("fallback", None)
    try:
        rule = FACTORIES[tree.func.id](*args, **kwargs)
        if fallback is not None:
            if not isinstance(rule, LinearRule):
                raise ValueError(f"{tree.func.id} takes no fallback")
            rule = with_fallback(rule, str(fallback))
    except TypeError as exc:
        raise ValueError(f"'{text}': {exc}") from None
    return key.strip(), rule
