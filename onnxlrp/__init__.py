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
    attribution.py    the Python API: Explainer, Explanation
    preprocessing.py / image.py   images in, heatmaps out
    metrics.py / baselines.py / evaluate.py   Insertion/Deletion and other methods, over folders
    cli.py            the `onnxlrp` command
"""
from .attribution import Analysis, Explainer, Explanation, OnnxLrpWarning, analyse
from .composites import PAPER_VARIANTS, PRESETS, Preset, get_preset
from .errors import OnnxLrpError
from .merges import Merge
from .preprocessing import PREPROCESSING
from .splitting import SPLITS, Split

__version__ = "0.1.0"

__all__ = [
    "Analysis", "Explainer", "Explanation", "Merge", "OnnxLrpError", "OnnxLrpWarning", "PAPER_VARIANTS",
    "PREPROCESSING", "PRESETS", "Preset", "SPLITS", "Split", "analyse", "get_preset",
]
