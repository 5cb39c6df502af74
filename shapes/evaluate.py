"""How often `tiny-shapes` (or `tiny-shapes-flow`) draws what its prompt says, judged by the shapes classifier.

    python -m shapes.evaluate                                  # shapes.RECOMMENDED settings, 4 samples per prompt
    python -m shapes.evaluate --model tiny-shapes-flow         # the flow twin at shapes.RECOMMENDED_FLOW
    python -m shapes.evaluate --guidance-scale 3 --samples-per-prompt 2
    python -m shapes.evaluate --weights-dir /tmp/rerun                     # a `shapes.pretrain --output-dir` rerun

Samples deterministically (DDIM η = 0, or the flow's Euler ODE) through `common.sample_images` (seeds 0 .. samples_per_prompt − 1, all prompts of a set
in one batch per seed) and reports the exact-match rate and the mean `shapes_alignment` on TRAIN_PROMPTS and
HELDOUT_PROMPTS, plus the per-attribute accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro

import common
import rewards
import shapes
from shapes import data


@dataclass
class Args:
    model: Literal["tiny-shapes", "tiny-shapes-flow"] = "tiny-shapes"
    """the testbed's DDPM (shapes.pretrain) or its rectified flow (shapes.pretrain_flow)"""
    num_inference_steps: Optional[int] = None
    """default: the model's `shapes.recommended` setting"""
    guidance_scale: Optional[float] = None
    """default: the model's `shapes.recommended` setting"""
    samples_per_prompt: int = 4
    lora_dir: Optional[str] = None
    """a run directory whose LoRA to evaluate (default: the base model)"""
    weights_dir: Optional[str] = None
    """evaluate the pipeline folder of a `python -m shapes.pretrain --output-dir DIR` (or `shapes.pretrain_flow`) rerun
    instead of the committed one of --model"""
    threads: int = 1


@torch.no_grad()
def evaluate(pipe, prompts: list[str], samples_per_prompt: int, num_steps: int, guidance_scale: float) -> dict:
    reward = rewards.load("shapes_alignment").parts["shapes_alignment"]
    exact, align, per_attr = [], [], {k: [] for k in data.ATTRIBUTES}
    for seed in range(samples_per_prompt):
        images = common.sample_images(pipe, prompts, seed, num_steps, guidance_scale)
        logits, targets = reward.logits_and_targets(images, prompts)
        hits = {k: logits[k].argmax(-1) == targets[k] for k in targets}
        for k, v in hits.items():
            per_attr[k].append(v)
        exact.append(torch.stack(list(hits.values())).all(0))
        align.append(reward(images, prompts))
    return dict(
        exact_match=torch.cat(exact).float().mean().item(),
        shapes_alignment=torch.cat(align).mean().item(),
        attribute_accuracy={k: torch.cat(v).float().mean().item() for k, v in per_attr.items()},
        images=len(prompts) * samples_per_prompt,
    )


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    rec = shapes.recommended(args.model)
    steps = rec["num_inference_steps"] if args.num_inference_steps is None else args.num_inference_steps
    w = rec["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    pipe = common.load_pipeline(args.weights_dir or args.model, lora_rank=0)
    if args.lora_dir:
        pipe.load_lora_weights(args.lora_dir)
    result = dict(
        model=args.weights_dir or args.model,
        num_inference_steps=steps,
        guidance_scale=w,
        **{name: evaluate(pipe, prompts, args.samples_per_prompt, steps, w)
           for name, prompts in (("train", data.TRAIN_PROMPTS), ("heldout", data.HELDOUT_PROMPTS))},
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(tyro.cli(Args))
