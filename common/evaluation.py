"""The sample grid every script draws while it trains: fixed prompts × fixed seeds, scored by the training reward,
by held-out rewards and by a diversity metric, and drawn as a captioned picture a person can read.

Why held-out rewards and diversity: a reward model is a proxy, and optimising it hard ends in reward hacking. DDPO
(Black et al. 2023, §6.4 and App. A): "in all the tasks, the model eventually destroys any meaningful image content
to maximize reward"; DRaFT (Clark et al. 2024, Fig. 3 right): fine-tuned too long, the model collapses to one
high-reward image for every prompt and seed. A second reward the run does not train on (train on aesthetic, watch
HPSv2 or PickScore) falls when the training reward is being gamed, and the distance between the images of one
prompt drawn from several seeds falls when the model collapses.

`common` imports no reward: the scripts pass the reward callables (`(images [B,3,H,W] in [0,1], prompts) ->
Tensor[B]`, as `rewards.load` returns them) and, optionally, an image-embedding function for the diversity.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import sample_images

RewardFn = Callable[[torch.Tensor, list], torch.Tensor]

MIN_CELL = 128  # small images (tiny models: 32×32) are enlarged with nearest neighbours to at least this many pixels
PAD = 4  # pixels around every image
DIVERSITY_SIZE = 64  # images are averaged down to at most this size before their pixel distances are taken


def diversity(images: torch.Tensor, group_size: int, embed_fn: Optional[Callable] = None) -> float:
    """Mean pairwise distance between the images of each prompt, averaged over prompts.

    `images` [P·S, 3, H, W] holds S images (seeds) of each of P prompts, row-major (prompt p, seed s at p·S + s).
    The distance is the RMS difference of feature vectors: by default the images area-averaged to at most 64×64
    (in [0, 1], so 0 for identical images and about 0.41 for independent uniform noise; no weights needed), or
    `embed_fn(images) -> [B, D]` (e.g. a reward model's image embedding) when given. Needs S ≥ 2.
    """
    if group_size < 2:
        raise ValueError(f"diversity needs at least 2 images per prompt, got {group_size}")
    images = images.detach().float()
    if embed_fn is not None:
        features = embed_fn(images).detach().float()
    else:
        h, w = images.shape[-2:]
        features = F.adaptive_avg_pool2d(images, (min(h, DIVERSITY_SIZE), min(w, DIVERSITY_SIZE)))
    groups = features.flatten(1).reshape(-1, group_size, features[0].numel())
    # differences taken directly (not torch.cdist's matrix-product shortcut), so identical images give exactly 0
    rms = (groups[:, :, None] - groups[:, None]).pow(2).mean(-1).sqrt()  # [P, S, S]
    upper = torch.triu(torch.ones(group_size, group_size, dtype=torch.bool), diagonal=1)
    return float(rms[:, upper].mean())


@dataclass
class GridResult:
    """One evaluation of the sample grid: what `Logger.samples` logs."""

    images: torch.Tensor  # [P·S, 3, H, W] in [0, 1] on the CPU, row-major: prompt p, seed s at index p·S + s
    prompts: list[str]  # per image
    seeds: list[int]  # per image
    scores: torch.Tensor  # [P·S] the training reward
    eval_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # held-out rewards, [P·S] each
    diversity: Optional[float] = None  # None with one seed per prompt
    reward_name: str = "reward"
    seeds_per_prompt: int = 1

    def metrics(self) -> dict[str, float]:
        """The grid's scalars: `eval_reward` (mean training reward), `eval/<name>` per held-out reward and
        `eval/diversity`."""
        out = {"eval_reward": float(self.scores.float().mean())}
        out |= {f"eval/{name}": float(s.float().mean()) for name, s in self.eval_scores.items()}
        if self.diversity is not None:
            out["eval/diversity"] = self.diversity
        return out

    def header(self, step: int) -> str:
        """"step 100 · mean shapes_alignment -6.19 · held-out shapes_exact_match 0.25 · diversity 0.312"."""
        values = self.metrics()
        parts = [f"step {step}", f"mean {self.reward_name} {values.pop('eval_reward'):.3g}"]
        parts += [f"held-out {name} {values.pop(f'eval/{name}'):.3g}" for name in self.eval_scores]
        parts += [f"{k.removeprefix('eval/')} {v:.3g}" for k, v in values.items()]
        return " · ".join(parts)

    def row_captions(self) -> list[str]:
        return self.prompts[:: self.seeds_per_prompt]

    def cell_captions(self) -> list[str]:
        return [f"seed {s}: {r:.3g}" for s, r in zip(self.seeds, self.scores.float().tolist())]


class SampleGrid:
    """Fixed prompts × fixed seeds, sampled with `common.sample_images` and scored.

    The grid has the first `num_images // seeds_per_prompt` prompts (at least one), each drawn with seeds
    `seed, seed + 1, …`: one generator per seed over the same prompt list, so a (prompt, seed) pair starts from the
    same noise at every evaluation, and seed `seed`'s images are those of the one-seed grid the scripts drew before.
    `reward_fn` is the training reward; `eval_rewards` maps names to held-out rewards; `embed_fn` (optional) maps
    images to embeddings for `diversity` (default: downscaled pixels).

        grid = SampleGrid(prompts, 8, 2, reward_fn, {"hpsv2": rewards.load("hpsv2")}, 50, 7.5, 0.0)
        logger.samples(step, grid(pipe))
    """

    def __init__(self, prompts: list[str], num_images: int = 8, seeds_per_prompt: int = 2,
                 reward_fn: Optional[RewardFn] = None, eval_rewards: Optional[dict[str, RewardFn]] = None,
                 num_steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, reward_name: str = "reward",
                 embed_fn: Optional[Callable] = None, seed: int = 0):
        if seeds_per_prompt < 1 or num_images < 1:
            raise ValueError(f"the sample grid needs num_images ≥ 1 and seeds_per_prompt ≥ 1, got {num_images} and "
                             f"{seeds_per_prompt}")
        self.prompts = list(prompts)[: max(1, num_images // seeds_per_prompt)]
        self.seeds = list(range(seed, seed + seeds_per_prompt))
        self.reward_fn, self.eval_rewards = reward_fn, dict(eval_rewards or {})
        self.num_steps, self.guidance_scale, self.eta = num_steps, guidance_scale, eta
        self.reward_name, self.embed_fn = reward_name, embed_fn

    @classmethod
    def from_args(cls, args, prompts: list[str], reward_fn: RewardFn, eval_rewards: dict[str, RewardFn]):
        """The grid a script's flags describe: --num-sample-images, --sample-seeds, --eval-prompts (a held-out set
        instead of the training `prompts`), its sampler settings (η = 0 for scripts without --eta) with
        --eval-num-inference-steps steps when given (absent from runs made before it: benchmark/checkpoint_eval.py)."""
        from .prompts import load_prompts

        num_steps = getattr(args, "eval_num_inference_steps", None)
        num_steps = args.num_inference_steps if num_steps is None else num_steps
        return cls(load_prompts(args.eval_prompts) if args.eval_prompts else prompts, args.num_sample_images,
                   args.sample_seeds, reward_fn, eval_rewards, num_steps, args.guidance_scale,
                   getattr(args, "eta", 0.0), reward_name=args.reward)

    @torch.no_grad()
    def __call__(self, pipe) -> GridResult:
        per_seed = [sample_images(pipe, self.prompts, s, self.num_steps, self.guidance_scale, self.eta)
                    for s in self.seeds]
        images = torch.stack(per_seed, dim=1).flatten(0, 1)  # [P, S, ...] -> row-major [P·S, ...]
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]

        def score(fn):  # no training reward given: NaN, so the grid still draws and logs its held-out rewards
            if fn is None:
                return torch.full((len(prompts),), math.nan)
            # not among the training batch's per-term rewards that a weighted reward records for the log
            with getattr(fn, "unrecorded", contextlib.nullcontext)():
                return fn(images, prompts).detach().float().cpu()

        group = len(self.seeds)
        return GridResult(
            images=images.float().cpu(), prompts=prompts, seeds=seeds, scores=score(self.reward_fn),
            eval_scores={name: score(fn) for name, fn in self.eval_rewards.items()},
            diversity=diversity(images, group, self.embed_fn) if group > 1 else None,
            reward_name=self.reward_name, seeds_per_prompt=group,
        )


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled font (FreeType), so there is no font file to ship


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` lines; a cut line (too many lines, or one word wider
    than `width`) ends in "…". It reads words only until the line after the last one shown, and cuts a line with
    O(log n) measurements (`_cut`), so a prompt of 100,000 characters is drawn in about a second, not hours."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
            if len(lines) > max_lines:  # a line past the last one shown: all that matters is that there is one
                break
    out = []
    for i, line in enumerate(lines[:max_lines]):
        if draw.textlength(line, font=font) > width or (i == max_lines - 1 and len(lines) > max_lines):
            line = _cut(draw, line, font, width)
        out.append(line)
    return out


def _cut(draw, line: str, font, width: int) -> str:
    """The longest prefix of `line` that fits in `width` pixels with "…" after it (its trailing spaces dropped), as
    trimming one character at a time finds it (that took 38 s for a 4,000-character prompt, hours for 100,000).
    A prefix's width grows with its length, so the cut is found by doubling a fitting length, then bisecting:
    O(log k) measurements of prefixes at most twice as long as the k characters that fit."""
    def fits(k: int) -> bool:
        return draw.textlength(line[:k] + "…", font=font) <= width

    fit, over = 0, 1  # fit: a length known to fit (the empty prefix is kept even when "…" alone is too wide)
    while over <= len(line) and fits(over):
        fit, over = over, 2 * over
    over = min(over, len(line) + 1)  # over: a length known not to fit, or one past the whole line
    while over - fit > 1:
        mid = (fit + over) // 2
        fit, over = (mid, over) if fits(mid) else (fit, mid)
    return line[:fit].rstrip() + "…"


def captioned_grid(images: torch.Tensor, ncol: int, row_captions: Optional[list[str]] = None,
                   cell_captions: Optional[list[str]] = None, header: Optional[str] = None,
                   min_cell: int = MIN_CELL):
    """A PIL image of `images` [B,3,H,W] in [0, 1], `ncol` per row, on white: `header` (wrapped) on top; above each
    row its caption (a prompt, wrapped to the row's width, at most 3 lines, truncated with "…"); above each image
    its own short caption (seed, scale, score). Images smaller than `min_cell` are enlarged by an integer factor
    with nearest neighbours, so every pixel of a 32×32 sample stays a sharp block."""
    from PIL import Image, ImageDraw

    images = images.detach().float().cpu().clamp(0, 1)
    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    k = max(1, math.ceil(min_cell / max(h, w)))
    cell_w, cell_h = w * k + 2 * PAD, h * k + 2 * PAD
    size = int(np.clip(cell_w // 10, 12, 20))
    font, header_font = _font(size), _font(size + 2)
    line_h = sum(font.getmetrics()) + 1
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = ncol * cell_w
    header_lines = _wrap(draw, header, header_font, width - 2 * PAD, 3) if header else []
    header_h = len(header_lines) * (sum(header_font.getmetrics()) + 1) + (2 * PAD if header else 0)
    rows = [_wrap(draw, c, font, width - 2 * PAD, 3) for c in row_captions] if row_captions else [[]] * nrow
    row_cap_h = max(len(r) for r in rows) * line_h if rows else 0
    cell_cap_h = line_h if cell_captions else 0
    row_h = PAD + row_cap_h + cell_cap_h + cell_h
    canvas = Image.new("RGB", (width, header_h + nrow * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for line in header_lines:
        draw.text((PAD, y), line, fill=(0, 0, 0), font=header_font)
        y += sum(header_font.getmetrics()) + 1
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top = header_h + r * row_h
        if c == 0:
            if r:  # a thin rule between rows: which caption belongs to which images
                draw.line([(0, top), (width, top)], fill=(200, 200, 200))
            for j, line in enumerate(rows[r] if r < len(rows) else []):
                draw.text((PAD, top + PAD + j * line_h), line, fill=(0, 0, 0), font=font)
        if cell_captions:
            draw.text((c * cell_w + PAD, top + PAD + row_cap_h), _wrap(draw, cell_captions[i], font, cell_w - 2 * PAD,
                                                                       1)[0], fill=(70, 70, 70), font=font)
        big = pixels[i].repeat(k, axis=0).repeat(k, axis=1)
        canvas.paste(Image.fromarray(big), (c * cell_w + PAD, top + PAD + row_cap_h + cell_cap_h + PAD))
    return canvas
