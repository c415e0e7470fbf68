"""Any ResNet from any framework: Keras/tf2onnx, timm, the dynamo exporter, VGG, fp16, opsets 13-21.

Committed fixtures (tests/fixtures) come from models/keras_fixtures.py and models/timm_fixtures.py;
PyTorch forms are exported here.
"""
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper, shape_inference
from torchvision.models.vgg import VGG, cfgs, make_layers
from typer.testing import CliRunner

import float32_bounds
from conftest import ROOT, relative_error
from models.export_torchvision import calibrate_batchnorm, export, randomize_batchnorm
from models.tiny_resnet import TinyResNet
from onnxlrp import Explainer, analyse
from onnxlrp import rules as R
from onnxlrp.cli import app

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

FIXTURES = ROOT / "tests" / "fixtures"
#: fixture -> (identity, projection, other) merges: what the architecture has
MERGES = {
    "keras_resnet50": (12, 4, 0),
    "keras_resnet101": (29, 4, 0),
    "keras_resnet50v2": (9, 4, 3),  # 3 shortcuts are a 1x1 stride-2 MaxPool
    "keras_small": (1, 1, 0),
    "keras_small_torch": (1, 1, 0),
    "timm_resnet18d": (4, 4, 0),  # ResNet-D: AvgPool + 1x1 conv on 3 strided shortcuts ("pooled" projections)
    "timm_resnet26d": (4, 4, 0),
    "timm_resnext26d_32x4d": (4, 4, 0),
    "timm_wide_resnet50_2": (12, 4, 0),
}
#: every rule conserves exactly whatever the weights: any loss is the graph handling's
FLAT = {op: R.flat() for op in ("Conv", "Gemm", "MatMul", "AveragePool", "GlobalAveragePool", "ReduceMean", "BatchNormalization")}


U, U16 = float32_bounds.U, 2.0 ** -11  # float32 and float16 unit roundoff
EPS = 1e-6  # every rule's stabiliser here


def batch(explainer, n=2, seed=0):
    return np.random.RandomState(seed).randn(n, *explainer.input_shape[1:]).astype(np.float32)


def largest_tensor(path) -> int:
    """Elements per image of the largest tensor in the graph (shape inference; batch excluded)."""
    graph = shape_inference.infer_shapes(onnx.load(str(path))).graph
    return max(math.prod(max(d.dim_value, 1) for d in v.type.tensor_type.shape.dim[1:])
               for v in list(graph.value_info) + list(graph.input) if v.type.tensor_type.shape.dim)


def weight_shapes(path) -> list[tuple[int, ...]]:
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits]


