"""What every command shares: exit codes, --version, warnings kept beside errors, --size HxW,
every option honoured, and an import that leaves the user's libraries as they were."""
import subprocess
import sys

import numpy as np
import onnx
from PIL import Image
from typer.testing import CliRunner

import tiny_graphs as tg
from onnxlrp import Explainer, __version__
from onnxlrp.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"onnxlrp {__version__}"


def test_an_internal_error_is_its_own_exit_code_and_says_how_to_report_it(demo_model, demo_image, tmp_path,
                                                                          monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("onnxlrp.cli.Explainer", broken)
    monkeypatch.delenv("ONNXLRP_DEBUG", raising=False)
    result = run("explain", demo_model, demo_image, "-o", tmp_path / "h.png")
    assert result.exit_code == 3, result.output
    assert "internal error (ZeroDivisionError: a bug)" in result.stderr and "report it" in result.stderr
    assert "Traceback" not in result.output


def test_warnings_before_an_error_are_kept(demo_model, demo_image, tmp_path, monkeypatch):
    """A cache that cannot be written warns when the explainer is built; a bad --target after
    that still shows the warning, before the error."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("ONNXLRP_CACHE", str(blocker / "cache"))  # below a regular file: not even root can
    monkeypatch.setattr("onnxlrp.runtime.cache._warned", False)  # once per process: this test's
    result = run("explain", demo_model, demo_image, "--preset", "epsilon-gamma-box", "--target", "99",
                 "-o", tmp_path / "h.png")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]
    assert lines[0].startswith("warning: ") and lines[-1].startswith("error: target class 99"), result.stderr


def _open_size_model(tmp_path):
    b = tg.Builder()
    h = b.op("Relu", [b.conv("x", 3, 4)])
    return tg.save(b.model(b.head(h, 4), input_shape=("N", 3, "H", "W")), tmp_path / "open.onnx")


def test_size_takes_height_and_width(tmp_path):
    """A text-line classifier's 48x192: --size HxW reaches the explainer (the heatmap is 48 x 192)."""
    model = _open_size_model(tmp_path)
    image = tmp_path / "line.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 192, 3), np.uint8)).save(image)
    result = run("explain", model, image, "--size", "48x192", "--npy", tmp_path / "h.npy")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "h.npy").shape == (48, 192)
    graph = run("graph", model, "--size", "48x192", "--json")
    assert graph.exit_code == 0 and '"shape": [\n      1,\n      3,\n      48,\n      192\n    ]' in graph.stdout


def test_compile_takes_the_box_bounds(demo_model, tmp_path):
    out = tmp_path / "e.onnx"
    result = run("compile", demo_model, "-o", out, "--preset", "epsilon-gamma-box", "--low", "-1", "--high", "1")
    assert result.exit_code == 0, result.output
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    import onnxruntime as ort

    compiled = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    relevance = compiled.run(["relevance"], {"images": x, "target": np.full(2, -1, np.int64)})[0]
    same = Explainer(demo_model, preset="epsilon-gamma-box", low=-1.0, high=1.0).explain(x).relevance
    default = Explainer(demo_model, preset="epsilon-gamma-box").explain(x).relevance
    # the saved graph and the explainer's are one graph: float32 rounding apart at most, as
    # onnxruntime may schedule them differently (1e-5 of the scale covers that many times)
    np.testing.assert_allclose(relevance, same, rtol=0, atol=1e-5 * np.abs(same).max())
    assert np.abs(relevance - default).max() > 1e-2 * np.abs(default).max()  # the bounds made a difference


def test_evaluate_takes_the_size(demo_model, tmp_path):
    """--size reaches evaluate's model: the demo model's fixed 64x64 refuses 32x32 in one line."""
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "x.png")
    result = run("evaluate", demo_model, tmp_path / "data", "--size", "32", "-o", tmp_path / "ev",
                 "--methods", "gradient")
    assert result.exit_code == 1 and "fixed size 64x64; cannot use 32x32" in result.stderr, result.output


