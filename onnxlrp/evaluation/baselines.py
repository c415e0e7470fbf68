"""Attribution methods to compare LRP with, computed by the same ONNX machinery (no PyTorch).

Every method maps a batch of model inputs and target classes to saliency maps [N, H, W]:

- LRP presets and the paper's variants (i)-(iv): the channel sum of the input relevance;
- ``gradient``: the gradient of the target logit (preset ``gradient``), absolute values
  summed over channels;
- ``gradient-x-input``, ``integrated-gradients`` (black baseline, 32 midpoint steps, all in
  one batch) and ``guided-backprop``: channel sums of the signed attributions;
- ``relevance-cam`` (Lee et al. 2021) and ``gated-lrp``: the paper's variant (iv), as a
  layer map at the last conv block, and as its pixel map gated by that layer map squared
  (lrp.heatmaps); computed in the relevance graph;
- ``grad-cam``: at the last conv block (the tensor the global pooling averages), ReLU of the
  channel maps weighted by their average gradient, upsampled bilinearly;
- ``score-cam``: forward passes only: each channel map of the last conv block, upsampled and
  scaled to [0, 1], masks the image (black elsewhere); the target's probability on each
  masked image weights that map.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
from PIL import Image

from ..analysis import analyse
from ..explainer import Explainer, Explanation
from ..lrp.composites import PAPER_VARIANTS, PRESETS
from ..lrp.heatmaps import KINDS, Heatmap
from ..options import Options, Runtime, resolve
from ..errors import SettingError
from ..ir.model import readable_ir_version
from ..runtime.session import run_batched, session


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Forward:
    """The model's own forward pass (logits before any final Softmax), with an optional extra
    output: a probe tensor such as the last conv block's feature map."""

    def __init__(self, model: str | Path, probe: str | None = None, device: str = "cpu",
                 image_size: tuple[int, int] | None = None, threads: int | None = None):
        analysis = analyse(model, image_size=image_size)
        canonical = analysis.graph.canonical
        graph = canonical.graph
        outputs = [canonical.logits]
        if probe == "last":
            probe = analysis.graph.last_feature_map()
        if probe is not None:
            tensor = graph.tensors().get(probe)
            if tensor is None:
                raise SettingError(f"{model}: no tensor '{probe}' to probe")
            tensor.dtype = np.float32
            outputs.append(tensor)
        graph.outputs = outputs
        graph.cleanup()
        forward = gs.export_onnx(graph, do_type_check=False)
        forward.ir_version = readable_ir_version(analysis.ir_version)  # gs would write the model's own
        self.session = session(forward, device, threads)
        self.input_name = canonical.input.name
        self.image, self.height, self.width = analysis.image, analysis.height, analysis.width
        self.num_classes = analysis.num_classes
        self.probe = probe
        # the probe's channel axis as the layer heatmaps find it: 1, or what a global pooling over it keeps
        self.channel_axis = analysis.graph.channel_axis(probe) if probe is not None else 1

    def __call__(self, x: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
        out = run_batched(self.session, {self.input_name: x}, batch_size, self.image.batch)
        return list(out.values())

    def probabilities(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return softmax(self(x, batch_size)[0].astype(np.float64))


def _channel_sum(relevance: np.ndarray, layout: str) -> np.ndarray:
    return relevance.sum(axis=1 if layout == "NCHW" else 3)


def _upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, h, w] -> [N, H, W], bilinear."""
    return np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
                     for m in maps])


@dataclass
class Method:
    """A named attribution method: (model inputs, targets) -> saliency maps [N, H, W]."""

    name: str
    label: str  # for tables
    compute: Callable[[np.ndarray, np.ndarray], np.ndarray]
    explainer: Explainer | None = None  # LRP methods: for conservation statistics
    last: list[Explanation] = field(default_factory=list)  # LRP methods: the latest explanation (one)

    def __call__(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return self.compute(x, targets)


def _lrp(name: str, label: str, model, options: Options, runtime: Runtime) -> Method:
    explainer = Explainer(model, replace(options, trace=True), runtime)
    last: list[Explanation] = []

    def compute(x, targets):
        last[:] = [explainer.explain(x, targets)]
        return last[0].heatmap()

    return Method(name, label, compute, explainer, last)


def methods(model: str | Path, black: np.ndarray, layout: str = "NCHW", steps: int = 32, *,
            options: Options | None = None, runtime: Runtime | None = None,
            **settings) -> dict[str, Callable[[], Method]]:
    """Method name -> a factory (methods build their sessions only when asked for).
    black: the model input of one all-black image (no batch axis), for Integrated Gradients and Score-CAM.
    options: the LRP methods' settings, except what a method sets itself (fixed_settings), and
    the input size; runtime: where every method's sessions run; or their settings by name
    (device="cuda"), as Explainer takes them."""
    options, runtime = resolve(options, runtime, settings)
    common = dict(device=runtime.device, image_size=options.image_size, threads=runtime.threads)

    def gradients(preset):
        explainer = Explainer(model, Options.make(preset=preset, image_size=options.image_size), runtime)
        return lambda x, targets: explainer.explain(x, targets).relevance

    def gradient():
        grad = gradients("gradient")
        return Method("gradient", "Gradient", lambda x, t: _channel_sum(np.abs(grad(x, t)), layout))

    def gradient_x_input():
        grad = gradients("gradient")
        return Method("gradient-x-input", "Gradient x Input", lambda x, t: _channel_sum(grad(x, t) * x, layout))

    def integrated_gradients():
        grad = gradients("gradient")
        alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps

        def compute(x, targets):
            path = black[None] + alphas[:, None, None, None, None] * (x - black)[None]  # [steps, N, ...]
            g = grad(path.reshape((-1,) + x.shape[1:]), np.tile(targets, steps)).reshape(path.shape)
            return _channel_sum(g.mean(axis=0) * (x - black), layout)

        return Method("integrated-gradients", "Integrated Gradients", compute)

    def guided_backprop():
        grad = gradients("guided-backprop")
        return Method("guided-backprop", "Guided Backprop", lambda x, t: _channel_sum(grad(x, t), layout))

    def grad_cam():
        explainer = Explainer(model, Options.make(preset="gradient", probe="last", image_size=options.image_size),
                              runtime)
        graph = explainer.analysis.graph
        axis = graph.channel_axis(graph.last_feature_map())  # as the layer heatmaps find it

        def compute(x, targets):
            # channels to axis 1 (a no-op for ONNX's channels-first maps)
            activation, gradient = (np.moveaxis(t, axis, 1) for t in explainer.explain(x, targets).probe)
            weights = gradient.mean(axis=(2, 3), keepdims=True)
            cam = np.maximum((weights * activation).sum(axis=1), 0)
            size = x.shape[2:] if layout == "NCHW" else x.shape[1:3]
            return _upsample(cam, *size)

        return Method("grad-cam", "Grad-CAM", compute)

    def score_cam():
        forward = Forward(model, probe="last", **common)

        def compute(x, targets):
            size = x.shape[2:] if layout == "NCHW" else x.shape[1:3]
            maps = []
            for image, target in zip(x, targets):
                activation = np.moveaxis(forward(image[None])[1], forward.channel_axis, 1)[0]  # [C, h, w]
                upsampled = _upsample(activation, *size)
                low = upsampled.min(axis=(1, 2), keepdims=True)
                span = upsampled.max(axis=(1, 2), keepdims=True) - low
                masks = np.where(span > 0, (upsampled - low) / np.where(span > 0, span, 1), 0)
                masks = masks[:, None] if layout == "NCHW" else masks[..., None]
                weights = forward.probabilities(black + masks * (image - black))[:, target]
                maps.append(np.maximum((weights[:, None, None] * activation).sum(axis=0), 0))
            return _upsample(np.stack(maps), *size)

        return Method("score-cam", "Score-CAM", compute)

    registry = {
        "gradient": gradient,
        "gradient-x-input": gradient_x_input,
        "integrated-gradients": integrated_gradients,
        "guided-backprop": guided_backprop,
        "grad-cam": grad_cam,
        "score-cam": score_cam,
    }
    return LrpMethods(registry, model, options, runtime)


#: LRP methods by name: (label, preset, options); any of them, and any preset by its name,
#: also with a heatmap suffix (``paper-iv:gated``, ``epsilon-gamma-box:layer``)
LRP_METHODS: dict[str, tuple[str, str, dict]] = {
    "lrp-captum": ("LRP (Captum default: epsilon, no splitting)", "captum", {}),
    "epsilon-plus-flat": ("LRP epsilon-plus-flat, ratio split", "epsilon-plus-flat", {}),
    **{f"paper-{v}": (f"LRP paper ({v})" + (", proposed" if v == "iv" else ""), "paper",
                      {"split": split, "include_identity": identity})
       for v, (split, identity) in PAPER_VARIANTS.items()},
    "relevance-cam": ("Relevance-CAM (paper (iv) at the last block)", "paper",
                      dict(zip(("split", "include_identity"), PAPER_VARIANTS["iv"]), heatmap="layer")),
    "gated-lrp": ("Gated LRP (paper (iv) x last-block relevance^2)", "paper",
                  dict(zip(("split", "include_identity"), PAPER_VARIANTS["iv"]), heatmap="gated")),
}


class LrpMethods(dict):
    """Method name -> factory: the named methods, the LRP_METHODS, every preset by name, and
    ``lrp`` (the explainer `options` describe, as given), each LRP method also as NAME:layer or
    NAME:gated (its Relevance-CAM or gated map)."""

    def __init__(self, named: dict[str, Callable[[], Method]], model, options: Options, runtime: Runtime):
        super().__init__(named)
        self.model, self.options, self.runtime = model, options, runtime
        for name in ("lrp", *LRP_METHODS):
            self[name] = self._factory(name)

    def _factory(self, name: str) -> Callable[[], Method] | None:
        base, _, kind = name.partition(":")
        if base == "lrp":
            label, preset, recipe = f"LRP {self.options.preset.name} (the options given)", None, {}
        elif base in LRP_METHODS:
            label, preset, recipe = LRP_METHODS[base]
        elif base in PRESETS and base not in ("gradient", "guided-backprop"):
            label, preset, recipe = f"LRP {base}", base, {}
        else:
            return None
        if kind:
            if kind not in KINDS or "heatmap" in recipe:
                return None
            label, recipe = f"{label}, {kind} map", {**recipe, "heatmap": kind}
        return lambda: _lrp(name, label, self.model, self._options(preset, recipe), self.runtime)

    def _options(self, preset: str | None, recipe: dict) -> Options:
        """A method's options: its preset and recipe (split, heatmap) over the options given; the
        'lrp' method (preset None) takes them as they are, but for a NAME:kind map."""
        given = self.options
        heatmap = Heatmap(recipe.get("heatmap", "pixel"), given.heatmap.layer)
        if preset is None:
            return given if "heatmap" not in recipe else replace(given, heatmap=heatmap)
        return Options.make(preset=preset, split=recipe.get("split"), include_identity=recipe.get("include_identity"),
                            bias=given.bias, low=given.low, high=given.high, preprocessing=given.preprocessing,
                            image_size=given.image_size, rules=dict(given.rules), precision=given.precision,
                            heatmap=heatmap)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and self._factory(name) is not None)

    def __missing__(self, name: str) -> Callable[[], Method]:
        factory = self._factory(name)
        if factory is None:
            raise KeyError(name)
        return factory


#: the settings (Options.make's names, as the CLI's options are named) an LRP method sets itself
_RECIPE = ("preset", "split", "include_identity", "heatmap")


def fixed_settings(name: str) -> tuple[str, ...]:
    """What method `name` sets itself, so that a setting given for it would be dropped: a named
    LRP method its preset, split and map; 'lrp' nothing (it takes the options as given, and its
    map from a :kind suffix); other methods nothing (they are not LRP: the rules do not apply)."""
    base, _, kind = name.partition(":")
    if base == "lrp":
        return ("heatmap",) if kind else ()
    if base in LRP_METHODS or base in PRESETS and base not in ("gradient", "guided-backprop"):
        return _RECIPE
    return ()
