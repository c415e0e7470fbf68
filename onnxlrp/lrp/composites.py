"""Presets: which rule each op gets, as small tables (Zennit calls them composites).

A preset maps op families (onnxlrp.ir.opinfo.Family, declared by each adapter, as Zennit's
composites map zennit.types) to rules, and, separately and before them, ONNX op types and
variants (a grouped convolution); a separate map gives the *first* layer its rule: the
first op, in topological order, whose family is in that map (as Zennit's
SpecialFirstLayerMapComposite does in module order). Ops a preset does not name get
their op's default (ReLU and BatchNorm pass, reshapes and MaxPool take the gradient);
residual merges get the chosen Relevance Splitting. Overrides (Options.rules, ``--rule``)
name an op type or a node and come before all of them.

The Zennit-named presets mean what Zennit 1.0's composites of the same name mean.
``paper`` is the published implementation of Otsuki et al. (ECCV 2024), variant (iv).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping

from . import rules as R
from ..errors import NoRuleError, SettingError
from ..ir.graph import ModelGraph
from ..ir.opinfo import Family
from .rules import Rule
from .splitting import Split

DEFAULTS: dict[str, Rule] = {"pass": R.PASS, "gradient": R.GRADIENT, "gate": R.GATE, "proportional": R.PROPORTIONAL}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    families: Mapping[Family, Rule]  # op family -> rule
    first: Mapping[Family, Rule] = field(default_factory=dict)  # op family -> rule for the first such op
    initial: str = "logit"  # the target's "logit", its softmax "probability", or "one" (gradients)
    fold_batchnorm: bool = True
    split: str = "ratio"
    include_identity: bool = True
    fallback: Rule | None = None  # rule for ops the tables do not name (default: the op's own)
    layers: Mapping[str, Rule] = field(default_factory=dict)  # op type -> rule, before `families`
    variants: Mapping[str, Rule] = field(default_factory=dict)  # Op.variant -> rule, before `layers`

    def assign(self, graph: ModelGraph, split: Split, overrides: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
        """The rule for every op of the graph, by node name. Overrides key by node name or op type."""
        overrides = overrides or {}
        _check_keys(graph, overrides)
        assigned: dict[str, Rule] = {}
        # The first layer is a property of the graph, not of the overrides: an override that
        # takes it (by name or op type) takes it away from the preset, and no other op inherits it.
        first = next((name for name, op in graph.ops.items() if op.family in self.first), None)
        for name, op in graph.ops.items():
            op_type = op.node.op
            if op.kind == "merge":
                rule = split
            elif name in overrides or op_type in overrides:
                rule = overrides.get(name, overrides.get(op_type))
            elif name == first:
                rule = self.first[op.family]
            elif op.variant in self.variants:
                rule = self.variants[op.variant]
            elif op_type in self.layers and not self.layers[op_type].applies_to(op):
                # Add/Sub/Mul/Div are several kinds of op (constant arithmetic, a merge, a gate):
                # a table's rule for the op type serves those it applies to, the others get their default
                rule = self.layers[op_type]
            elif op.family in self.families and not self.families[op.family].applies_to(op):
                # as for op types: a rule a member of the family cannot take leaves it its default
                rule = self.families[op.family]
            elif self.fallback is not None:
                rule = self.fallback
            elif op.default_rule in DEFAULTS:
                rule = DEFAULTS[op.default_rule]
            else:
                raise NoRuleError(f"{op.path}: node '{name}' ({op_type}): preset '{self.name}' has no rule for {op_type}")
            why_not = rule.applies_to(op)
            if why_not:
                raise NoRuleError(f"{op.path}: node '{name}' ({op_type}): rule {rule.describe()} does not apply: {why_not}")
            assigned[name] = rule
        return assigned


def _check_keys(graph: ModelGraph, overrides: Mapping[str, Rule]) -> None:
    """Every override names a node of the graph or an op type onnxlrp knows: a key that matches
    nothing (a torch module name, a typo) would silently leave the preset's rule in place. (An
    op type the graph lacks is fine: one table of overrides serves many models.)"""
    from .ops import OP_TYPES

    names = list(graph.ops)
    op_types = sorted({op.node.op for op in graph.ops.values()})
    for key in overrides:
        if key in graph.ops or key in OP_TYPES:
            continue
        path = next(iter(graph.ops.values())).path if graph.ops else "model"
        near = _closest(key, names) or _closest(key, op_types)
        hint = f"; closest: {', '.join(near)}" if near else "; onnxlrp graph lists the nodes and op types"
        raise SettingError(f"{path}: rule override '{key}' matches no node name or op type of the graph{hint}")


def _closest(key: str, candidates: list[str], n: int = 3) -> list[str]:
    """Names that contain the key once '.' and '/' are read alike (torch's 'layer4.0.conv1' is the
    exporter's '/layer4/layer4.0/conv1/Conv'), else the most similar ones."""
    def plain(text: str) -> str:
        return text.lower().replace("/", ".").strip(".")

    containing = [c for c in candidates if plain(key) in plain(c)]
    return containing[:n] or difflib.get_close_matches(key, candidates, n=n, cutoff=0.5)


def _zennit_families(conv: Rule, stabilizer: float = 1e-6, epsilon: float = 1e-6) -> dict[Family, Rule]:
    """Zennit's layer map: the conv rule, Epsilon for dense layers, Norm for average pools."""
    dense, pool = R.epsilon(epsilon), R.norm(stabilizer)
    return {
        Family.CONVOLUTION: conv,
        Family.DENSE: dense,
        Family.AVERAGE_POOLING: pool,
        Family.GLOBAL_POOLING: pool,
        Family.MAX_POOLING: R.GRADIENT,
        Family.BATCH_NORM: R.PASS,
        Family.ACTIVATION: R.PASS,
        # ReLU6 and Hardtanh (Clip, as torch exports them), Sigmoid: Zennit's Pass for every
        # activation, so the relevance of a unit held at its cap goes on (its gradient there is zero)
        Family.BOUNDED_ACTIVATION: R.PASS,
        # normalisations with sigma held constant: affine layers, epsilon as for dense layers
        Family.NORMALISATION: dense,
    }


def _handing_on(families: dict[Family, Rule], fallback: str = "flat") -> dict[Family, Rule]:
    """The same table, each linear rule handing on its stabiliser's share by `fallback`."""
    return {family: R.with_fallback(rule, fallback) if isinstance(rule, R.LinearRule) else rule
            for family, rule in families.items()}


_PAPER_EPS = 1e-5
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "epsilon-plus-flat",
            "Zennit EpsilonPlusFlat: flat first layer, z+ convs, epsilon dense",
            _zennit_families(R.zplus()),
            first={Family.CONVOLUTION: R.flat(), Family.DENSE: R.flat()},
        ),
        Preset(
            "epsilon-plus-flat-conserve",
            "epsilon-plus-flat, with the share of relevance every layer's stabiliser would absorb handed "
            "on by the flat rule: conserves without biases where denominators vanish (depthwise convs)",
            _handing_on(_zennit_families(R.zplus())),
            first={Family.CONVOLUTION: R.flat(), Family.DENSE: R.flat()},
        ),
        Preset(
            "epsilon-gamma-box",
            "Zennit EpsilonGammaBox: z^B first conv, gamma=0.25 convs, epsilon dense",
            _zennit_families(R.gamma(0.25)),
            first={Family.CONVOLUTION: R.zbox()},
        ),
        Preset(
            "epsilon-alpha2-beta1",
            "Zennit EpsilonAlpha2Beta1: alpha2-beta1 on every conv (the first too), epsilon dense",
            _zennit_families(R.alpha_beta(2.0, 1.0)),
        ),
        Preset(
            "epsilon",
            "LRP-epsilon (1e-6) on every conv and dense layer, normalisation and constant arithmetic "
            "(a bias added on its own, a scale)",
            {**_zennit_families(R.epsilon()), Family.AFFINE: R.epsilon()},
            # a Clip by its gradient, as LRP-0 (gradient x input) has it: epsilon is LRP-0 stabilised
            layers={"Clip": R.GRADIENT},
        ),
        Preset(
            "paper",
            "Otsuki et al. ECCV 2024, variant (iv): z+ (eps 1e-5, no bias), stem with a = 1, "
            "MaxPool as 2x2 average, BatchNorm passes, ratio split, softmax probability",
            {
                Family.CONVOLUTION: R.zplus(_PAPER_EPS, use_bias=False),
                Family.DENSE: R.zplus(_PAPER_EPS, use_bias=False),
                Family.MAX_POOLING: R.avg2x2(_PAPER_EPS),
                Family.AVERAGE_POOLING: R.norm(_PAPER_EPS),
                Family.GLOBAL_POOLING: R.norm(_PAPER_EPS),
                Family.NORMALISATION: R.epsilon(_PAPER_EPS),
                Family.BATCH_NORM: R.PASS,
                Family.ACTIVATION: R.PASS,
            },
            first={Family.CONVOLUTION: R.zplus(_PAPER_EPS, use_bias=False, ones_input=True)},
            initial="probability",
            fold_batchnorm=False,
        ),
        Preset(
            "captum",
            "LRP as Captum applies it by default: epsilon 1e-9 on every layer (BatchNorm too), no "
            "Relevance Splitting (both branches of a merge get all relevance, as the gradient of +)",
            {**{family: R.epsilon(1e-9) for family in (Family.CONVOLUTION, Family.DENSE, Family.AVERAGE_POOLING,
                                                       Family.GLOBAL_POOLING, Family.BATCH_NORM, Family.NORMALISATION)},
             Family.MAX_POOLING: R.GRADIENT, Family.ACTIVATION: R.PASS},  # epsilon on a max is its winner-take-all
            fold_batchnorm=False,
            split="copy",
        ),
        # Baselines computed by the same machinery: every op's transpose is its vector-Jacobian product.
        Preset("gradient", "the gradient of the target logit (vanilla saliency)", {},
               initial="one", split="copy", fallback=R.GRADIENT),
        Preset("guided-backprop", "guided backpropagation: ReLUs pass positive gradients only", {},
               layers={"Relu": R.GUIDED}, initial="one", split="copy", fallback=R.GRADIENT),
    )
}

#: The paper's ablation variants (Table 2): (split, include_identity).
PAPER_VARIANTS = {
    "i": ("symmetric", False),
    "ii": ("symmetric", True),
    "iii": ("ratio", False),
    "iv": ("ratio", True),
}


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise SettingError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}") from None
