"""Canonicalisation passes (onnxlrp/canonizers.py), each checked three ways: the canonical graph
has the expected form, the explainer's logits are onnxruntime's own output of the original model,
and the relevance is that of a closed form or of a twin model written in canonical form by hand.

Tolerances on forward values come from an error bound, not from observed error. A float32 sum of
n products is within ~n*u * sum|terms| of the exact sum (u = 2^-24, the float32 unit roundoff).
In a net of linear ops, ReLUs and pools, the *magnitude net* -- every constant replaced by its
absolute value (Sub by Add), run on |x| -- is >= sum|terms| at every layer. So a float32 forward
pass of `depth` rounding stages of at most `terms` terms each is within depth * terms * u *
magnitude of the exact value (to first order), whatever the summation order a kernel picks.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import tiny_graphs as tg
from onnxlrp import Explainer, OnnxLrpError, analyse
from onnxlrp import rules as R

U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff, 2^-24


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def magnitude(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The magnitude net's output: an upper bound on sum|terms| of every output (see the module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(np.abs(values), init.name))
    for node in m.graph.node:
        if node.op_type == "Sub":
            node.op_type = "Add"
        for attr in node.attribute:
            if attr.name in ("alpha", "beta"):
                attr.f = abs(attr.f)
    return run_ort(m, np.abs(x))


def assert_forward_close(got, want, model, x, depth: int, terms: int) -> None:
    """got and want: two float32 evaluations of `model` at x. Each is within depth * terms * u *
    magnitude of the exact value; allow twice that for each (first-order slack), so 4x in all."""
    bound = 4 * depth * terms * U * magnitude(model, x)
    assert got.shape == want.shape
    excess = np.abs(got - want) - bound
    assert np.all(excess <= 0), f"forward differs by {np.abs(got - want).max()} (bound {bound.max()})"


def save(model: onnx.ModelProto, tmp_path, name: str):
    return tg.save(model, tmp_path / f"{name}.onnx")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message.strip(), message
    return message


# ---------------------------------------------------------------------------------------------
# 1, 2. Gemm: alpha and beta folded into W and C; the shapes C may have

DENSE_RNG = np.random.RandomState(11)
W = (DENSE_RNG.randn(5, 12) * 0.5).astype(np.float32)  # [outputs, inputs], as transB=1 stores it
C = (DENSE_RNG.randn(5) * 0.5).astype(np.float32)
X_DENSE = DENSE_RNG.randn(3, 3, 2, 2).astype(np.float32)  # 12 features
ALPHA, BETA = 1.3, -0.6  # not powers of two: scaling W and C rounds


def gemm_model(trans_b: int, bias: str = "[N]", alpha=ALPHA, beta=BETA, batch="N") -> onnx.ModelProto:
    """Flatten -> Gemm 'fc'; bias: the shape C is given in, "none" (no input) or "empty" (input '')."""
    b = tg.Builder()
    flat = b.op("Flatten", ["x"], name="flat", axis=1)
    weight = W if trans_b else np.ascontiguousarray(W.T)
    inputs = [flat, b.const(weight)]
    if bias == "[N]":
        inputs.append(b.const(C))
    elif bias == "[1, N]":
        inputs.append(b.const(C.reshape(1, -1)))
    elif bias == "scalar":
        inputs.append(b.const(C[:1].reshape(())))
    elif bias == "empty":
        inputs.append("")
    out = b.op("Gemm", inputs, name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return b.model(out, input_shape=(batch, 3, 2, 2))


def effective_bias(bias: str) -> np.ndarray:
    """beta * C broadcast to one value per output, float64."""
    c = {"[N]": C, "[1, N]": C, "scalar": np.full(5, C[0]), "none": np.zeros(5), "empty": np.zeros(5)}[bias]
    return BETA * c.astype(np.float64)


def lrp0_dense(x: np.ndarray, w_eff: np.ndarray, b_eff: np.ndarray, targets: np.ndarray, bias: bool):
    """LRP-0 of one dense layer z = W x + b, float64 (as tests/test_rules.py expected('epsilon')):
    R_i = x_i W[t, i] * logit_t / z_t, with z_t = the logit when the rule keeps the bias.
    Also the tolerance for each image: the float32 ratio logit_t / z_t is off by at most
    (12 + 2) u * (sum|terms| / |z|) for each of the two sums, and the product x_i W_ti R/z adds
    3 roundings (fl(alpha W) one more); 4x that, so it holds whatever order the sums take."""
    x64 = x.reshape(len(x), -1).astype(np.float64)
    rows = np.arange(len(x))
    logit = (x64 @ w_eff.T + b_eff)[rows, targets]
    used = b_eff if bias else 0.0
    z = (x64 @ w_eff.T + used)[rows, targets]
    size = np.abs(x64) @ np.abs(w_eff).T + np.abs(b_eff)
    cond = size[rows, targets] * (1 / np.abs(z) + 1 / np.abs(logit))
    relevance = x64 * w_eff[targets] * (logit / z)[:, None]
    rtol = 4 * ((x64.shape[1] + 2) * U * cond + 4 * U)
    return relevance, rtol


def assert_lrp0(result, x, w_eff, b_eff, targets, bias):
    want, rtol = lrp0_dense(x, w_eff, b_eff, targets, bias)
    got = result.relevance.reshape(len(x), -1)
    assert np.all(np.abs(got - want) <= rtol[:, None] * np.abs(want)), np.abs(got - want).max()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_alpha_beta_are_folded(trans_b, bias, tmp_path):
    model = gemm_model(trans_b)
    path = save(model, tmp_path, "gemm")
    gemm = analyse(path).graph.ops["fc"].node
    assert gemm.attrs.get("alpha", 1.0) == 1.0 and gemm.attrs.get("beta", 1.0) == 1.0
    w_eff, b_eff = ALPHA * W.astype(np.float64), effective_bias("[N]")
    x64 = X_DENSE.reshape(len(X_DENSE), -1).astype(np.float64)
    targets = np.argmax(np.abs(x64 @ w_eff.T + b_eff), axis=1)  # the largest |logit|: a well-conditioned ratio
    result = Explainer(path, rules={"Gemm": R.epsilon(0.0)}, bias=bias).explain(X_DENSE, target=targets)
    # one Gemm of 12 terms (+ the alpha and beta products): 2 rounding stages of <= 14 terms
    assert_forward_close(result.logits, run_ort(model, X_DENSE), model, X_DENSE, depth=2, terms=14)
    assert_lrp0(result, X_DENSE, w_eff, b_eff, targets, bias)


@pytest.mark.parametrize("bias", ["[1, N]", "scalar", "none", "empty"])
def test_gemm_bias_shapes(bias, tmp_path):
    """C of shape [1, N] (or a scalar) broadcasts like [N]; without C, beta scales nothing and
    must not stop the explanation (no C, or the empty optional input '')."""
    model = gemm_model(1, bias)
    reference = Explainer(save(gemm_model(1, "[N]"), tmp_path, "n"), rules={"Gemm": R.epsilon(0.0)})
    explainer = Explainer(save(model, tmp_path, "gemm"), rules={"Gemm": R.epsilon(0.0)})
    w_eff, b_eff = ALPHA * W.astype(np.float64), effective_bias(bias)
    x64 = X_DENSE.reshape(len(X_DENSE), -1).astype(np.float64)
    targets = np.argmax(np.abs(x64 @ w_eff.T + b_eff), axis=1)
    result = explainer.explain(X_DENSE, target=targets)
    assert_forward_close(result.logits, run_ort(model, X_DENSE), model, X_DENSE, depth=2, terms=14)
    assert_lrp0(result, X_DENSE, w_eff, b_eff, targets, bias=True)
    if bias == "[1, N]":  # explains like [N]: both within the closed form's bound, checked against each other
        same = reference.explain(X_DENSE, target=targets)
        _, rtol = lrp0_dense(X_DENSE, w_eff, b_eff, targets, True)
        np.testing.assert_array_equal(same.targets, result.targets)
        assert np.all(np.abs(same.relevance - result.relevance).reshape(len(X_DENSE), -1)
                      <= 2 * rtol[:, None] * np.abs(same.relevance).reshape(len(X_DENSE), -1))


def test_gemm_bias_per_batch_row_is_an_error(tmp_path):
    model = gemm_model(1, "none", batch=2)  # a fixed batch of 2, so C of shape [2, N] is valid ONNX
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    model.graph.initializer.append(numpy_helper.from_array(np.stack([C, -C]), "per_row"))
    gemm.input.append("per_row")
    onnx.checker.check_model(model)
    run_ort(model, X_DENSE[:2])  # onnxruntime runs it
    with pytest.raises(OnnxLrpError) as exc:
        analyse(save(model, tmp_path, "rows"))
    assert "node 'fc' (Gemm)" in one_line(exc) and "[2, 5]" in str(exc.value)


def batch_scaled(b: tg.Builder, values: np.ndarray) -> str:
    """values * batch size: computed at run time (the batch is dynamic), but not from the image values."""
    shape = b.op("Shape", ["x"], name="shape")
    size = b.op("Gather", [shape, b.const(np.array(0, np.int64))], name="batch")
    return b.op("Mul", [b.const(values), b.op("Cast", [size], name="batch_f", to=TensorProto.FLOAT)], name="scaled")


def test_gemm_with_computed_parameters_is_an_error(tmp_path):
    b = tg.Builder()
    flat = b.op("Flatten", ["x"], name="flat", axis=1)
    out = b.op("Gemm", [flat, batch_scaled(b, W)], name="fc", transB=1, alpha=ALPHA)
    with pytest.raises(OnnxLrpError, match=r"node 'fc' \(Gemm\): its weights are computed at run time") as exc:
        analyse(save(b.model(out, input_shape=("N", 3, 2, 2)), tmp_path, "w"))
    one_line(exc)
    b = tg.Builder()
    flat = b.op("Flatten", ["x"], name="flat", axis=1)
    out = b.op("Gemm", [flat, b.const(W), batch_scaled(b, C)], name="fc", transB=1, beta=BETA)
    with pytest.raises(OnnxLrpError, match=r"node 'fc' \(Gemm\): .*bias") as exc:
        analyse(save(b.model(out, input_shape=("N", 3, 2, 2)), tmp_path, "c"))
    one_line(exc)


# ---------------------------------------------------------------------------------------------
# 3. auto_pad resolved into explicit pads

SIZE = (7, 8)  # odd height, even width: symmetric and one-sided SAME padding
X_WINDOW = np.random.RandomState(12).randn(2, 3, *SIZE).astype(np.float32)


def spec_pads(mode: str, sizes, kernel, strides) -> list[int]:
    """Explicit pads for auto_pad, from the ONNX Conv / MaxPool / AveragePool operator spec: SAME_*
    keeps output = ceil(input / stride), padding (output - 1) * stride + kernel - input in all,
    split evenly, the odd one at the end (SAME_UPPER) or the beginning (SAME_LOWER). VALID: none."""
    begins, ends = [], []
    for n, k, s in zip(sizes, kernel, strides):
        total = 0 if mode == "VALID" else max(0, (-(-n // s) - 1) * s + k - n)
        begins.append(total // 2 + (total % 2 if mode == "SAME_LOWER" else 0))
        ends.append(total // 2 + (total % 2 if mode == "SAME_UPPER" else 0))
    return begins + ends


def window_model(op: str, mode: str, explicit: bool) -> tuple[onnx.ModelProto, list[list[int]]]:
    """Stride-2 3x3 windows with auto_pad=mode, or (explicit) its twin with the spec's pads.
    Conv: two such convs ('win1' on 7x8, 'win2' on what it gives). Pools: a padded 3x3 stem conv,
    ReLU, then the pool 'win1'. Returns the model and each window's explicit pads."""
    rng = np.random.RandomState(13)
    b = tg.Builder()
    window = dict(kernel_shape=[3, 3], strides=[2, 2])
    pads, sizes, x = [], list(SIZE), "x"

    def padding():
        p = spec_pads(mode, sizes, [3, 3], [2, 2])
        pads.append(p)
        sizes[:] = [(n + p[i] + p[i + 2] - 3) // 2 + 1 for i, n in enumerate(sizes)]
        return dict(pads=p) if explicit else dict(auto_pad=mode)

    if op == "Conv":
        for i, cin in enumerate((3, 4)):
            w, bias = (rng.randn(4, cin, 3, 3) * 0.5).astype(np.float32), (rng.randn(4) * 0.1).astype(np.float32)
            x = b.op("Relu", [b.op("Conv", [x, b.const(w), b.const(bias)], name=f"win{i + 1}", **window, **padding())])
    else:
        w = (rng.randn(4, 3, 3, 3) * 0.5).astype(np.float32)
        x = b.op("Relu", [b.op("Conv", [x, b.const(w)], name="stem", kernel_shape=[3, 3], pads=[1] * 4)])
        x = b.op(op, [x], name="win1", **window, **padding())
    head = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1),
                         b.const((rng.randn(5, 4) * 0.5).astype(np.float32))], name="fc", transB=1)
    return b.model(head, input_shape=("N", 3, *SIZE)), pads


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_auto_pad_is_resolved(op, mode, tmp_path):
    model, pads = window_model(op, mode, explicit=False)
    twin, _ = window_model(op, mode, explicit=True)
    path, twin_path = save(model, tmp_path, "auto"), save(twin, tmp_path, "twin")
    if mode != "VALID":  # the sizes were chosen so that SAME pads something, one-sided somewhere
        assert any(p[0] != p[2] or p[1] != p[3] for p in pads)
    for preset in ("epsilon-plus-flat", "epsilon-gamma-box"):
        explainer, reference = Explainer(path, preset=preset), Explainer(twin_path, preset=preset)
        if preset == "epsilon-plus-flat":
            ops = explainer.analysis.graph.ops
            for i, want in enumerate(pads):
                attrs = ops[f"win{i + 1}"].node.attrs
                assert attrs.get("auto_pad", "NOTSET") == "NOTSET" and list(attrs["pads"]) == want
        result, same = explainer.explain(X_WINDOW), reference.explain(X_WINDOW)
        # <= 6 rounding stages (2 convs or conv + pool, the mean, the dense layer) of <= 36 terms
        assert_forward_close(result.logits, run_ort(model, X_WINDOW), model, X_WINDOW, depth=6, terms=36)
        np.testing.assert_array_equal(result.targets, same.targets)
        # Both canonical graphs are the same computation (the pads checked above, the same weights),
        # run by the same onnxruntime kernels; 1e-5 of the largest relevance (~170 u) only leaves
        # room for a kernel that sums these short (<= 36-term) sums in another order.
        scale = np.abs(same.relevance).max()
        np.testing.assert_allclose(result.relevance, same.relevance, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------
# 4. Per-channel Sub / Div (and Mul / Add) after a conv folded into it

FOLD_RNG = np.random.RandomState(14)
W1 = (FOLD_RNG.randn(4, 3, 3, 3) * 0.5).astype(np.float32)
W2 = (FOLD_RNG.randn(4, 4, 3, 3) * 0.5).astype(np.float32)
B2 = (FOLD_RNG.randn(4) * 0.1).astype(np.float32)
MEAN = (FOLD_RNG.randn(4) * 0.3).astype(np.float32)
STD = (FOLD_RNG.rand(4) + 0.5).astype(np.float32)
GAMMA = np.array([1.2, -0.7, 0.9, 1.5], np.float32)  # one negative scale
BETA_BN = (FOLD_RNG.randn(4) * 0.2).astype(np.float32)
FC = (FOLD_RNG.randn(5, 4) * 0.5).astype(np.float32)
X_FOLD = FOLD_RNG.randn(2, 3, 8, 8).astype(np.float32)


def affine_model(kind: str) -> onnx.ModelProto:
    """stem conv -> ReLU -> 'conv2', then per kind:
    bn:          Sub(mean) -> Div(std) -> Mul(gamma) -> Add(beta), as tf2onnx writes an unfused BatchNorm
    twin:        nothing; conv2 has the folded weights and bias, computed here in float64
    const_minus: Sub(constant, conv2)   const_over: Div(constant, conv2)
    then ReLU -> global mean -> dense layer."""
    b = tg.Builder()
    x = b.op("Relu", [b.op("Conv", ["x", b.const(W1)], name="stem", kernel_shape=[3, 3], pads=[1] * 4)])
    w2, b2 = W2, B2
    if kind == "twin":
        scale = GAMMA.astype(np.float64) / STD
        w2 = (W2 * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        b2 = ((B2.astype(np.float64) - MEAN) * scale + BETA_BN).astype(np.float32)
    x = b.op("Conv", [x, b.const(w2), b.const(b2)], name="conv2", kernel_shape=[3, 3], pads=[1] * 4)
    if kind == "bn":  # the constants in several shapes that broadcast along the channels only
        x = b.op("Sub", [x, b.const(MEAN.reshape(4, 1, 1))], name="sub")
        x = b.op("Div", [x, b.const(STD.reshape(1, 4, 1, 1))], name="div")
        x = b.op("Mul", [x, b.const(GAMMA.reshape(1, 4, 1, 1))], name="mul")
        x = b.op("Add", [x, b.const(BETA_BN.reshape(4, 1, 1))], name="add")
    elif kind == "const_minus":
        x = b.op("Sub", [b.const(MEAN.reshape(4, 1, 1)), x], name="rsub")
    elif kind == "const_over":
        x = b.op("Div", [b.const(STD.reshape(4, 1, 1)), x], name="rdiv")
    x = b.op("Relu", [x])
    head = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), b.const(FC)], name="fc", transB=1)
    return b.model(head, input_shape=("N", 3, 8, 8))


