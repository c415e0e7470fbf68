"""tracemalloc's peak over one folder run, in a process of its own (the tests' own threads,
Ray's among them, would allocate into the same peak): numpy's buffers and every Python object;
onnxruntime's arena is per batch and not traced.

    python tests/memory_probe.py runs COUNT FOLDER     # runs.explain_folder, NPY files into FOLDER
    python tests/memory_probe.py atlas COUNT           # concepts.atlas's scan and references

prints the peak in bytes."""
import sys
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def image(key: str) -> np.ndarray:
    """A different image per key, the same for the same key in every run."""
    return np.random.default_rng(int(key[3:])).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def main(kind: str, count: int, folder: str | None = None) -> int:
    from onnxlrp import Explainer
    from onnxlrp.concepts import atlas
    from onnxlrp.runs import FileSink, Pixels, explain_folder

    if kind == "runs":
        explainer = Explainer(ROOT / "models" / "demo" / "tiny_resnet.onnx")
        def run():
            return explain_folder(explainer, Pixels.of(count, image), FileSink(npy=Path(folder)), batch_size=32).images
    else:
        def run():
            return atlas(ROOT / "models" / "audit" / "clean.onnx", Pixels.of(count, image), per_class=2, references=2,
                         batch_size=32).images
    tracemalloc.start()
    done = run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert done == count, (done, count)
    return peak


if __name__ == "__main__":
    print(main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:]))
