"""Layer relevance maps (Relevance-CAM) and gated pixel maps, computed in the relevance graph.

References are numpy computations on what the graph exposes anyway: the input relevance and
the probe relevance at the same tensor, in float64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import float32_bounds
from conftest import relative_error
from float32_bounds import apart
from onnxlrp import Explainer
from onnxlrp.cli import app
from onnxlrp.errors import OnnxLrpError
from onnxlrp.lrp.heatmaps import Heatmap, upsample_reference
from onnxlrp.runtime.session import session

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo" / "tiny_resnet.onnx"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
U = np.finfo(np.float32).eps / 2  # float32 unit roundoff


def largest_tensor(path) -> int:
    """Elements per image of the model's largest tensor (shape inference; batch excluded)."""
    import math

    import onnx
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    return max(math.prod(max(d.dim_value, 1) for d in v.type.tensor_type.shape.dim[1:])
               for v in list(graph.value_info) + list(graph.input) if v.type.tensor_type.shape.dim)


def images(explainer: Explainer, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, *explainer.input_shape[1:]).astype(np.float32)


def channel_sum_bound(relevance: np.ndarray, axis: int, height: int, width: int) -> np.ndarray:
    """What float32 rounding can move a channel sum, upsampled, by: a sum of C terms is off by at
    most (C - 1) u sum |R_c| (in any order), and bilinear interpolation (a convex combination, 3
    more roundings) carries that bound along; a few u more for the interpolation itself."""
    channels = relevance.shape[axis]
    magnitude = upsample_reference(np.abs(relevance).sum(axis=axis), height, width)
    return (channels + 8) * U * magnitude + 8 * U * np.abs(magnitude).max()


@pytest.mark.parametrize("model", [DEMO, FIXTURES / "keras_small.onnx", FIXTURES / "timm_resnet18d.onnx"],
                         ids=["demo", "keras-nhwc", "timm-resnet-d"])
def test_layer_map_at_the_last_block_is_the_probe_relevance_summed_and_upsampled(model, explainer_cache):
    """One graph with both outputs, so the reference sees the very relevance the map is made of."""
    explainer = Explainer(model, heatmap="layer", probe="last")  # layer="last" by default
    assert explainer.summary.heatmap_layer == explainer.summary.probe
    x = images(explainer)
    result = explainer.explain(x, warn=False)
    _, relevance = result.probe
    found = result.heatmap()
    height, width = found.shape[1:]
    expected = upsample_reference(relevance.astype(np.float64).sum(axis=1), height, width)
    assert found.shape == (len(x),) + tuple(explainer.input_shape[2:] if explainer.summary.image.layout == "NCHW"
                                            else explainer.input_shape[1:3])
    assert np.all(np.abs(found - expected) <= channel_sum_bound(relevance, 1, height, width))


def test_layer_map_at_the_input_is_the_pixel_map(explainer_cache):
    """At the input the layer map is the channel sum of the input relevance (3 channels: 2u of
    sum |R_c|); Resize to the same size interpolates with weights 1 and 0, one rounding more."""
    result = Explainer(DEMO, heatmap="layer", layer="input").explain(images(Explainer(DEMO)))
    expected = result.relevance.astype(np.float64).sum(axis=1)
    bound = 2 * U * np.abs(result.relevance).sum(axis=1) + 2 * U * np.abs(expected).max()
    assert np.all(np.abs(result.heatmap() - expected) <= bound)
    # and the default map is the pixel map, computed as before (no heatmap output in the graph)
    assert "heatmap" not in [o.name for o in Explainer(DEMO).session.get_outputs()]


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_gated_map_is_zero_where_the_layer_map_is_not_positive(power, explainer_cache):
    """Against float64 numpy on the same run's relevance: the input relevance, and the probe
    relevance at the gate's layer. Preset epsilon at an early block, where a fifth of the layer
    map is negative on these images (epsilon-plus-flat's z+ rules keep it positive everywhere)."""
    layer = "/stages/stages.1/relu_1/Relu_output_0"
    explainer = Explainer(DEMO, preset="epsilon", heatmap=Heatmap("gated", layer, power), probe=layer)
    result = explainer.explain(images(explainer, n=6))
    gated, relevance = result.heatmap(), result.relevance.astype(np.float64)
    probe = result.probe[1]
    coarse = upsample_reference(probe.astype(np.float64).sum(axis=1), 64, 64)
    band = channel_sum_bound(probe, 1, 64, 64)  # how far the graph's own layer map can be from `coarse`
    assert 0.05 < (coarse <= 0).mean() < 0.95 and (np.abs(coarse) <= band).mean() < 0.01  # both cases, clearly
    assert np.all(gated[coarse < -band] == 0)
    # elsewhere: the pixel map times the positive layer map to the power, scaled to [0, 1] per image
    gate = np.maximum(coarse, 0) ** power
    top = gate.max(axis=(1, 2), keepdims=True)
    pixel = relevance.sum(axis=1)
    expected = pixel * gate / top
    # (coarse / its max)^p, for p >= 1, moves by at most p (|d coarse| + |d max|) / max (each d
    # within the band); the pixel sum by 2u sum |R_c|; a few u more for Pow, the division, the product
    peak = top ** (1 / power)
    moved = power * 2 * band.max(axis=(1, 2), keepdims=True) / peak + 8 * U
    bound = np.abs(pixel) * moved + 2 * U * np.abs(relevance).sum(axis=1) + 8 * U * np.abs(expected)
    assert np.all(np.abs(gated - expected) <= bound)