def test_channel_affine_is_folded_into_the_conv(tmp_path):
    model = affine_model("bn")
    path, twin_path = save(model, tmp_path, "bn"), save(affine_model("twin"), tmp_path, "twin")
    analysis = analyse(path)
    assert analysis.graph.canonical.folded_batchnorms == 4
    assert not {"Sub", "Div", "Mul", "Add"} & {op.node.op for op in analysis.graph.ops.values()}
    # z+ (epsilon-plus-flat) and alpha-beta on conv2: sums of same-sign terms, so relevance is
    # well-conditioned in the weights. The folded constants differ from the twin's by a few float32
    # roundings (one per fold here, one in the twin: <= 6 u relative to each sum's magnitude);
    # carried through ~6 layers of <= 36-term positive sums that stays far below 1e-4 (~800 u)
    # of the largest relevance, while any wrong fold moves it by percent.
    for preset in ("epsilon-plus-flat", "epsilon-alpha2-beta1"):
        result = Explainer(path, preset=preset).explain(X_FOLD)
        same = Explainer(twin_path, preset=preset).explain(X_FOLD)
        # stem, conv2, 4 affine ops, mean, dense: 8 rounding stages of <= 36 terms
        assert_forward_close(result.logits, run_ort(model, X_FOLD), model, X_FOLD, depth=8, terms=36)
        np.testing.assert_array_equal(result.targets, same.targets)
        scale = np.abs(same.relevance).max()
        np.testing.assert_allclose(result.relevance, same.relevance, rtol=1e-4, atol=1e-4 * scale)


