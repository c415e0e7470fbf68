"""Image files to model input: reading, resizing, normalisation presets and box bounds.

Presets:

- ``imagenet``: RGB in [0, 1], minus mean, over std (torchvision, timm);
- ``caffe``: BGR in [0, 255] minus the ImageNet mean (Keras ResNet50/101/152);
- ``tf``: RGB in [-1, 1] (Keras ResNet50V2/101V2/152V2, MobileNet);
- ``raw``: RGB in [0, 1], nothing else.

The z^B rule's default box is the pixel range [0, 255] mapped through the preset.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import ImageError, SettingError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Preprocessing:
    name: str
    scale: float  # pixel value (0..255) times scale ...
    mean: tuple[float, ...]  # ... minus mean, over std, per channel in the model's channel order
    std: tuple[float, ...]
    bgr: bool = False

    def _stats(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if channels == 1:  # grayscale models: one channel with the average statistics
            return mean.mean(keepdims=True), std.mean(keepdims=True)
        return mean, std

    def normalize(self, pixels: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """uint8 images [N, H, W, C] (RGB or gray) -> float32 model input in `layout`."""
        x = pixels.astype(np.float32)
        if self.bgr and x.shape[-1] == 3:
            x = x[..., ::-1]
        mean, std = self._stats(x.shape[-1])
        x = (x * self.scale - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)

    def denormalize(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """The inverse of normalize: model input -> uint8 RGB/gray images [N, H, W, C]."""
        x = x.transpose(0, 2, 3, 1) if layout == "NCHW" else x
        mean, std = self._stats(x.shape[-1])
        x = (x * std + mean) / self.scale
        if self.bgr and x.shape[-1] == 3:
            x = x[..., ::-1]
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def bounds(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high): the pixel values 0 and 255 after preprocessing."""
        mean, std = self._stats(channels)
        low, high = (0 * self.scale - mean) / std, (255 * self.scale - mean) / std
        return low.astype(np.float32), high.astype(np.float32)


