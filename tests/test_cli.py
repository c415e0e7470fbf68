"""The `onnxlrp` command: outputs, the compiled explainer, and one-line errors on bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from onnx import TensorProto, helper
from typer.testing import CliRunner

import tiny_graphs as tg
from conftest import relative_error
from float32_bounds import apart
from onnxlrp import Explainer, OnnxLrpError
from onnxlrp.cli import app


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_explain_one_image(demo_model, demo_image, tmp_path):
    png, npy = tmp_path / "heat.png", tmp_path / "heat.npy"
    result = run("explain", demo_model, demo_image, "--split", "ratio", "-o", png, "--npy", npy)
    assert result.exit_code == 0, result.output
    assert Image.open(png).size == (256, 256)  # 64x64 input, enlarged for viewing
    heat = np.load(npy)
    explanation, pixels = Explainer(demo_model).explain_files([demo_image])
    # the same compiled graph on the same one-image batch, but another session: float32 rounding
    # of both runs, should onnxruntime order a sum otherwise
    x = Explainer(demo_model).images.normalize(pixels)
    assert relative_error(heat, explanation.heatmap()[0]) <= apart(demo_model, x, explanation.targets, tmp_path,
                                                                   ("heatmap",), split="ratio")[0]
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
    # the saved file is the same graph on the same batch, but in plain onnxruntime's default
    # session options (not onnxlrp's): float32 rounding of both runs
    relevance_bound, logits_bound = apart(demo_model, x, expected.targets, tmp_path, ("relevance", "logits"),
                                          preset="epsilon-gamma-box", split="proportional")
    assert relative_error(relevance, expected.relevance) <= relevance_bound
    assert relative_error(logits, expected.logits) <= logits_bound


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
    tg.save(tg.product_net(), tmp / "product.onnx")
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
        "product": ([tmp / "product.onnx", demo_image], r"node 'product' \(Mul\): no LRP rule for Mul of two computed"),
        "not an image input": ([tmp / "vector.onnx", demo_image], r"input 'in0' has shape \['\?', 10\]; expected an image batch"),
        "two inputs": ([tmp / "two.onnx", demo_image], r"model has 2 inputs \(in0, in1\)"),
        "unreadable image": ([demo_model, demo_image, tmp / "broken.png"], r"broken\.png: cannot read image"),
        "truncated image": ([demo_model, tmp / "cut.png"], r"cut\.png: cannot read image"),
        "missing image": ([demo_model, tmp / "none.png"], r"none\.png: no such file or folder"),
        "target out of range": (good + ["--target", "6"], r"target class 6 out of range: the model has 6 classes \(0\.\.5\)"),
        "cuda unavailable": (good + ["--device", "cuda"], r"device cuda: "),
    }


CASES = ["not onnx", "truncated", "missing model", "no rule", "product", "not an image input", "two inputs",
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


def test_cuda_unavailable_is_one_line_in_a_real_process(demo_model, demo_image, tmp_path):
    """onnxruntime's own logger writes a failed CUDA provider's library errors straight to the
    process's stderr, which CliRunner does not see: run the console script itself."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        probe = ort.InferenceSession(str(demo_model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if probe.get_providers()[0] == "CUDAExecutionProvider":
            pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, "-c", "from onnxlrp.cli import app; app()", "explain", str(demo_model),
                             str(demo_image), "--device", "cuda", "-o", str(tmp_path / "x.png")],
                            capture_output=True, text=True, env={**os.environ, "ONNXLRP_DEBUG": ""})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device cuda"), result.stderr


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
    expected, pixels = Explainer(demo_model).explain_files(files)
    # batches of 3 against one of 7: onnxruntime may take other kernels, float32 rounding of both runs
    found = np.stack([np.load(npy / f"{f.stem}_lrp.npy") for f in files])
    x = Explainer(demo_model).images.normalize(pixels)
    assert relative_error(found, expected.heatmap()) <= apart(demo_model, x, expected.targets, tmp_path, ("heatmap",))[0]


