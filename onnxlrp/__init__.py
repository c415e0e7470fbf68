"""onnxlrp: Layer-wise Relevance Propagation with Relevance Splitting on ONNX graphs.

The pipeline, one package per stage:

    ir/           load and validate the ONNX file, canonicalise it, the networkx DAG of
                  the data path, residual merges and their skip kinds
    lrp/          op adapters by family (forward and transpose emitters), LRP rules,
                  Relevance Splitting, presets, the relevance graph builder, explosion checks
    runtime/      onnxruntime sessions and batching, the on-disk cache of compiled explainers
    io/           images in (preprocessing), heatmaps out, outputs written all or none
    evaluation/   Insertion/Deletion and other metrics, baseline methods, `evaluate`
    audit/        deployment audits: checks over a folder, findings, verdict, HTML/JSON report

and the API that strings them together:

    options.py    Options (what the compiled graph is; frozen, the cache key) and Runtime
                  (where it runs): what every entry point accepts
    analysis.py   analyse(): the model read, canonicalised, merges found, rules assigned
    compiler.py   the relevance graph built from an analysis, or found in the cache
    explainer.py  Explainer: compiled graph + runner + image reader
    explanation.py  Explanation: relevance and the numbers to audit conservation
    cli.py        the `onnxlrp` command, a thin layer over the above
"""
from .analysis import Analysis, analyse
from .errors import OnnxLrpError, OnnxLrpWarning
from .explainer import Explainer
from .explanation import Explanation
from .ir.merges import Merge
from .io.preprocessing import PREPROCESSING
from .lrp import rules
from .lrp.composites import PAPER_VARIANTS, PRESETS, Preset, get_preset
from .lrp.splitting import SPLITS, Split
from .options import Options, Runtime

__version__ = "0.1.0"

__all__ = [
    "Analysis", "Explainer", "Explanation", "Merge", "OnnxLrpError", "OnnxLrpWarning", "Options", "PAPER_VARIANTS",
    "PREPROCESSING", "PRESETS", "Preset", "Runtime", "SPLITS", "Split", "analyse", "get_preset", "rules",
]
