"""Score a trained LoRA (or the base model) on fixed prompts and seeds, independently of the training script.

Each prompt set (e.g. the training prompts and the held-out prompts) is cut into two disjoint halves
(`split_prompts`), a *validation* split, on which the benchmark chooses each algorithm's learning rate, and a *test*
split, on which it reports; the two also never share initial noise. Of the chosen half, about `--num-images`
prompts covering it evenly (`eval_prompts`) are sampled with `common.sample_images` in chunks of 32 with fixed seeds
(chunk i of the test split uses seed 10000 + i, of the validation split 20000 + i: every model sees the same initial
noise), and scored with each reward of `--rewards`; the figure per set and reward is the mean over the images, so
for the 0/1 reward `shapes_exact_match` it is the exact-match rate.

The sampler is the one the run trained with (its args.json: T, w, and η, which is 0 for the gradient scripts and
1 for the RL scripts), so each LoRA is evaluated on the policy it optimised. The base model is evaluated once
per sampler (`--eta`).

    python benchmark/evaluate.py --run-dir RUN --sets train=shapes,heldout=shapes_heldout \
        --rewards shapes_exact_match,shapes_alignment --split test --out RUN/test_eval.json
    python benchmark/evaluate.py --model tiny-shapes --eta 0 --num-inference-steps 20 --guidance-scale 3 ... # base
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import rewards  # noqa: E402

SPLITS = dict(test=10_000, validation=20_000)  # split -> seed of its first chunk (disjoint noise for the two)
CHUNK = 32


class AttributeAccuracy:
    """`shapes_attribute_accuracy`, an evaluation-only score: the fraction of the four attributes (shape, colour,
    background, count) that the shapes classifier reads as the prompt says, per image (0, 0.25, ..., 1). Finer
    than `shapes_exact_match` (all four right), which is near 0 for a weak base model."""

    def __init__(self):
        self.reward = rewards.load("shapes_alignment").parts["shapes_alignment"]

    def __call__(self, images, prompts):
        logits, targets = self.reward.logits_and_targets(images, prompts)
        return torch.stack([(logits[k].argmax(-1) == targets[k]).float() for k in targets]).mean(0)


EXTRA_SCORES = {"shapes_attribute_accuracy": AttributeAccuracy}


def load_score(name: str):
    """A reward of `rewards` or one of EXTRA_SCORES."""
    return EXTRA_SCORES[name]() if name in EXTRA_SCORES else rewards.load(name)


def split_prompts(prompts: list[str], split: str) -> list[str]:
    """The `split` ("test" or "validation") half of a prompt set. The testbed's captions come in consecutive pairs
    that differ only in the count ("a red circle on a green background", "two red circles on a green background",
    `shapes.data`); pair k gives its caption k mod 2 to the test split and the other one to the validation split.
    So each half holds every (shape, colour, background) combination of the set once, half of them as one object
    and half as two, and the two halves share no caption. (Every other caption would put all single objects in
    one half.) For other prompt sets the rule still gives two disjoint halves of equal size."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    first = 0 if split == "test" else 1
    return [p for i, p in enumerate(prompts) if i % 2 == (i // 2 + first) % 2]


def eval_prompts(prompts: list[str], n: int) -> list[str]:
    """About n prompts covering the set evenly: with n < len(prompts), n prompts evenly spaced through the set;
    otherwise every prompt round(n / len(prompts)) times (96 train prompts, n = 96: each once; 24 held-out: each 4
    times), so that every prompt weighs the same."""
    if n < len(prompts):
        return [prompts[(i * len(prompts)) // n] for i in range(n)]
    return list(prompts) * max(1, round(n / len(prompts)))


@torch.no_grad()
def per_image(pipe, prompts: list[str], reward_fns: dict, num_steps: int, guidance_scale: float, eta: float,
              seed: int, chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    """Each reward of each image of `prompts` ([len(prompts)] per reward), sampled in chunks of `chunk` prompts
    with seeds seed, seed + 1, ... (one chunk of all prompts with seed `seed` is `shapes.evaluate`'s batch)."""
    scores = {name: [] for name in reward_fns}
    for i in range(0, len(prompts), chunk):
        part = prompts[i : i + chunk]
        images = common.sample_images(pipe, part, seed + i // chunk, num_steps, guidance_scale, eta)
        for name, fn in reward_fns.items():
            scores[name].append(fn(images, part).float().cpu())
    return {name: torch.cat(values) for name, values in scores.items()}


def score(pipe, prompts: list[str], reward_fns: dict, num_steps: int, guidance_scale: float, eta: float,
          seed: int) -> dict:
    """Mean of each reward over images of `prompts`, sampled in chunks with seeds seed, seed + 1, ..."""
    scores = per_image(pipe, prompts, reward_fns, num_steps, guidance_scale, eta, seed)
    return {name: float(values.double().mean()) for name, values in scores.items()}


def evaluate(model: str, run_dir: str | None, prompt_sets: dict[str, str], reward_names: list[str], num_images: int,
             num_steps: int, guidance_scale: float, eta: float, lora_rank: int = 0, lora_ff: bool = False,
             split: str = "test") -> dict:
    """Scores of the base model (run_dir None) or of the run's final LoRA on the `split` half of each prompt set,
    per prompt set and reward."""
    t0 = time.time()
    targets = common.ATTENTION_TARGETS + (common.FEEDFORWARD_TARGETS if lora_ff else ())
    pipe = common.load_pipeline(model, lora_rank if run_dir else 0, "cpu", torch.float32, lora_targets=targets)
    if run_dir:
        common.load_lora(pipe, run_dir)
    reward_fns = {name: load_score(name) for name in reward_names}
    scores = {key: score(pipe, eval_prompts(split_prompts(common.load_prompts(name), split), num_images), reward_fns,
                         num_steps, guidance_scale, eta, SPLITS[split])
              for key, name in prompt_sets.items()}
    config = dict(model=model, run_dir=run_dir, prompt_sets=prompt_sets, rewards=reward_names, num_images=num_images,
                  num_inference_steps=num_steps, guidance_scale=guidance_scale, eta=eta, split=split,
                  seed=SPLITS[split])
    return dict(config=config, scores=scores, seconds=round(time.time() - t0, 2))


def evaluate_run(run_dir: str | Path, prompt_sets: dict[str, str], reward_names: list[str], num_images: int,
                 split: str = "test") -> dict:
    """Scores of a finished run's final LoRA with the sampler and LoRA shape of its args.json."""
    args = json.loads((Path(run_dir) / "args.json").read_text())
    return evaluate(args["model"], str(run_dir), prompt_sets, reward_names, num_images, args["num_inference_steps"],
                    args["guidance_scale"], args.get("eta", 0.0), args["lora_rank"], args.get("lora_ff", False), split)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a finished run; its args.json gives model, sampler and LoRA shape")
    p.add_argument("--model", help="base model (without --run-dir)")
    p.add_argument("--sets", required=True, help="split=prompt_set,... e.g. train=shapes,heldout=shapes_heldout")
    p.add_argument("--rewards", required=True, help="comma-separated reward names")
    p.add_argument("--num-images", type=int, default=96, help="about this many images per prompt set")
    p.add_argument("--split", default="test", choices=list(SPLITS), help="half of each prompt set (split_prompts)")
    p.add_argument("--num-inference-steps", type=int, help="base model only (a run uses its own)")
    p.add_argument("--guidance-scale", type=float, help="base model only")
    p.add_argument("--eta", type=float, default=0.0, help="base model only")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    sets = dict(item.split("=", 1) for item in a.sets.split(","))
    reward_names = a.rewards.split(",")
    if a.run_dir:
        result = evaluate_run(a.run_dir, sets, reward_names, a.num_images, a.split)
    else:
        result = evaluate(a.model, None, sets, reward_names, a.num_images, a.num_inference_steps, a.guidance_scale,
                          a.eta, split=a.split)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["scores"]))


if __name__ == "__main__":
    main()
