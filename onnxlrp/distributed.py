"""Explain many images on a Ray cluster (or a local Ray instance), with Ray Data.

``explain_dataset(images, "model.onnx", output="heatmaps/")`` explains every image and writes
one Parquet row per image to ``output``:

===================== =====================================================================
path                  the image (absolute path; a Dataset's own "path" values as given)
target                the class explained (int64; top-1)
logits                list<float32>, the model's logits
initial_relevance     float32, the relevance the pass started from
input_relevance       float64, the total relevance at the input
conservation_error    float64, |input - initial| / |initial|
exploded              bool, relevance exploded (NaN/Inf set to 0, or > 1000x the initial)
heatmap               list<float16>, the channel-summed relevance, flattened (row-major)
heatmap_shape         list<int32>, [H, W]
relevance             with full_relevance=True: list<float32>, the input relevance, flattened
relevance_shape       with full_relevance=True: list<int32>, its shape in the model's layout
===================== =====================================================================

The explainer is compiled once, in the driver; its serialised graph goes to the workers
through the object store, and every actor opens one onnxruntime session on it. Images are
decoded in the actors by onnxlrp's own reader, so heatmaps are those of
``Explainer.explain_files`` for the same options (bit for bit on the CPU). The paths must be
readable from every worker (one machine, or a shared file system).

A rerun into the same ``output`` skips the images already there (``resume=True``): rows are
written block by block, so an interrupted run keeps what was finished. Ray is optional:
``pip install 'onnxlrp[ray]'``.

``explain_files`` is the same work with the single-process command's output: a PNG and/or
an NPY per image, written by the actors (each batch's files together) and skipped on a
rerun where they exist. ``evaluate(..., cluster=)`` and ``audit(..., cluster=)`` run their
per-image work the same way (onnxlrp.runtime.cluster).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import OnnxLrpError, first_line
from .explainer import Explainer, Portable
from .ir.digest import model_digest
from .lrp import reach
from .runtime.cluster import (Cluster, actor_resources, assigned_threads, batches_of, connected, import_ray,
                              map_batches)

#: Written beside the Parquet files: what produced them, checked on resume. The leading
#: underscore keeps it out of pyarrow's (and Ray's) view of the Parquet dataset.
META = "_onnxlrp.json"
PATH = "path"


def _parquet_files(output: Path) -> list[Path]:
    return sorted(p for p in output.rglob("*.parquet") if not p.name.startswith((".", "_")))


def done_paths(output: str | Path) -> set[str]:
    """The image paths that already have a row in the Parquet files under `output`."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for file in _parquet_files(Path(output)):
        try:
            done.update(pq.read_table(file, columns=[PATH]).column(PATH).to_pylist())
        except Exception as exc:
            raise OnnxLrpError(f"{file}: cannot read Parquet file ({first_line(exc)}); "
                               "delete it to explain its images again") from None
    return done


def _check_meta(output: Path, meta: dict[str, Any], keep: bool) -> None:
    """Results already in `output` must come from the same model and options."""
    file = output / META
    if not keep or not _parquet_files(output):
        return
    if not file.is_file():
        raise OnnxLrpError(f"{output}: holds Parquet files that onnxlrp did not write ({META} is missing); "
                           "choose another output folder")
    old = json.loads(file.read_text())
    for key in ("model_sha256", "options", "target"):
        if old.get(key) != meta[key]:
            raise OnnxLrpError(f"{output}: holds results of another {'model' if key == 'model_sha256' else 'set of options'} "
                               f"({old.get('preset')} on {old.get('model')}); choose another output folder, or resume=False "
                               "to replace them")


def _paths_of(source) -> list[str | os.PathLike]:
    """Paths from a file, folder, list of them, or ray.data.Dataset with a "path" column."""
    if isinstance(source, (str, os.PathLike)):
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    columns = source.columns() if hasattr(source, "columns") else None
    if columns is None:
        raise OnnxLrpError(f"source: expected image paths or a ray.data.Dataset, got {type(source).__name__}")
    if PATH not in columns:
        raise OnnxLrpError(f"the dataset has no '{PATH}' column (columns: {', '.join(columns)})")
    paths: list[str] = []
    for batch in source.select_columns([PATH]).iter_batches(batch_format="pyarrow", batch_size=None):
        paths.extend(batch.column(PATH).to_pylist())
    return paths


def _sources(source, dedupe: bool) -> list[str]:
    from .io.preprocessing import image_files

    if isinstance(source, (str, os.PathLike)):
        source = [source]
    files = [os.path.abspath(p) for p in image_files(list(source))]
    return list(dict.fromkeys(files)) if dedupe else files


