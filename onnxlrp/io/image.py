"""Heatmaps as pictures (matplotlib colormaps, Pillow for files).

Two styles:

- ``signed`` (default): the channel-summed relevance with a symmetric diverging colormap
  (zero at its centre: ``coldnhot`` as in Zennit, or ``bwr``, ``seismic``, ...) over a grey copy
  of the image, each pixel as opaque as its relevance is strong;
- ``paper``: as Otsuki et al. show them: heat quantization (8 levels), normalisation at the
  98 % cumulative-sum threshold with a sign mode, and ``jet`` over the image at alpha 0.4.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LinearSegmentedColormap
from PIL import Image


SIGNS = ("positive", "absolute", "all")
STYLES = ("signed", "paper")

#: onnxlrp's own colormaps, found before matplotlib's. They are not registered with matplotlib:
#: importing onnxlrp leaves its registry as the user has it.
#: coldnhot: cyan and blue for negative, black at zero, red and yellow for positive relevance.
OWN_COLORMAPS = {"coldnhot": LinearSegmentedColormap.from_list(
    "coldnhot", [(0.0, "#00ffff"), (0.25, "#0000ff"), (0.5, "#000000"), (0.75, "#ff0000"), (1.0, "#ffff00")])}


def is_colormap(name: str) -> bool:
    return name in OWN_COLORMAPS or name in colormaps


def colormap(name: str):
    return OWN_COLORMAPS[name] if name in OWN_COLORMAPS else colormaps[name]


def quantize(heat: np.ndarray, levels: int = 8) -> np.ndarray:
    """Heat quantization: bins = linspace(min, max, levels); each value drops to its bin's lower
    edge, the maximum stays."""
    heat = np.asarray(heat, dtype=np.float64)
    if levels < 2 or heat.max() == heat.min():
        return heat
    bins = np.linspace(heat.min(), heat.max(), levels)
    return bins[np.clip(np.digitize(heat, bins) - 1, 0, levels - 1)]


def cumulative_threshold(values: np.ndarray, percent: float = 98.0) -> float:
    """The value at which the ascending cumulative sum of (non-negative) values reaches `percent` %."""
    ordered = np.sort(values.reshape(-1))
    sums = np.cumsum(ordered)
    if sums[-1] <= 0:
        return 0.0
    return float(ordered[np.searchsorted(sums, sums[-1] * percent / 100)])


def normalize(heat: np.ndarray, sign: str = "positive", percent: float = 98.0) -> np.ndarray:
    """Scale by the 98 % cumulative-sum threshold and clip to [-1, 1]: positive keeps positive values,
    absolute takes magnitudes, all keeps signs (threshold from magnitudes)."""
    heat = np.asarray(heat, dtype=np.float64)
    if sign == "positive":
        heat = np.clip(heat, 0, None)
    elif sign == "absolute":
        heat = np.abs(heat)
    elif sign != "all":
        raise ValueError(f"unknown sign mode '{sign}'; choose one of {', '.join(SIGNS)}")
    threshold = cumulative_threshold(np.abs(heat), percent)
    return np.clip(heat / threshold, -1, 1) if threshold > 0 else np.zeros_like(heat)


def _normalized(heat: np.ndarray, symmetric: bool) -> np.ndarray:
    """Relevance scaled to [-1, 1] (symmetric) or [0, 1], robust to a few extreme pixels."""
    heat = np.asarray(heat, dtype=np.float64)
    if symmetric:
        scale = np.percentile(np.abs(heat), 99.5) or np.abs(heat).max()
        return np.clip(heat / scale, -1, 1) if scale > 0 else np.zeros_like(heat)
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def colorize(heat: np.ndarray, cmap: str = "bwr", symmetric: bool = True) -> np.ndarray:
    """[H, W] relevance -> uint8 RGB. Symmetric maps put zero at the colormap's centre."""
    values = _normalized(heat, symmetric)
    rgba = colormap(cmap)(0.5 + 0.5 * values if symmetric else values)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _enlarged(picture: Image.Image, min_size: int) -> Image.Image:
    factor = -(-min_size // min(picture.size))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    return picture


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.8, cmap: str = "bwr", min_size: int = 256) -> Image.Image:
    """The signed heatmap over a grey version of the image (uint8 [H, W, C]).

    Each pixel's colour is as opaque as its relevance is strong (up to `alpha`), so
    the image shows where relevance is zero. Small inputs are enlarged to `min_size`.
    """
    weight = alpha * np.abs(_normalized(heat, True))[..., None]
    colors = colorize(heat, cmap).astype(np.float32)
    gray = image.astype(np.float32).mean(axis=-1, keepdims=True)
    return _enlarged(Image.fromarray((weight * colors + (1 - weight) * gray).round().clip(0, 255).astype(np.uint8)), min_size)


def paper_overlay(image: np.ndarray, heat: np.ndarray, levels: int = 8, sign: str = "positive",
                  cmap: str = "jet", alpha: float = 0.4, min_size: int = 256) -> Image.Image:
    """The paper's display: quantize, normalise, colormap over the image at `alpha`."""
    values = normalize(quantize(heat, levels), sign)
    colors = colorize(values, cmap, symmetric=False).astype(np.float32)
    rgb = image.astype(np.float32)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return _enlarged(Image.fromarray((alpha * colors + (1 - alpha) * rgb).round().clip(0, 255).astype(np.uint8)), min_size)


def render(image: np.ndarray, heat: np.ndarray, style: str = "signed", levels: int | None = None,
           sign: str = "positive", cmap: str | None = None) -> Image.Image:
    """A heatmap picture in one of the STYLES; levels (heat quantization) 0 turns it off."""
    if style == "paper":
        return paper_overlay(image, heat, 8 if levels is None else levels, sign, cmap or "jet")
    if style == "signed":
        return overlay(image, quantize(heat, levels) if levels else heat, cmap=cmap or "coldnhot")
    raise ValueError(f"unknown style '{style}'; choose one of {', '.join(STYLES)}")


def data_uri(picture: Image.Image | np.ndarray) -> str:
    """A picture as a PNG data: URI, for self-contained HTML pages."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(picture: Image.Image, size: int = 128) -> Image.Image:
    """At most `size` pixels a side; small pictures enlarged to it, their pixels kept sharp."""
    picture = picture.convert("RGB")
    if max(picture.size) >= size:
        picture.thumbnail((size, size))  # in place; no change at exactly `size`
        return picture
    return picture.resize((size, size), Image.NEAREST)


def write_png(picture: Image.Image, path: str | Path) -> None:
    picture.save(path, format="PNG")


def write_npy(array: np.ndarray, path: str | Path) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def write_heatmap(outputs, pixels: np.ndarray, heat: np.ndarray, png: Path | None, npy: Path | None,
                  style: str = "signed", levels: int | None = None, sign: str = "positive",
                  cmap: str | None = None) -> None:
    """One heatmap's files, staged in `outputs` (io.files.Outputs): the PNG over the image, the
    raw map as float32 .npy."""
    if png is not None:
        picture = render(pixels, heat, style, levels, sign, cmap)
        outputs.write(png, lambda tmp: write_png(picture, tmp))
    if npy is not None:
        outputs.write(npy, lambda tmp: write_npy(heat.astype(np.float32), tmp))
