"""The `onnxlrp` command: outputs, the compiled explainer, and one-line errors on bad input."""
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from onnx import TensorProto, helper
from typer.testing import CliRunner

import tiny_graphs as tg
from onnxlrp import Explainer
from onnxlrp.cli import app


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_explain_one_image(demo_model, demo_image, tmp_path):
    png, npy = tmp_path / "heat.png", tmp_path / "heat.npy"
    result = run("explain", demo_model, demo_image, "--split", "ratio", "-o", png, "--npy", npy)
    assert result.exit_code == 0, result.output
    assert Image.open(png).size == (256, 256)  # 64x64 input, enlarged for viewing
    heat = np.load(npy)
    explanation, _ = Explainer(demo_model).explain_files([demo_image])
    np.testing.assert_allclose(heat, explanation.heatmap()[0], rtol=1e-6)
    assert "class" in result.stdout and str(png) in result.stdout


def test_explain_folder_and_several_images(demo_model, demo_image, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.open(demo_image).convert("RGB").save(folder / name)
    out = tmp_path / "out"
    result = run("explain", demo_model, folder, demo_image, "-o", out, "--npy", out, "--preset", "paper", "--target", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "a_lrp.npy", "a_lrp.png", "b_lrp.npy", "b_lrp.png", "demo_lrp.npy", "demo_lrp.png"]
    assert result.stdout.count("class 2") == 3


def test_compiled_explainer_runs_in_plain_onnxruntime(demo_model, tmp_path):
    out = tmp_path / "explainer.onnx"
    result = run("compile", demo_model, "-o", out, "--preset", "epsilon-gamma-box", "--split", "proportional")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "target"]
    x = np.random.RandomState(0).randn(3, 3, 64, 64).astype(np.float32)
    logits, relevance = session.run(["logits", "relevance"], {"images": x, "target": np.array([-1, 0, 5])})
    expected = Explainer(demo_model, preset="epsilon-gamma-box", split="proportional").explain(x, target=[logits[0].argmax(), 0, 5])
    np.testing.assert_allclose(relevance, expected.relevance, rtol=1e-6)
    np.testing.assert_allclose(logits, expected.logits, rtol=1e-6)


def test_graph_json_lists_the_merges(demo_model):
    result = run("graph", demo_model, "--json", "--preset", "paper")
    payload = json.loads(result.stdout)
    assert payload["merge_counts"] == {"identity": 4, "projection": 2, "other": 0}
    assert payload["input"] == {"name": "input", "layout": "NCHW", "shape": [1, 3, 64, 64]}


# Bad input: one line on stderr, non-zero exit, no output file.

