"""The two objects every entry point accepts: Options (what the compiled graph is) and
Runtime (where and how it runs).

Options shapes the compiled relevance graph; made of plain values, it pickles and travels
to other processes and machines as it is, and its digest (with the model file's content) is
the key of the compiled-explainer cache. Runtime changes no number: the device, threads,
batch size, the cache and a Ray cluster. ``Explainer``, ``audit``, ``evaluate``,
``explain_dataset`` and the folder runs take both; the command line builds them in one
place (onnxlrp.cli_options) from the option groups every command shares.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

import numpy as np

from .errors import SettingError
from .io.preprocessing import Preprocessing, get_preprocessing
from .lrp.composites import Preset, get_preset
from .lrp.heatmaps import Heatmap
from .lrp.rules import Rule
from .lrp.splitting import Split
from .runtime import fingerprint
from .runtime.cluster import Cluster
from .runtime.session import DEVICES

PRECISIONS = ("fp32", "fp16")


def resolve_split(preset: Preset, split: str | Split | None, include_identity: bool | None) -> Split:
    """The Split rule asked for: a Split as given, else by name, with the preset's defaults."""
    if isinstance(split, Split):
        return split
    try:
        return Split(split or preset.split, preset.include_identity if include_identity is None else include_identity)
    except ValueError as exc:
        raise SettingError(str(exc)) from None


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything that shapes the compiled relevance graph, resolved (a Split, not a name).

    Build one by names with :meth:`Options.make`. Frozen and made of plain values, so it
    pickles and travels; its fingerprint, with the model file's content, is the cache key:
    anything that changes the graph changes the key.
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
    concept_layer: str | None = None  # the layer whose channels are concepts (lrp.conditional)

    @classmethod
    def make(
        cls,
        *,
        preset: str | Preset = "epsilon-plus-flat",
        split: str | Split | None = None,
        include_identity: bool | None = None,
        bias: bool = True,
        low: float | Sequence[float] | None = None,
        high: float | Sequence[float] | None = None,
        preprocessing: str | Preprocessing = "imagenet",
        image_size: tuple[int, int] | None = None,
        rules: Mapping[str, Rule] | None = None,
        trace: bool = False,
        precision: str = "fp32",
        probe: str | None = None,
        heatmap: str | Heatmap = "pixel",
        layer: str = "last",
        concept_layer: str | None = None,
    ) -> Options:
        """Options from names. preset: a name from onnxlrp.PRESETS. split: symmetric, ratio or
        proportional (default: the preset's, ratio). include_identity: whether identity skips
        take part in the split (False sends their relevance down the main branch). bias: False
        drops biases from every rule (Zennit's zero_params=['bias']), which makes conserving
        presets conserve. low/high: z^B box bounds, scalars or per channel (default: the pixel
        range mapped through `preprocessing`). image_size: (H, W) where the model leaves them
        open. rules: overrides, keyed by node name or op type (lrp.rules.parse reads
        'KEY=RULE(ARGS)'). trace: also report the relevance total at the output of every op
        (Explanation.layer_sums). precision: "fp16" runs the relevance pass in float16 (inputs
        and outputs stay float32), for GPUs. probe: a tensor name ("last": the last conv
        block's output) whose activation and relevance are returned too. heatmap: "pixel"
        (input relevance over channels), "layer" (Relevance-CAM at tensor `layer`) or "gated"
        (the pixel map gated by the positive layer map), or an lrp.heatmaps.Heatmap.
        concept_layer: a tensor or node name, or "last", whose channels are concepts: the graph
        then also returns conditional relevance (Explainer.explain(..., concepts=))."""
        if precision not in PRECISIONS:
            raise SettingError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
        preset = get_preset(preset)
        return cls(
            preset=preset, split=resolve_split(preset, split, include_identity), bias=bias,
            low=bound_values(low), high=bound_values(high), preprocessing=get_preprocessing(preprocessing),
            image_size=tuple(image_size) if image_size else None, rules=tuple((rules or {}).items()), trace=trace,
            precision=precision, probe=probe,
            heatmap=heatmap if isinstance(heatmap, Heatmap) else Heatmap(heatmap, layer), concept_layer=concept_layer,
        )

    def digest(self) -> str | None:
        """A digest of every field, or None where one cannot be described (a callable object as modifier)."""
        try:
            return fingerprint.digest(self)
        except fingerprint.Unfingerprintable:
            return None


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where and how a compiled explainer runs; nothing here changes a number.

    device: an onnxruntime execution provider, cpu or cuda. threads: onnxruntime's intra-op
    threads (None: its own choice). batch_size: images per onnxruntime run. cache: reuse a
    compiled explainer from the on-disk cache (onnxlrp.runtime.cache) and store new ones
    there. cluster: run the batches on Ray actors (None: in this process)."""

    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 16
    cache: bool = True
    cluster: Cluster | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise SettingError(f"unknown device '{self.device}'; choose one of {', '.join(DEVICES)}")
        if self.batch_size < 1:
            raise SettingError("batch size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise SettingError("threads must be at least 1")


#: the keyword names Options.make and Runtime take (Explainer's shortcuts)
OPTION_NAMES = tuple(inspect.signature(Options.make).parameters)
RUNTIME_NAMES = tuple(f.name for f in fields(Runtime))


def split_settings(settings: Mapping[str, object]) -> tuple[dict, dict]:
    """Keyword settings -> (Options.make's, Runtime's); an unknown name is a TypeError, as for a call."""
    unknown = [k for k in settings if k not in OPTION_NAMES and k not in RUNTIME_NAMES]
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(map(repr, unknown))}; options: {', '.join(OPTION_NAMES)}; "
                        f"runtime: {', '.join(RUNTIME_NAMES)}")
    return ({k: v for k, v in settings.items() if k in OPTION_NAMES},
            {k: v for k, v in settings.items() if k in RUNTIME_NAMES})


def resolve(options: Options | None, runtime: Runtime | None, settings: Mapping[str, object]) -> tuple[Options, Runtime]:
    """The (Options, Runtime) an entry point runs with: the objects as given, or built from the
    settings given by name (Explainer(model, preset="epsilon", device="cuda")); both for the same
    object is a TypeError, as an unknown name is."""
    option_settings, runtime_settings = split_settings(settings)
    if option_settings and options is not None or runtime_settings and runtime is not None:
        raise TypeError("give options and runtime either as objects or by name, not both")
    return (options if options is not None else Options.make(**option_settings),
            runtime if runtime is not None else Runtime(**runtime_settings))


def bound_values(value) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
