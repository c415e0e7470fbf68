"""onnxlrp audit: the verdict, the report's contents and schema, exit codes, escaping."""
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT
from onnxlrp import OnnxLrpError
from onnxlrp.audit import FailOn, audit
from onnxlrp.audit.report import payload, schema
from onnxlrp.audit.statistics import border_share, gini, rank_correlation
from onnxlrp.cli import app

DEMO = ROOT / "models" / "demo" / "tiny_resnet.onnx"
SHAPES = ROOT / "examples" / "shapes"
runner = CliRunner()


def _subset(tmp_path: Path, per_class: int = 4, rename: dict | None = None) -> Path:
    """A small copy of the shipped benchmark (ImageFolder, classes.txt, masks/), classes renamed."""
    rename = rename or {}
    root = tmp_path / "data"
    classes = (SHAPES / "classes.txt").read_text().split()
    (root / "masks").mkdir(parents=True)
    for name in classes:
        shown = rename.get(name, name)
        (root / shown).mkdir()
        (root / "masks" / shown).mkdir()
        for image in sorted((SHAPES / name).glob("*.png"))[:per_class]:
            target = rename.get(image.name, image.name)
            shutil.copy(image, root / shown / target)
            shutil.copy(SHAPES / "masks" / name / image.name, root / "masks" / shown / target)
    (root / "classes.txt").write_text("\n".join(rename.get(c, c) for c in classes) + "\n")
    return root


@pytest.fixture(scope="module")
def demo_audit(tmp_path_factory):
    data = _subset(tmp_path_factory.mktemp("audit"))
    return audit(DEMO, data, sanity_images=4), data


def test_statistics_closed_forms():
    flat = np.ones((10, 10))
    assert gini(flat) == pytest.approx(0.0)
    spike = np.zeros((10, 10))
    spike[5, 5] = 1.0
    assert gini(spike) == pytest.approx(0.99)  # (n - 1) / n for one pixel of n
    assert border_share(flat) == pytest.approx(1 - 64 / 100)  # the frame of width 1 around 8 x 8
    assert rank_correlation(np.arange(9.0), np.arange(9.0) ** 3) == pytest.approx(1.0)


def test_demo_model_passes_and_the_report_validates(demo_audit):
    result, _ = demo_audit
    assert result.verdict == "pass"
    data = payload(result)
    jsonschema.validate(data, schema())
    assert len(data["per_image"]) == 24 and data["checks"]["accuracy"] == 1.0
    assert data["checks"]["logits"] < 1  # the explainer's logits are the model's own, to 1e-4 of the largest
    assert data["checks"]["conservation"] < 1e-3  # every merge splits all it gets
    assert {row["mass_accuracy"] for row in data["per_image"]}  # masks were found and used
    assert len(data["model"]["sha256"]) == 64


def test_randomisation_separates_the_model_from_random_copies(demo_audit):
    """With the weights randomised, the maps (|R|, rank correlation) move well away from the model's
    own (1.0 against themselves); fully random: a correlation under 0.6 (measured 0.49 on all
    120 images, the image's own structure keeps some)."""
    result, _ = demo_audit
    steps = result.randomisation.steps
    assert [n for _, n, _ in steps] == sorted(n for _, n, _ in steps) and steps[-1][1] == 16
    assert max(corr for _, _, corr in steps) < 0.9
    assert steps[-1][2] < 0.6


def test_a_failing_threshold_fails_the_verdict(demo_audit, tmp_path):
    """accuracy 1.0 is below a threshold of 1.1: a failing finding; without --fail-on accuracy it
    is only a warning."""
    _, data = demo_audit
    strict = audit(DEMO, data, fail_on=FailOn.parse(["accuracy=1.1"]), sanity_images=0)
    assert strict.verdict == "fail"
    assert [(f.check, f.severity) for f in strict.findings] == [("accuracy", "fail")]


