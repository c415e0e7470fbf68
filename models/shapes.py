"""A synthetic image benchmark with ground-truth object masks.

Each 64x64 image shows one *target* shape, drawn in a saturated warm colour, among 1-3
*distractor* shapes in cool, muted colours, on a textured background. The class is
the target's shape; distractors may have any shape, so only the target decides the
class. The mask marks the target's pixels: a heatmap that explains the decision
should put its relevance there.

    images, labels, masks = generate(100, seed=1)
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "plus", "star", "ring")
SIZE = 64


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(angle + math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if kind == "triangle":
        return [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    if kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = angle + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return points
    if kind == "plus":
        w = r * 0.35
        outline = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]
    raise ValueError(kind)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(r * 0.45)))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _texture(rng: np.random.RandomState) -> np.ndarray:
    """A smooth random background: a few sinusoidal gratings in two muted colours, plus noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    field = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(3):
        theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(0.05, 0.35), rng.uniform(0, 2 * math.pi)
        field += np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    palette = []
    for _ in range(2):
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.7)
        palette.append(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    image = palette[0] * field[..., None] + palette[1] * (1 - field[..., None])
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255)


def _colour(rng: np.random.RandomState, target: bool) -> tuple[int, int, int]:
    if target:  # saturated, bright, warm (red..yellow)
        hsv = (rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0))
    else:  # muted, cool (green..blue..violet)
        hsv = (rng.uniform(0.35, 0.75), rng.uniform(0.15, 0.55), rng.uniform(0.35, 0.8))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(*hsv))


def sample(rng: np.random.RandomState) -> tuple[np.ndarray, int, np.ndarray]:
    """One (image uint8 [64, 64, 3], label, target mask bool [64, 64])."""
    label = rng.randint(len(CLASSES))
    background = _texture(rng)
    placed: list[tuple[float, float, float]] = []

    def place(r: float) -> tuple[float, float]:
        for _ in range(100):
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                return cx, cy
        return cx, cy

    r = rng.uniform(10, 15)
    cx, cy = place(r)
    placed.append((cx, cy, r))
    target = (label, cx, cy, r, rng.uniform(0, 2 * math.pi), _colour(rng, True))
    distractors = []
    for _ in range(rng.randint(1, 4)):
        q = rng.uniform(6, 11)
        x, y = place(q)
        placed.append((x, y, q))
        distractors.append((rng.randint(len(CLASSES)), x, y, q, rng.uniform(0, 2 * math.pi), _colour(rng, False)))

    image = Image.fromarray(background.astype(np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    for kind, x, y, q, angle, colour in distractors + [target]:
        draw_shape(draw, CLASSES[kind], x, y, q, angle, colour)
    draw_shape(ImageDraw.Draw(mask), CLASSES[label], cx, cy, r, target[4], 255)
    return np.asarray(image), int(label), np.asarray(mask) > 0


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n samples from a seeded stream: (images [n, 64, 64, 3] uint8, labels [n], masks [n, 64, 64] bool)."""
    rng = np.random.RandomState(seed)
    images, labels, masks = zip(*(sample(rng) for _ in range(n)))
    return np.stack(images), np.array(labels), np.stack(masks)
