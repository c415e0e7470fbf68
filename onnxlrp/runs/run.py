"""explain_folder: a folder of images explained in batches and written through a sink, in this
process or on Ray actors, resumable in both."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SettingError
from ..explainer import Explainer
from ..ir.digest import model_digest
from ..lrp.explosion import Explosion
from ..options import Options, Runtime, resolve, split_settings
from . import local, on_ray, step
from .parquet import ParquetSink
from .sources import as_source


@dataclass(frozen=True)
class RunSummary:
    """What a run did. images: explained in this run; skipped: already done (resume).
    explosion: what exploded (None when nothing was explained, or rows went straight to
    Parquet on Ray). at_input, taken: per explanation, the share of the initial relevance at
    the input and [N, F] what each family of ops took (lrp.reach; None for gradients, or Parquet
    on Ray): the reach warning's median is taken over them."""

    images: int
    skipped: int
    explosion: Explosion | None = None
    at_input: np.ndarray | None = None
    taken: np.ndarray | None = None


def explain_folder(
    model: str | Path | Explainer,
    images: Any,
    sink: Any,
    *,
    options: Options | None = None,
    runtime: Runtime | None = None,
    target: int | None = None,
    top_k: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[step.Explained], None] | None = None,
    check_images: bool = False,
    **settings: Any,
) -> RunSummary:
    """Explain every image of `images` in batches and write the results through `sink`.

    model: an .onnx file, or an Explainer already built (its options are used; runtime and
    runtime settings still choose where the run goes). images: files and folders (searched
    recursively, as the command line does), or a source (runs.sources: ImageFiles, Pixels).
    sink: runs.FileSink (PNG/NPY files) or runs.ParquetSink (rows). options, runtime and the
    settings by name as Explainer takes them; runtime.cluster None runs in this process, a
    Cluster on Ray actors (the same batches, so the same numbers). target: the class for every
    image (None: each one's top-1); top_k: each image's k best classes instead (files only).
    progress(done, total): images finished in this run, first (0, total) before any work.
    on_result(Explained): each explanation, in order, once its outputs are written (on Ray:
    when the run ends; not for Parquet on Ray, whose rows go from the actors to the files).
    check_images: decode every image before the first is explained (a bad one is then an error
    before any output). Images the sink already holds (resume) are skipped. Memory: about two
    batches, however many images (runs.local).
    """
    if isinstance(model, Explainer):
        option_settings, runtime_settings = split_settings(settings)
        if options is not None or option_settings:
            raise TypeError("an Explainer brings its own options: give runtime settings only")
        explainer = model
        _, runtime = resolve(explainer.options, runtime, runtime_settings) if (runtime or runtime_settings) else \
            (None, explainer.runtime)
    else:
        options, runtime = resolve(options, runtime, settings)
        explainer = None
    if top_k is not None and target is not None:
        raise SettingError("top_k and target exclude each other")
    source = as_source(images, absolute=sink.absolute, dedupe=sink.absolute)
    sink = sink.plan(len(source.items), top_k)
    sink.check(source.items)  # every destination and, if asked, every image: before any work
    if check_images:
        source.check()
    if explainer is None:
        # On Ray the driver only compiles; the actors run the graph on their device.
        where = runtime if runtime.cluster is None else Runtime(device="cpu", threads=1, cache=runtime.cache)
        explainer = Explainer(model, options, where)
    explainer.targets(target, 1)  # a class out of range: an error before any work
    if top_k is not None and not 1 <= top_k <= explainer.num_classes:
        raise SettingError(f"top_k {top_k}: the model has {explainer.num_classes} classes")
    if sink.concepts:
        explainer.conditions(sink.concepts, 1)  # no concept layer, or more concepts than channels: before any work
    if isinstance(sink, ParquetSink):
        sink = sink.opened(_meta(explainer, target, runtime.device))
    items = source.items
    todo: Any = range(len(items))
    if sink.resumes:
        # 8 bytes per image still to do: the index, not the item
        todo = np.fromiter((i for i in range(len(items)) if not sink.done(items[i])), dtype=np.int64)
    if progress is not None:
        progress(0, len(todo))
    common = dict(target=target, batch_size=runtime.batch_size, progress=progress)
    if runtime.cluster is None:
        totals = local.run(explainer, source, sink, todo, top_k=top_k, on_result=on_result, **common)
    elif isinstance(sink, ParquetSink):
        totals = on_ray.run_rows(explainer, source, sink, todo, runtime.cluster, runtime.device, **common)
    else:
        totals = on_ray.run_files(explainer, source, sink, todo, runtime.cluster, runtime.device, top_k=top_k,
                                  on_result=on_result, **common)
    shares = totals.shares
    return RunSummary(totals.images, len(items) - len(todo), totals.explosion,
                      np.concatenate([a for a, _ in shares]) if shares else None,
                      np.concatenate([t for _, t in shares]) if shares else None)


def _meta(explainer: Explainer, target: int | None, device: str) -> dict[str, Any]:
    """What produced a Parquet folder's rows (runs.parquet.META), checked on resume."""
    options = explainer.options
    return {"model": str(explainer.model_file), "model_sha256": model_digest(explainer.model_file),
            "preset": explainer.summary.preset, "options": options.digest() or repr(options), "target": target,
            "device": device}
