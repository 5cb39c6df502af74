"""Prompt sets as data: DDPO's lists ship in `prompt_data/`; any newline-separated file works too."""

from __future__ import annotations

import random
from pathlib import Path

import shapes.data

DATA = Path(__file__).parent / "prompt_data"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _animal_activities() -> list[str]:
    # DDPO's prompt-image alignment prompts: "a(n) {animal} {activity}", 45 × 3.
    return [f"{_article(a)} {act}"
            for a in _lines(DATA / "simple_animals.txt") for act in _lines(DATA / "activities.txt")]


PROMPT_SETS = {
    "simple_animals": lambda: _lines(DATA / "simple_animals.txt"),  # DDPO's aesthetic prompts (45 animals)
    "imagenet_animals": lambda: _lines(DATA / "imagenet_animals.txt"),  # DDPO's compressibility prompts (398)
    "animal_activities": _animal_activities,  # DDPO's alignment prompts (135)
    "shapes": lambda: list(shapes.data.TRAIN_PROMPTS),  # the tiny-shapes testbed's 96 training captions
    "shapes_heldout": lambda: list(shapes.data.HELDOUT_PROMPTS),  # its 24 captions never seen in pretraining
}


def default_prompt_set(model: str | None) -> str:
    """The prompt set a script uses when none is named: the testbed's captions for `tiny-shapes` (the only prompts
    it was trained on and that its `shapes_*` rewards can read), DDPO's 45 animals otherwise."""
    return "shapes" if model == "tiny-shapes" else "simple_animals"


def load_prompts(name: str | None = None, prompt_file: str | None = None, model: str | None = None) -> list[str]:
    """The prompts of a named set (None: `default_prompt_set(model)`), or of `prompt_file` (one prompt per line)."""
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {prompt_file}: no such file")
        prompts = _lines(path)
        if not prompts:
            raise ValueError(f"--prompt-file {prompt_file} holds no prompts (one per line expected)")
        return prompts
    name = name or default_prompt_set(model)
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; known: {sorted(PROMPT_SETS)} (or use --prompt-file)")
    return PROMPT_SETS[name]()


def sample_prompts(prompts: list[str], n: int, rng: random.Random) -> list[str]:
    """n prompts drawn uniformly with replacement, as DDPO samples its training prompts."""
    return [rng.choice(prompts) for _ in range(n)]
