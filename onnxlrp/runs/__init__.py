"""Folder runs: many images explained in batches and written through a sink, in this process
or on Ray actors, with memory bounded by the batch and resumable after an interruption.

    sources.py   what to explain: ImageFiles (files and folders), Pixels (made in memory);
                 listed up front, decoded batch by batch
    files.py     FileSink: PNG/NPY files named as the command line names them
    parquet.py   ParquetSink: one Parquet row per image (read_heatmaps, done_paths)
    step.py      one batch, the same in both backends: explain, record, add up
    local.py     the in-process pipeline (decode ahead, write behind)
    on_ray.py    the Ray backend (runtime.cluster's actors; Ray Data for Parquet)
    run.py       explain_folder, the one entry point, and its RunSummary

>>> from onnxlrp.runs import FileSink, explain_folder
>>> summary = explain_folder("model.onnx", ["photos/"], FileSink(output=Path("heatmaps")), batch_size=32)
"""
from .files import FileSink
from .parquet import META, ParquetSink, done_paths, read_heatmaps
from .run import RunSummary, explain_folder
from .sources import ImageFiles, Item, Pixels
from .step import Explained

__all__ = ["Explained", "FileSink", "ImageFiles", "Item", "META", "ParquetSink", "Pixels", "RunSummary",
           "done_paths", "explain_folder", "read_heatmaps"]
