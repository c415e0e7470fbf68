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

import float32_bounds  # noqa: E402
from conftest import relative_error  # noqa: E402
from onnxlrp import Explainer  # noqa: E402
from onnxlrp.distributed import explain_dataset, read_heatmaps  # noqa: E402
from onnxlrp.errors import OnnxLrpError  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
              pytest.mark.slow]  # the reference tier: pytest -m "not slow" leaves it out

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


@pytest.fixture(scope="module")
def bound(reference, tmp_path_factory):
    """How far (relative, L2 over the images) the actors' logits, initial relevance, input sums,
    relevance and heatmaps may be from the driver's: the actors run onnxruntime with the CPUs
    Ray gave them (1 here) and the driver with its default threads, in other processes, and
    onnxruntime does not promise the same float32 rounding across thread counts. Each run is
    within float32_bounds.onnx_bounds of the exact result (float32_bounds.apart)."""
    explainer = Explainer(MODEL)
    x = explainer.images.normalize(explainer.read_images(FILES))
    names = ("logits", "initial", "input_sum", "relevance", "heatmap")
    return dict(zip(names, float32_bounds.apart(MODEL, x, reference.targets, tmp_path_factory.mktemp("noisy"), names)))


def rows(output: Path) -> dict[str, dict]:
    table = pq.read_table(output)  # pyarrow skips _onnxlrp.json
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "an image has more than one row"
    return {row["path"]: row for row in table.to_pylist()}


def heatmap_bound(heat16: np.ndarray, bound: dict) -> float:
    """float16 heatmaps (the Parquet column) of float32 maps within bound["heatmap"]: float16
    rounding of each (float32_bounds.float16_rtol), and below 2^-14 float16's subnormal
    spacing 2^-24, half of it per element and map."""
    return float32_bounds.float16_rtol(bound["heatmap"]) + 2.0 ** -24 * np.sqrt(heat16.size) / np.linalg.norm(heat16)


def check_equal(found: dict[str, dict], reference, bound: dict, files=FILES) -> None:
    heat = reference.heatmap().astype(np.float16)
    assert sorted(found) == sorted(files)
    index = [FILES.index(path) for path in files]
    for i, path in zip(index, files):
        row = found[path]
        # an integer: the same in any run while the top two logits are further apart than the
        # logits' float32 bound (the demo model on these images: by more than 6, against < 1e-3)
        assert row["target"] == reference.targets[i]
        assert row["heatmap_shape"] == list(heat.shape[1:])
    column = lambda name: np.array([found[path][name] for path in files], np.float64)  # noqa: E731
    assert relative_error(column("logits"), reference.logits[index]) <= bound["logits"]
    initial = reference.initial[index].astype(np.float64)
    assert relative_error(column("initial_relevance"), initial) <= bound["initial"]
    # |S - I| / |I| (S the input sum, I the initial relevance) moves by at most
    # (|dS| + |dI|) / |I| + error |dI| / |I|; dS, dI within their L2 bounds of ||S||, ||I||
    total = reference.input_sum[index]
    errors = reference.conservation_error[index]
    moved = (bound["input_sum"] * np.linalg.norm(total) + bound["initial"] * np.linalg.norm(initial)
             * (1 + errors.max())) / np.abs(initial).min()
    assert np.all(np.abs(column("conservation_error") - errors) <= moved)
    maps = np.stack([np.asarray(found[path]["heatmap"], np.float16).reshape(found[path]["heatmap_shape"])
                     for path in files])
    assert relative_error(maps.astype(np.float64), heat[index].astype(np.float64)) <= heatmap_bound(heat[index], bound)


