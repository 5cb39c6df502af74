"""The procedural data set: 32×32 RGB images of coloured shapes on a plain background, captioned by a fixed grammar.

    a red circle on a blue background
    two green triangles on a white background

Grammar: `{a|two} {colour} {shape}[s] on a {background} background`, with the attribute values below; the
shape colour differs from the background colour. 3 shapes × 5 colours × 4 other backgrounds × 2 counts =
120 captions. `HELDOUT_PAIRS` (one colour per shape) never appear in `TRAIN_PROMPTS`, so a model pretrained
on them has never drawn, say, a green circle; `HELDOUT_PROMPTS` are the 24 captions with those pairs.

Images are drawn with hard edges in the exact palette colours: a pixel is either the background colour or the
shape colour. Shapes have a random size and position; two shapes never touch (a gap of at least 2 pixels).
Everything is deterministic given a numpy `Generator`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
COUNTS = {"a": 1, "two": 2}
HELDOUT_PAIRS = (("circle", "green"), ("square", "yellow"), ("triangle", "red"))  # (shape, colour)

GRAMMAR = (
    "'{a|two} {colour} {shape}[s] on a {background} background' with colour, background in "
    f"{'/'.join(COLORS)} (different), shape in {'/'.join(SHAPES)}, plural 's' exactly when the count is 'two'"
)
_PATTERN = re.compile(
    rf"(a|two) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})(s?) on a ({'|'.join(COLORS)}) background"
)


@dataclass(frozen=True)
class Attrs:
    """One image's attributes; `count` is 1 or 2."""

    shape: str
    color: str
    background: str
    count: int


# One classifier head per attribute: the attribute's name and its values in label order.
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(COLORS), "count": (1, 2)}


def caption(attrs: Attrs) -> str:
    word = {v: k for k, v in COUNTS.items()}[attrs.count]
    plural = "s" if attrs.count > 1 else ""
    return f"{word} {attrs.color} {attrs.shape}{plural} on a {attrs.background} background"


def parse_caption(text: str) -> Attrs:
    """The attributes of a grammar caption (surrounding whitespace and case ignored); ValueError otherwise."""
    m = _PATTERN.fullmatch(text.strip().lower())
    if m is None or (m.group(4) == "s") != (m.group(1) == "two") or m.group(2) == m.group(5):
        raise ValueError(f"prompt {text!r} is not a shapes caption; the grammar is {GRAMMAR}")
    return Attrs(shape=m.group(3), color=m.group(2), background=m.group(5), count=COUNTS[m.group(1)])


def all_attrs() -> list[Attrs]:
    """Every valid attribute combination (120), in a fixed order."""
    return [
        Attrs(shape, color, background, count)
        for shape, color, background, count in itertools.product(SHAPES, COLORS, COLORS, COUNTS.values())
        if color != background
    ]


def is_heldout(attrs: Attrs) -> bool:
    return (attrs.shape, attrs.color) in HELDOUT_PAIRS


TRAIN_PROMPTS = [caption(a) for a in all_attrs() if not is_heldout(a)]
HELDOUT_PROMPTS = [caption(a) for a in all_attrs() if is_heldout(a)]


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of one shape centred at (cx, cy) with size r (pixels)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if shape == "square":
        h = 0.8 * r  # about the circle's area
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # equilateral triangle pointing up, inscribed in the circle of radius 1.2 r (its apex may reach 0.2 r past
    # the square of half-side r): inside all three edges' half-planes
    vertices = [(cx + 1.2 * r * np.cos(a), cy + 1.2 * r * np.sin(a)) for a in np.radians([-90, 30, 150])]
    inside = np.ones((SIZE, SIZE), bool)
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    return inside


def render(attrs: Attrs, rng: np.random.Generator) -> torch.Tensor:
    """A float32 image [3, SIZE, SIZE] in [0, 1] of `attrs`, random size and position.

    One shape has size r ∈ [6, 10] px, two shapes r ∈ [4.5, 7] each with centres at least r1 + r2 + 2.5 px
    apart (their bounding circles do not touch, so they are separate blobs)."""
    if attrs.color == attrs.background:
        raise ValueError(f"shape colour equals background colour in {attrs}")
    lo, hi = (6.0, 10.0) if attrs.count == 1 else (4.5, 7.0)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < attrs.count:
        r = rng.uniform(lo, hi)
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
        if all((cx - px) ** 2 + (cy - py) ** 2 >= (r + pr + 2.5) ** 2 for px, py, pr in placed):
            placed.append((cx, cy, r))
    mask = np.zeros((SIZE, SIZE), bool)
    for cx, cy, r in placed:
        mask |= _mask(attrs.shape, cx, cy, r)
    image = np.where(mask[None], np.array(COLORS[attrs.color])[:, None, None],
                     np.array(COLORS[attrs.background])[:, None, None])
    return torch.from_numpy(image.astype(np.float32))


def sample_batch(n: int, rng: np.random.Generator,
                 combos: list[Attrs] | None = None) -> tuple[torch.Tensor, list[Attrs]]:
    """n images [n, 3, SIZE, SIZE] with attributes drawn uniformly from `combos` (default: all combinations)."""
    combos = all_attrs() if combos is None else combos
    attrs = [combos[i] for i in rng.integers(len(combos), size=n)]
    return torch.stack([render(a, rng) for a in attrs]), attrs


def labels(attrs: list[Attrs]) -> dict[str, torch.Tensor]:
    """Per-attribute class indices (long [n]) for the classifier's heads."""
    return {
        name: torch.tensor([values.index(getattr(a, name)) for a in attrs]) for name, values in ATTRIBUTES.items()
    }


def write_image_folder(folder, n: int, seed: int = 0) -> None:
    """n training images (no held-out pair) as `NNNNN.png` with their captions in `NNNNN.txt`: an image–caption
    folder for refl.py's --pretrain-data (the pre-training loss on the data the tiny-shapes model was trained on)."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, attrs = sample_batch(n, np.random.default_rng(seed), [a for a in all_attrs() if not is_heldout(a)])
    for i, (image, a) in enumerate(zip(images, attrs)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(a) + "\n")


if __name__ == "__main__":  # python -m shapes.data --write-pretrain DIR [--n 512] [--seed 0]
    import argparse

    parser = argparse.ArgumentParser(description="write an image-caption folder of the shapes data (--pretrain-data)")
    parser.add_argument("--write-pretrain", required=True, metavar="DIR")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    write_image_folder(a.write_pretrain, a.n, a.seed)
    print(f"{a.n} images with captions in {a.write_pretrain}")
