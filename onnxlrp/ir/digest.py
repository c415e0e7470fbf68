"""A model's identity: the digest of its .onnx file and of every external-data file it names.

Exporters keep weights apart from the graph (PyTorch's dynamo exporter writes a ``.data``
file by default), so the .onnx file alone does not say which model it is: retrained weights
can leave it byte for byte the same. This one digest keys the compiled-explainer cache,
names the audited model and guards a Parquet run's resume.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import onnx

from ..errors import ModelError, first_line


def file_digest(path: Path) -> str:
    """SHA-256 of one file's content, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def external_files(path: str | Path) -> list[Path]:
    """The external-data files a model's tensors name (initializers, Constant nodes, subgraphs),
    sorted and without repeats; a one-line error for one that is missing."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # not a model: the loader says so; here the file alone is its identity
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    locations = sorted({entry.value for tensor in _tensors(model.graph)
                        if tensor.data_location == onnx.TensorProto.EXTERNAL
                        for entry in tensor.external_data if entry.key == "location"})
    files = [path.parent / location for location in locations]
    for file in files:
        if not file.is_file():
            raise ModelError(f"{path}: its external data file '{file.name}' is missing (expected at {file})")
    return files


def model_digest(path: str | Path) -> str:
    """SHA-256 over the .onnx file and every external-data file it names (name and content):
    a change of weights in a .data file changes the model's identity. A self-contained model's
    digest is its file's (what sha256sum prints)."""
    path = Path(path)
    files = external_files(path)
    if not files:
        return file_digest(path)
    digest = hashlib.sha256(file_digest(path).encode())
    for file in files:
        digest.update(f"\0{file.relative_to(path.parent).as_posix()}\0{file_digest(file)}".encode())
    return digest.hexdigest()


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)
