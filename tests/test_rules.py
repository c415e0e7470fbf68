"""Closed-form checks: each rule on a single dense layer, each split on a single merge.

The expected values are the rules' textbook formulas written out in numpy, not a
re-run of onnxlrp's recipes.
"""
import numpy as np
import pytest

import float32_bounds
import tiny_graphs as tg
from conftest import relative_error
from onnxlrp import Explainer
from onnxlrp import rules as R

X = np.array([[[[0.5, -1.0]], [[2.0, 0.0]], [[-0.3, 1.5]]]], np.float32)  # [1, 3, 1, 2]: 6 features
W = np.array([[0.4, -0.2, 0.3, 0.1, -0.5, 0.2],
              [-0.3, 0.5, 0.2, -0.4, 0.1, 0.3],
              [0.2, 0.1, -0.6, 0.5, 0.3, -0.1]], np.float32)
B = np.array([0.05, -0.2, 0.1], np.float32)
EPS = 1e-6
U = float32_bounds.U


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    b = tg.Builder()
    flat = b.op("Flatten", ["x"], axis=1)
    logits = b.op("Gemm", [flat, b.const(W), b.const(B)], name="fc", transB=1)
    return tg.save(b.model(logits, input_shape=("N", 3, 1, 2)), tmp_path_factory.mktemp("dense") / "dense.onnx")


def stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def pos(a):
    return np.maximum(a, 0)


def neg(a):
    return np.minimum(a, 0)


def expected(rule: str, x: np.ndarray, target: int, bias: bool = True, W=W, B=B) -> np.ndarray:
    """R_i for one dense layer z = W x + b, relevance z_t at the target output only."""
    r = np.zeros(len(W))
    r[target] = (W @ x + B)[target]  # the model's logit: its bias counts whatever the rules do
    b = B if bias else np.zeros_like(B)
    z = W @ x + b
    if rule == "epsilon":
        return x * (W.T @ (r / stab(z)))
    if rule == "zplus":
        zp = pos(W) @ pos(x) + neg(W) @ neg(x) + pos(b)
        s = r / stab(zp)
        return pos(x) * (pos(W).T @ s) + neg(x) * (neg(W).T @ s)
    if rule == "alpha-beta":  # alpha 2, beta 1
        zp = pos(W) @ pos(x) + neg(W) @ neg(x) + pos(b)
        zn = neg(W) @ pos(x) + pos(W) @ neg(x) + neg(b)
        sp, sn = r / stab(zp), r / stab(zn)
        return 2 * (pos(x) * (pos(W).T @ sp) + neg(x) * (neg(W).T @ sp)) - (pos(x) * (neg(W).T @ sn) + neg(x) * (pos(W).T @ sn))
    if rule == "gamma":  # gamma 0.25, the output's sign selects the positive or the negative part
        g = 0.25
        wu, wd = W + g * pos(W), W + g * neg(W)
        bu, bd = b + g * pos(b), b + g * neg(b)
        up = r * (z > 0) / stab(wu @ pos(x) + bu + wd @ neg(x))
        down = r * (z < 0) / stab(wd @ pos(x) + bd + wu @ neg(x))
        return pos(x) * (wu.T @ up) + neg(x) * (wd.T @ up) + pos(x) * (wd.T @ down) + neg(x) * (wu.T @ down)
    if rule == "zplus-fallback":  # z+, and what its stabiliser takes, r eps / (z+ + eps), spread flat
        zp = pos(W) @ pos(x) + neg(W) @ neg(x) + pos(b)
        s = r / stab(zp)
        share = s * EPS
        return pos(x) * (pos(W).T @ s) + neg(x) * (neg(W).T @ s) + np.ones_like(W).T @ (share / stab(np.full_like(z, len(x))))
    if rule == "flat":
        return np.ones_like(x) * (np.ones_like(W).T @ (r / stab(np.full_like(z, len(x)))))
    if rule == "w2":
        return (W ** 2).T @ (r / stab((W ** 2).sum(axis=1) + b ** 2))
    if rule == "zbox":
        low, high = np.full_like(x, -1.0), np.full_like(x, 2.5)
        zb = z - (pos(W) @ low + pos(b)) - (neg(W) @ high + neg(b))
        s = r / stab(zb)
        return x * (W.T @ s) - low * (pos(W).T @ s) - high * (neg(W).T @ s)
    raise ValueError(rule)


