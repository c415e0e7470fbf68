"""Pipeline stage 6: heatmaps as pictures (matplotlib colormaps, Pillow for files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .attribution import write_atomic


def colorize(heat: np.ndarray, cmap: str = "bwr", symmetric: bool = True) -> np.ndarray:
    """[H, W] relevance -> uint8 RGB. Symmetric maps put zero at the colormap's centre."""
    heat = np.asarray(heat, dtype=np.float64)
    if symmetric:
        scale = np.abs(heat).max()
        values = 0.5 + 0.5 * heat / scale if scale > 0 else np.full_like(heat, 0.5)
    else:
        low, high = heat.min(), heat.max()
        values = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    rgba = colormaps[cmap](np.clip(values, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6, cmap: str = "bwr", symmetric: bool = True) -> Image.Image:
    """The heatmap blended over a grey version of the image (uint8 [H, W, C])."""
    colors = colorize(heat, cmap, symmetric).astype(np.float32)
    gray = image.astype(np.float32).mean(axis=-1, keepdims=True)
    mixed = alpha * colors + (1 - alpha) * gray
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8))


def save_png(picture: Image.Image, path: str | Path) -> None:
    write_atomic(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


def save_npy(array: np.ndarray, path: str | Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    write_atomic(Path(path), write)
