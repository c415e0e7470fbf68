"""The residual merge: an Add of two computed tensors. Its rule is a split (onnxlrp.lrp.splitting)."""
from __future__ import annotations

from .base import Op

class ResidualAdd(Op):
    """An Add of two computed tensors: a residual merge. Relevance is split, see splitting.py."""

    kind = "merge"
    keeps_sign = True
    shape_preserving = True
    default_rule = "split"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        shapes = [t.shape for t in self.data_inputs]
        if shapes[0] != shapes[1]:
            raise self.error(f"adds tensors of shapes {shapes[0]} and {shapes[1]}; a residual merge needs equal shapes")
