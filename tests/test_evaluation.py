"""The paper's evaluation: demo model, baselines against PyTorch references, `onnxlrp evaluate`."""
import copy
import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny_graphs as tg
from conftest import ROOT, relative_error
from models.shapes import generate
from models.train_demo import TEST_SEED, to_input, train
from models.tiny_resnet import TinyResNet
from onnxlrp import Explainer, OnnxLrpError
from onnxlrp.evaluation.baselines import Forward, methods
from onnxlrp.cli import app
from onnxlrp.evaluation import metrics
from onnxlrp.evaluation.evaluate import Dataset, evaluate, load_dataset
from onnxlrp.io.preprocessing import get_preprocessing

BENCHMARK = ROOT / "examples" / "shapes"
RECORD = json.loads((ROOT / "models" / "demo" / "tiny_resnet.json").read_text())


def test_demo_model_is_accurate_on_held_out_images(demo_model):
    images, labels, _ = generate(600, seed=TEST_SEED)
    x = get_preprocessing("imagenet").normalize(images)
    accuracy = (Forward(demo_model).probabilities(x).argmax(axis=1) == labels).mean()
    assert accuracy >= 0.95
    assert RECORD["test_accuracy"] >= 0.95 and RECORD["test"]["seed"] != RECORD["train"]["seed"]


def test_training_reproduces_from_its_seed():
    runs = [train(seed=3, train_images=256, test_images=64, epochs=1, log=lambda _: None) for _ in range(2)]
    (a, accuracy_a, _), (b, accuracy_b, _) = runs
    assert accuracy_a == accuracy_b
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A briefly trained TinyResNet as a torch module, and its ONNX export."""
    model, _, _ = train(seed=0, train_images=256, test_images=64, epochs=1, log=lambda _: None)
    from models.export_torchvision import export
    return model, export(model, tmp_path_factory.mktemp("tiny") / "tiny.onnx", size=64)


def _inputs(n=2, seed=0):
    images, labels, _ = generate(n, seed=seed + 100)
    return get_preprocessing("imagenet").normalize(images), labels


def test_gradient_times_input_equals_autograd(resnet18, images):
    targets = np.array([3, 7])
    gradient = Explainer(resnet18.folded, preset="gradient").explain(images, targets).relevance
    x = torch.tensor(images, requires_grad=True)
    resnet18.model(x)[torch.arange(2), torch.from_numpy(targets)].sum().backward()
    expected = (x * x.grad).detach().numpy()
    # both float32, summed in different orders: ~1e-6 relative through resnet18, 1e-4 leaves a wide margin
    assert relative_error(gradient * images, expected) < 1e-4


def test_guided_backprop_equals_torch_reference(tiny):
    model, path = tiny
    x, labels = _inputs()

    class Guided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a.clamp(min=0)

        @staticmethod
        def backward(ctx, grad):
            (a,) = ctx.saved_tensors
            return grad * (a > 0) * (grad > 0)

    class GuidedReLU(torch.nn.Module):
        def forward(self, a):
            return Guided.apply(a)

    guided = TinyResNet(num_classes=6)
    guided.load_state_dict(model.state_dict())
    for module in guided.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(module, name, GuidedReLU())
    inputs = torch.tensor(x, requires_grad=True)
    guided.eval()(inputs)[torch.arange(2), torch.from_numpy(labels)].sum().backward()
    ours = Explainer(path, preset="guided-backprop").explain(x, labels).relevance
    # both float32 (BatchNorm folded on one side only): rounding ~1e-6 relative, far below 1e-4
    assert relative_error(ours, inputs.grad.numpy()) < 1e-4


def test_grad_cam_equals_torch_reference(tiny):
    model, path = tiny
    x, labels = _inputs()
    black = get_preprocessing("imagenet").normalize(np.zeros((1, 64, 64, 3), np.uint8))[0]
    ours = methods(path, black)["grad-cam"]()(x, labels)
    features = model.stages(model.stem(torch.tensor(x))).detach().requires_grad_()
    logits = model.fc(torch.flatten(model.pool(features), 1))
    logits[torch.arange(2), torch.from_numpy(labels)].sum().backward()
    cam = torch.relu((features.grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1)).detach().numpy()
    from onnxlrp.evaluation.baselines import _upsample
    # both float32 (BatchNorm folded on one side only): rounding ~1e-6 relative, far below 1e-4
    assert relative_error(ours, _upsample(cam, 64, 64)) < 1e-4


def test_integrated_gradients_of_a_linear_model_is_exact(tmp_path):
    """For f(x) = W x + b the path integral is exact: IG = (x - baseline) * W[target]."""
    b = tg.Builder()
    weight = tg.weights(4, 3 * 4 * 4)
    logits = b.op("Gemm", [b.op("Flatten", ["x"], axis=1), b.const(weight), b.const(tg.weights(4))], transB=1)
    path = tg.save(b.model(logits, input_shape=("N", 3, 4, 4)), tmp_path / "linear.onnx")
    x = np.random.RandomState(0).randn(2, 3, 4, 4).astype(np.float32)
    black = np.full((3, 4, 4), -1.5, np.float32)
    targets = np.array([1, 3])
    ig = methods(path, black)["integrated-gradients"]()(x, targets)
    expected = ((x - black) * weight[targets].reshape(2, 3, 4, 4)).sum(axis=1)
    # float32 on both sides in a different order (IG averages 32 equal gradients): ~1e-7 relative per
    # term of order 1; atol for channel sums of 3 such terms that cancel to near 0
    np.testing.assert_allclose(ig, expected, rtol=1e-4, atol=1e-5)


def test_score_cam_equals_torch_reference(tiny):
    """Score-CAM written from its definition, in float64 torch: each channel map A_k of the last
    conv block, upsampled to the image and scaled to [0, 1], masks the image (black elsewhere);
    the target's softmax probability on that masked image is A_k's weight; the map is the ReLU of
    the weighted sum, upsampled to the image as Grad-CAM's is."""
    model, path = tiny
    x, labels = _inputs()
    black = get_preprocessing("imagenet").normalize(np.zeros((1, 64, 64, 3), np.uint8))[0]
    ours = methods(path, black)["score-cam"]()(x, labels)

    def upsample(maps):  # bilinear, half-pixel centres: the usual Score-CAM upsampling
        return torch.nn.functional.interpolate(maps[None], size=(64, 64), mode="bilinear", align_corners=False)[0]

    reference = copy.deepcopy(model).double().eval()
    base = torch.tensor(black, dtype=torch.float64)
    expected = []
    with torch.no_grad():
        for image, target in zip(torch.tensor(x, dtype=torch.float64), labels):
            channels = reference.stages(reference.stem(image[None]))[0]  # [C, 8, 8]
            up = upsample(channels)
            low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
            flat = (high == low)[:, 0, 0]  # a constant map cannot be scaled to [0, 1]: weight 0
            scaled = (up - low) / torch.where(high > low, high - low, 1.0)
            masked = base + scaled[:, None] * (image - base)
            weights = torch.where(flat, 0.0, torch.softmax(reference(masked), dim=1)[:, int(target)])
            expected.append(upsample(torch.relu((weights[:, None, None] * channels).sum(dim=0))[None])[0])
    expected = torch.stack(expected).numpy()
    # (the block ends in a ReLU and the weights are probabilities, so here the final ReLU never acts)
    assert ours.shape == (2, 64, 64) and expected.max() > 0
    # float32 ONNX run against a float64 reference: rounding of ~1e-7 relative per operation, grown over
    # 13 layers of sums of <= 576 terms and the [0, 1] scaling, stays orders of magnitude below 1e-4
    assert relative_error(ours, expected) < 1e-4