PREPROCESSING = {
    p.name: p
    for p in (
        Preprocessing("imagenet", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        Preprocessing("caffe", 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True),
        Preprocessing("tf", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        Preprocessing("raw", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    )
}


def get_preprocessing(name: str | Preprocessing) -> Preprocessing:
    if isinstance(name, Preprocessing):
        return name
    try:
        return PREPROCESSING[name]
    except KeyError:
        raise SettingError(f"unknown preprocessing '{name}'; choose one of {', '.join(PREPROCESSING)}") from None


#: the folder of object masks in a data folder (masks/<the image's relative path>); no images in it
MASKS = "masks"


def walk_images(folder: str | Path) -> list[PurePosixPath]:
    """Image files under `folder`, recursively, relative to it and sorted: the one walk of every
    command (explain's folder arguments, evaluate's and audit's data folders). Names starting
    with "." (hidden files and folders, .DS_Store, macOS's ._x.png resource forks) are skipped,
    and so is the masks folder at the top (`MASKS`): masks are no images to explain."""
    folder = Path(folder)
    found, seen = [], set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        top = Path(parent) == folder
        # sorted: deterministic
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d == MASKS))
        for name in names:
            path = Path(parent, name)
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append(PurePosixPath(*path.relative_to(folder).parts))
    return sorted(found)


def find_mask(image: str | Path, root: str | Path, masks: str | Path | None = None) -> Path | None:
    """The object mask of `image` (a file under the data folder `root`), the one lookup of every
    command: `masks` (default root/masks) / the image's path relative to root, else the same
    path with a .png (or .PNG) suffix (a JPEG's mask is a PNG); None when neither exists, or when the
    image lies outside root (an absolute path in a labels file)."""
    image, root = Path(image), Path(root)
    folder = Path(masks) if masks is not None else root / MASKS
    try:
        relative = image.relative_to(root)
    except ValueError:
        return None
    for candidate in (folder / relative, *((folder / relative).with_suffix(s) for s in (".png", ".PNG"))):
        if candidate.is_file():
            return candidate
    return None


def image_sources(paths: list[str | Path]) -> list[tuple[Path, PurePosixPath]]:
    """Every image and its path relative to the argument that named it.

    Folders are searched recursively (photos/cats/a.png -> cats/a.png) by walk_images: sorted,
    skipping names that start with "." and the masks folder; a file argument stands for itself
    (-> its file name).
    """
    sources: list[tuple[Path, PurePosixPath]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = walk_images(path)
            if not found:
                raise ImageError(f"{path}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            sources.extend((path.joinpath(*rel.parts), rel) for rel in found)
        elif path.is_file():
            sources.append((path, PurePosixPath(path.name)))
        else:
            raise ImageError(f"{path}: no such file or folder")
    return sources


def image_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders (their image files, recursively and sorted) and check every path exists."""
    return [path for path, _ in image_sources(paths)]


BACKGROUND = 255  # transparent pixels are composited on white


def _to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Any mode Pillow reads -> 8-bit RGB, or L when channels == 1.

    16-bit grey: times 255/65535, rounded. I (32-bit int): 8-, 16- or 32-bit data by its largest
    value. F (float): [0, 1] if every value lies in [0, 1], else 0..255; clipped. Alpha and
    transparent colours: composited on BACKGROUND.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode == "F":
            top = 1.0 if a.min() >= 0 and a.max() <= 1 else 255.0
        elif img.mode == "I":
            top = next(2.0**bits - 1 for bits in (8, 16, 32) if a.max() < 2**bits)
        else:
            top = 65535.0
        img = Image.fromarray(np.rint(np.clip(a, 0, top) * (255 / top)).astype(np.uint8))
    elif img.mode == "LAB":  # Pillow converts LAB to RGB (D65 sRGB), but not to L
        img = img.convert("RGB")
    elif img.has_transparency_data:  # an alpha channel, or a palette's / tRNS transparent colour
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255
        img = Image.fromarray(np.rint(rgba[..., :3] * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def _read(path: str | Path, channels: int = 3) -> Image.Image:
    """Open, check (PNG chunk checksums), fully decode and convert to 8 bits; else a one-line error."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            return _to_8bit(img, channels)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageError(f"{path}: cannot read image ({first_line(exc)})") from None


def check_images(files: list[Path], threads: int = 4) -> None:
    """Every file opens, passes Pillow's integrity check and decodes in full (pixels discarded);
    else a one-line error."""
    def check(path: Path) -> None:  # returns nothing: finished futures must not hold pixels
        _read(path)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(check, files))


def load_image(path: str | Path, height: int, width: int, channels: int = 3) -> np.ndarray:
    """Read an image, scale its shorter side to fit, centre-crop to height x width: uint8 [H, W, C]."""
    img = _read(path, channels)
    scale = max(height / img.height, width / img.width)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def load_images(files: list[Path], height: int, width: int, channels: int = 3) -> np.ndarray:
    """load_image for each file: uint8 [N, H, W, C]."""
    return np.stack([load_image(f, height, width, channels) for f in files])


@dataclass(frozen=True)
class ImageReader:
    """Image files as one model sees them: scaled, centre-cropped, normalised, in its layout."""

    height: int
    width: int
    channels: int
    layout: str
    preprocessing: Preprocessing

    def load(self, paths: list[str | Path]) -> tuple[list[Path], np.ndarray]:
        """Read image files (folders expand to their images): (files, uint8 [N, H, W, C])."""
        files = image_files(list(paths))
        return files, self.read(files)

    def read(self, files: list[Path]) -> np.ndarray:
        """uint8 [N, H, W, C] as the model sees them."""
        return load_images(list(files), self.height, self.width, self.channels)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> the model's float32 input batch."""
        return self.preprocessing.normalize(pixels, self.layout)