RULES = {"epsilon": R.epsilon(), "zplus": R.zplus(), "alpha-beta": R.alpha_beta(2, 1), "gamma": R.gamma(0.25),
         "flat": R.flat(), "w2": R.wsquare(), "zbox": R.zbox(), "zplus-fallback": R.with_fallback(R.zplus(), "flat")}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("target", [0, 2])
def test_dense_rules_closed_form(dense, rule, target, bias):
    explainer = Explainer(dense, rules={"Gemm": RULES[rule]}, bias=bias, low=-1.0, high=2.5, preprocessing="raw")
    result = explainer.explain(X, target=target)
    x = X.reshape(-1).astype(np.float64)
    want = expected(rule, x, target, bias)
    error, bound = relative_error(result.relevance.reshape(-1), want), float32_bound(rule, x, target, bias)
    assert error <= bound, (error, bound)


def float32_bound(rule: str, x: np.ndarray, target: int, bias: bool) -> float:
    """How far float32 may land from the closed form here, from its float64 sensitivity
    (float32_bounds.py), at the worst-case size: each weight off by n u (n = 6 terms: the
    worst-case backward error of a 6-term sum, not the typical sqrt(n) u), the bias by u;
    MULTIPLE times the spread over SEEDS, plus 8 u for the roundings after the sums (quotient,
    product, the rule's two or three parts combined)."""
    want = expected(rule, x, target, bias)
    squares = []
    for seed in float32_bounds.SEEDS:
        rng = np.random.RandomState(seed)
        w, b = W * (1 + W.shape[1] * U * rng.randn(*W.shape)), B * (1 + U * rng.randn(*B.shape))
        squares.append(relative_error(expected(rule, x, target, bias, w, b), want) ** 2)
    return float32_bounds.MULTIPLE * float(np.sqrt(np.mean(squares))) + 8 * U


def test_lrp0_on_zero_denominator_gives_zero_not_nan(dense):
    x = np.zeros_like(X)  # z = b: bias-free z is exactly 0 everywhere
    result = Explainer(dense, rules={"Gemm": R.epsilon(0.0)}, bias=False).explain(x, target=1)
    assert np.all(np.isfinite(result.relevance)) and not result.relevance.any()


# One merge y = x + c * x (skip: identity; main: a constant scale), then a dense layer with the
# flat rule, so every element of y gets relevance R_t / 6 whatever its value.
C = np.array([2.0, -0.5, 0.5, 0.0, 3.0, 1.0], np.float32)
XM = np.array([1.0, 2.0, 0.0, -1.0, 0.5, 0.0], np.float32)  # zeros: 0/0 in the ratio split
Y = XM.astype(np.float64) * (1 + C)  # the merge's output


@pytest.fixture(scope="module")
def merge(tmp_path_factory):
    b = tg.Builder()
    main = b.op("Mul", ["x", b.const(C.reshape(1, 3, 1, 2))], name="scale")
    y = b.op("Add", ["x", main], name="merge")
    logits = b.op("Gemm", [b.op("Flatten", [y], axis=1), b.const(W), b.const(B)], name="fc", transB=1)
    return tg.save(b.model(logits, input_shape=("N", 3, 1, 2)), tmp_path_factory.mktemp("merge") / "merge.onnx")