def test_load_dataset_folder_labels_and_masks(tmp_path):
    classes = (BENCHMARK / "classes.txt").read_text().split("\n")[:-1]  # one name per line
    assert classes == RECORD["classes"] and classes != sorted(classes)  # so the order is the file's
    data = load_dataset(BENCHMARK)
    assert data.classes == classes and len(data.files) == 120
    assert all(m is not None for m in data.masks)
    assert all(f.parent.name == classes[label] for f, label in zip(data.files, data.labels))
    assert sorted(set(data.labels.tolist())) == list(range(6))
    (tmp_path / "labels.csv").write_text("circle/0002.png,0\nring/0007.png,ring\n")
    rel = load_dataset(BENCHMARK, tmp_path / "labels.csv")
    assert [f.name for f in rel.files] == ["0002.png", "0007.png"] and rel.masks[0] is not None
    assert rel.labels.tolist() == [0, 5] and classes.index("ring") == 5  # classes.txt's order, not sorted names
    assert rel.classes == classes
    (tmp_path / "bad.csv").write_text("circle/9999.png,0\n")
    with pytest.raises(OnnxLrpError, match=r"bad.csv line 1: no such image .*9999.png"):
        load_dataset(BENCHMARK, tmp_path / "bad.csv")


def _folder(root, names, masks=()):
    """A data folder with copies of one benchmark image at the given relative paths."""
    source = (BENCHMARK / "circle" / "0002.png").read_bytes()
    for name in list(names) + [f"masks/{m}" for m in masks]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(source)
    return root