def _model_with_inputs(*shapes, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(f"in{i}", dtype, list(s)) for i, s in enumerate(shapes)]
    nodes = [helper.make_node("Identity", ["in0"], ["out"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", dtype, list(shapes[0]))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _bad_inputs(tmp: Path, demo_model: Path, demo_image: Path) -> dict:
    data = demo_model.read_bytes()
    (tmp / "text.onnx").write_text("not a model\n")
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    tg.save(tg.tanh_net(), tmp / "tanh.onnx")
    tg.save(tg.gated_net(), tmp / "gated.onnx")
    onnx.save(_model_with_inputs(("N", 10)), tmp / "vector.onnx")
    onnx.save(_model_with_inputs(("N", 3, 8, 8), ("N", 3, 8, 8)), tmp / "two.onnx")
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp / "cut.png").write_bytes(demo_image.read_bytes()[:200])
    good = [demo_model, demo_image]
    return {
        "not onnx": ([tmp / "text.onnx", demo_image], r"text\.onnx: not a readable ONNX model"),
        "truncated": ([tmp / "truncated.onnx", demo_image], r"truncated\.onnx: not a readable ONNX model"),
        "missing model": ([tmp / "nothing.onnx", demo_image], r"nothing\.onnx: no such file"),
        "no rule": ([tmp / "tanh.onnx", demo_image], r"node 'act_tanh' \(Tanh\): no LRP rule"),
        "gating": ([tmp / "gated.onnx", demo_image], r"node 'se_sigmoid' \(Sigmoid\): no LRP rule"),
        "not an image input": ([tmp / "vector.onnx", demo_image], r"input 'in0' has shape \['\?', 10\]; expected an image batch"),
        "two inputs": ([tmp / "two.onnx", demo_image], r"model has 2 inputs \(in0, in1\)"),
        "unreadable image": ([demo_model, demo_image, tmp / "broken.png"], r"broken\.png: cannot read image"),
        "truncated image": ([demo_model, tmp / "cut.png"], r"cut\.png: cannot read image"),
        "missing image": ([demo_model, tmp / "none.png"], r"none\.png: no such file or folder"),
        "target out of range": (good + ["--target", "6"], r"target class 6 out of range: the model has 6 classes \(0\.\.5\)"),
        "cuda unavailable": (good + ["--device", "cuda"], r"device cuda: "),
    }


CASES = ["not onnx", "truncated", "missing model", "no rule", "gating", "not an image input", "two inputs",
         "unreadable image", "truncated image", "missing image", "target out of range", "cuda unavailable"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_no_output(case, demo_model, demo_image, tmp_path):
    if case == "cuda unavailable" and "CUDAExecutionProvider" in ort.get_available_providers():
        probe = ort.InferenceSession(str(demo_model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if probe.get_providers()[0] == "CUDAExecutionProvider":
            pytest.skip("a CUDA device is present")  # only on GPU machines; CI has none
    args, message = _bad_inputs(tmp_path, demo_model, demo_image)[case]
    out, npy = tmp_path / "out", tmp_path / "npy"  # a file for one image, a folder for several
    result = run("explain", *args, "-o", out, "--npy", npy)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and not npy.exists()


def test_several_images_need_a_folder(demo_model, demo_image, tmp_path):
    result = run("explain", demo_model, demo_image, demo_image, "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "need an output folder" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_graph_and_compile_report_errors_too(tmp_path):
    tg.save(tg.tanh_net(), tmp_path / "tanh.onnx")
    for args in (["graph", tmp_path / "tanh.onnx"], ["compile", tmp_path / "tanh.onnx", "-o", tmp_path / "x.onnx"]):
        result = run(*args)
        assert result.exit_code == 1 and result.stderr.startswith("error: ") and "act_tanh" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_explain_top_k_writes_one_heatmap_per_class(demo_model, demo_image, tmp_path):
    out = tmp_path / "out"
    result = run("explain", demo_model, demo_image, "--top-k", "3", "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["demo_top1_lrp.png", "demo_top2_lrp.png", "demo_top3_lrp.png"]
    logits = Explainer(demo_model).explain_files([demo_image])[0].logits[0]
    classes = [int(line.split("class ")[1].split(",")[0]) for line in result.stdout.splitlines() if "class" in line]
    assert classes == np.argsort(-logits)[:3].tolist()


def test_explain_many_images_in_batches(demo_model, tmp_path):
    """Several batches through the pipeline: every image gets its own, correct heatmap."""
    folder = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "ring"
    files = sorted(folder.glob("*.png"))[:7]
    out, npy = tmp_path / "out", tmp_path / "npy"
    result = run("explain", demo_model, *files, "--batch-size", "3", "-o", out, "--npy", npy)
    assert result.exit_code == 0, result.output
    assert len(list(out.iterdir())) == 7
    expected, _ = Explainer(demo_model).explain_files(files)
    for f, heat in zip(files, expected.heatmap()):
        np.testing.assert_allclose(np.load(npy / f"{f.stem}_lrp.npy"), heat, rtol=1e-5, atol=1e-7)


def test_list_methods_needs_no_model():
    result = run("evaluate", "--list-methods")
    assert result.exit_code == 0, result.output
    assert "lrp-captum" in result.output.split() and "grad-cam" in result.output.split()