def test_constant_minus_conv_is_not_folded(tmp_path):
    """c - conv(x) is affine with scale -1: it stays an affine op, and the forward is unchanged."""
    model = affine_model("const_minus")
    path = save(model, tmp_path, "rsub")
    analysis = analyse(path)
    assert analysis.graph.canonical.folded_batchnorms == 0
    rsub = analysis.graph.ops["rsub"]
    assert rsub.kind == "affine" and float(rsub.weight) == -1.0
    result = Explainer(path).explain(X_FOLD)
    assert_forward_close(result.logits, run_ort(model, X_FOLD), model, X_FOLD, depth=5, terms=36)
    assert np.all(np.isfinite(result.relevance))


def test_constant_over_conv_is_an_error(tmp_path):
    """c / conv(x) is not linear in x: no fold (that would compute conv(x) / c), a one-line error."""
    model = affine_model("const_over")
    run_ort(model, X_FOLD)  # a valid model
    with pytest.raises(OnnxLrpError, match=r"node 'rdiv' \(Div\)") as exc:
        analyse(save(model, tmp_path, "rdiv"))
    one_line(exc)


# ---------------------------------------------------------------------------------------------
# 5. Node names made unique

def named_model(names: dict[int, str]) -> onnx.ModelProto:
    """conv, ReLU, conv, ReLU, mean, flatten, dense (7 data ops, indices 0..6), with the
    node names at the given indices replaced (by '' or by a name another node has)."""
    rng = np.random.RandomState(16)  # not tg.RNG: the weights must not depend on which tests ran before
    b = tg.Builder()
    x = "x"
    for i, cin in enumerate((3, 4)):
        w = (rng.randn(4, cin, 3, 3) * 0.5).astype(np.float32)
        x = b.op("Conv", [x, b.const(w)], name=f"conv{i + 1}", kernel_shape=[3, 3], pads=[1] * 4)
        x = b.op("Relu", [x], name=f"act{i + 1}")
    b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [x], name="mean")], name="flat", axis=1),
                  b.const((rng.randn(5, 4) * 0.5).astype(np.float32))], name="fc", transB=1)
    for index, name in names.items():
        b.nodes[index].name = name
    return b.model(b.nodes[-1].output[0])