def test_a_cluster_address_nothing_answers_at_is_one_line(tmp_path):
    """Ray itself retries a dead address for minutes; onnxlrp says so at once. Nothing is written.
    First in the module: once the module's Ray instance runs, a process uses that one."""
    assert not ray.is_initialized()
    import socket

    from typer.testing import CliRunner

    from onnxlrp.cli import app

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, message in ((f"127.0.0.1:{port}", f"cannot reach the Ray cluster at 127.0.0.1:{port}"),
                             ("nonsense", "expected 'auto', HOST:PORT or ray://HOST:PORT")):
        result = CliRunner().invoke(app, ["evaluate", str(MODEL), str(SHAPES), "--limit", "1", "-m", "grad-cam",
                                          "--ray-address", address, "-o", str(tmp_path / "out")])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_same_as_single_process(local_ray, reference, bound, tmp_path):
    out = explain_dataset(FILES, MODEL, output=tmp_path / "out", batch_size=4, concurrency=2, full_relevance=True)
    found = rows(out)
    check_equal(found, reference, bound)
    relevance = np.stack([np.asarray(found[path]["relevance"], np.float32).reshape(found[path]["relevance_shape"])
                          for path in FILES])
    assert relative_error(relevance, reference.relevance) <= bound["relevance"]
    maps = read_heatmaps(out)
    first = reference.heatmap()[:1].astype(np.float16)
    assert relative_error(maps[FILES[0]][None].astype(np.float64), first.astype(np.float64)) <= \
        float32_bounds.float16_rtol(bound["heatmap"] * np.linalg.norm(reference.heatmap()) / np.linalg.norm(first)) \
        + 2.0 ** -24 * np.sqrt(first.size) / np.linalg.norm(first)  # image 0's share of the batch's L2 bound


def test_resume_skips_what_is_done(local_ray, reference, bound, tmp_path):
    out = tmp_path / "out"
    explain_dataset(FILES[:5], MODEL, output=out, batch_size=4)
    first = {p.name for p in out.glob("*.parquet")}
    assert sorted(rows(out)) == sorted(FILES[:5])
    # A folder holding all twelve and more: only the 115 others are new. Here: the list again.
    explain_dataset(FILES, MODEL, output=out, batch_size=4)
    assert first <= {p.name for p in out.glob("*.parquet")}  # the first run's files are kept
    check_equal(rows(out), reference, bound)
    # Everything is done: nothing to run, nothing written.
    before = sorted(p.name for p in out.glob("*.parquet"))
    explain_dataset(FILES, MODEL, output=out, batch_size=4)
    assert sorted(p.name for p in out.glob("*.parquet")) == before
    # Other options into the same folder would mix results: refused.
    with pytest.raises(OnnxLrpError, match="another set of options"):
        explain_dataset(FILES, MODEL, output=out, preset="epsilon", batch_size=4)


def test_dataset_source_and_resume(local_ray, reference, bound, tmp_path):
    out = tmp_path / "out"
    explain_dataset(FILES[::2], MODEL, output=out, batch_size=4)
    dataset = ray.data.from_items([{"path": p, "label": i} for i, p in enumerate(FILES)])
    explain_dataset(dataset, MODEL, output=out, batch_size=4)
    check_equal(rows(out), reference, bound)
    with pytest.raises(OnnxLrpError, match="no 'path' column"):
        explain_dataset(ray.data.from_items([{"file": FILES[0]}]), MODEL, output=tmp_path / "other")