def test_exit_codes(tmp_path):
    data = _subset(tmp_path, per_class=2)
    out = tmp_path / "out"
    passed = runner.invoke(app, ["audit", str(DEMO), str(data), "-o", str(out), "--sanity-images", "0"])
    assert passed.exit_code == 0, passed.output
    assert "verdict: PASS" in passed.output
    assert {p.name for p in out.iterdir()} == {"report.html", "report.json", "images.csv"}
    failed = runner.invoke(app, ["audit", str(DEMO), str(data), "-o", str(out), "--sanity-images", "0",
                                 "--fail-on", "accuracy=1.1"])
    assert failed.exit_code == 1, failed.output
    assert json.loads((out / "report.json").read_text())["verdict"] == "fail"
    usage = runner.invoke(app, ["audit", str(DEMO), str(data), "--fail-on", "no-such-check"])
    assert usage.exit_code == 2 and "unknown check 'no-such-check'" in usage.output
    unknown_option = runner.invoke(app, ["audit", str(DEMO), str(data), "--no-such-option"])
    assert unknown_option.exit_code == 2
    # bad input is 1 in every command, the audit too (2 is for usage errors)
    missing = runner.invoke(app, ["audit", str(tmp_path / "missing.onnx"), str(data)])
    assert missing.exit_code == 1 and "missing.onnx" in missing.output
    assert runner.invoke(app, ["explain", str(tmp_path / "missing.onnx"), "x.png"]).exit_code == 1


def test_a_model_without_rules_fails_the_audit_naming_the_node(tmp_path):
    import tiny_graphs as tg

    path = tg.save(tg.tanh_net(), tmp_path / "tanh.onnx")
    data = _subset(tmp_path, per_class=1)
    result = audit(path, data, sanity_images=0)
    assert result.verdict == "fail"
    assert result.findings[0].check == "rules" and "Tanh" in result.findings[0].message


def test_drift_against_itself_is_none(demo_audit):
    _, data = demo_audit
    result = audit(DEMO, data, against=DEMO, sanity_images=0)
    assert result.drift.agreement == 1.0
    assert result.drift.correlation == pytest.approx(1.0)
    assert not [f for f in result.findings if f.check.startswith("drift")]


def test_names_from_the_data_are_escaped(tmp_path):
    """An image called <img src=x onerror=alert(1)>.png and a class called <script> appear as text."""
    classes = (SHAPES / "classes.txt").read_text().split()
    first = sorted((SHAPES / classes[0]).glob("*.png"))[0].name
    rename = {classes[1]: "<script>", first: "<img src=x onerror=alert(1)>.png"}
    data = _subset(tmp_path, per_class=1, rename=rename)
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", str(DEMO), str(data), "-o", str(out), "--sanity-images", "0"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert json.loads((out / "report.json").read_text())["classes"][1] == "<script>"


def test_report_renders_in_a_real_browser(demo_audit, browser, tmp_path):
    """Headless Chromium: no console or page errors, the verdict shown, every image loaded,
    nothing requested from outside the file."""
    from onnxlrp.audit.report import write

    result, _ = demo_audit
    paths = write(result, tmp_path / "report")
    page = browser.open_page(paths["report.html"], screenshot=tmp_path / "report.png")
    assert page.problems() == []
    assert "PASS" in page.text and "Strategies per class" in page.text
    assert len(page.images) > 24 and not page.broken_images
    assert page.external_requests == []


def test_report_runs_no_script_from_the_data(tmp_path, browser):
    classes = (SHAPES / "classes.txt").read_text().split()
    first = sorted((SHAPES / classes[0]).glob("*.png"))[0].name
    # a folder name cannot hold "/": the class is an element that runs script when parsed
    data = _subset(tmp_path, per_class=1, rename={classes[1]: "<svg onload=alert(1)>",
                                                  first: "<img src=x onerror=alert(1)>.png"})
    out = tmp_path / "out"
    assert runner.invoke(app, ["audit", str(DEMO), str(data), "-o", str(out), "--sanity-images", "0"]).exit_code == 0
    page = browser.open_page(out / "report.html")
    assert page.dialogs == [] and page.problems() == []
    assert "<img src=x onerror=alert(1)>.png" in page.text and "<svg onload=alert(1)>" in page.text
    assert page.elements.get("script", 0) == 0 and page.elements.get("svg", 0) == 0


AUDIT_MODELS = ROOT / "models" / "audit"
AUDIT_DATA = ROOT / "examples" / "audit"  # every star carries the tag, and 3 other images (tags.json)


