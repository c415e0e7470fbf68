"""onnxlrp.runs in one process: streaming memory, resume after an interruption, sources.
(The Ray backend's resume is tested in test_distributed; the CLI's files in test_cli.)"""
import numpy as np
import pytest

from conftest import ROOT, traced_peak
from onnxlrp import Explainer
from onnxlrp.errors import ImageError
from onnxlrp.runs import FileSink, Pixels, explain_folder

DEMO = ROOT / "models" / "demo" / "tiny_resnet.onnx"
BATCH = 8


@pytest.fixture(scope="module")
def explainer():
    return Explainer(DEMO)


def _image(key: str) -> np.ndarray:
    """A different image per key, the same for the same key in every run."""
    rng = np.random.default_rng(int(key[3:]))
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _maps(folder, count):
    return np.stack([np.load(folder / f"img{k:0{len(str(count - 1))}d}_lrp.npy") for k in range(count)])


def test_an_interrupted_run_resumes_where_it_stopped(explainer, tmp_path):
    """A failure while batch 3 is decoded leaves batches 1 and 2 complete on disk (each image's
    files appear together); the rerun explains only the rest, and the maps equal one
    uninterrupted run's exactly: the rerun cuts the rest into the same batches, and onnxruntime
    gives the same numbers for the same batch."""
    count = 5 * BATCH
    whole = tmp_path / "whole"
    summary = explain_folder(explainer, Pixels.of(count, _image), FileSink(npy=whole), batch_size=BATCH)
    assert (summary.images, summary.skipped) == (count, 0)

    failed = {"once": False}

    def flaky(key: str) -> np.ndarray:
        if key == f"img{2 * BATCH:02d}" and not failed["once"]:
            failed["once"] = True
            raise ImageError(f"{key}: the camera went away")
        return _image(key)

    out = tmp_path / "resumed"
    with pytest.raises(ImageError, match="camera went away"):
        explain_folder(explainer, Pixels.of(count, flaky), FileSink(npy=out), batch_size=BATCH)
    first = sorted(p.name for p in out.iterdir())
    assert len(first) == 2 * BATCH and not any(".tmp" in name for name in first)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    seen = []
    summary = explain_folder(explainer, Pixels.of(count, flaky), FileSink(npy=out), batch_size=BATCH,
                             progress=lambda done, total: seen.append((done, total)))
    assert (summary.images, summary.skipped) == (count - 2 * BATCH, 2 * BATCH)
    assert seen[0] == (0, count - 2 * BATCH) and seen[-1] == (count - 2 * BATCH,) * 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps  # not rewritten
    np.testing.assert_array_equal(_maps(out, count), _maps(whole, count))
    again = explain_folder(explainer, Pixels.of(count, _image), FileSink(npy=out), batch_size=BATCH)
    assert (again.images, again.skipped) == (0, count)


def test_a_staged_run_leaves_nothing_and_does_not_resume(explainer, tmp_path):
    """staged=True (the CLI's single-process explain): all files at the end, or none."""
    def broken(key: str) -> np.ndarray:
        if key == f"img{2 * BATCH:02d}":
            raise ImageError(f"{key}: unreadable")
        return _image(key)

    out = tmp_path / "staged"
    with pytest.raises(ImageError, match="unreadable"):
        explain_folder(explainer, Pixels.of(3 * BATCH, broken), FileSink(npy=out, staged=True), batch_size=BATCH)
    assert not out.exists()
    summary = explain_folder(explainer, Pixels.of(3 * BATCH, _image), FileSink(npy=out, staged=True), batch_size=BATCH)
    again = explain_folder(explainer, Pixels.of(3 * BATCH, _image), FileSink(npy=out, staged=True), batch_size=BATCH)
    assert (summary.skipped, again.images, again.skipped) == (0, 3 * BATCH, 0)


def test_a_source_that_makes_the_wrong_shape_is_one_error(explainer, tmp_path):
    with pytest.raises(ImageError, match=r"img0: made an image of shape \[32, 32, 3\]"):
        explain_folder(explainer, Pixels.of(2, lambda key: np.zeros((32, 32, 3), np.uint8)), FileSink(npy=tmp_path))


@pytest.mark.slow
def test_ten_thousand_images_in_one_process_need_the_memory_of_two_batches(tmp_path):
    """The pipeline holds batch k (explained), k+1 (decoding) and k-1's writes; what stays per
    image is two shares and the item's name. So the peak of a 10,000-image run stays within
    twice the peak of a one-batch run, measured the same way here (no machine's constant in the
    bound). Holding each image's 16 KiB map would need 160 MiB, ten times the bound."""
    one_batch = traced_peak("runs", 32, tmp_path / "one")
    many = traced_peak("runs", 10_000, tmp_path / "many")
    assert many < 2 * one_batch, f"peak {many / 2**20:.1f} MiB for 10,000 images, {one_batch / 2**20:.1f} for one batch"
    assert len(list((tmp_path / "many").iterdir())) == 10_000
