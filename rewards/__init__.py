"""Rewards: `fn(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]` (float32).

    reward_fn = rewards.load("hpsv2", device="cuda", dtype=torch.float16)
    reward_fn = rewards.load("hpsv2:1,aesthetic:0.1")      # weighted sum; a bare name has weight 1
    reward_fn.differentiable                               # all() of the parts
    reward_fn.last_components                              # {name: Tensor[B]} of the last call, unweighted

| name | model | score |
|---|---|---|
| `aesthetic` | CLIP ViT-L/14 + LAION MLP head | MLP(image embedding / norm), about 1-10 |
| `hpsv2`, `hpsv21` | open_clip ViT-H-14 + HPS v2 / v2.1 checkpoint | cosine(image, text) |
| `pickscore` | PickScore_v1 (CLIP-H) | logit_scale.exp() * cosine(image, text) |
| `jpeg_compressibility`, `jpeg_incompressibility` | PIL JPEG, quality 95 | -/+ file size in kB; not differentiable |
| `jpeg_*_diff` (compress., incompress.) | kornia's differentiable JPEG, q50 | -/+ mean of ((x - JPEG(x))·255)² |
| `shapes_alignment` | shapes classifier (small CNN, `shapes/weights/`) | mean over 4 attributes of log p(value), ≤ 0 |
| `shapes_exact_match` | the same classifier | 1 if all four argmaxes match the prompt, else 0; not differentiable |

Weights are downloaded through huggingface_hub on first use (Hugging Face cache, $HF_HOME). Local copies
are given as keyword arguments of `load` or environment variables (`REWARDS_` + the upper-cased name):

| option | used by | what |
|---|---|---|
| `aesthetic_clip` | aesthetic | hub id or directory of `openai/clip-vit-large-patch14` (transformers) |
| `aesthetic_head` | aesthetic | file `sac+logos+ava1-l14-linearMSE.pth` |
| `hpsv2_checkpoint` / `hpsv21_checkpoint` | hpsv2 / hpsv21 | file `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` |
| `pickscore_model` | pickscore | hub id or directory of `yuvalkirstain/PickScore_v1` |
| `pickscore_processor` | pickscore | hub id or directory of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (tokenizer) |

Only torch is imported here; transformers, open_clip and kornia are imported by the loaders.
"""

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import aesthetic, hps, jpeg, pickscore, shapes
from ._base import Reward, RewardError, RewardSpecError, clip_preprocess
from ._hub import WeightsNotFound

__all__ = [
    "REWARDS", "Reward", "RewardError", "RewardSpecError", "WeightedSum", "WeightsNotFound", "clip_preprocess", "is_differentiable", "load", "parse"
]


@dataclass(frozen=True)
class _Entry:
    differentiable: bool
    build: Callable[..., Reward]  # build(device=..., dtype=..., **{parameter: value})
    options: dict[str, str] = field(default_factory=dict)  # load() keyword / env option -> build parameter
    downloads: tuple[tuple[str, list[str]], ...] = ()  # (hub repo, `hf download` arguments) it fetches


def _jpeg(cls, sign: float) -> Callable[..., Reward]:
    return lambda device, dtype: cls(sign).to(device)


def _hps(version: str) -> Callable[..., Reward]:
    return lambda **kw: hps.HPSReward.from_pretrained(version, **kw)


_REGISTRY: dict[str, _Entry] = {
    "aesthetic": _Entry(
        True,
        aesthetic.AestheticReward.from_pretrained,
        {"aesthetic_clip": "clip", "aesthetic_head": "head"},
        ((aesthetic.CLIP_REPO, aesthetic.CLIP_FILES), (aesthetic.HEAD_REPO, [aesthetic.HEAD_FILE])),
    ),
    "hpsv2": _Entry(True, _hps("v2"), {"hpsv2_checkpoint": "checkpoint"}, ((hps.REPO, [hps.FILES["v2"]]),)),
    "hpsv21": _Entry(True, _hps("v2.1"), {"hpsv21_checkpoint": "checkpoint"}, ((hps.REPO, [hps.FILES["v2.1"]]),)),
    "pickscore": _Entry(
        True,
        pickscore.PickScoreReward.from_pretrained,
        {"pickscore_model": "model", "pickscore_processor": "processor"},
        ((pickscore.MODEL_REPO, pickscore.MODEL_FILES), (pickscore.PROCESSOR_REPO, pickscore.PROCESSOR_FILES)),
    ),
    "jpeg_compressibility": _Entry(False, _jpeg(jpeg.JpegSize, -1.0)),
    "jpeg_incompressibility": _Entry(False, _jpeg(jpeg.JpegSize, +1.0)),
    "jpeg_compressibility_diff": _Entry(True, _jpeg(jpeg.JpegDistortion, -1.0)),
    "jpeg_incompressibility_diff": _Entry(True, _jpeg(jpeg.JpegDistortion, +1.0)),
    "shapes_alignment": _Entry(True, shapes.ShapesAlignment.from_pretrained),
    "shapes_exact_match": _Entry(False, shapes.ShapesExactMatch.from_pretrained),
}
REWARDS: tuple[str, ...] = tuple(_REGISTRY)
_OPTIONS = tuple(option for entry in _REGISTRY.values() for option in entry.options)