def copied_images(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """FILES copied into class subfolders of one folder (the CLI takes folders), and the copies'
    paths -> the originals."""
    folder = tmp_path / "images"
    copies = {}
    for path in FILES:
        copy = folder / Path(path).parent.name / Path(path).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(Path(path).read_bytes())
        copies[str(copy)] = path
    return folder, copies


def test_cli_explain_to_parquet(local_ray, reference, bound, tmp_path):
    """onnxlrp explain --ray --parquet DIR: the same rows as the API (the Ray instance this test
    module started); -o beside --parquet is a one-line error."""
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    folder, copies = copied_images(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(MODEL), str(folder), "--ray", "--parquet", str(out),
                                      "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "12 image(s) explained" in result.output
    check_equal({copies[k]: v for k, v in rows(out).items()}, reference, bound)
    both = CliRunner().invoke(app, ["explain", str(MODEL), str(folder), "--parquet", str(out), "-o", str(tmp_path)])
    assert both.exit_code == 1 and "leave out -o and --npy" in both.output


def test_cli_explain_on_ray_writes_the_single_process_files_and_resumes(local_ray, tmp_path):
    """explain --ray -o DIR --npy DIR: the files of the single-process command, byte for byte,
    under the same names; a rerun after a partial output explains only what is missing."""
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    folder, _ = copied_images(tmp_path)
    # batches of 11 and 1: onnxruntime takes another path for a lone image, in both runs alike
    args = ["explain", str(MODEL), str(folder), "--batch-size", "11", "--top-k", "2"]
    alone = CliRunner().invoke(app, args + ["-o", str(tmp_path / "png1"), "--npy", str(tmp_path / "npy1")])
    assert alone.exit_code == 0, alone.output
    ray_args = args + ["--ray", "--concurrency", "2", "-o", str(tmp_path / "png"), "--npy", str(tmp_path / "npy")]
    first = CliRunner().invoke(app, ray_args)
    assert first.exit_code == 0, first.output
    for kind in ("png", "npy"):
        ours = sorted(p.relative_to(tmp_path / kind) for p in (tmp_path / kind).rglob(f"*.{kind}"))
        theirs = sorted(p.relative_to(tmp_path / f"{kind}1") for p in (tmp_path / f"{kind}1").rglob(f"*.{kind}"))
        assert ours == theirs and len(ours) == 24  # 12 images, top 2
        for name in ours:
            assert (tmp_path / kind / name).read_bytes() == (tmp_path / f"{kind}1" / name).read_bytes(), name
    assert sorted(first.stdout.splitlines()) == sorted(alone.stdout.replace("png1", "png").replace("npy1", "npy")
                                                       .splitlines())
    # An interrupted run: three images' files gone; the rerun writes those and leaves the rest.
    gone = sorted((tmp_path / "png" / "star").glob("*.png")) + sorted((tmp_path / "npy" / "ring").glob("*_top1_lrp.npy"))
    kept = tmp_path / "png" / "circle" / f"{Path(FILES[0]).stem}_top1_lrp.png"
    stamp = kept.stat().st_mtime_ns
    for path in gone:
        path.unlink()
    again = CliRunner().invoke(app, ray_args)
    assert again.exit_code == 0, again.output
    assert "8 image(s) already explained there: skipped" in again.output
    assert all(p.is_file() for p in gone) and kept.stat().st_mtime_ns == stamp
    assert len(again.stdout.splitlines()) == 2 * 4  # the four images redone, two ranks each


def test_evaluate_on_ray_equals_single_process(local_ray):
    """The same per-image values, in the same order, and so the same table: LRP (with its
    conservation points), a CAM and a gradient method, both protocols, masks."""
    from onnxlrp.evaluation.evaluate import evaluate, load_dataset
    from onnxlrp.runtime.cluster import Cluster

    dataset = load_dataset(SHAPES)
    args = (MODEL, dataset, ["paper-iv", "grad-cam", "gradient"])
    # one thread, as each of the 2 actors on 2 CPUs has: the same kernels with the same work
    # split, so the same numbers (another thread count may split reductions otherwise)
    alone = evaluate(*args, limit=10, batch_size=4, threads=1)
    progress = []
    spread = evaluate(*args, limit=10, batch_size=4, cluster=Cluster(concurrency=2), progress=progress.append,
                      threads=1)
    assert spread.values == alone.values and spread.conservation == alone.conservation
    assert spread.accuracy == alone.accuracy and spread.markdown() == alone.markdown()
    assert len(alone.values["paper-iv"]["exact:id"]) == 10 and sorted(progress) == [2, 4, 4]


def test_audit_on_ray_equals_single_process(local_ray):
    """The same rows, checks and findings: faithfulness scores and drift come from the actors too."""
    from onnxlrp.audit.run import audit
    from onnxlrp.runtime.cluster import Cluster

    models = ROOT / "models" / "audit"
    args = dict(against=models / "clean.onnx", faithfulness=True, sanity_images=4, limit=24, batch_size=8)
    # one thread everywhere, as each of the 2 actors on 2 CPUs has: the same kernels with the same
    # work split, so the same numbers (the driver's sanity checks included)
    alone = audit(models / "shortcut.onnx", ROOT / "examples" / "audit", threads=1, **args)
    spread = audit(models / "shortcut.onnx", ROOT / "examples" / "audit", cluster=Cluster(concurrency=2), threads=1,
                   **args)
    assert spread.rows == alone.rows and spread.checks == alone.checks
    assert [(f.check, f.severity, f.message, f.images) for f in spread.findings] == \
        [(f.check, f.severity, f.message, f.images) for f in alone.findings]
    assert np.array_equal(spread.heatmaps, alone.heatmaps) and np.array_equal(spread.pixels, alone.pixels)
    assert np.array_equal(spread.other_heatmaps, alone.other_heatmaps)
    assert "exact_id" in alone.rows[0] and "drift_rank_correlation" in str(alone.rows[0])


def test_cli_evaluate_and_audit_on_ray(local_ray, tmp_path):
    """--ray on evaluate and audit: the results files of the single-process commands."""
    import json

    from typer.testing import CliRunner

    from onnxlrp.cli import app

    evaluate = ["evaluate", str(MODEL), str(SHAPES), "--limit", "6", "--batch-size", "4", "-m", "paper-iv,grad-cam"]
    # one thread, as each actor has (the library test above says why)
    alone = CliRunner().invoke(app, evaluate + ["-o", str(tmp_path / "e1"), "--threads", "1"])
    spread = CliRunner().invoke(app, evaluate + ["-o", str(tmp_path / "e2"), "--ray"])
    assert alone.exit_code == spread.exit_code == 0, spread.output
    assert (tmp_path / "e1" / "results.md").read_text() == (tmp_path / "e2" / "results.md").read_text()
    assert json.loads((tmp_path / "e1" / "results.json").read_text()) == \
        json.loads((tmp_path / "e2" / "results.json").read_text())

    audit = ["audit", str(ROOT / "models" / "audit" / "shortcut.onnx"), str(ROOT / "examples" / "audit"),
             "--limit", "12", "--sanity-images", "2"]
    alone = CliRunner().invoke(app, audit + ["-o", str(tmp_path / "a1"), "--threads", "1"])
    spread = CliRunner().invoke(app, audit + ["-o", str(tmp_path / "a2"), "--ray", "--concurrency", "2"])
    assert alone.exit_code == spread.exit_code, spread.output
    assert alone.stdout.replace("a1", "a2") == spread.stdout
    assert (tmp_path / "a1" / "images.csv").read_text() == (tmp_path / "a2" / "images.csv").read_text()


def test_without_ray_the_flags_say_what_to_install(monkeypatch, tmp_path):
    """No ray installed: one line naming the extra, exit 1 (bad input, in every command), nothing run."""
    import sys

    from typer.testing import CliRunner

    from onnxlrp.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    for args, code in ((["explain", str(MODEL), FILES[0], "--ray", "-o", str(tmp_path / "x")], 1),
                       (["evaluate", str(MODEL), str(SHAPES), "--ray", "-o", str(tmp_path / "e")], 1),
                       (["audit", str(MODEL), str(SHAPES), "--ray", "-o", str(tmp_path / "a")], 1)):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == code, result.output
        assert result.output.strip().splitlines() == ["error: ray is not installed: pip install 'onnxlrp[ray]'"]
    assert not any(tmp_path.iterdir())



def test_bad_input_in_an_actor_is_its_one_line(local_ray, tmp_path):
    """An unreadable image met by a Ray actor: the same one-line error as in one process (exit 1,
    nothing written), not Ray's wrapped task error."""
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    data = tmp_path / "data"
    (data / "circle").mkdir(parents=True)
    for path in FILES[:3]:
        (data / "circle" / Path(path).name).write_bytes(Path(path).read_bytes())
    (data / "circle" / "zz.png").write_bytes(Path(FILES[0]).read_bytes()[:100])  # truncated
    (data / "classes.txt").write_text("circle\nsquare\ntriangle\nplus\nstar\nring\n")
    args = ["evaluate", str(MODEL), str(data), "-m", "grad-cam", "--batch-size", "2", "-o", str(tmp_path / "out")]
    alone, spread = CliRunner().invoke(app, args), CliRunner().invoke(app, args + ["--ray"])
    assert alone.exit_code == spread.exit_code == 1, spread.output
    assert spread.output == alone.output and "zz.png: cannot read image" in alone.output
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_parquet_actor_is_its_one_line(local_ray, tmp_path):
    """explain --parquet: Ray Data brings an actor's error back as its traceback's text; the
    user gets the one line the single-process command gives (exit 1), not Ray's error."""
    from typer.testing import CliRunner

    from onnxlrp.cli import app

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(Path(FILES[0]).read_bytes())
    (data / "zz.png").write_bytes(Path(FILES[0]).read_bytes()[:100])  # truncated
    alone = CliRunner().invoke(app, ["explain", str(MODEL), str(data), "-o", str(tmp_path / "png")])
    spread = CliRunner().invoke(app, ["explain", str(MODEL), str(data), "--ray", "--parquet", str(tmp_path / "pq")])
    assert alone.exit_code == spread.exit_code == 1, spread.output
    assert spread.output.strip().splitlines() == alone.output.strip().splitlines(), spread.output
    assert "zz.png: cannot read image" in alone.output


def test_cli_explain_to_parquet_honours_every_explainer_option(local_ray, tmp_path):
    """Every option of explain that shapes the explanation reaches the Parquet run (the meta
    file's options digest is the one of an Explainer given the same options, and the rows
    explain the class asked for); the picture options, which a row cannot hold, are refused."""
    import json

    from typer.testing import CliRunner

    from onnxlrp.cli import app
    from onnxlrp.distributed import META

    files = FILES[:2]
    out = tmp_path / "out"
    flags = ["--preset", "epsilon-gamma-box", "--no-bias", "--exclude-identity", "--low", "-1.5", "--high", "2.5",
             "--precision", "fp16", "--target", "3", "--size", "64x64", "--preprocess", "raw"]
    result = CliRunner().invoke(app, ["explain", str(MODEL), *files, "--ray", "--parquet", str(out), *flags])
    assert result.exit_code == 0, result.output
    expected = Explainer(MODEL, preset="epsilon-gamma-box", bias=False, include_identity=False, low=-1.5, high=2.5,
                         precision="fp16", image_size=(64, 64), preprocessing="raw")
    meta = json.loads((out / META).read_text())
    assert meta["options"] == expected.options.digest() and meta["target"] == 3
    found = rows(out)
    assert all(found[f]["target"] == 3 for f in files)
    for f in files:  # how much reached the input (the totals' own ratio), and columns for what took the rest
        row = found[f]
        assert row["reach"] == pytest.approx(row["input_relevance"] / row["initial_relevance"], rel=1e-6)
        assert all(f"taken_{family}" in row for family in ("layer", "activation", "other"))
    refused = CliRunner().invoke(app, ["explain", str(MODEL), *files, "--parquet", str(tmp_path / "b"), "--top-k", "2",
                                       "--cmap", "jet"])
    assert refused.exit_code == 1 and "leave out --cmap, --top-k" in refused.output
    assert not (tmp_path / "b").exists()
