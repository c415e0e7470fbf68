"""The in-process backend: a pipeline over the batches of a run.

While onnxruntime explains batch k, a thread decodes batch k+1 and others write batch k-1's
files; nothing else is held. So the memory a run needs is that of about two batches, however
many images the folder has: each batch's pixels, relevance and heatmaps are let go once its
files are written, and what stays per image is its summary's two shares (step.Totals).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

from . import step
from .sources import Item, Source

#: threads that decode and write beside onnxruntime (PNG encoding and decoding release the GIL)
THREADS = 4


def run(explainer, source: Source, sink, todo: Sequence[int], *, target, top_k: int | None, batch_size: int,
        on_result: Callable[[step.Explained], None] | None, progress: Callable[[int, int], None] | None) -> step.Totals:
    """Explain source.items[i] for i in todo, in batches of batch_size (the cut `explain --ray`
    makes too); on_result gets each explanation in order once its files are written."""
    items, ranks, totals = source.items, top_k or 1, step.Totals()
    starts = range(0, len(todo), batch_size)

    def batch(start: int) -> list[Item]:
        return [items[i] for i in todo[start:start + batch_size]]

    def decode(chunk: list[Item]):
        return source.decoder([item.key for item in chunk], explainer.images)

    def finish(chunk: list[Item], part: step.Part, writes: list[Future]) -> None:
        files = [names for write in writes for names in write.result()]
        step.written(part, files)
        totals.add(part, len(chunk))
        if on_result is not None:
            for record in part.records:
                on_result(record)
        if progress is not None:
            progress(totals.images, len(todo))

    with sink.writing() as writer, ThreadPoolExecutor(max_workers=THREADS) as pool:
        pending = None  # the last batch, being written
        upcoming = pool.submit(decode, batch(0)) if starts else None
        for k, start in enumerate(starts):
            chunk, pixels = batch(start), upcoming.result()
            if k + 1 < len(starts):
                upcoming = pool.submit(decode, batch(starts[k + 1]))
            result, rows = step.explain(explainer, pixels, target, top_k, batch_size, sink.pair_lone,
                                        sink.concepts)
            part = step.numbers(chunk, result, rows, ranks)
            writes = [pool.submit(task) for task in writer.tasks(chunk, pixels, result)]
            del result, pixels  # the writes hold what they need; the relevance goes
            if pending is not None:
                finish(*pending)
            pending = (chunk, part, writes)
        if pending is not None:
            finish(*pending)
    return totals
