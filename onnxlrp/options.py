"""Options: everything that shapes a compiled explainer, in one frozen object.

Made of plain values, it pickles and travels to other processes and machines as it is,
and its digest (with the model file's content) is the key of the compiled-explainer cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import OnnxLrpError
from .io.preprocessing import Preprocessing, get_preprocessing
from .lrp.composites import Preset
from .lrp.heatmaps import Heatmap
from .lrp.rules import Rule
from .lrp.splitting import Split
from .runtime import fingerprint

PRECISIONS = ("fp32", "fp16")


def resolve_split(preset: Preset, split: str | Split | None, include_identity: bool | None) -> Split:
    """The Split rule asked for: a Split as given, else by name, with the preset's defaults."""
    if isinstance(split, Split):
        return split
    try:
        return Split(split or preset.split, preset.include_identity if include_identity is None else include_identity)
    except ValueError as exc:
        raise OnnxLrpError(str(exc)) from None


@dataclass(frozen=True)
class Options:
    """Everything that shapes the compiled relevance graph, resolved (a Split, not a name).

    Frozen and made of plain values, so it pickles and travels; its fingerprint, with the
    model file's content, is the cache key: anything that changes the graph changes the key.
    """

    preset: Preset
    split: Split
    bias: bool = True
    low: tuple[float, ...] | None = None  # z^B box bounds as given (per channel or one value)
    high: tuple[float, ...] | None = None
    preprocessing: Preprocessing = field(default_factory=lambda: get_preprocessing("imagenet"))
    image_size: tuple[int, int] | None = None
    rules: tuple[tuple[str, Rule], ...] = ()  # overrides, by node name or op type
    trace: bool = False
    precision: str = "fp32"
    probe: str | None = None
    heatmap: Heatmap = Heatmap()  # pixel, layer (Relevance-CAM) or gated

    def digest(self) -> str | None:
        """A digest of every field, or None where one cannot be described (a callable object as modifier)."""
        try:
            return fingerprint.digest(self)
        except fingerprint.Unfingerprintable:
            return None


def bound_values(value) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))