def test_labels_csv_class_order(tmp_path):
    zoo = _folder(tmp_path / "zoo", ["zebra/z.png", "lion/l.png"], masks=["zebra/z.png"])
    (tmp_path / "zoo.csv").write_text("zebra/z.png,zebra\nlion/l.png,lion\nzebra/z.png,1\n")
    # no classes.txt: the class subfolders sorted by name, masks/ not among them ("masks" < "zebra")
    data = load_dataset(zoo, tmp_path / "zoo.csv")
    assert data.classes == ["lion", "zebra"] and data.labels.tolist() == [1, 0, 1]
    assert data.masks[0] == zoo / "masks" / "zebra" / "z.png" and data.masks[1] is None
    assert load_dataset(zoo).classes == ["lion", "zebra"]
    (tmp_path / "two.csv").write_text("lion/l.png,2\n")  # an index: folders in a CSV layout need not be classes
    assert load_dataset(zoo, tmp_path / "two.csv").labels.tolist() == [2]  # evaluate() checks it against the model
    (zoo / "classes.txt").write_text("zebra\nlion\n")  # classes.txt wins over the folder names
    data = load_dataset(zoo, tmp_path / "zoo.csv")
    assert data.classes == ["zebra", "lion"] and data.labels.tolist() == [0, 1, 1]
    assert load_dataset(zoo).labels.tolist() == [0, 1]  # folder mode: zebra/z.png first, class 0

    flat = _folder(tmp_path / "flat", ["a.png", "b.png"])  # no class list at all
    (tmp_path / "numbers.csv").write_text("a.png,3\nb.png,0\n")
    data = load_dataset(flat, tmp_path / "numbers.csv")  # indices need no class list
    assert data.labels.tolist() == [3, 0] and data.classes == []
    (tmp_path / "names.csv").write_text("a.png,3\n\nb.png,ring\n")
    with pytest.raises(OnnxLrpError, match=r"names.csv line 3: class name 'ring' but no class list: "
                                           r"put the class order in .*flat.classes.txt"):
        load_dataset(flat, tmp_path / "names.csv")


@pytest.mark.parametrize("row, message", [
    ("ring/0007.png,-1", "negative label -1"),
    ("ring/0007.png,hexagon", "unknown class 'hexagon'"),
    ("ring/0007.png, ", "empty label"),
    ("ring/0007.png,6", "label 6 out of range: 6 classes"),
    ("ring/0007.png", "expected 'path,label'"),
])
def test_labels_csv_rejects_bad_labels(tmp_path, row, message):
    # the bad row is on line 4, after a comment, a good row and a blank line
    (tmp_path / "labels.csv").write_text(f"# path,label\ncircle/0002.png,5\n\n{row}\n")
    with pytest.raises(OnnxLrpError, match=r"^\S*labels.csv line 4: " + re.escape(message)) as error:
        load_dataset(BENCHMARK, tmp_path / "labels.csv")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("label, message", [(-1, "label -1 is negative"),
                                            (6, "label 6 out of range: the model has 6 classes")])
def test_evaluate_rejects_labels_the_model_has_no_class_for(demo_model, label, message):
    image = BENCHMARK / "ring" / "0007.png"
    data = Dataset([image, image], np.array([0, label]), [None, None], [])  # e.g. numeric labels, no class list
    with pytest.raises(OnnxLrpError, match=message):
        evaluate(demo_model, data, ["gradient"])


def test_evaluate_reports_progress_as_it_goes(demo_model, monkeypatch):
    events = []
    real = metrics.insertion_deletion
    monkeypatch.setattr(metrics, "insertion_deletion", lambda *a, **k: events.append("curves") or real(*a, **k))
    evaluate(demo_model, load_dataset(BENCHMARK), ["gradient", "grad-cam"], protocols=("paper",),
             limit=3, batch_size=2, progress=events.append)
    steps = [e for e in events if e != "curves"]
    assert events.count("curves") == 3 * 2 and events[0] != "curves"  # the first maps count before any curve
    assert all(a != "curves" or b != "curves" for a, b in zip(events, events[1:]))  # progress after every image
    assert all(0 < n <= 1 for n in steps)  # fractions of an image, never a whole batch at once
    last = len(events) - 1 - events[::-1].index("curves")
    assert sum(e for e in events[:last] if e != "curves") < 3  # not all reported at the end
    # two methods split each image in quarters, exact in float64; 1e-12 covers rounding of other splits
    assert sum(steps) == pytest.approx(3, abs=1e-12)


def test_evaluate_cli_on_the_shipped_benchmark(demo_model, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(demo_model), str(BENCHMARK), "--limit", "3",
                                      "--methods", "paper-iv,paper-i,grad-cam,gradient", "-o", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert payload["images"] == 3 and set(payload["methods"]) == {"paper-iv", "paper-i", "grad-cam", "gradient"}
    iv = payload["methods"]["paper-iv"]
    for key in ("paper:insertion", "paper:deletion", "paper:id", "exact:id", "mass_accuracy", "pointing_game", "conservation_error"):
        assert key in iv and np.isfinite(iv[key]["mean"])
    # mean of the differences against the difference of the means: float64 rounding only (approx: 1e-6 relative)
    assert iv["paper:id"]["mean"] == pytest.approx(iv["paper:insertion"]["mean"] - iv["paper:deletion"]["mean"])
    assert set(payload["conservation"]["paper-iv"]) == {"output", "input", "first block", "last block"}
    assert (out / "conservation.png").stat().st_size > 0
    assert "| LRP paper (iv)" in (out / "results.md").read_text()


def test_evaluate_rejects_unknown_methods(demo_model):
    result = CliRunner().invoke(app, ["evaluate", str(demo_model), str(BENCHMARK), "--methods", "magic"])
    assert result.exit_code == 1 and "unknown method(s) magic" in result.stderr


def test_explain_paper_style(demo_model, demo_image, tmp_path):
    result = CliRunner().invoke(app, ["explain", str(demo_model), str(demo_image), "--preset", "paper",
                                      "--style", "paper", "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").exists()