def test_list_methods_needs_no_model():
    result = run("evaluate", "--list-methods")
    assert result.exit_code == 0, result.output
    assert "lrp-captum" in result.output.split() and "grad-cam" in result.output.split()


# Destinations, staged outputs, and what users read.

@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written to, root included: an immutable folder (chattr +i) where
    the file system allows it, else permission bits for other users."""
    import os
    import shutil
    import subprocess
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root and chattr +i is not available here: no way to make a folder read-only")
    try:
        (folder / "probe").touch()
        (folder / "probe").unlink()
        pytest.skip("the folder stayed writable")
    except OSError:
        pass
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def _one_error_line(result, pattern: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]  # notes come first
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("where", ["png", "npy", "both"])
def test_read_only_destination_is_an_error_before_any_work(where, read_only, demo_model, demo_image, tmp_path):
    png = read_only / "a.png" if where in ("png", "both") else tmp_path / "a.png"
    npy = read_only / "a.npy" if where in ("npy", "both") else tmp_path / "a.npy"
    result = run("explain", demo_model, demo_image, "-o", png, "--npy", npy)
    _one_error_line(result, r"read_only/a\.(png|npy): cannot write there")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.npy").exists()
    assert list(read_only.iterdir()) == []


def test_read_only_destination_for_compile_and_evaluate(read_only, demo_model, explainer_cache):
    before = set(explainer_cache.iterdir())
    _one_error_line(run("compile", demo_model, "-o", read_only / "e.onnx"), r"e\.onnx: cannot write there")
    assert set(explainer_cache.iterdir()) == before  # refused before anything was built
    shapes = Path(__file__).resolve().parent.parent / "examples" / "shapes"
    _one_error_line(run("evaluate", demo_model, shapes, "-o", read_only / "eval", "--limit", "1", "--methods", "gradient"),
                    r"eval/results\.md: cannot write there")
    assert list(read_only.iterdir()) == []


def test_a_failure_late_in_a_folder_run_leaves_no_output(demo_model, monkeypatch, tmp_path):
    """Outputs are staged and published together: if the third batch fails, the heatmaps of the
    first two never appear (nor the folders made for them)."""
    files = sorted((Path(__file__).resolve().parent.parent / "examples" / "shapes" / "ring").glob("*.png"))[:5]
    calls = []
    original = Explainer.explain

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OnnxLrpError("onnxruntime failed on the relevance graph (out of memory)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Explainer, "explain", failing)
    out = tmp_path / "out" / "deeper"
    result = run("explain", demo_model, *files, "--batch-size", "2", "-o", out, "--npy", out)
    _one_error_line(result, r"out of memory")
    assert len(calls) == 3 and not (tmp_path / "out").exists()


def test_a_truncated_jpeg_late_in_a_folder_stops_before_any_output(demo_model, demo_image, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):
        Image.open(demo_image).convert("RGB").resize((256, 256)).save(folder / f"{k}.jpg", quality=95)
    data = (folder / "3.jpg").read_bytes()
    (folder / "3.jpg").write_bytes(data[: len(data) * 2 // 3])  # the header verifies, the pixels do not decode
    out = tmp_path / "out"
    result = run("explain", demo_model, folder, "--batch-size", "2", "-o", out)
    _one_error_line(result, r"3\.jpg: cannot read image")
    assert not out.exists()


def test_npy_alone_writes_only_npy_and_every_file_is_named(demo_model, demo_image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("explain", demo_model, demo_image, "--npy", "heat.npy")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.npy"]
    assert result.stdout.strip().endswith("-> heat.npy")
    result = run("explain", demo_model, demo_image, demo_image, "--npy", "maps")  # several: a folder, still no PNG
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["demo_lrp.npy", "demo_lrp_1.npy"]
    assert not (tmp_path / "lrp_out").exists()
    result = run("explain", demo_model, demo_image, "-o", "h.png", "--npy", "h.npy")
    assert result.exit_code == 0 and "-> h.png, h.npy" in result.stdout, result.output
    result = run("explain", demo_model, demo_image, demo_image)  # several, no -o: the documented ./lrp_out/
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "lrp_out").iterdir()) == [
        "demo_lrp.png", "demo_lrp_1.png"]


def test_subfolders_are_walked_and_mirrored(demo_model, demo_image, tmp_path):
    """The ImageFolder layout: two images of one name in different class folders never collide."""
    data = tmp_path / "data"
    for cls in ("circle", "ring"):
        (data / cls).mkdir(parents=True)
        Image.open(demo_image).save(data / cls / "0001.png")
    out = tmp_path / "out"
    result = run("explain", demo_model, data, "-o", out, "--npy", out)
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["circle/0001_lrp.npy", "circle/0001_lrp.png", "ring/0001_lrp.npy", "ring/0001_lrp.png"]


def test_output_and_npy_must_differ(demo_model, demo_image, tmp_path):
    _one_error_line(run("explain", demo_model, demo_image, "-o", tmp_path / "h.png", "--npy", tmp_path / "h.png"),
                    r"h\.png: --output and --npy name the same file")
    assert not (tmp_path / "h.png").exists()


def test_usage_errors_are_one_line_too(demo_model, demo_image):
    """... and exit 2 in every command (1 is bad input, or an audit that fails)."""
    _one_error_line(run("explain", demo_model, demo_image, "--preset", "nope"),
                    r"Invalid value for '--preset'.*'nope' is not one of .*\(see .* explain --help\)", code=2)
    _one_error_line(run("explain", demo_model), r"Missing argument 'IMAGES\.\.\.'", code=2)
    _one_error_line(run("graph", demo_model, "--bogus"), r"No such option: --bogus", code=2)
    _one_error_line(run("evaluate", demo_model, demo_image, "--size", "64x"), r"'64x' is not N or HxW", code=2)


def test_compile_says_the_batch_is_dynamic(demo_model, tmp_path):
    result = run("compile", demo_model, "-o", tmp_path / "e.onnx")
    assert result.exit_code == 0, result.output
    assert "inputs images [N, 3, 64, 64], target [N]" in result.stdout


def test_notes_come_before_the_results(demo_model, demo_image, tmp_path):
    result = run("explain", demo_model, demo_image, "-o", tmp_path / "h.png")
    assert result.exit_code == 0, result.output
    assert result.output.index("note: folded") < result.output.index("class ")


@pytest.mark.parametrize("command", ["explain", "graph", "compile", "evaluate"])
def test_help_reads_well_at_80_columns(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "…" not in result.output
    if command == "explain":
        text = " ".join(result.output.split())
        for option, default in (("--split", "the preset's, ratio"), ("--cmap", "coldnhot; jet for --style paper"),
                                ("--target", "top-1 per image")):
            assert f"[default: ({default})]" in text, option


def test_graph_table_fits_80_columns_and_breaks_names_at_slashes(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    fixture = Path(__file__).resolve().parent / "fixtures" / "keras_resnet50.onnx"
    result = run("graph", fixture)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if line.split()[:1] == ["node"])
    assert header.split() == ["node", "op", "rule"]
    # every name of the graph can be read back from the table, broken only before a '/'
    node = "resnet50/conv2_block1_1_conv/BiasAdd"
    rows = [line.split()[0] for line in lines if line.strip() and not line.startswith("─")]
    assert any(row.startswith("resnet50/") or row == "resnet50" for row in rows)
    assert "/conv2_block1_1_conv" in result.stdout and "conv2_bl\n" not in result.stdout
    assert node.replace("/", "") not in result.stdout


def test_unwritable_cache_warns_once_and_runs(demo_model, demo_image, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("ONNXLRP_CACHE", str(blocker / "cache"))  # below a regular file: not even root can
    result = run("explain", demo_model, demo_image, demo_image, "-o", tmp_path / "out", "--preset", "epsilon-gamma-box")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "cache" in warnings[0], result.stderr
    assert len(list((tmp_path / "out").iterdir())) == 2
