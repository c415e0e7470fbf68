"""Pipeline stage 6: heatmaps as pictures (matplotlib colormaps, Pillow for files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .attribution import write_atomic


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
    rgba = colormaps[cmap](0.5 + 0.5 * values if symmetric else values)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.8, cmap: str = "bwr", min_size: int = 256) -> Image.Image:
    """The signed heatmap over a grey version of the image (uint8 [H, W, C]).

    Each pixel's colour is as opaque as its relevance is strong (up to `alpha`), so
    the image shows where relevance is zero. Small inputs are enlarged to `min_size`.
    """
    weight = alpha * np.abs(_normalized(heat, True))[..., None]
    colors = colorize(heat, cmap).astype(np.float32)
    gray = image.astype(np.float32).mean(axis=-1, keepdims=True)
    picture = Image.fromarray((weight * colors + (1 - weight) * gray).round().clip(0, 255).astype(np.uint8))
    factor = -(-min_size // min(picture.size))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    return picture


def save_png(picture: Image.Image, path: str | Path) -> None:
    write_atomic(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


def save_npy(array: np.ndarray, path: str | Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    write_atomic(Path(path), write)