def test_a_node_name_or_a_tensor_name_picks_the_layer(explainer_cache):
    x = images(Explainer(DEMO))
    by_tensor = Explainer(DEMO, heatmap="layer", layer="/stages/stages.4/relu_1/Relu_output_0").explain(x).heatmap()
    by_node = Explainer(DEMO, heatmap="layer", layer="/stages/stages.4/relu_1/Relu").explain(x).heatmap()
    last = Explainer(DEMO, heatmap="layer").explain(x).heatmap()
    # bitwise: both names compile to the same graph, byte for byte; same options, one process
    assert np.array_equal(by_tensor, by_node) and not np.allclose(by_tensor, last)
    with pytest.raises(OnnxLrpError, match="no node or tensor 'nope'"):
        Explainer(DEMO, heatmap="layer", layer="nope")
    with pytest.raises(OnnxLrpError, match="needs a 4-d feature map"):
        Explainer(DEMO, heatmap="layer", layer="/fc/Gemm")
    with pytest.raises(OnnxLrpError, match="unknown heatmap 'cam'"):
        Explainer(DEMO, heatmap="cam")
    with pytest.raises(OnnxLrpError, match="power must be positive"):
        Heatmap("gated", power=0)


def test_the_compiled_explainer_carries_its_map(tmp_path, explainer_cache):
    """compile --heatmap gated: plain onnxruntime returns the same map as the API."""
    out = tmp_path / "gated.onnx"
    result = CliRunner().invoke(app, ["compile", str(DEMO), "--heatmap", "gated", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "heatmap [N, 64, 64] (gated)" in result.stdout
    explainer = Explainer(DEMO, heatmap="gated")
    x = images(explainer)
    feeds = {"images": x, "target": np.full(len(x), -1, np.int64)}
    expected = explainer.explain(x).heatmap()
    # the file under the explainer's own session options: the same graph, the same kernels
    assert np.array_equal(session(str(out)).run(["heatmap"], feeds)[0], expected)
    # in plain onnxruntime (its default session options are not onnxlrp's, and may fuse and pick
    # kernels otherwise: float32 rounding of both runs)
    plain = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["heatmap"], feeds)[0]
    assert plain.shape == (len(x), 64, 64)
    targets = explainer.explain(x).targets
    assert relative_error(plain, expected) <= apart(DEMO, x, targets, tmp_path, ("heatmap",), heatmap="gated")[0]


def test_maps_say_they_do_not_conserve(explainer_cache):
    notes = Explainer(DEMO, heatmap="gated").summary.notes
    assert any("does not conserve relevance" in n for n in notes)
    assert not any("does not conserve" in n for n in Explainer(DEMO).summary.notes)
    # the conservation figures are those of the pixel relevance: the map only adds nodes after
    # the relevance pass, which is the same node for node
    plain, gated = (Explainer(DEMO, heatmap=kind).compiled.onnx().graph for kind in ("pixel", "gated"))
    nodes = {node.name: node for node in gated.node}
    assert all(nodes.get(node.name) == node for node in plain.node)
    added = [name for name in nodes if name not in {node.name for node in plain.node}]
    assert added and all(name.startswith(("lrp/heatmap/", "lrp/output/heatmap")) for name in added)


def test_explain_cli_writes_the_gated_map(tmp_path, explainer_cache):
    npy = tmp_path / "map.npy"
    result = CliRunner().invoke(app, ["explain", str(DEMO), str(ROOT / "examples" / "demo.png"),
                                      "--heatmap", "gated", "--npy", str(npy)])
    assert result.exit_code == 0, result.output
    explainer = Explainer(DEMO, heatmap="gated")
    expected, _ = explainer.explain_files([ROOT / "examples" / "demo.png"])
    # bitwise: the same graph, session options and one-image batch, in one process
    assert np.array_equal(np.load(npy), expected.heatmap()[0])
    bad = CliRunner().invoke(app, ["explain", str(DEMO), str(ROOT / "examples" / "demo.png"), "--heatmap", "layer",
                                   "--layer", "nope", "--npy", str(tmp_path / "x.npy")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "no node or tensor 'nope'" in bad.output
    assert not (tmp_path / "x.npy").exists()


def test_audit_looks_at_the_chosen_map_and_says_it_does_not_conserve(tmp_path, explainer_cache):
    """audit --heatmap gated: the checks run on the gated maps; the conservation figures are
    the pixel relevance's, and the report says so."""
    data = ROOT / "examples" / "audit"
    model = ROOT / "models" / "audit" / "shortcut.onnx"
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(model), str(data), "--heatmap", "gated", "--limit", "12",
                                      "--sanity-images", "0", "-o", str(out), "--fail-on", "none"])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "the gated heatmaps the checks look at do not conserve relevance" in html
    assert "does not conserve relevance" in html  # the explainer's note, in the facts table
    from onnxlrp.audit import audit

    gated = audit(model, data, heatmap="gated", limit=12, sanity_images=0)
    pixel = audit(model, data, limit=12, sanity_images=0)
    explainer = Explainer(model, heatmap="gated")
    same, _ = explainer.explain_files([data / f for f in gated.files])  # the audit's one batch of 12
    # bitwise: the same graph, session options and batch, in one process
    assert np.array_equal(gated.heatmaps, same.heatmap())
    # the same relevance pass (node for node, above), but onnxruntime may fuse the two graphs
    # differently. The figure is the largest |R - R_skip - R_main| / |R| over the merges (biases
    # kept): float32 rounding of the merge totals, each a sum of at most the merge tensor's
    # elements (at most the largest tensor's), within 2 sum_rtol + 3u as in test_conservation; two such figures, in [0, that].
    within = 2 * float32_bounds.sum_rtol(largest_tensor(model)) + 3 * U
    assert 0 <= pixel.checks["conservation"] <= within and 0 <= gated.checks["conservation"] <= within
    assert abs(gated.checks["conservation"] - pixel.checks["conservation"]) <= within
    assert gated.identity["heatmap"].startswith("gated at ") and pixel.identity["heatmap"] == "pixel"


def test_evaluate_compares_them_by_default_and_takes_any_preset_with_a_map(explainer_cache):
    from onnxlrp.evaluation.evaluate import DEFAULT_METHODS, evaluate, load_dataset

    assert {"relevance-cam", "gated-lrp"} <= set(DEFAULT_METHODS)
    results = evaluate(DEMO, load_dataset(ROOT / "examples" / "shapes"),
                       ["gated-lrp", "paper-iv:gated", "epsilon-gamma-box:layer"], protocols=("exact",), limit=3)
    assert results.values["gated-lrp"] == results.values["paper-iv:gated"]  # the same method, by two names
    assert results.labels["epsilon-gamma-box:layer"] == "LRP epsilon-gamma-box, layer map"
    assert results.values["epsilon-gamma-box:layer"] != results.values["gated-lrp"]
    with pytest.raises(OnnxLrpError, match="unknown method.*grad-cam:gated"):
        evaluate(DEMO, load_dataset(ROOT / "examples" / "shapes"), ["grad-cam:gated"], limit=1)


def test_float16_pass_carries_the_maps(explainer_cache):
    """precision fp16: the converter keeps some ops (TopK, Max) in float32, so the maps use
    none of them; the structure holds in any precision (zero where the layer map is <= 0),
    and the maps follow the float32 ones (rank correlation, not a rounding bound)."""
    from scipy.stats import spearmanr

    where = dict(preset="epsilon", layer="/stages/stages.1/relu_1/Relu")
    x = images(Explainer(DEMO), n=2)
    layer = Explainer(DEMO, heatmap="layer", precision="fp16", **where).explain(x).heatmap()
    gated = Explainer(DEMO, heatmap="gated", precision="fp16", **where).explain(x).heatmap()
    full = Explainer(DEMO, heatmap="gated", **where).explain(x).heatmap()
    assert np.isfinite(gated).all() and np.all(gated[layer <= 0] == 0)
    assert spearmanr(gated.ravel(), full.ravel())[0] > 0.95
