"""Shared fixtures: small torchvision ResNets with seeded random weights, exported to ONNX.

Models are built once per session (resnet18/50 at 64x64 keeps the suite fast on two
cores) and exported both ways: BatchNorm folded by the exporter, and kept as nodes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 64


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """Two torch threads where a test module uses torch; torch itself is imported only by the
    tests that use it (the fast tier's tests of tiny graphs and the CLI need none)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def explainer_cache(tmp_path_factory):
    """Compiled explainers go to a throwaway cache, not the user's."""
    import os
    os.environ["ONNXLRP_CACHE"] = str(tmp_path_factory.mktemp("onnxlrp-cache"))
    return Path(os.environ["ONNXLRP_CACHE"])


@dataclass
class Exported:
    model: torch.nn.Module  # eval mode, float32
    folded: Path  # BatchNorm folded into the convs by the exporter
    kept: Path  # BatchNormalization nodes kept


def _exported(arch: str, tmp_path_factory) -> Exported:
    from models.export_torchvision import build, export

    model = build(arch, seed=0, calibration_size=SIZE)
    folder = tmp_path_factory.mktemp(arch)
    return Exported(
        model,
        export(model, folder / f"{arch}.onnx", size=SIZE),
        export(model, folder / f"{arch}_bn.onnx", size=SIZE, keep_batchnorm=True),
    )


@pytest.fixture(scope="session")
def resnet18(tmp_path_factory) -> Exported:
    return _exported("resnet18", tmp_path_factory)


@pytest.fixture(scope="session")
def resnet50(tmp_path_factory) -> Exported:
    return _exported("resnet50", tmp_path_factory)


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """Two normalised-looking input images [2, 3, 64, 64]."""
    return np.random.RandomState(0).randn(2, 3, SIZE, SIZE).astype(np.float32)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return ROOT / "models" / "demo" / "tiny_resnet.onnx"


@pytest.fixture(scope="session")
def demo_image() -> Path:
    return ROOT / "examples" / "demo.png"


def traced_peak(*args: str) -> int:
    """tests/memory_probe.py's peak for these arguments, measured in a process of its own."""
    import subprocess

    probe = Path(__file__).with_name("memory_probe.py")
    done = subprocess.run([sys.executable, str(probe), *map(str, args)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium for the HTML reports (skipped without one, unless
    ONNXLRP_REQUIRE_BROWSER=1)."""
    from browser import Browser, require_browser

    require_browser()
    with Browser() as chromium:
        yield chromium


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
