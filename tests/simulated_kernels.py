"""Simulate int8 kernels that round differently from the reference Q/DQ arithmetic.

On a CPU with AVX2 but no AVX-512 VNNI, onnxruntime's fused int8 kernels (QLinearConv and
friends, chosen with the default graph optimisations) give an int8 model's logits up to 1.24
away from the reference Q/DQ arithmetic (models/audit/clean_int8.onnx on examples/audit); on a
VNNI machine they agree bit for bit. To test on any machine, a session opened on `model` with
optimisations on (the deployed kernels) returns its first output moved by `offset` (a few
quantisation steps, one sign per class), while a session with ORT_DISABLE_ALL (the reference
arithmetic) is left alone, and so is every other model (the relevance graphs).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


def install(monkeypatch, model: str | Path, offset: float) -> None:
    target = os.path.realpath(str(model))
    original = ort.InferenceSession

    class Deployed(original):
        def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
            super().__init__(path_or_bytes, sess_options, *args, **kwargs)
            level = sess_options.graph_optimization_level if sess_options is not None else None
            self._moved = (isinstance(path_or_bytes, (str, Path)) and os.path.realpath(str(path_or_bytes)) == target
                           and level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL)

        def run(self, output_names, input_feed, run_options=None):
            outputs = super().run(output_names, input_feed, run_options)
            if self._moved:
                first = outputs[0]
                signs = np.where(np.arange(first.shape[-1]) % 2 == 0, 1.0, -1.0).astype(first.dtype)
                outputs = [first + offset * signs, *outputs[1:]]
            return outputs

    monkeypatch.setattr(ort, "InferenceSession", Deployed)
