"""Did a `tiny-shapes` run learn? `python -m shapes.evaluate`'s figures before and after, paired, with their noise.

    python benchmark/paired_eval.py runs/quickstart            # 2 × 480 images; writes runs/quickstart/paired_eval.json
    python benchmark/paired_eval.py RUN --prompt-file FILE --samples-per-prompt 32   # a run on a few captions

With --prompt-file the captions of that file (a run trained on a few captions: its own, with more seeds each) replace
the 96 training captions; the 24 held-out captions are always scored.

The base model and the run's LoRA draw the same images as `python -m shapes.evaluate` (DDIM η = 0, the run's T and
w, seeds 0 .. --samples-per-prompt − 1, all captions of a set in one batch per seed), so the "after" means equal
`shapes.evaluate --lora-dir RUN`'s. Each image is scored by `shapes_alignment` and `shapes_exact_match`, and the
change is measured per image (same prompt, same initial noise): its mean, the standard deviation of the per-image
differences, the standard error of the mean change (std / √n), and the change on each half of the seeds (0 and 1,
2 and 3), whose difference is a second, model-free look at the noise. A rise "clearly beyond the noise" is one of
several standard errors that both seed halves agree on.

An RL run trained on its stochastic sampler and on another reward (e.g. docs/benchmark/rl.md section 6's DDPO-IS
runs on JPEG incompressibility) is scored on what it optimised: `--rewards jpeg_incompressibility shapes_alignment
--eta 1` draws both models' images with DDIM η = 1 from the same seeds (the same initial noise and the same per-step
noise), so the change is still paired per image. Each of --rewards is a reward spec as the scripts' --reward takes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import rewards  # noqa: E402
from benchmark.evaluate import per_image  # noqa: E402

REWARDS = ("shapes_alignment", "shapes_exact_match")


def images_scores(pipe, prompts: list[str], seeds: int, num_steps: int, guidance_scale: float,
                  reward_names: tuple[str, ...] = REWARDS, eta: float = 0.0) -> dict:
    """reward -> [seeds, len(prompts)] scores of shapes.evaluate's images (one batch of all prompts per seed; with
    `eta` > 0 the same seeds also fix the sampler's per-step noise)."""
    fns = {name: rewards.load(name) for name in reward_names}
    per_seed = [per_image(pipe, prompts, fns, num_steps, guidance_scale, eta, seed, chunk=len(prompts))
                for seed in range(seeds)]
    return {name: torch.stack([s[name] for s in per_seed]).double() for name in reward_names}


def paired(before: torch.Tensor, after: torch.Tensor) -> dict:
    """Figures of a paired change: `before`/`after` [seeds, prompts] of the same images."""
    diff = after - before
    halves = [diff[: len(diff) // 2], diff[len(diff) // 2 :]] if len(diff) > 1 else [diff]
    std = float(diff.flatten().std())
    return dict(before=float(before.mean()), after=float(after.mean()), change=float(diff.mean()),
                diff_std=std, standard_error=std / math.sqrt(diff.numel()), images=diff.numel(),
                change_by_seed_half=[float(h.mean()) for h in halves])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished tiny-shapes run (its args.json and LoRA)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="seeds per caption (shapes.evaluate: 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-file", type=Path, help="score these captions instead of the 96 training captions")
    p.add_argument("--heldout-samples-per-prompt", type=int, help="seeds per held-out caption (default: as above)")
    p.add_argument("--rewards", nargs="+", default=list(REWARDS), metavar="SPEC",
                   help="rewards to score, each a spec as the scripts' --reward (default: %(default)s)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η of both models' sampler (default 0, as "
                   "shapes.evaluate; 1: the RL scripts' sampler)")
    a = p.parse_args(argv)
    for spec in a.rewards:
        try:
            rewards.parse(spec)  # loads nothing
        except rewards.RewardSpecError as e:
            p.error(f"--rewards {spec}: {e}")
    if a.eta < 0:
        p.error(f"--eta {a.eta:g}: must be >= 0")
    names = tuple(a.rewards)
    torch.set_num_threads(a.threads)
    from shapes import data

    args = json.loads((a.run_dir / "args.json").read_text())
    T, w = args["num_inference_steps"], args["guidance_scale"]
    base = common.load_pipeline(args["model"], 0, "cpu", torch.float32)
    tuned = common.load_pipeline(args["model"], 0, "cpu", torch.float32)
    tuned.load_lora_weights(str(a.run_dir))  # as shapes.evaluate --lora-dir does
    result = dict(run_dir=str(a.run_dir), num_inference_steps=T, guidance_scale=w, eta=a.eta,
                  seeds=a.samples_per_prompt,
                  heldout_seeds=a.heldout_samples_per_prompt or a.samples_per_prompt)
    train = data.TRAIN_PROMPTS if a.prompt_file is None else common.load_prompts(None, str(a.prompt_file), None)
    result["prompts"] = train
    seeds = dict(train=a.samples_per_prompt, heldout=a.heldout_samples_per_prompt or a.samples_per_prompt)
    for split, prompts in (("train", train), ("heldout", data.HELDOUT_PROMPTS)):
        before = images_scores(base, prompts, seeds[split], T, w, names, a.eta)
        after = images_scores(tuned, prompts, seeds[split], T, w, names, a.eta)
        result[split] = {name: paired(before[name], after[name]) for name in names}
    (a.run_dir / "paired_eval.json").write_text(json.dumps(result, indent=2))
    for split in ("train", "heldout"):
        for name, r in result[split].items():
            halves = " / ".join(f"{h:+.3f}" for h in r["change_by_seed_half"])
            print(f"{split:8s} {name:20s} {r['before']:.3f} -> {r['after']:.3f}: change {r['change']:+.3f} "
                  f"± {r['standard_error']:.3f} (SE; per-image std {r['diff_std']:.3f}, n = {r['images']}); "
                  f"by seed half {halves}")


if __name__ == "__main__":
    main()