@pytest.mark.parametrize("split, include_identity", [("ratio", True), ("symmetric", True), ("proportional", True), ("ratio", False)])
def test_split_closed_form(merge, split, include_identity):
    explainer = Explainer(merge, rules={"Gemm": R.flat()}, split=split, include_identity=include_identity)
    (m,) = explainer.merges
    assert (m.kind, m.skip, m.main_branch) == ("identity", "x", ("scale",))
    result = explainer.explain(XM.reshape(1, 3, 1, 2), target=0)
    per_element = result.initial[0] / (6 + EPS)
    if not include_identity:
        share = np.zeros(6)
    elif split == "ratio":  # |h_s| / (|h_s| + |h_m|), 1/2 where both are 0
        share = np.array([1 / 3, 2 / 3, 0.5, 1.0, 0.25, 0.5])
    elif split == "symmetric":
        share = np.full(6, 0.5)
    else:  # h_s / (y + eps sign y), y = h_s + h_m = (1 + c) x; 0 where y = 0 (then h_s = 0)
        share = XM / stab(Y)
    R_total, R_skip, R_main = result.merge_sums[0, 0]
    assert np.all(np.isfinite(result.relevance))
    main_share = C * XM / stab(Y) if split == "proportional" else 1 - share
    # Worst-case float32 rounding, counted: each element's relevance is one quotient of the flat
    # rule (u), its share and the product with it (<= 4u: y, y + eps, h / y, R x share), and a
    # total of 6 elements adds 5 roundings: 10u relative to the sum of magnitudes, so 10u times
    # the sum's cancellation (sum |share| / |sum share|; up to 5.8 for the proportional main
    # branch, which takes -1 of one element). Twice that, for an emitter that orders the same
    # operations differently.
    def rtol(shares):
        return 2 * 10 * U * np.abs(shares).sum() / abs(shares.sum())
    np.testing.assert_allclose(R_total, 6 * per_element, rtol=rtol(np.ones(6)))
    np.testing.assert_allclose(R_skip, share.sum() * per_element, rtol=rtol(share) if share.any() else 0, atol=0)
    np.testing.assert_allclose(R_main, main_share.sum() * per_element, rtol=rtol(main_share))


def test_alpha_beta_accepts_alpha_minus_beta_one_up_to_rounding():
    """1.4 - 0.4 is 0.9999999999999999 in floating point: still alpha - beta = 1."""
    rule = R.alpha_beta(1.4, 0.4)
    assert dict(rule.params) == {"alpha": 1.4, "beta": 0.4}
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        R.alpha_beta(1.5, 0.4)


def test_a_rule_override_that_matches_nothing_names_the_closest_nodes(resnet18):
    """A torch module name ('layer4.0.conv1', as a user of torchvision would write it) is no
    ONNX node name: it is an error naming the exporter's node, not an override ignored."""
    from onnxlrp.errors import OnnxLrpError

    with pytest.raises(OnnxLrpError, match=r"rule override 'layer4.0.conv1' matches no node.*closest: /layer4/layer4.0/conv1/Conv"):
        Explainer(resnet18.folded, rules={"layer4.0.conv1": R.epsilon(0.25)}, cache=False)
    with pytest.raises(OnnxLrpError, match=r"rule override 'Comv' matches no node.*closest: Conv"):
        Explainer(resnet18.folded, rules={"Comv": R.epsilon(0.25)}, cache=False)
    # a node name and an op type the graph lacks are both fine
    Explainer(resnet18.folded, rules={"/layer4/layer4.0/conv1/Conv": R.epsilon(0.25), "MatMul": R.epsilon()}, cache=False)


def test_the_fallback_hands_on_what_a_vanishing_denominator_would_lose(tmp_path):
    """z+ where no input contributes positively (x = 0, no bias: every z+ denominator is 0): z+
    alone loses the whole logit to its stabiliser; with the fallback it goes to the window by
    the flat rule, so the input gets all of it, evenly (its float32 sum of 6 equal terms is
    within sum_rtol(6) of the logit, plus the flat rule's own 1e-6 of the window count)."""
    b = tg.Builder()
    flat = b.op("Flatten", ["x"], axis=1)
    w = np.abs(W)  # positive weights: z+ = W+ x+ is 0 exactly where x is 0
    c = np.array([0.7, 0.4, 0.9], np.float32)  # logits = W x + c: 0.9 for class 2 at x = 0
    logits = b.op("Gemm", [flat, b.const(w), b.const(c)], name="fc", transB=1)
    path = tg.save(b.model(logits, input_shape=("N", 3, 1, 2)), tmp_path / "pos.onnx")
    x = np.zeros_like(X)
    lost = Explainer(path, rules={"Gemm": R.zplus()}, bias=False).explain(x, target=2)
    kept = Explainer(path, rules={"Gemm": R.with_fallback(R.zplus(), "flat")}, bias=False).explain(x, target=2)
    assert np.all(lost.relevance == 0)
    assert abs(kept.input_sum[0] - 0.9) <= 0.9 * (float32_bounds.sum_rtol(6) + 2e-7 + 8 * U)
    np.testing.assert_allclose(kept.relevance.reshape(-1), np.full(6, 0.15), rtol=8 * U + 2e-7)
