"""onnxlrp: Layer-wise Relevance Propagation with Relevance Splitting on ONNX graphs.

The pipeline, one module per stage:

    model.py          load and validate the ONNX file, describe its image input
    canonizers.py     canonicalise the graph (fold BatchNorm, strip Identity, merge Pad, ...)
    graph.py          the networkx DAG of the data path
    merges.py         residual merges and their skip kinds
    ops.py            per op type: forward and transpose emitters (ONNX nodes)
    rules.py          LRP rules as recipes over those emitters
    splitting.py      Relevance Splitting at merges
    composites.py     presets: op type -> rule tables
    relevance_graph.py  the relevance pass as one ONNX model
    runtime.py        onnxruntime sessions
    attribution.py    the Python API: Options, Explainer, Explanation
    explosion.py      relevance that explodes: found, set to 0 where NaN/Inf, reported
    cache.py / fingerprint.py   the on-disk cache of compiled explainers, keyed by the options' digest
    files.py          outputs: destinations checked first, written all together or not at all
    preprocessing.py / image.py   images in, heatmaps out
    metrics.py / baselines.py / evaluate.py   Insertion/Deletion and other methods, over folders
    cli.py            the `onnxlrp` command
"""
from .attribution import Analysis, Explainer, Explanation, Options, analyse
from .composites import PAPER_VARIANTS, PRESETS, Preset, get_preset
from .errors import OnnxLrpError, OnnxLrpWarning
from .merges import Merge
from .preprocessing import PREPROCESSING
from .splitting import SPLITS, Split

__version__ = "0.1.0"

__all__ = [
    "Analysis", "Explainer", "Explanation", "Merge", "OnnxLrpError", "OnnxLrpWarning", "Options", "PAPER_VARIANTS",
    "PREPROCESSING", "PRESETS", "Preset", "SPLITS", "Split", "analyse", "get_preset",
]
