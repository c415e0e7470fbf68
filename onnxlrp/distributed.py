"""Explain many images on a Ray cluster (or a local Ray instance) into Parquet rows.

``explain_dataset(images, "model.onnx", output="heatmaps/")`` explains every image and writes
one Parquet row per image to ``output`` (the columns: onnxlrp.runs.parquet). It is
``runs.explain_folder`` with a ParquetSink on Ray: the explainer is compiled once, in the
driver; its serialised graph goes to the workers through the object store, and every actor
opens one onnxruntime session on it. Images are decoded in the actors by onnxlrp's own
reader, so heatmaps are those of ``Explainer.explain_files`` for the same options (bit for
bit on the CPU). The paths must be readable from every worker (one machine, or a shared file
system).

A rerun into the same ``output`` skips the images already there (``resume=True``): rows are
written block by block, so an interrupted run keeps what was finished. Ray is optional:
``pip install 'onnxlrp[ray]'``. PNG/NPY files on Ray, and either in one process:
``runs.explain_folder`` with a FileSink, or without a cluster.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError
from .options import Options, Runtime, resolve
from .runs.parquet import META, PATH, ParquetSink, done_paths, read_heatmaps
from .runs.run import explain_folder
from .runs.sources import ImageFiles
from .runtime.cluster import Cluster, import_ray

__all__ = ["META", "PATH", "done_paths", "explain_dataset", "read_heatmaps"]


def _paths_of(source) -> list[str | os.PathLike]:
    """Paths from a file, folder, list of them, or ray.data.Dataset with a "path" column."""
    if isinstance(source, (str, os.PathLike)):
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    columns = source.columns() if hasattr(source, "columns") else None
    if columns is None:
        raise DataError(f"source: expected image paths or a ray.data.Dataset, got {type(source).__name__}")
    if PATH not in columns:
        raise DataError(f"the dataset has no '{PATH}' column (columns: {', '.join(columns)})")
    paths: list[str] = []
    for batch in source.select_columns([PATH]).iter_batches(batch_format="pyarrow", batch_size=None):
        paths.extend(batch.column(PATH).to_pylist())
    return paths


def explain_dataset(
    source: str | Path | Sequence[str | Path] | Any,
    model: str | Path,
    *,
    output: str | Path,
    options: Options | None = None,
    runtime: Runtime | None = None,
    target: int | None = None,
    resume: bool = True,
    full_relevance: bool = False,
    **settings: Any,
) -> Path:
    """Explain images on Ray and write one Parquet row per image to the folder `output`.

    source: an image file or folder (searched recursively, as the CLI does), a list of them,
    or a ray.data.Dataset with a "path" column. options, runtime: as Explainer takes them, or
    their settings by name (preset=, split=, ..., batch_size=, device=); runtime.cluster is
    where to run (default: a local Ray instance, or the one this process has started), and
    concurrency= (actors, one onnxruntime session each: the cluster's CPUs shared among them
    as their threads, or one GPU each on cuda) and address= (a Ray cluster to join) build one.
    resume: skip the images that already have a row under `output` (False: replace what is
    there). target: the class to explain in every image (None: each image's top-1). Returns
    `output`.
    """
    import_ray()
    where = {k: settings.pop(k) for k in ("address", "concurrency") if k in settings}
    options, runtime = resolve(options, runtime, settings)
    if where and runtime.cluster is not None:
        raise TypeError("give the cluster either in runtime or as address=/concurrency=, not both")
    if runtime.cluster is None:
        runtime = replace(runtime, cluster=Cluster(where.get("address"), where.get("concurrency", 1)))
    output = Path(output)
    explain_folder(model, ImageFiles.of(_paths_of(source), absolute=True, dedupe=True),
                   ParquetSink(output, full_relevance=full_relevance, resume=resume), options=options,
                   runtime=runtime, target=target)
    return output