def parse(spec: str) -> list[tuple[str, float]]:
    """`"hpsv2:1,aesthetic:0.1"` -> `[("hpsv2", 1.0), ("aesthetic", 0.1)]`; a name without weight has weight 1.

    Raises RewardSpecError (a ValueError) for unknown names (listing the known ones), malformed or non-finite
    weights, empty terms and repeated names. Loads nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"empty reward spec {spec!r}; known rewards: {', '.join(REWARDS)}")
    parsed: list[tuple[str, float]] = []
    for term in spec.split(","):
        name, has_weight, weight_text = (part.strip() for part in term.partition(":"))
        if not name:
            raise RewardSpecError(f"empty term in reward spec {spec!r}; expected e.g. 'hpsv2:1,aesthetic:0.1'")
        if name not in _REGISTRY:
            raise RewardSpecError(f"unknown reward {name!r} in {spec!r}; known rewards: {', '.join(REWARDS)}")
        weight = 1.0
        if has_weight:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise RewardSpecError(
                    f"malformed weight {weight_text!r} for reward {name!r} in {spec!r}; "
                    "expected a finite number, e.g. 'hpsv2:1,aesthetic:0.1'"
                )
        if name in (n for n, _ in parsed):
            raise RewardSpecError(f"reward {name!r} appears twice in {spec!r}")
        parsed.append((name, weight))
    return parsed


def is_differentiable(spec: str) -> bool:
    """Whether gradients reach the pixels for every part of `spec` (no weights are loaded)."""
    return all(_REGISTRY[name].differentiable for name, _ in parse(spec))


class WeightedSum(Reward):
    """`sum_i w_i * r_i(images, prompts)`; keeps the unweighted, detached parts of the last call in
    `last_components`. Non-differentiable parts are scored on detached images without a graph."""

    def __init__(self, parts: list[tuple[str, float, Reward]]):
        super().__init__()
        self.weights = {name: weight for name, weight, _ in parts}
        self.parts = torch.nn.ModuleDict({name: reward for name, _, reward in parts})
        self.differentiable = all(reward.differentiable for _, _, reward in parts)
        self.last_components: dict[str, torch.Tensor] = {}
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        total, components = 0.0, {}
        for name, reward in self.parts.items():
            if reward.differentiable:
                score = reward(images, prompts)
            else:
                with torch.no_grad():
                    score = reward(images.detach(), prompts)
            components[name] = score.detach()
            total = total + self.weights[name] * score
        self.last_components = components
        return total

    def extra_repr(self) -> str:
        return ",".join(f"{name}:{weight:g}" for name, weight in self.weights.items())


def load(spec: str, device="cpu", dtype: torch.dtype = torch.float32, **paths) -> WeightedSum:
    """Build the reward(s) of `spec` (see `parse`) on `device` in `dtype`, downloading weights on first use.

    `paths` are the local-copy options listed in the module docstring (each also read from the environment
    variable `REWARDS_<OPTION>`); missing weights raise `WeightsNotFound` naming what to download."""
    unknown = sorted(set(paths) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown reward option(s) {unknown}; known: {', '.join(_OPTIONS)}")
    parts = []
    for name, weight in parse(spec):
        entry = _REGISTRY[name]
        kwargs = {}
        for option, parameter in entry.options.items():
            value = paths.get(option) or os.environ.get(f"REWARDS_{option.upper()}")
            if value:
                kwargs[parameter] = value
        try:
            reward = entry.build(device=device, dtype=dtype, **kwargs)
        except WeightsNotFound as e:
            everything = "\n".join(f"    hf download {repo} {' '.join(args)}" for repo, args in entry.downloads)
            local = ", ".join(f"{option}=PATH (or env REWARDS_{option.upper()})" for option in entry.options)
            e.args = (
                f"{e.args[0]}\nEverything '{name}' downloads:\n{everything}\n"
                f"Local copies for '{name}': rewards.load(..., {local}).",
            )
            raise
        parts.append((name, weight, reward))
    return WeightedSum(parts)
