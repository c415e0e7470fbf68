"""The Ray backend: the same batches explained and written by Ray actors.

The explainer is compiled once, in the driver; its graph goes to the workers through Ray's
object store, and each actor opens its onnxruntime session on it and decodes its own
batches (the images must be readable from every node). Files (FileSink) are written by the
actors, image by image, and only each batch's numbers come back (runtime.cluster.map_batches,
in the order of the batches). Parquet rows (ParquetSink) are written by Ray Data while the
run goes on, block by block: nothing comes back to the driver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..explainer import Portable
from ..runtime.cluster import Cluster, actor_resources, assigned_threads, batches_of, connected, map_batches
from . import step
from .parquet import PATH, ParquetSink, table
from .sources import Decoder, Item, Source


@dataclass(frozen=True)
class _FilesJob:
    """A batch of items explained in an actor, its files written there (runtime.cluster's Job)."""

    explainer: Portable
    decoder: Decoder
    sink: Any  # a planned FileSink
    batch_size: int
    target: int | None = None
    top_k: int | None = None

    def open(self, device: str, threads: int | None) -> Callable[[list[Item]], step.Part]:
        explainer = self.explainer.open(device, threads)
        ranks = self.top_k or 1

        def run(chunk: list[Item]) -> step.Part:
            pixels = self.decoder([item.key for item in chunk], explainer.images)
            result, rows = step.explain(explainer, pixels, self.target, self.top_k, self.batch_size,
                                        self.sink.pair_lone, self.sink.concepts)
            part = step.numbers(chunk, result, rows, ranks)
            with self.sink.writing() as writer:
                files = [names for task in writer.tasks(chunk, pixels, result) for names in task()]
            return step.written(part, files)

        return run


def run_files(explainer, source: Source, sink, todo: Sequence[int], cluster: Cluster, device: str, *, target,
              top_k: int | None, batch_size: int, on_result, progress) -> step.Totals:
    if sink.staged:
        raise SettingError("staged outputs are published by one process: a run on Ray writes image by image "
                           "(staged=False)")
    items = [source.items[i] for i in todo]
    batches = batches_of(items, batch_size)
    totals, done = step.Totals(), [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(items))

    with connected(cluster) as ray:
        job = _FilesJob(explainer.portable().stored(ray), source.decoder, sink, batch_size, target, top_k)
        parts = map_batches(job, batches, cluster, device, advance)
    for chunk, part in zip(batches, parts):
        totals.add(part, len(chunk))
        if on_result is not None:
            for record in part.records:
                on_result(record)
    return totals


class _RowsActor:
    """One onnxruntime session per actor, on the relevance graph shipped from the driver."""

    def __init__(self, explainer, decoder, device: str, batch_size: int, full_relevance: bool,
                 target: int | None = None):
        self.explainer = explainer.open(device, assigned_threads(device))
        self.decoder, self.batch_size, self.full_relevance, self.target = decoder, batch_size, full_relevance, target

    def __call__(self, batch):
        paths = batch.column(PATH).to_pylist()
        pixels = self.decoder(paths, self.explainer.images)
        # Ray cuts the blocks as it likes: a lone image is run as a pair (step.explain)
        result, n = step.explain(self.explainer, pixels, self.target, None, self.batch_size, pair_lone=True)
        return table(paths, result, n, self.full_relevance)


def run_rows(explainer, source: Source, sink: ParquetSink, todo: Sequence[int], cluster: Cluster, device: str, *,
             target, batch_size: int, progress) -> step.Totals:
    from ray.data import SaveMode

    keys = [source.items[i].key for i in todo]
    totals = step.Totals()
    if not keys:
        return totals
    with connected(cluster) as ray:
        # One block per batch, so that every actor gets work. The keys are gathered in the
        # driver first: operators upstream of the actors would wait for CPUs the actors hold.
        dataset = ray.data.from_items([{PATH: k} for k in keys], override_num_blocks=math.ceil(len(keys) / batch_size))
        shipped = explainer.portable().stored(ray)
        results = dataset.map_batches(
            _RowsActor, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cluster.concurrency),
            fn_constructor_kwargs={"explainer": shipped, "decoder": source.decoder, "device": device,
                                   "batch_size": batch_size, "full_relevance": sink.full_relevance, "target": target},
            **actor_resources(ray, cluster, device),
        )
        # Before the run (an interrupted run leaves rows to resume from) and after it (an
        # overwrite clears the folder).
        sink.write_meta()
        # Writing takes no CPU of its own: the actors hold them all, and rows must reach the
        # disk while they run (else an interrupted run leaves nothing to resume from).
        results.write_parquet(str(sink.output), mode=SaveMode.APPEND if sink.resume else SaveMode.OVERWRITE,
                              ray_remote_args={"num_cpus": 0})
        sink.write_meta()
    totals.images = len(keys)
    if progress is not None:
        progress(len(keys), len(keys))
    return totals