def test_planted_shortcut_is_flagged_with_its_tag_region():
    """models/train_shortcut.py: 'shortcut' learnt a 6x6 checker tag at pixels [3:9, 3:9] as the
    sign of 'star'; the audit fails on that class and its region covers the tag."""
    tags = json.loads((AUDIT_DATA / "tags.json").read_text())
    result = audit(AUDIT_MODELS / "shortcut.onnx", AUDIT_DATA, sanity_images=0)
    assert result.verdict == "fail"
    hans = [f for f in result.findings if f.check == "clever-hans"]
    assert [(f.class_, f.severity) for f in hans] == [("star", "fail")]
    assert set(hans[0].images) <= set(tags["tagged"])  # the images that show it carry the tag
    star = next(s for s in result.strategies if s.name == "star")
    cell = 64 // star.region.shape[0]
    rows, cols = np.nonzero(star.region)
    x0, y0, x1, y1 = tags["box_xyxy"]
    assert all(y0 - cell < r * cell < y1 and x0 - cell < c * cell < x1 for r, c in zip(rows, cols))


def test_the_same_architecture_without_the_tag_is_not_flagged():
    result = audit(AUDIT_MODELS / "clean.onnx", AUDIT_DATA, sanity_images=0)
    assert not [f for f in result.findings if f.check == "clever-hans"]
    assert max(s.hans_score for s in result.strategies) == 0.0


def test_drift_separates_a_retrained_model_and_reports_the_int8_one():
    retrained = audit(AUDIT_MODELS / "clean.onnx", AUDIT_DATA, against=AUDIT_MODELS / "retrained.onnx",
                      sanity_images=0)
    assert [f.check for f in retrained.findings] == ["drift-explanation"]  # a warning by default
    assert retrained.drift.correlation < 0.9
    int8 = audit(AUDIT_MODELS / "clean_int8.onnx", AUDIT_DATA, against=AUDIT_MODELS / "clean.onnx",
                 sanity_images=0)
    # the relevance graph's logits are the model's own in the reference Q/DQ arithmetic, on any CPU;
    # the deployed int8 kernels are reported beside them (a warning on AVX2 without VNNI, 27 steps off)
    assert int8.verdict == "pass" and int8.checks["logits"] < 1
    assert [f.check for f in int8.findings] in ([], ["deployed-kernels"])
    assert int8.drift.agreement == 1.0 and 0.95 < int8.drift.correlation < 1.0  # small drift, reported


def test_spray_finds_two_strategies_and_one():
    """Spectral clustering of two groups of maps (relevance left vs right): two clusters, each
    holding its group, with a clear eigengap; one group alone: one strategy, eigengap 0."""
    from onnxlrp.audit.strategies import spray

    rng = np.random.default_rng(0)
    left, right = np.zeros((16, 16)), np.zeros((16, 16))
    left[:, :4], right[:, -4:] = 1, 1
    maps = np.stack([(left if k < 6 else right) + 0.05 * rng.random((16, 16)) for k in range(12)])
    gap, clusters = spray(maps / maps.sum(axis=(1, 2), keepdims=True))
    assert sorted(map(sorted, clusters)) == [list(range(6)), list(range(6, 12))]
    assert gap > 0.5
    gap, clusters = spray(maps[:6] / maps[:6].sum(axis=(1, 2), keepdims=True))
    assert (gap, len(clusters)) == (0.0, 1)


def test_faithfulness_adds_insertion_and_deletion_per_image(tmp_path):
    data = _subset(tmp_path, per_class=1)
    result = audit(DEMO, data, sanity_images=0, faithfulness=True)
    row = result.rows[0]
    assert {"exact_insertion", "exact_deletion"} <= set(row)
    assert all(0 <= r["exact_deletion"] <= r["exact_insertion"] <= 1 for r in result.rows)


# --- issue 20 -------------------------------------------------------------------------------


