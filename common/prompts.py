"""Prompt sets as data: DDPO's lists ship in `prompt_data/`; any newline-separated file works too."""

from __future__ import annotations

import random
import re
from pathlib import Path

from .errors import UserError

DATA = Path(__file__).parent / "prompt_data"


def _split(text: str) -> list[str]:
    """The non-blank lines of `text`, stripped. Lines end at \\n, \\r\\n or \\r only: str.splitlines also cuts at a form
    feed, U+2028, U+0085 and other separators that no line count (`wc -l`, an editor's line numbers) sees."""
    return [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def _lines(path: Path) -> list[str]:
    return _split(path.read_text(encoding="utf-8"))


def _article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _animal_activities() -> list[str]:
    # DDPO's prompt-image alignment prompts: "a(n) {animal} {activity}", 45 × 3.
    return [f"{_article(a)} {act}"
            for a in _lines(DATA / "simple_animals.txt") for act in _lines(DATA / "activities.txt")]


def _shapes(split: str) -> list[str]:
    # the tiny-shapes testbed (shapes/) is imported only when its prompts are asked for, so that a script copied
    # with common/ and rewards/ alone runs without it
    try:
        import shapes.data
    except ImportError as e:
        raise UserError(f"the prompt set {split!r} belongs to the tiny-shapes testbed (shapes/), which is not "
                        f"importable here ({e})") from e
    return list(shapes.data.TRAIN_PROMPTS if split == "shapes" else shapes.data.HELDOUT_PROMPTS)


PROMPT_SETS = {
    "simple_animals": lambda: _lines(DATA / "simple_animals.txt"),  # DDPO's aesthetic prompts (45 animals)
    "imagenet_animals": lambda: _lines(DATA / "imagenet_animals.txt"),  # DDPO's compressibility prompts (398)
    "animal_activities": _animal_activities,  # DDPO's alignment prompts (135)
    # The papers' own experiments (issue 13). AlignProp controls the number of objects but released no prompts:
    # "counting" is ours in its style, numbers one..five x 12 countable objects (60) for owlvit_count.
    "counting": lambda: _lines(DATA / "counting.txt"),
    # DRaFT §5.3 adversarial examples: prompts of one class (a mouse, 10) to be classified as another
    # (resnet50_target[target=...]); its exact prompts are not published, these are ours.
    "imagenet_mouse": lambda: _lines(DATA / "imagenet_mouse.txt"),
    # DRaFT §5.3 object removal (people, owlvit_remove) and detection ("a bowl of fruit", owlvit_detect): scenes
    # where the objects are likely; only "a bowl of fruit" is the paper's example as issue 13 reports it.
    "draft_removal": lambda: _lines(DATA / "draft_removal.txt"),
    "draft_detection": lambda: _lines(DATA / "draft_detection.txt"),
    "shapes": lambda: _shapes("shapes"),  # the tiny-shapes testbed's 96 training captions
    "shapes_heldout": lambda: _shapes("shapes_heldout"),  # its 24 captions never seen in pretraining
}


def default_prompt_set(model: str | None) -> str:
    """The prompt set a script uses when none is named: the testbed's captions for `tiny-shapes` and
    `tiny-shapes-flow` (the only prompts they were trained on and that their `shapes_*` rewards can read), DDPO's 45
    animals otherwise."""
    from .models import TESTBEDS

    return "shapes" if model in TESTBEDS else "simple_animals"


def load_prompts(name: str | None = None, prompt_file: str | None = None, model: str | None = None) -> list[str]:
    """The prompts of a named set (None: `default_prompt_set(model)`), or of `prompt_file` (UTF-8 text, with or without
    a byte-order mark, one prompt per line, blank lines skipped). A missing, unreadable, binary or empty file, or an
    unknown set name, raises UserError."""
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {prompt_file}: no such file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"--prompt-file {prompt_file}: cannot be read ({e.strerror or e})") from e
        try:
            # utf-8-sig's decoding, with error positions counted from the file's start: a byte-order mark (Windows
            # editors write one) is not part of the first prompt
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {prompt_file} is not UTF-8 text (byte {e.start}); expected one prompt "
                            "per line") from e
        if "\0" in text:
            raise UserError(f"--prompt-file {prompt_file} is a binary file (it contains NUL bytes); expected one "
                            "prompt per line")
        prompts = _split(text)
        if not prompts:
            raise UserError(f"--prompt-file {prompt_file} holds no prompts (one per line expected)")
        return prompts
    name = name or default_prompt_set(model)
    if name not in PROMPT_SETS:
        raise UserError(f"unknown prompt set {name!r}; known: {sorted(PROMPT_SETS)} (or use --prompt-file)")
    return PROMPT_SETS[name]()


def sample_prompts(prompts: list[str], n: int, rng: random.Random) -> list[str]:
    """n prompts drawn uniformly with replacement, as DDPO samples its training prompts."""
    return [rng.choice(prompts) for _ in range(n)]