class _ExplainActor:
    """One onnxruntime session per actor, on the relevance graph shipped from the driver."""

    def __init__(self, explainer, device: str, batch_size: int, full_relevance: bool, target: int | None = None):
        self.explainer = explainer.open(device, assigned_threads(device))
        self.batch_size, self.full_relevance, self.target = batch_size, full_relevance, target

    def __call__(self, batch):
        import pyarrow as pa

        paths = batch.column(PATH).to_pylist()
        explainer = self.explainer
        n = len(paths)
        pixels = explainer.images.read(paths)
        # onnxruntime's CPU kernels take another path for a batch of one image (a few ulp apart,
        # 3e-9 on the demo model); a lone image is run as a pair, so that the numbers do not
        # depend on how Ray cut the blocks.
        pairs = np.concatenate([pixels, pixels]) if n == 1 else pixels
        result = explainer.explain(explainer.images.normalize(pairs), self.target, self.batch_size, warn=False)
        taken = result.taken_shares
        exploded = np.zeros(n, dtype=bool)
        if result.explosion is not None:
            exploded[[i for i in result.explosion.indices if i < n]] = True

        def lists(values: np.ndarray) -> pa.Array:
            flat = np.ascontiguousarray(values).reshape(n, -1)
            offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))

        heat = result.heatmap()[:n].astype(np.float16)
        columns = {
            PATH: pa.array(paths, pa.string()),
            "target": pa.array(result.targets[:n].astype(np.int64)),
            "logits": lists(result.logits[:n].astype(np.float32)),
            "initial_relevance": pa.array(result.initial[:n].astype(np.float32)),
            "input_relevance": pa.array(result.input_sum[:n]),
            "conservation_error": pa.array(result.conservation_error[:n].astype(np.float64)),
            # the share of the explained logit at the input, and what each family of ops took
            # (lrp.reach; NaN for gradients, which do not conserve)
            "reach": pa.array(result.reach[:n] if taken is not None else np.full(n, np.nan)),
            **{f"taken_{family}": pa.array(taken[:n, k] if taken is not None else np.full(n, np.nan))
               for k, family in enumerate(reach.FAMILIES)},
            "exploded": pa.array(exploded),
            "heatmap": lists(heat),
            "heatmap_shape": lists(np.tile(np.asarray(heat.shape[1:], np.int32), (n, 1))),
        }
        if self.full_relevance:
            relevance = result.relevance[:n].astype(np.float32)
            columns["relevance"] = lists(relevance)
            columns["relevance_shape"] = lists(np.tile(np.asarray(relevance.shape[1:], np.int32), (n, 1)))
        return pa.table(columns)


def explain_dataset(
    source: str | Path | Sequence[str | Path] | Any,
    model: str | Path,
    *,
    output: str | Path,
    preset: str = "epsilon-plus-flat",
    split: str | None = None,
    include_identity: bool | None = None,
    bias: bool = True,
    low: float | Sequence[float] | None = None,
    high: float | Sequence[float] | None = None,
    rules: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    preprocessing: str = "imagenet",
    image_size: tuple[int, int] | None = None,
    heatmap: str = "pixel",
    layer: str = "last",
    target: int | None = None,
    batch_size: int = 16,
    concurrency: int = 1,
    device: str = "cpu",
    address: str | None = None,
    resume: bool = True,
    full_relevance: bool = False,
) -> Path:
    """Explain images on Ray and write one Parquet row per image to the folder `output`.

    source: an image file or folder (searched recursively, as the CLI does), a list of them,
    or a ray.data.Dataset with a "path" column. concurrency: the number of actors, one
    onnxruntime session each (CPU: the cluster's CPUs shared among them, as their threads;
    cuda: one GPU each). address: a Ray cluster to connect to; None uses the instance already
    started in this process, else starts a local one (and shuts it down when done).
    resume: skip the images that already have a row under `output` (False: replace what is
    there). heatmap, layer: the map in the "heatmap" column (Explainer's heatmap=). target: the
    class to explain in every image (None: each image's top-1). The explainer options (split
    to precision) are Explainer's. Returns `output`.
    """
    import_ray()
    from ray.data import SaveMode

    from .runtime.session import DEVICES

    if device not in DEVICES:
        raise OnnxLrpError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if batch_size < 1:
        raise OnnxLrpError("batch_size must be at least 1")
    cluster = Cluster(address, concurrency)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OnnxLrpError(f"{output}: not a folder")

    # Compiled once, here: the workers get the graph, not the model.
    explainer = Explainer(model, preset=preset, split=split, include_identity=include_identity, bias=bias, low=low,
                          high=high, rules=rules, precision=precision, preprocessing=preprocessing,
                          image_size=image_size, heatmap=heatmap, layer=layer, device="cpu", threads=1)
    explainer.targets(target, 1)  # a class out of range is an error before Ray starts
    options = explainer.options
    meta = {
        "model": str(model), "model_sha256": model_digest(model), "preset": explainer.summary.preset,
        "options": options.digest() or repr(options), "target": target, "device": device,
    }
    _check_meta(output, meta, resume)
    done = done_paths(output) if resume and output.is_dir() else set()

    # The paths are gathered here, and a user's Dataset is read to its "path" column first:
    # operators upstream of the actors would wait for CPUs the actors hold (a deadlock).
    files = [f for f in _sources(_paths_of(source), dedupe=True) if f not in done]
    if not files:
        return output

    with connected(cluster) as ray:
        # One block per batch, so that every actor gets work.
        dataset = ray.data.from_items([{PATH: f} for f in files], override_num_blocks=math.ceil(len(files) / batch_size))
        shipped = explainer.portable().stored(ray)
        del explainer
        results = dataset.map_batches(
            _ExplainActor, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            fn_constructor_kwargs={"explainer": shipped, "device": device, "batch_size": batch_size,
                                   "full_relevance": full_relevance, "target": target},
            **actor_resources(ray, cluster, device),
        )
        output.mkdir(parents=True, exist_ok=True)
        # Before the run (an interrupted run leaves rows to resume from) and after it (an
        # overwrite clears the folder).
        (output / META).write_text(json.dumps(meta, indent=1))
        # Writing takes no CPU of its own: the actors hold them all, and rows must reach the
        # disk while they run (else an interrupted run leaves nothing to resume from).
        results.write_parquet(str(output), mode=SaveMode.APPEND if resume else SaveMode.OVERWRITE,
                              ray_remote_args={"num_cpus": 0})
        (output / META).write_text(json.dumps(meta, indent=1))
    return output