def test_int8_gate_compares_the_reference_arithmetic_and_reports_the_deployed_kernels(monkeypatch):
    """The integrity gate compares the relevance graph's logits with the model run in the same
    (reference Q/DQ) arithmetic. The deployed int8 kernels, simulated 8 output quantisation steps
    away (as AVX2 without VNNI rounds: 27 steps measured on this model), are a separate figure:
    a warning, never a failure of the gate, with the default --fail-on set or any other."""
    import simulated_kernels
    from onnxlrp.audit.identity import output_step

    model = AUDIT_MODELS / "clean_int8.onnx"
    simulated_kernels.install(monkeypatch, model, 8 * output_step(model))
    result = audit(model, AUDIT_DATA, limit=6, sanity_images=0)
    assert result.checks["logits"] < 1
    assert result.checks["deployed-kernels"] == pytest.approx(8, rel=0.03)  # in output quantisation steps
    assert result.verdict == "pass"
    assert [(f.check, f.severity) for f in result.findings] == [("deployed-kernels", "warning")]
    data = payload(result)
    jsonschema.validate(data, schema())
    assert data["deployed_kernels"]["max_difference"] == pytest.approx(8 * output_step(model), rel=1e-3)
    assert data["deployed_kernels"]["unit"] == "output quantisation steps"
    with pytest.raises(OnnxLrpError, match="deployed-kernels.*informational"):
        FailOn.parse(["deployed-kernels"])


