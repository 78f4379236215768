"""Procedurally generated shapes: a synthetic 10-class image dataset made by this project, not a real one.

Each image is one shape (circle, square, triangle, ...) drawn at a random position and size in a colour that
contrasts with a random background (a linear colour gradient plus pixel noise). Everything is a function of
the generator seed, so the dataset is the same on every machine and for every experiment.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]

# class name -> inside-the-shape test on coordinates relative to the shape's centre, in units of its radius.
# Every shape is symmetric under a horizontal flip, so flips preserve the labels.
SHAPES: dict[str, Mask] = {
    "circle": lambda dx, dy: dx**2 + dy**2 <= 1,
    "square": lambda dx, dy: np.maximum(abs(dx), abs(dy)) <= 0.8,
    "triangle": lambda dx, dy: (dy <= 0.8) & (abs(dx) <= 0.55 * (dy + 0.9)),
    "cross": lambda dx, dy: (np.minimum(abs(dx), abs(dy)) <= 0.3) & (np.maximum(abs(dx), abs(dy)) <= 1),
    "ring": lambda dx, dy: (dx**2 + dy**2 <= 1) & (dx**2 + dy**2 >= 0.55**2),
    "horizontal_bar": lambda dx, dy: (abs(dx) <= 1.2) & (abs(dy) <= 0.3),
    "vertical_bar": lambda dx, dy: (abs(dx) <= 0.3) & (abs(dy) <= 1.2),
    "diamond": lambda dx, dy: abs(dx) + abs(dy) <= 1,
    "x": lambda dx, dy: (abs(abs(dx) - abs(dy)) <= 0.35) & (np.maximum(abs(dx), abs(dy)) <= 0.9),
    "two_dots": lambda dx, dy: (abs(dx) - 0.55) ** 2 + dy**2 <= 0.4**2,
}


def shapes(per_class: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each shape: uint8 (N,3,size,size) and int64 labels (N,), N = 10 * per_class."""
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = np.repeat(np.arange(len(SHAPES), dtype=np.int64), per_class)
    n = labels.size
    grid = (np.arange(size) + 0.5) / size  # pixel centres in (0, 1)
    y, x = grid[None, :, None], grid[None, None, :]  # (1,S,1), (1,1,S)
    centre = rng.uniform(0.3, 0.7, (n, 2, 1, 1))
    radius = rng.uniform(0.18, 0.3, (n, 1, 1))
    dx, dy = (x - centre[:, 0]) / radius, (y - centre[:, 1]) / radius  # (N,S,S)
    mask = np.zeros((n, size, size), dtype=bool)
    for c, inside in enumerate(SHAPES.values()):
        rows = labels == c
        mask[rows] = inside(dx[rows], dy[rows])
    background, colour = _background_and_colour(rng, n, x, y)  # (N,3,S,S), (N,3,1,1)
    images = np.where(mask[:, None], colour, background) + rng.normal(0, 0.03, (n, 3, size, size))
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def _background_and_colour(rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """A noisy linear gradient between two nearby colours, and a shape colour far from their midpoint."""
    start = rng.uniform(0, 1, (n, 3, 1, 1))
    end = np.clip(start + rng.uniform(-0.25, 0.25, (n, 3, 1, 1)), 0, 1)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    t = 0.5 + ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)) / np.sqrt(2)  # (N,1,S,S) in [0,1]
    background = start + (end - start) * t + rng.normal(0, 0.05, (n, 3, x.shape[-1], x.shape[-1]))
    middle = (start + end) / 2
    offset = rng.uniform(0.35, 0.5, (n, 3, 1, 1))
    colour = np.where(middle > 0.5, middle - offset, middle + offset)
    return background, colour