@dataclass(frozen=True)
class FilesJob:
    """Explain a batch of image files in an actor and write their PNG/NPY files there, as the
    single-process command does (io.image.write_heatmap); a batch's files appear together."""

    explainer: Portable
    batch_size: int
    target: int | None = None
    top_k: int | None = None
    style: str = "signed"
    levels: int | None = None
    sign: str = "positive"
    cmap: str | None = None

    def open(self, device: str, threads: int | None) -> Callable[[list], tuple[list[dict], Any]]:
        from .io.files import Outputs
        from .io.image import write_heatmap

        explainer = self.explainer.open(device, threads)
        ranks = self.top_k or 1

        def run(batch: list[tuple[str, list[tuple[Path | None, Path | None]]]]) -> tuple[list[dict], Any]:
            """batch: (image file, its (PNG, NPY) destinations per rank) -> per image what was
            explained, and what exploded (lrp.explosion.Explosion or None)."""
            # The single-process command's batches, as they are (a lone image included): the
            # same onnxruntime runs, so the same files, byte for byte.
            pixels = explainer.read_images([file for file, _ in batch])
            result = explainer.explain(explainer.images.normalize(pixels), self.target, self.batch_size, self.top_k,
                                       warn=False)
            heat, explosion = result.heatmap(), result.explosion
            exploded = set(explosion.indices) if explosion is not None else set()
            taken = result.taken_shares
            rows = []
            with Outputs() as outputs:
                for i, (file, destinations) in enumerate(batch):
                    for r, (png, npy) in enumerate(destinations):
                        write_heatmap(outputs, pixels[i], heat[i * ranks + r], png, npy, self.style, self.levels,
                                      self.sign, self.cmap)
                    picked = range(i * ranks, (i + 1) * ranks)
                    rows.append({"file": file, "targets": [int(result.targets[k]) for k in picked],
                                 "initial": [float(result.initial[k]) for k in picked],
                                 "input_sum": [float(result.input_sum[k]) for k in picked],
                                 "reach": [float(result.reach[k]) for k in picked],
                                 "taken": None if taken is None else [taken[k].tolist() for k in picked],
                                 "exploded": any(k in exploded for k in picked)})
            return rows, explosion

        return run


def explain_files(explainer, work: Sequence[tuple[str, list[tuple[Path | None, Path | None]]]], cluster: Cluster,
                  *, device: str = "cpu", batch_size: int = 16, target: int | None = None, top_k: int | None = None,
                  style: str = "signed", levels: int | None = None, sign: str = "positive", cmap: str | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[list[dict], Any]:
    """Each (image file, [(PNG, NPY) per rank]) explained on Ray actors with `explainer`'s
    compiled graph, its files written as the single-process command writes them. Returns per
    image: file, targets, initial and input relevance, reach and what each family took (shares, or
    None for gradients) per rank, exploded; and the explosions
    of the whole run (lrp.explosion.Explosion, None if none)."""
    with connected(cluster) as ray:
        job = FilesJob(explainer.portable().stored(ray), batch_size, target, top_k, style, levels, sign, cmap)
        done = map_batches(job, batches_of(list(work), batch_size), cluster, device, progress)
    explosions = [e for _, e in done if e is not None]
    return [row for rows, _ in done for row in rows], (sum(explosions[1:], explosions[0]) if explosions else None)


def read_heatmaps(output: str | Path) -> dict[str, np.ndarray]:
    """The heatmaps under `output`, by image path: float16 [H, W] each."""
    import pyarrow.parquet as pq

    maps: dict[str, np.ndarray] = {}
    for file in _parquet_files(Path(output)):
        table = pq.read_table(file, columns=[PATH, "heatmap", "heatmap_shape"])
        for path, heat, shape in zip(*(table.column(c).to_pylist() for c in (PATH, "heatmap", "heatmap_shape"))):
            maps[path] = np.asarray(heat, dtype=np.float16).reshape(shape)
    return maps
