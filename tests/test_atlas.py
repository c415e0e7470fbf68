"""The concept atlas (onnxlrp.concepts): relevance maximisation over a folder, its report, the
command, streaming, and Ray."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT, traced_peak
from onnxlrp import Explainer
from onnxlrp.cli import app
from onnxlrp.concepts import atlas, where_it_looks, write
from onnxlrp.concepts.scan import Top
from onnxlrp.errors import SettingError

AUDIT_DATA = ROOT / "examples" / "audit"
MODELS = ROOT / "models" / "audit"
TAGS = json.loads((AUDIT_DATA / "tags.json").read_text())
CLASSES = (AUDIT_DATA / "classes.txt").read_text().split()
runner = CliRunner()


def _covers_tag(box) -> bool:
    x0, y0, x1, y1 = TAGS["box_xyxy"]
    top, left, bottom, right = box
    return top <= y0 and left <= x0 and bottom >= y1 and right >= x1


@pytest.fixture(scope="module")
def atlases():
    return {name: atlas(MODELS / f"{name}.onnx", AUDIT_DATA, per_class=3, class_names=CLASSES)
            for name in ("shortcut", "clean")}


def test_the_shortcut_class_rests_on_channels_that_look_at_the_tag(atlases):
    """The planted shortcut (a checkerboard in the top-left corner of most star images): the
    star class's top concepts in the shortcut model have reference images whose conditional
    maps sit on the tag; in the clean twin, trained without it, none do."""
    shortcut, clean = atlases["shortcut"], atlases["clean"]
    star = CLASSES.index(TAGS["shortcut_class"])
    for found, expected in ((shortcut, True), (clean, False)):
        [entry] = [c for c in found.classes if c.target == star]
        for channel, _ in entry.channels:
            boxes = [r.box for r in found.concepts[channel].by_relevance]
            assert boxes and all(_covers_tag(b) == expected for b in boxes), (expected, channel, boxes)


@pytest.mark.slow
def test_references_are_the_best_images_by_relevance_and_activation(atlases):
    """Against a brute force over the folder: every image's channel totals from the compiled
    graph's own outputs, sorted. float32 totals of the same relevance from two graphs may
    differ in their last bits, so values are compared to float32 rounding of their sum's
    magnitude (sum_rtol) and the order only where values are apart by more."""
    import float32_bounds

    found = atlases["shortcut"]
    explainer = Explainer(MODELS / "shortcut.onnx", concept_layer="last")
    result, _ = explainer.explain_files([AUDIT_DATA])
    files = [str(p) for p in explainer.load_images([AUDIT_DATA])[0]]
    concepts = explainer.explain(explainer.images.normalize(explainer.load_images([AUDIT_DATA])[1]),
                                 concepts=1).concepts
    relevance, activation = concepts.channel_relevance, concepts.channel_activation
    h, w = 16, 16  # the layer's positions
    rtol = float32_bounds.sum_rtol(h * w)
    for channel, concept in found.concepts.items():
        for refs, values in ((concept.by_relevance, relevance[:, channel]), (concept.by_activation,
                                                                            activation[:, channel])):
            expected = np.sort(values[values > 0])[::-1][:len(refs)]
            got = np.array([r.value for r in refs])
            np.testing.assert_allclose(got, expected, rtol=4 * rtol, atol=4 * rtol * np.abs(values).max())
            for r in refs:
                assert np.isclose(values[files.index(r.image)], r.value, rtol=4 * rtol, atol=4 * rtol * np.abs(values).max())
    shares = concepts.shares
    for entry in found.classes:
        rows = result.targets == entry.target
        assert entry.images == rows.sum()
        mean = shares[rows].mean(axis=0)
        for channel, share in entry.channels:
            assert share == pytest.approx(mean[channel], rel=1e-5, abs=1e-6)
        assert entry.channels[0][0] == int(np.argmax(mean))


def test_top_keeps_the_best_of_any_number_of_batches_in_any_order():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 7)).round(1)  # rounded: ties, which go to the earlier image
    order = np.lexsort((np.broadcast_to(np.arange(50), (7, 50)), -values.T), axis=1)[:, :4]
    for cut in ([50], [1] * 50, [13, 20, 17]):
        starts = np.cumsum([0] + cut[:-1])
        batches = list(zip(starts, cut))
        rng.shuffle(batches)
        top = Top(7, 4)
        for start, size in batches:
            top.add(values[start:start + size], np.arange(start, start + size))
        np.testing.assert_array_equal(top.index, order)


def test_where_it_looks():
    heat = np.zeros((64, 64))
    heat[3:9, 3:9] = 1.0
    heat[40, 40] = 0.1  # below a fifth of the peak: not where it looks
    assert where_it_looks(heat) == (0, 0, 16, 16)  # widened to a quarter of each side, inside the image
    assert where_it_looks(-heat) == (0, 0, 64, 64)  # nothing positive: the whole image
    heat[50:60, 20:50] = 1.0
    assert where_it_looks(heat) == (3, 3, 60, 50)


@pytest.mark.slow
def test_the_report_and_json(atlases, tmp_path):
    found = atlases["shortcut"]
    paths = write(found, tmp_path / "atlas")
    data = json.loads(paths["atlas.json"].read_text())
    assert data["layer"] == found.layer and data["channels"] == 32 and data["images"] == 48
    assert [c["name"] for c in data["classes"]] == CLASSES
    star = data["classes"][CLASSES.index("star")]
    first = data["concepts"][str(star["concepts"][0]["channel"])]
    assert len(first["by_relevance"]) == 6 and set(first["by_relevance"][0]) == {"image", "value", "class", "box"}
    page = paths["atlas.html"].read_text()
    assert page.count("<img ") == sum(len(c.by_relevance) + len(c.by_activation) for entry in found.classes
                                      for c in [found.concepts[ch] for ch, _ in entry.channels])
    assert "Class star" in page and "http" not in page.replace("http-equiv", "")


@pytest.mark.slow
def test_the_atlas_renders_in_a_real_browser(atlases, tmp_path, browser):
    """Headless Chromium: no errors, every picture loads, nothing fetched; a class name from the
    data is text, not markup."""
    found = atlases["clean"]
    found.classes[0] = type(found.classes[0])(found.classes[0].target, "<img src=x onerror=alert(1)>",
                                              found.classes[0].images, found.classes[0].channels)
    page = browser.open_page(write(found, tmp_path / "atlas")["atlas.html"], screenshot=tmp_path / "atlas.png")
    assert page.problems() == [] and page.dialogs == []
    assert "Class <img src=x onerror=alert(1)>" in page.text and page.images and not page.broken_images


@pytest.mark.slow
def test_the_command(tmp_path):
    out = tmp_path / "atlas"
    result = runner.invoke(app, ["concepts", str(MODELS / "shortcut.onnx"), str(AUDIT_DATA), "-o", str(out),
                                 "--per-class", "2", "--references", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("concepts at /stages/stages.5/relu_1/Relu_output_0 (32 channels), 48 images")
    assert lines[1].startswith("  circle (8 images): channel ") and len(lines) == 1 + len(CLASSES) + 1
    assert sorted(p.name for p in out.iterdir()) == ["atlas.html", "atlas.json"]
    for args, message in (
        (["--layer", "nowhere"], "no node or tensor 'nowhere'"),
        (["--heatmap", "gated"], "leave the heatmap at 'pixel'"),
    ):
        bad = runner.invoke(app, ["concepts", str(MODELS / "shortcut.onnx"), str(AUDIT_DATA), "-o",
                                  str(tmp_path / "bad"), *args])
        assert bad.exit_code == 1 and message in bad.output and len(bad.output.strip().splitlines()) <= 2
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SettingError, match="class names"):
        atlas(MODELS / "shortcut.onnx", AUDIT_DATA, class_names=["a"])


@pytest.mark.slow
def test_a_folder_of_any_size_streams_through_the_scan():
    """What the scan keeps grows with channels x references, not with the images (8 bytes of
    target per image): 5,000 images need less than twice the memory of one batch."""
    one = traced_peak("atlas", 32)
    many = traced_peak("atlas", 5000)
    assert many < 2 * one, (many, one)


@pytest.mark.slow
def test_on_ray_the_same_atlas(tmp_path):
    from onnxlrp.runtime.cluster import Cluster

    local = atlas(MODELS / "shortcut.onnx", AUDIT_DATA, per_class=2, references=3, class_names=CLASSES)
    remote = atlas(MODELS / "shortcut.onnx", AUDIT_DATA, per_class=2, references=3, class_names=CLASSES,
                   cluster=Cluster(concurrency=2))  # the same batches: the same numbers
    assert remote.to_dict() | {"seconds": 0} == local.to_dict() | {"seconds": 0}
