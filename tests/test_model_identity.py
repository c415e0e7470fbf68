"""A model's identity is its .onnx file plus the external-data files it names (ir.digest): the
compiled-explainer cache, the audit and a Parquet run's resume all go by it."""
import shutil

import numpy as np
import onnx
import pytest

from onnxlrp import Explainer
from onnxlrp.audit.identity import identity
from onnxlrp.errors import OnnxLrpError
from onnxlrp.ir.digest import file_digest, model_digest


def _external(model: onnx.ModelProto, folder, scale: float = 1.0):
    """The model saved with its weights in model.data (every tensor, however small)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        values = onnx.numpy_helper.to_array(init)
        if values.dtype == np.float32:
            init.CopyFrom(onnx.numpy_helper.from_array((values * np.float32(scale)).astype(np.float32), init.name))
    folder.mkdir(exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.data",
              size_threshold=0)
    return folder / "model.onnx"


def test_new_weights_in_the_data_file_are_a_new_model(demo_model, tmp_path):
    source = onnx.load(str(demo_model))
    path = _external(source, tmp_path / "deployed")
    retrained = _external(source, tmp_path / "retrained", scale=1.5)
    assert path.read_bytes() == retrained.read_bytes()  # the graph file alone cannot tell them apart
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    before = Explainer(path).explain(x)
    digest = model_digest(path)
    shutil.copyfile(retrained.with_suffix(".data"), path.with_suffix(".data"))  # weights replaced in place
    assert model_digest(path) != digest and file_digest(path) == file_digest(retrained)
    after = Explainer(path).explain(x)  # the cache must not serve the old graph
    fresh = Explainer(path, cache=False).explain(x)
    np.testing.assert_array_equal(after.logits, fresh.logits)
    assert not np.allclose(after.logits, before.logits)
    assert identity(path, Explainer(path))["sha256"] == model_digest(path)


def test_a_self_contained_model_is_named_by_its_file(demo_model, tmp_path):
    assert model_digest(demo_model) == file_digest(demo_model)  # what sha256sum prints


def test_a_missing_data_file_is_one_line(demo_model, tmp_path):
    path = _external(onnx.load(str(demo_model)), tmp_path / "m")
    path.with_suffix(".data").unlink()
    with pytest.raises(OnnxLrpError, match=r"external data file 'model.data' is missing"):
        model_digest(path)