def flat_bounds(path) -> tuple[float, float]:
    """(per op, whole pass) relative bounds on what flat rules lose, whatever the weights.
    Per op: eps / (n + eps) < EPS in exact arithmetic, plus float32 rounding of the two totals
    compared and of each element's transposed sum: three sums of one sign (flat keeps the sign)
    of at most largest_tensor terms, each within sum_rtol. Whole pass: eps / n per layer, and
    every element's chain of transposed sums, independent roundings over all layers, so within
    sum_rtol of all their terms together (weights [O, I, ...]: fan-in and fan-out, both ways,
    bound the terms), plus a quotient per layer."""
    shapes = weight_shapes(path)
    terms = sum(math.prod(w) // w[0] + math.prod(w) // w[1] for w in shapes)
    leak = sum(EPS / (math.prod(w) // w[0]) for w in shapes) + EPS  # + pools, each n >= 4, all together < EPS
    per_op = 3 * float32_bounds.sum_rtol(largest_tensor(path)) + EPS
    return per_op, leak + float32_bounds.sum_rtol(terms) + len(shapes) * U


def perturbed_spread(path, x, size, folder, seeds=float32_bounds.SEEDS, **options) -> float:
    """RMS relative distance of our map on copies of the model whose float initializers carry
    relative Gaussian noise size(array) from our map on the model. With float16-sized noise
    (u16 = 2^-11 = 8192 u) float32 rounding is 1e-4 of what is measured: the spread is the
    problem's sensitivity, the same on any machine."""
    reference = Explainer(path, **options).explain(x).relevance
    squares = []
    for seed in seeds:
        model, rng = onnx.load(str(path)), np.random.RandomState(seed)
        for init in model.graph.initializer:
            a = numpy_helper.to_array(init)
            if a.dtype == np.float32 and a.size > 1:
                noisy = a * (1 + size(a) * rng.standard_normal(a.shape))
                init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
        onnx.save(model, str(folder / f"perturbed{seed}.onnx"))
        result = Explainer(folder / f"perturbed{seed}.onnx", cache=False, **options).explain(x).relevance
        squares.append(relative_error(result, reference) ** 2)
    return float(np.sqrt(np.mean(squares)))


@pytest.mark.parametrize("name", sorted(MERGES))
def test_fixture_merges(name):
    analysis = analyse(FIXTURES / f"{name}.onnx")
    kinds = Counter(m.kind for m in analysis.merges)
    assert (kinds["identity"], kinds["projection"], kinds["other"]) == MERGES[name]
    if name == "keras_resnet50v2":
        pooled = [m for m in analysis.merges if m.kind == "other"]
        assert all([analysis.graph.ops[n].node.op for n in m.skip_branch] == ["MaxPool"] for m in pooled)
    if name.startswith("timm") and "wide" not in name:
        pooled = [m for m in analysis.merges if m.detail == "pooled"]
        assert len(pooled) == 3 and all(m.kind == "projection" for m in pooled)
        assert all([analysis.graph.ops[n].node.op for n in m.skip_branch] == ["AveragePool", "Conv"] for m in pooled)


@pytest.mark.parametrize("name", sorted(MERGES))
def test_fixture_conserves_under_flat_rules(name):
    """Flat everywhere conserves whatever the weights: every op must hand on what it gets.
    The one exception is an explicit zero Pad before a MaxPool that could not be merged
    (ResNet50V2: its input can be negative): windows the padding wins give it relevance."""
    explainer = Explainer(FIXTURES / f"{name}.onnx", rules=FLAT, split="ratio", trace=True)
    result = explainer.explain(batch(explainer))
    ops = explainer.analysis.graph.ops
    pads = [n for n in explainer.trace_nodes if ops[n].node.op == "Pad"]
    per_op, whole = flat_bounds(FIXTURES / f"{name}.onnx")
    for image in range(2):
        for row in result.layer_report(image):
            if row["node"] not in pads:
                assert abs(row["absorbed"]) <= per_op, (row, per_op)
    if not pads:
        assert np.all(result.conservation_error <= whole), (result.conservation_error, whole)
    else:
        assert name == "keras_resnet50v2"


@pytest.mark.parametrize("name", sorted(MERGES))
def test_fixture_only_zplus_layers_absorb(name):
    """epsilon-plus-flat without biases: only z+ convs may absorb relevance (at units with no
    positive contribution, common in these 1/8-width fixtures); every other op conserves."""
    explainer = Explainer(FIXTURES / f"{name}.onnx", bias=False, trace=True)
    result = explainer.explain(batch(explainer))
    ops, rules = explainer.analysis.graph.ops, explainer.analysis.rules
    # What a conserving op may lose: its stabiliser's share, EPS / |z| (flat and norm: n >= 1;
    # the epsilon dense layer: the target's |z| >= 0.1 on these fixtures' images), plus the
    # float32 rounding of the two totals compared and of the op's own sums, as in flat_bounds
    # (relevance under z+ stays essentially of one sign: float64 Zennit's resnet maps have
    # sum |R| / |sum R| = 1 + 1e-7).
    bound = 3 * float32_bounds.sum_rtol(largest_tensor(FIXTURES / f"{name}.onnx")) + EPS / 0.1
    for row in result.layer_report(0):
        rule = rules[row["node"]]
        if getattr(rule, "name", "") != "zplus" and ops[row["node"]].node.op != "Pad":
            assert abs(row["absorbed"]) <= bound, (row, rule.describe(), bound)


def test_keras_and_torch_twins_give_the_same_heatmap():
    """keras_small (NHWC, tf2onnx, BatchNorm as Mul+Add after biased convs) and its PyTorch twin
    with copied weights (NCHW, BatchNormalization nodes): one network, one heatmap."""
    keras, torch_ = FIXTURES / "keras_small.onnx", FIXTURES / "keras_small_torch.onnx"
    x = np.random.RandomState(3).randn(2, 3, 64, 64).astype(np.float32)
    for preset in ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"):
        a = Explainer(keras, preset=preset).explain(x.transpose(0, 2, 3, 1))
        b = Explainer(torch_, preset=preset).explain(x)
        np.testing.assert_array_equal(a.targets, b.targets)
        assert close(a, b)


def test_keras_batchnorm_as_mul_add_is_folded():
    analysis = analyse(FIXTURES / "keras_small.onnx")
    assert not {"Mul", "Add"} & {op.node.op for op in analysis.graph.ops.values() if op.kind != "merge"}
    assert analysis.graph.canonical.folded_batchnorms == 6  # 3 unfused BatchNorms: a Mul and an Add each
    merge_inputs = {t for m in analysis.merges for t in (m.skip, m.main)}
    assert any("batchnorm/add_1" in t for t in merge_inputs)  # merges whose input is a bias Add


def test_keras_resnet50_cli(tmp_path):
    model = FIXTURES / "keras_resnet50.onnx"
    result = CliRunner().invoke(app, ["graph", str(model), "--json"])
    payload = json.loads(result.stdout)
    assert payload["input"]["layout"] == "NHWC" and len(payload["merges"]) == 16
    assert any("Softmax" in note for note in payload["notes"])  # the logits before it are explained
    result = CliRunner().invoke(app, ["explain", str(model), str(ROOT / "examples" / "demo.png"),
                                      "--preprocess", "caffe", "-o", str(tmp_path / "k.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k.png").exists()


def test_caffe_preprocessing_is_what_keras_resnet50_expects():
    from onnxlrp.io.preprocessing import get_preprocessing
    pixels = np.random.RandomState(0).randint(0, 256, (1, 4, 4, 3)).astype(np.uint8)
    x = get_preprocessing("caffe").normalize(pixels, "NHWC")
    keras_like = pixels[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(x, keras_like, rtol=1e-6)
    np.testing.assert_allclose(get_preprocessing("tf").normalize(pixels, "NHWC"), pixels / 127.5 - 1, rtol=1e-6)


# PyTorch forms, exported here

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(5)
    model = TinyResNet(num_classes=6)
    generator = torch.Generator().manual_seed(5)
    randomize_batchnorm(model, generator)
    calibrate_batchnorm(model, generator, size=64)
    return model.eval(), tmp_path_factory.mktemp("tiny")


def heat(path, x, preset="epsilon-plus-flat", **kwargs):
    return Explainer(path, preset=preset, **kwargs).explain(x)


# Two float32 evaluations of one network (exported differently): each is within its float32
# bound of the exact map, so they differ by at most the sum of the two. For these presets with
# biases that bound is 3e-5 (relative L2) on resnet18 (test_zennit, from float64), the deepest
# network compared here (keras_small has 7 layers); TinyResNet's map moves by 9x the relative size of weight noise
# (perturbed_spread at float16 size: 0.44 % for u16), i.e. ~1.3e-5 for float32's sqrt(n) u
# (n <= 576), 4e-5 with test_zennit's multiple 3. Each map within 4e-5: apart by < 1e-4.
CLOSE = 1e-4


def nchw(result) -> np.ndarray:
    return result.relevance.transpose(0, 3, 1, 2) if result.layout == "NHWC" else result.relevance


def close(a, b):
    return relative_error(nchw(a), nchw(b)) <= CLOSE


def test_batchnorm_folded_or_kept_gives_the_same_heatmap(resnet18, images):
    for preset in ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"):
        assert close(heat(resnet18.kept, images, preset), heat(resnet18.folded, images, preset))


def test_torchscript_and_dynamo_give_the_same_heatmap(tiny):
    model, folder = tiny
    x = np.random.RandomState(4).randn(2, 3, 64, 64).astype(np.float32)
    script = export(model, folder / "script.onnx", size=64)
    dynamo = export(model, folder / "dynamo.onnx", size=64, dynamo=True)
    ops = {op.node.op for op in analyse(dynamo).graph.ops.values()}
    assert {"ReduceMean", "Reshape"} <= ops and "GlobalAveragePool" not in ops  # the dynamo exporter's forms
    for preset in ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"):
        assert close(heat(dynamo, x, preset), heat(script, x, preset))


@pytest.mark.parametrize("opset", range(13, 22))
def test_opsets(opset, tiny):
    model, folder = tiny
    x = np.random.RandomState(4).randn(2, 3, 64, 64).astype(np.float32)
    reference = heat(export(model, folder / "ref.onnx", size=64), x)
    forms = {"script": dict(opset=opset)}
    if opset >= 18:
        forms["dynamo"] = dict(opset=opset, dynamo=True)
    for form, options in forms.items():
        path = export(model, folder / f"{form}{opset}.onnx", size=64, **options)
        explainer = Explainer(path)
        assert len(explainer.merges) == 6
        assert close(explainer.explain(x), reference), (form, opset)


def test_final_softmax_is_stripped_and_said(tiny):
    model, folder = tiny
    path = export(torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval(), folder / "softmax.onnx", size=64)
    explainer = Explainer(path)
    assert any("Softmax" in note for note in explainer.analysis.notes)
    x = np.random.RandomState(4).randn(2, 3, 64, 64).astype(np.float32)
    result = explainer.explain(x)
    assert not np.allclose(result.logits.sum(axis=1), 1)  # logits, not probabilities
    assert close(result, heat(export(model, folder / "plain.onnx", size=64), x))


def test_float16_model_is_explained_in_float32(tiny):
    model, folder = tiny
    path = folder / "half.onnx"
    half = TinyResNet(num_classes=6)
    half.load_state_dict(model.state_dict())
    torch.onnx.export(half.half().eval(), torch.randn(1, 3, 64, 64).half(), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    explainer = Explainer(path)
    assert "float16 model: explained in float32" in explainer.analysis.notes
    x = np.random.RandomState(4).randn(2, 3, 64, 64).astype(np.float32)
    full_path = export(model, folder / "full.onnx", size=64)
    ours, full = explainer.explain(x), heat(full_path, x)
    np.testing.assert_array_equal(ours.targets, full.targets)
    # Rounding to float16 moves each weight by at most u16 (relative): bound by the map's own
    # spread under relative noise u16 on every weight, times float32_bounds.MULTIPLE.
    spread = perturbed_spread(full_path, x, lambda a: U16, folder)
    error = relative_error(ours.relevance, full.relevance)
    assert error <= float32_bounds.MULTIPLE * spread, (error, spread)


def test_float16_relevance_pass(tiny):
    model, folder = tiny
    path = export(model, folder / "p16.onnx", size=64)
    x = np.random.RandomState(4).randn(2, 3, 64, 64).astype(np.float32)
    for preset in ("epsilon-plus-flat", "paper"):
        half = Explainer(path, preset=preset, precision="fp16").explain(x)
        full = heat(path, x, preset)
        assert half.relevance.dtype == np.float32
        # The float32 argument of float32_bounds.py with u16 for u: a float16 dot product of n terms
        # (accumulated in float16, as ARM's native kernels may) is exact for weights off by about
        # sqrt(n) u16; bound by the map's spread under that noise, times MULTIPLE.
        spread = perturbed_spread(path, x, lambda a: math.sqrt(a[0].size if a.ndim > 1 else 1) * U16, folder, preset=preset)
        error = relative_error(half.relevance, full.relevance)
        assert error <= float32_bounds.MULTIPLE * spread, (preset, error, spread)


@pytest.mark.parametrize("depth, batch_norm", [("A", False), ("A", True), ("D", False), ("D", True)])
def test_vgg_without_merges(depth, batch_norm, tmp_path):
    """VGG-11 (A) and VGG-16 (D) at 1/8 width, 224x224: no merges, LRP just works."""
    torch.manual_seed(0)
    model = VGG(make_layers([c if c == "M" else c // 8 for c in cfgs[depth]], batch_norm=batch_norm), num_classes=10)
    model.classifier = torch.nn.Sequential(  # VGG's head at 1/64 width, sensibly scaled
        torch.nn.Linear(64 * 7 * 7, 64), torch.nn.ReLU(True), torch.nn.Dropout(),
        torch.nn.Linear(64, 64), torch.nn.ReLU(True), torch.nn.Dropout(), torch.nn.Linear(64, 10))
    if batch_norm:
        generator = torch.Generator().manual_seed(0)
        randomize_batchnorm(model, generator)
        calibrate_batchnorm(model, generator, size=224, batches=1, batch_size=4)
    path = export(model.eval(), tmp_path / "vgg.onnx", size=224)
    x = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    explainer = Explainer(path, bias=False)
    assert explainer.merges == []
    result = explainer.explain(x)
    assert result.relevance.shape == (1, 3, 224, 224)
    # a property, not rounding: the dense layers' epsilon (1e-6) takes eps / |z| of each unit
    # of these small 1/64-width activations, and z+ units without positive input absorb what
    # reaches them; 1e-3 says "conserves" with room (rounding, per flat_bounds, is < 1e-3)
    assert result.conservation_error[0] < 1e-3
    whole = flat_bounds(path)[1]
    assert Explainer(path, rules=FLAT).explain(x).conservation_error[0] <= whole
