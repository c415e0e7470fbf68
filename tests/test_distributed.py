"""explain_dataset on a local Ray instance: the same numbers as one process, and resume.

One Ray instance (2 CPUs) serves the whole module; each explain_dataset call costs a few
seconds of actor and writer start-up, so the image sets are small.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (optional): pip install 'onnxlrp[ray]'")
pytest.importorskip("ray.data", reason="ray[data] is not installed (optional): pip install 'onnxlrp[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (from ray[data]) is not installed")

from onnxlrp import Explainer  # noqa: E402
from onnxlrp.distributed import explain_dataset, read_heatmaps  # noqa: E402
from onnxlrp.errors import OnnxLrpError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo" / "tiny_resnet.onnx"
SHAPES = ROOT / "examples" / "shapes"
# Two images of each of the six classes, as absolute paths (what the Parquet rows hold).
FILES = [os.path.abspath(p) for c in ("circle", "plus", "ring", "square", "star", "triangle")
         for p in sorted((SHAPES / c).glob("*.png"))[:2]]


@pytest.fixture(scope="module")
def local_ray(explainer_cache):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """Single process: Explainer.explain_files on the same images."""
    result, _ = Explainer(MODEL).explain_files(FILES, batch_size=4)
    return result


def rows(output: Path) -> dict[str, dict]:
    table = pq.read_table(output)  # pyarrow skips _onnxlrp.json
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "an image has more than one row"
    return {row["path"]: row for row in table.to_pylist()}


def check_equal(found: dict[str, dict], reference, files=FILES) -> None:
    heat = reference.heatmap().astype(np.float16)
    assert sorted(found) == sorted(files)
    for i, path in enumerate(files):
        row = found[path]
        assert row["target"] == reference.targets[i]
        assert np.array_equal(np.asarray(row["logits"], np.float32), reference.logits[i])
        assert np.float32(row["initial_relevance"]) == reference.initial[i]
        assert row["conservation_error"] == reference.conservation_error[i]
        assert row["heatmap_shape"] == list(heat.shape[1:])
        assert np.array_equal(np.asarray(row["heatmap"], np.float16).reshape(row["heatmap_shape"]), heat[i])


def test_same_as_single_process(local_ray, reference, tmp_path):
    out = explain_dataset(FILES, MODEL, output=tmp_path / "out", batch_size=4, concurrency=2, full_relevance=True)
    found = rows(out)
    check_equal(found, reference)
    for i, path in enumerate(FILES):
        relevance = np.asarray(found[path]["relevance"], np.float32).reshape(found[path]["relevance_shape"])
        assert np.array_equal(relevance, reference.relevance[i])
    maps = read_heatmaps(out)
    assert np.array_equal(maps[FILES[0]], reference.heatmap()[0].astype(np.float16))


def test_resume_skips_what_is_done(local_ray, reference, tmp_path):
    out = tmp_path / "out"
    explain_dataset(FILES[:5], MODEL, output=out, batch_size=4)
    first = {p.name for p in out.glob("*.parquet")}
    assert sorted(rows(out)) == sorted(FILES[:5])
    # A folder holding all twelve and more: only the 115 others are new. Here: the list again.
    explain_dataset(FILES, MODEL, output=out, batch_size=4)
    assert first <= {p.name for p in out.glob("*.parquet")}  # the first run's files are kept
    check_equal(rows(out), reference)
    # Everything is done: nothing to run, nothing written.
    before = sorted(p.name for p in out.glob("*.parquet"))
    explain_dataset(FILES, MODEL, output=out, batch_size=4)
    assert sorted(p.name for p in out.glob("*.parquet")) == before
    # Other options into the same folder would mix results: refused.
    with pytest.raises(OnnxLrpError, match="another set of options"):
        explain_dataset(FILES, MODEL, output=out, preset="epsilon", batch_size=4)


def test_dataset_source_and_resume(local_ray, reference, tmp_path):
    out = tmp_path / "out"
    explain_dataset(FILES[::2], MODEL, output=out, batch_size=4)
    dataset = ray.data.from_items([{"path": p, "label": i} for i, p in enumerate(FILES)])
    explain_dataset(dataset, MODEL, output=out, batch_size=4)
    check_equal(rows(out), reference)
    with pytest.raises(OnnxLrpError, match="no 'path' column"):
        explain_dataset(ray.data.from_items([{"file": FILES[0]}]), MODEL, output=tmp_path / "other")


def test_cli_explain_on_ray(local_ray, reference, tmp_path):
    """onnxlrp explain --ray: the same rows as the API (the Ray instance this test module started);
    without -o, a one-line error."""
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    folder = tmp_path / "images"
    folder.mkdir()
    for path in FILES:  # the CLI takes files and folders; rows hold absolute paths
        (folder / Path(path).parent.name).mkdir(exist_ok=True)
        (folder / Path(path).parent.name / Path(path).name).write_bytes(Path(path).read_bytes())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(MODEL), str(folder), "--ray", "-o", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "12 image(s) explained" in result.output
    copies = {str(folder / Path(p).parent.name / Path(p).name): p for p in FILES}
    check_equal({copies[k]: v for k, v in rows(out).items()}, reference)
    missing = CliRunner().invoke(app, ["explain", str(MODEL), str(folder), "--ray"])
    assert missing.exit_code == 1 and "give the output folder with -o" in missing.output