def test_importing_and_running_leaves_the_users_libraries_as_they_were(demo_model, tmp_path):
    """onnx-graphsurgeon's logger, matplotlib's colormap registry and its backend belong to the
    user: onnxlrp sets none of them, not at import and not while it works."""
    script = f"""
import matplotlib, onnx_graphsurgeon as gs
from matplotlib import colormaps
matplotlib.use("svg")
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.VERBOSE
import onnxlrp, onnxlrp.cli, onnxlrp.evaluation.evaluate as ev
import numpy as np
from onnxlrp.io.image import colorize
onnxlrp.Explainer({str(demo_model)!r}, cache=False)
colorize(np.ones((4, 4)), "coldnhot")
ev._plot_conservation(type("R", (), dict(conservation={{"m": {{"output": [1.0], "input": [1.0]}}}},
                                         labels={{"m": "m"}}))(), {str(tmp_path / "p.png")!r})
assert gs.logger.G_LOGGER.severity == gs.logger.G_LOGGER.VERBOSE, gs.logger.G_LOGGER.severity
assert "coldnhot" not in colormaps
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_package_and_its_commands_never_import_torch(demo_model, demo_image, tmp_path):
    """torch is for exporting models and for the tests' references, never for the relevance
    pass: importing every stage and explaining leave it unimported (and the fast tier's tests
    that need no torch run without it)."""
    script = f"""
import sys
import onnxlrp, onnxlrp.cli, onnxlrp.audit.run, onnxlrp.evaluation.evaluate, onnxlrp.distributed
from onnxlrp.cli import app
app(["explain", {str(demo_model)!r}, {str(demo_image)!r}, "-o", {str(tmp_path / "h.png")!r}, "--no-cache"],
    standalone_mode=False)
assert "torch" not in sys.modules, [m for m in sys.modules if m.startswith("torch")][:5]
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_model_of_a_newer_ir_version_than_onnxruntime_reads_is_explained(demo_model, tmp_path):
    """onnx may write an IR version the installed onnxruntime does not read yet (onnx 1.23's
    make_model: IR 14, onnxruntime 1.31: up to 13); onnxlrp writes the relevance graph itself,
    at a version onnxruntime reads."""
    import onnxruntime as ort

    from onnxlrp.ir.model import readable_ir_version

    model = onnx.load(str(demo_model))
    newest = readable_ir_version(99)
    model.ir_version = newest + 1  # one onnxruntime cannot read
    path = tmp_path / "new.onnx"
    onnx.save(model, str(path))
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        raise AssertionError("onnxruntime read the newer IR version: the test needs another")
    except Exception as exc:
        assert "IR version" in str(exc) or "ir_version" in str(exc).lower(), exc
    x = np.random.RandomState(0).randn(1, 3, 64, 64).astype(np.float32)
    found = Explainer(path, cache=False).explain(x)
    expected = Explainer(demo_model, cache=False).explain(x)
    np.testing.assert_array_equal(found.relevance, expected.relevance)  # one graph, one session configuration
    assert onnx.load(str(path)).ir_version == newest + 1  # the user's file is not touched


def test_rule_overrides_on_the_command_line(demo_model, demo_image, tmp_path):
    """--rule KEY=RULE(ARGS) gives the CLI the API's overrides: the same rules (graph), the same
    relevance (explain, against Explainer(rules=...) in this process: one graph, one session
    configuration), a bad spec a usage error, a key that names nothing bad input."""
    import json

    from onnxlrp import rules as R

    graph = run("graph", demo_model, "--json", "--rule", "Conv=epsilon(0.25)", "--rule", "/stem/stem.0/Conv=zplus(fallback=flat)")
    assert graph.exit_code == 0, graph.output
    rules = {row["node"]: row["rule"] for row in json.loads(graph.stdout)["nodes"]}
    assert rules["/stem/stem.0/Conv"] == "zplus(eps=1e-06, eps share by flat)"
    assert rules["/stages/stages.0/conv1/Conv"] == "epsilon(eps=0.25)"
    result = run("explain", demo_model, demo_image, "--rule", "Conv=gamma(gamma=0.1)", "--npy", tmp_path / "h.npy")
    assert result.exit_code == 0, result.output
    x = Explainer(demo_model).read_images([demo_image])
    expected = Explainer(demo_model, rules={"Conv": R.gamma(gamma=0.1)})
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"),
                                  expected.explain(expected.preprocessing.normalize(x)).heatmap()[0])
    bad = run("explain", demo_model, demo_image, "--rule", "Conv=gamma(oops)", "-o", tmp_path / "b.png")
    assert bad.exit_code == 2 and "'--rule'" in bad.stderr and "arguments must be numbers" in bad.stderr
    unknown = run("explain", demo_model, demo_image, "--rule", "conv1=epsilon()", "-o", tmp_path / "c.png")
    assert unknown.exit_code == 1 and "rule override 'conv1' matches no node" in unknown.stderr
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()
