"""The option groups (onnxlrp.cli_options): every command that explains takes every group,
each command's options are its own plus its groups', and every group option reaches the
Options and Runtime the Python API receives (none dropped on the way)."""
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from onnxlrp import OnnxLrpError, rules as R
from onnxlrp.cli import app
from onnxlrp.cli_options import EXPLAINING, GroupedCommand
from onnxlrp.explainer import Explainer
from onnxlrp.options import Options, Runtime
from onnxlrp.runtime.cluster import Cluster

COMMANDS = get_command(app).commands
#: the commands that explain images: each takes every group
EXPLAINS = ("explain", "evaluate", "audit")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_command_takes_its_groups_and_every_explaining_command_every_group():
    for name, command in COMMANDS.items():
        declared = command.callback.groups
        grouped = [p.name for group in declared for p in group.params]
        params = {p.name for p in command.params}
        assert set(grouped) <= params, (name, set(grouped) - params)
        assert isinstance(command, GroupedCommand), name
        if name in EXPLAINS:
            assert declared == EXPLAINING, name
    # an option of a group is declared in its group only: no command redeclares one on its own
    every = {p.name for group in EXPLAINING for p in group.params}
    for name, command in COMMANDS.items():
        own = {p.name for p in command.params} - {p.name for g in command.callback.groups for p in g.params}
        assert not own & every, (name, own & every)


def test_help_shows_each_group_under_its_heading():
    result = CliRunner().invoke(app, ["audit", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    for group in EXPLAINING:
        assert f"\n{group.title}:\n" in result.output, group.title
    assert max(len(line) for line in result.output.splitlines()) <= 80


#: a non-default value for every group option, and the objects they must become
GIVEN = ["--preprocess", "caffe", "--size", "64x48", "--preset", "epsilon-gamma-box", "--split", "symmetric",
         "--exclude-identity", "--no-bias", "--low", "-2", "--high", "3", "--rule", "Conv=epsilon(0.25)",
         "--precision", "fp16", "--heatmap", "gated", "--layer", "input", "--device", "cpu", "--threads", "1",
         "--batch-size", "3", "--no-cache", "--ray", "--concurrency", "2"]
OPTIONS = Options.make(preprocessing="caffe", image_size=(64, 48), preset="epsilon-gamma-box", split="symmetric",
                       include_identity=False, bias=False, low=-2, high=3, rules={"Conv": R.epsilon(0.25)},
                       precision="fp16", heatmap="gated", layer="input")
RUNTIME = Runtime(device="cpu", threads=1, batch_size=3, cache=False, cluster=Cluster(None, 2))


def _recording(monkeypatch):
    seen = []

    def recorded(self, model, options=None, runtime=None, **settings):
        seen.append((options, runtime))
        raise OnnxLrpError("recorded")

    monkeypatch.setattr(Explainer, "__init__", recorded)
    return seen


@pytest.mark.parametrize("command", ["explain", "audit"])
def test_every_group_option_reaches_the_explainer(command, demo_model, demo_image, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    seen = _recording(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(demo_image.read_bytes())
    target = demo_image if command == "explain" else data
    result = run(command, demo_model, target, "-o", tmp_path / "out", *GIVEN)
    assert result.exit_code == 1 and "recorded" in result.stderr, result.output
    options, runtime = seen[0]
    assert options.digest() == OPTIONS.digest() and runtime == RUNTIME


def test_compile_takes_the_groups_that_shape_the_graph(demo_model, tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    shaping = GIVEN[:GIVEN.index("--device")]
    result = run("compile", demo_model, "-o", tmp_path / "e.onnx", *shaping)
    assert result.exit_code == 1 and "recorded" in result.stderr, result.output
    assert seen[0][0].digest() == OPTIONS.digest()


def test_evaluate_hands_the_groups_to_its_lrp_method_and_refuses_what_a_method_sets(demo_model, demo_image,
                                                                                    tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import onnxlrp.cli as cli

    seen = {}

    def recorded(model, dataset, methods, protocols, levels, **kwargs):
        seen.update(kwargs, methods=methods)
        raise OnnxLrpError("recorded")

    monkeypatch.setattr(cli, "run_evaluation", recorded)
    data = tmp_path / "data" / "ring"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(demo_image.read_bytes())
    result = run("evaluate", demo_model, data.parent, "-o", tmp_path / "out", "--methods", "lrp,grad-cam", *GIVEN)
    assert result.exit_code == 1 and "recorded" in result.stderr, result.output
    assert seen["options"].digest() == OPTIONS.digest() and seen["runtime"] == RUNTIME
    clash = run("evaluate", demo_model, data.parent, "--methods", "paper-iv", "--split", "ratio")
    assert clash.exit_code == 1 and "method paper-iv sets --split itself" in clash.stderr, clash.output
