"""The paper's evaluation: demo model, baselines against PyTorch references, `onnxlrp evaluate`."""
import json

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
from onnxlrp.baselines import Forward, methods
from onnxlrp.cli import app
from onnxlrp.evaluate import load_dataset
from onnxlrp.preprocessing import get_preprocessing

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
    from onnxlrp.baselines import _upsample
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
    np.testing.assert_allclose(ig, expected, rtol=1e-4, atol=1e-5)


def test_score_cam_weights_maps_by_masked_scores(tiny):
    _, path = tiny
    x, labels = _inputs()
    black = get_preprocessing("imagenet").normalize(np.zeros((1, 64, 64, 3), np.uint8))[0]
    maps = methods(path, black)["score-cam"]()(x, labels)
    assert maps.shape == (2, 64, 64) and np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() > 0


def test_load_dataset_folder_labels_and_masks(tmp_path):
    data = load_dataset(BENCHMARK)
    assert data.classes == RECORD["classes"] and len(data.files) == 120
    assert all(m is not None for m in data.masks)
    assert data.files[0].parent.name == data.classes[data.labels[0]]
    (tmp_path / "labels.csv").write_text("circle/0002.png,0\nring/0007.png,ring\n")
    rel = load_dataset(BENCHMARK, tmp_path / "labels.csv")
    assert [f.name for f in rel.files] == ["0002.png", "0007.png"] and rel.masks[0] is not None
    assert rel.labels.tolist() == [0, rel.classes.index("ring")]
    (tmp_path / "bad.csv").write_text("circle/9999.png,0\n")
    with pytest.raises(OnnxLrpError, match=r"bad.csv line 1: no such image .*9999.png"):
        load_dataset(BENCHMARK, tmp_path / "bad.csv")


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
