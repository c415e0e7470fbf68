"""The GPU session's kit (benchmarks/gpu/), rehearsed on the CPU so that the one run a GPU
session gets does not fail on a typo: the parts that carry onnxruntime-gpu there, and the
check script itself at a small size (--device cpu --quick)."""
import io
import json
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import install  # noqa: E402
import pack  # noqa: E402

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out


def _archive(path: Path) -> None:
    """A tar.xz like pack.repack's: a package at the archive's top level."""
    data = b"VALUE = 42\n" + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("fakepkg/__init__.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path.write_bytes(lzma.compress(buffer.getvalue()))


def test_parts_join_into_the_installed_package(tmp_path):
    folder, target = tmp_path / ".gpu", tmp_path / "site"
    folder.mkdir()
    _archive(folder / "onnxruntime.tar.xz")
    parts = pack.cut(folder / "onnxruntime.tar.xz", folder, 1000, "fake.whl")
    assert len(parts) > 2 and not (folder / "onnxruntime.tar.xz").exists()
    assert install.status(folder).endswith("all there")
    install.install(folder, target)
    assert (target / "fakepkg" / "__init__.py").read_bytes().startswith(b"VALUE = 42")
    install.install(folder, target)  # a second run on the same machine: already there


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_a_missing_or_damaged_part_is_named(tmp_path, damage, capsys):
    folder = tmp_path / ".gpu"
    folder.mkdir()
    _archive(folder / "onnxruntime.tar.xz")
    parts = pack.cut(folder / "onnxruntime.tar.xz", folder, 1000, "fake.whl")
    second = folder / parts[1]["name"]
    if damage == "missing":
        second.unlink()
        assert "missing [2]" in install.status(folder)
    else:
        second.write_bytes(b"x" + second.read_bytes()[1:])
    with pytest.raises(SystemExit) as exit:
        install.install(folder, tmp_path / "site")
    assert exit.value.code == 3
    assert f"{parts[1]['name']} {damage}" in capsys.readouterr().err
    assert not (tmp_path / "site" / "fakepkg").exists()


def test_the_parts_fit_one_call_beside_the_working_tree():
    assert 4 * 2**20 < pack.LIMIT - pack.MARGIN - pack.tree_bytes()


def test_check_rehearsal_on_the_cpu(tmp_path):
    """Every section but the CUDA-only ones runs and writes its numbers; CPU against CPU gives
    the same maps (two sessions of one float32 graph: at most float32 rounding)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--device", "cpu",
                           "--quick", "--precisions", "fp32", "fp16", "--budget", "400", "--out", str(out), "--models", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"environment", "correctness", "throughput", "profile", "options", "tensorrt"}
    for name in ("epsilon-plus-flat", "paper-iv", "gradient", "grad-cam"):
        row = results["correctness"][f"resnet18 {name}"]
        assert row["map"] <= 1e-5, row  # float32 rounding of reordered sums, if any
    # fp16 against fp32: a sanity bound (fp16's unit roundoff is 4.9e-4), not a measurement
    assert results["correctness"]["resnet18 epsilon-plus-flat"]["fp16_relevance"] < 0.1
    throughput = results["throughput"]
    for config in ("ORT forward fp32", "onnxlrp epsilon-plus-flat fp32", "onnxlrp epsilon, on-device fp32",
                   "Zennit epsilon-plus-flat fp32", "ORT forward fp16", "onnxlrp epsilon-plus-flat fp16",
                   "Zennit epsilon-plus-flat fp16"):
        assert all(throughput[config]["batches"][b]["images_per_s"] > 0 for b in ("1", "2")), throughput[config]
    assert any(op["op"] == "Conv" for op in results["profile"]["ops"])
    assert all("error" not in r and r["batches"] for r in results["options"].values()), results["options"]
    text = (out / "results.md").read_text()
    assert "## correctness" in text and "| onnxlrp epsilon-plus-flat fp32 | 2 |" in text