@pytest.mark.parametrize("names", [
    {0: "Relu_1", 1: ""},  # the name generated for node 1 is taken by the node before it
    {1: "", 3: "Relu_1"},  # ... by a node after it, which must keep its name
    {1: "", 3: "Relu_1", 0: "Relu_1_1"},  # and so is the first fallback
    {1: "act", 3: "act"},  # two nodes of one name
    {1: "", 3: ""},  # several unnamed
], ids=["taken-earlier", "taken-later", "taken-twice", "duplicate", "unnamed"])
def test_node_names_are_made_unique(names, tmp_path):
    model = named_model(names)
    path = save(model, tmp_path, "named")
    ops = analyse(path).graph.ops
    assert [op.node.op for op in ops.values()] == ["Conv", "Relu", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert len({op.node.name for op in ops.values()}) == 7
    assert list(ops) == [op.node.name for op in ops.values()]
    for index, name in sorted(names.items()):  # a non-empty name keeps it at its first node
        if name and all(names[i] != name for i in names if i < index):
            assert list(ops)[index] == name
    x = np.random.RandomState(15).randn(2, 3, 16, 16).astype(np.float32)
    result = Explainer(path).explain(x)
    renamed = onnx.ModelProto()  # onnxruntime refuses two nodes of one name: run a renamed copy
    renamed.CopyFrom(model)
    for i, node in enumerate(renamed.graph.node):
        node.name = f"node{i}"
    # two 3x3 convs (27 and 36 terms), mean, dense: 5 rounding stages of <= 256 terms (the mean)
    assert_forward_close(result.logits, run_ort(renamed, x), renamed, x, depth=5, terms=256)
    assert np.all(np.isfinite(result.relevance))