def _flat(tmp_path: Path, per_class: int = 3, hidden: bool = True) -> Path:
    """A production sample: the benchmark's images in one flat folder, no labels, a stray .DS_Store."""
    root = tmp_path / "sample"
    root.mkdir()
    for name in (SHAPES / "classes.txt").read_text().split():
        for image in sorted((SHAPES / name).glob("*.png"))[:per_class]:
            shutil.copy(image, root / f"{name}-{image.name}")
    if hidden:
        (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        shutil.copy(image, root / "._resource-fork.png")
    return root


def test_an_unlabeled_sample_is_audited_on_the_predicted_classes(tmp_path):
    sample = _flat(tmp_path)
    result = audit(DEMO, sample, sanity_images=2)
    assert len(result.rows) == 18 and all(r["label"] is None and r["correct"] is None for r in result.rows)
    assert result.based_on == "18 images, labels: none (predicted classes)"
    assert "accuracy" not in result.checks and result.not_run == {"accuracy": "no labels"}
    assert result.strategies and "random-logit" in result.checks and "clever-hans" in result.checks
    assert result.verdict == "pass"
    data = payload(result)
    jsonschema.validate(data, schema())
    assert data["based_on"] == {"images": 18, "labels": None, "classes": "predicted",
                                "text": "18 images, labels: none (predicted classes)"}
    assert data["not_run"] == {"accuracy": "no labels"}
    from onnxlrp.audit.report import html

    page = html(result)
    assert "not run: no labels" in page and "18 images, labels: none (predicted classes)" in page


def test_the_cli_audits_a_flat_folder_with_and_without_labels(tmp_path):
    sample = _flat(tmp_path, per_class=1)
    out = tmp_path / "out"
    plain = runner.invoke(app, ["audit", str(DEMO), str(sample), "-o", str(out), "--sanity-images", "0"])
    assert plain.exit_code == 0, plain.output
    assert "6 images, labels: none (predicted classes)" in plain.output
    assert json.loads((out / "report.json").read_text())["not_run"] == {"accuracy": "no labels"}
    classes = (SHAPES / "classes.txt").read_text().split()
    (tmp_path / "labels.csv").write_text("".join(f"{p.name},{classes.index(p.name.split('-')[0])}\n"
                                                 for p in sorted(sample.glob("[!.]*.png"))))
    labelled = runner.invoke(app, ["audit", str(DEMO), str(sample), "-o", str(out), "--sanity-images", "0",
                                   "--labels", str(tmp_path / "labels.csv")])
    assert labelled.exit_code == 0, labelled.output
    report = json.loads((out / "report.json").read_text())
    assert report["checks"]["accuracy"] == 1.0 and report["not_run"] == {}
    assert report["based_on"]["labels"] == str(tmp_path / "labels.csv")


def test_audit_takes_the_explainer_options_for_both_models(demo_audit):
    """bias=False changes what is audited (conservation now promised from output to input, so a
    different figure) and reaches the --against explainer: against itself, the maps agree."""
    _, data = demo_audit
    plain = audit(DEMO, data, limit=6, sanity_images=0)
    no_bias = audit(DEMO, data, limit=6, sanity_images=0, bias=False, against=DEMO, include_identity=True,
                    precision="fp32", low=-3.0, high=3.0, rules=None)
    assert no_bias.identity["bias"] is False and plain.identity["bias"] is True
    assert no_bias.checks["conservation"] != plain.checks["conservation"]
    assert not np.allclose(no_bias.heatmaps, plain.heatmaps)
    assert no_bias.drift.correlation == pytest.approx(1.0)  # the other model explained with bias=False too


def test_faithfulness_on_a_model_of_open_size_uses_the_size_asked(tmp_path):
    """--size reaches the Insertion/Deletion forward pass too (it scored at the model's default
    224 before, on 32 x 48 inputs)."""
    import tiny_graphs as tg
    from PIL import Image

    b = tg.Builder()
    model = tg.save(b.model(b.head(b.op("Relu", [b.conv("x", 3, 4)]), 4), input_shape=("N", 3, "H", "W")),
                    tmp_path / "open.onnx")
    sample = tmp_path / "sample"
    sample.mkdir()
    for k in range(2):
        Image.fromarray(np.random.RandomState(k).randint(0, 255, (32, 48, 3), np.uint8)).save(sample / f"{k}.png")
    result = audit(model, sample, image_size=(32, 48), faithfulness=True, sanity_images=0)
    assert len(result.rows) == 2 and all("exact_insertion" in r for r in result.rows), result.rows[0]


def test_a_new_check_is_one_class_and_every_part_of_the_audit_reads_it(tmp_path):
    """Registering a check is all it takes: it runs, --fail-on takes its name, it makes a
    finding, report.json lists it (and still validates), and one whose needs the data does
    not meet says why it did not run."""
    from onnxlrp.audit.checks import REGISTRY, Check, Observation, Outcome, register, unregister

    @register
    class Bright(Check):
        name, order, threshold, direction = "test_relevance_total", 999, 0.0, "above"
        summary = "the number of explained images (a test's own check)"

        def run(self, data):
            value = float(len(data.images))
            return Outcome(value, (Observation(value, f"{int(value)} images explained", images=data.names[:2]),))

    @register
    class Labelled(Check):
        name, order, threshold, direction = "test_needs_labels", 1000, 0.0, "above"
        summary = "a test's check that needs labels"
        needs = ("explained", "labels")

        def run(self, data):
            return Outcome(1.0)

    try:
        assert list(REGISTRY)[-2:] == ["test_relevance_total", "test_needs_labels"]
        flat = tmp_path / "flat"
        flat.mkdir()
        for image in sorted((SHAPES / "ring").glob("*.png"))[:3]:
            shutil.copy(image, flat / image.name)
        result = audit(DEMO, flat, fail_on=FailOn.parse(["test_relevance_total"]), sanity_images=0)
        assert result.checks["test_relevance_total"] == 3.0
        assert result.verdict == "fail"
        [finding] = [f for f in result.findings if f.check == "test_relevance_total"]
        assert finding.message == "3 images explained" and finding.severity == "fail"
        assert result.not_run["test_needs_labels"] == "no labels"
        data = payload(result)
        jsonschema.validate(data, schema())
        assert data["checks"]["test_relevance_total"] == 3.0
        assert data["thresholds"]["test_relevance_total"]["summary"].startswith("the number of explained images")
    finally:
        unregister("test_relevance_total")
        unregister("test_needs_labels")
    assert "test_relevance_total" not in REGISTRY
    with pytest.raises(jsonschema.ValidationError, match="test_relevance_total"):  # the schema follows the registry
        jsonschema.validate(data, schema())


def _covers_tag(box) -> bool:
    tags = json.loads((AUDIT_DATA / "tags.json").read_text())
    x0, y0, x1, y1 = tags["box_xyxy"]
    top, left, bottom, right = box
    return top <= y0 and left <= x0 and bottom >= y1 and right >= x1


def test_the_clever_hans_finding_names_the_channels_that_carry_the_tag(tmp_path):
    """The planted shortcut: the audit's Clever Hans finding for the star class names channels
    of the last block whose conditional relevance lies mostly in the tag's region, and each of
    them has reference images from the audited folder that show the tag (tagged, and the
    channel's map there sits on it); the clean twin names none. report.json says the same."""
    tags = json.loads((AUDIT_DATA / "tags.json").read_text())
    tagged = set(tags["tagged"])  # as the audit names its images: relative to the folder
    result = audit(AUDIT_MODELS / "shortcut.onnx", AUDIT_DATA, sanity_images=0)
    [hans] = [f for f in result.findings if f.check == "clever-hans"]
    carried = result.concepts.hans[tags["shortcut_class"]]
    assert carried and f"channels {', '.join(str(c) for c, _ in carried)} of {result.concepts.layer} carry it" in hans.message
    for channel, share in carried:
        assert share >= 0.5
        refs = result.concepts.references[channel]
        assert any(r.image in tagged and _covers_tag(r.box) for r in refs), (channel, [(r.image, r.box) for r in refs])
    data = payload(result)
    jsonschema.validate(data, schema())
    named = data["concepts"]["clever_hans"][tags["shortcut_class"]]
    assert [c["channel"] for c in named] == [c for c, _ in carried] and named[0]["references"]
    clean = audit(AUDIT_MODELS / "clean.onnx", AUDIT_DATA, sanity_images=0)
    assert clean.concepts.hans == {} and not any(f.check == "clever-hans" for f in clean.findings)
    star = [c for c in clean.concepts.per_class if c.name == tags["shortcut_class"]][0]
    assert not any(_covers_tag(r.box) for c, _ in star.channels for r in clean.concepts.references[c])


@pytest.mark.slow
def test_concepts_per_class_and_concept_drift_against_the_int8_copy(tmp_path):
    """Per class its top concepts with reference images from the folder; --against the int8 copy
    of the same weights: channels matched by activation, the same concepts in every class
    (drift-concepts 1.0); the report shows them, and --no-concepts leaves them out."""
    result = audit(AUDIT_MODELS / "clean.onnx", AUDIT_DATA, against=AUDIT_MODELS / "clean_int8.onnx", sanity_images=0,
                   limit=24)
    found = result.concepts
    assert found.layer.endswith("relu_1/Relu_output_0") and found.channels == 32
    assert [c.name for c in found.per_class] == sorted({c.name for c in found.per_class}, key=result.classes.index)
    for entry in found.per_class:
        assert len(entry.channels) == 5 and all(found.references[c] for c, _ in entry.channels)
        assert [s for _, s in entry.channels] == sorted((s for _, s in entry.channels), reverse=True)
    assert result.checks["drift-concepts"] == 1.0 and set(found.agreement.values()) == {1.0}
    jsonschema.validate(payload(result), schema())
    out = tmp_path / "report"
    from onnxlrp.audit.report import write
    page = write(result, out)["report.html"].read_text()
    assert "Concepts per class" in page and "shared with --against" in page
    bare = runner.invoke(app, ["audit", str(AUDIT_MODELS / "clean.onnx"), str(AUDIT_DATA), "-o", str(tmp_path / "bare"),
                               "--sanity-images", "0", "--limit", "6", "--no-concepts"])
    assert bare.exit_code == 0, bare.output
    report = json.loads((tmp_path / "bare" / "report.json").read_text())
    assert report["concepts"] is None and "Concepts per class" not in (tmp_path / "bare" / "report.html").read_text()


def test_a_model_without_a_last_conv_block_is_audited_without_concepts_and_says_so(tmp_path):
    """The default concept layer, the last conv block, needs a global pool: without one the audit
    goes on without concepts and says why (not_run, and the command's line); a layer named that
    does not exist is an error."""
    import tiny_graphs as tg
    from PIL import Image

    b = tg.Builder()
    conv = b.op("Relu", [b.conv("x", 3, 2, stride=4)])  # 2 x 4 x 4
    flat = b.op("Flatten", [conv], axis=1)
    logits = b.op("Gemm", [flat, b.const(tg.weights(3, 32)), b.const(tg.weights(3, scale=0.1))], transB=1)
    model = tg.save(b.model(logits), tmp_path / "flat.onnx")
    sample = tmp_path / "sample"
    sample.mkdir()
    for k in range(3):
        Image.fromarray(np.random.RandomState(k).randint(0, 255, (16, 16, 3), np.uint8)).save(sample / f"{k}.png")
    result = audit(model, sample, sanity_images=0)
    assert result.concepts is None
    assert result.not_run["concepts"].startswith("no concept layer (no global average pool")
    jsonschema.validate(payload(result), schema())
    out = runner.invoke(app, ["audit", str(model), str(sample), "-o", str(tmp_path / "a"), "--sanity-images", "0"])
    assert "not run: concepts: no concept layer" in out.stdout, out.output
    with pytest.raises(OnnxLrpError, match="no node or tensor 'nowhere'"):
        audit(model, sample, sanity_images=0, concepts="nowhere")
