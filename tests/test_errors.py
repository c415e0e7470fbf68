"""Every user error is an OnnxLrpError of its kind (onnxlrp.errors), so that code telling
kinds apart (the audit's rules check, a release pipeline) reads the type, not the message;
and the command line turns every kind into its one line and exit 1."""
import numpy as np
import pytest
from typer.testing import CliRunner

import tiny_graphs as tg
from onnxlrp import Explainer, OnnxLrpError
from onnxlrp.cli import app
from onnxlrp.errors import DataError, ImageError, ModelError, NoRuleError, OutputError, SettingError
from onnxlrp.evaluation.evaluate import load_dataset
from onnxlrp.io.files import check_writable
from onnxlrp.io.preprocessing import image_sources
from onnxlrp.options import Options, Runtime


def test_each_kind_of_problem_raises_its_type(demo_model, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    explainer = Explainer(demo_model)
    cases = [
        (ModelError, lambda: Explainer(garbage)),
        (ImageError, lambda: image_sources([tmp_path / "missing.png"])),
        (ImageError, lambda: image_sources([empty])),
        (SettingError, lambda: Options.make(precision="fp8")),
        (SettingError, lambda: Options.make(preset="no-such-preset")),
        (SettingError, lambda: Runtime(device="tpu")),
        (SettingError, lambda: Explainer(demo_model, heatmap="layer", layer="no-such-tensor")),
        (DataError, lambda: load_dataset(empty)),
        (DataError, lambda: explainer.explain(np.zeros((1, 3, 5, 5), np.float32))),
        (OutputError, lambda: check_writable([empty])),
        (NoRuleError, lambda: Explainer(tg.save(tg.product_net(), tmp_path / "product.onnx"))),
    ]
    for kind, make in cases:
        with pytest.raises(OnnxLrpError) as caught:
            make()
        assert type(caught.value) is kind, (kind.__name__, type(caught.value).__name__, caught.value)


def test_the_command_line_gives_every_kind_one_line_and_exit_1(demo_model, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    for args in (["explain", garbage, tmp_path], ["explain", demo_model, tmp_path / "missing.png"],
                 ["explain", demo_model, tmp_path, "--heatmap", "layer", "--layer", "nope"]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith("error: "), result.stderr
