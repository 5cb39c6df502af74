"""ReFL: Reward Feedback Learning, the reward of a one-step prediction from a random late step.

Xu, Liu, Wu, Tong, Li, Ding, Tang & Dong, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", NeurIPS 2023 (arXiv:2304.05977), section "ReFL"; here as DRaFT's paper (Clark
et al., ICLR 2024) evaluates it, with the same LoRA setup and settings as `draft.py`.

Idea: late in sampling, the one-step prediction x̂0 = (x_m − √(1−ᾱ_m)·ε̂)/√ᾱ_m from the current latent
is already a recognisable image, so a differentiable reward of it is a training signal for the weights at
that step. ReFL samples without gradient down to a random step index m among the last `max_step` steps of the
schedule, makes one guided UNet call with gradient at x_m, stops sampling there, and scores x̂0. Drawing m at
random spreads the updates over the late timesteps. DRaFT's comparison draws from the last 20 of 50 steps
and uses guidance (DRaFT found it avoids collapse); ImageReward's released code (ImageReward/ReFL.py) draws
steps 30–39 of 40, calls the UNet without guidance (here --guidance-scale 1), and passes the step index
itself as the UNet's timestep; this file uses the step's own timestep t_m, as the method describes.

What differs from `draft.py` (marked `# ReFL:`): no --k; --max-step draws m each update; the sampling loop
returns x̂0 at step m instead of continuing to x0; --loss relu gives ImageReward's
relu(λ − r)·grad_scale. The step index m and its timestep are logged.

    python refl.py --reward hpsv2 --steps 2000                  # SD1.4 on one GPU
    python refl.py --model tiny --reward jpeg_compressibility_diff --steps 20 --batch-size 2
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
from tqdm import tqdm

import common
import rewards


@dataclass
class Args:
    exp_name: str = "refl"
    """name of this experiment (the run directory's prefix)"""
    model: str = common.SD14
    """hub id, local diffusers folder, `tiny` (random weights, for CPU smoke tests) or `tiny-shapes` (the CPU
    testbed pretrained on coloured shapes, shapes/)"""
    reward: str = "aesthetic"
    """a differentiable reward of `rewards.REWARDS`, or a weighted sum such as `hpsv2:1,aesthetic:0.1`"""
    prompts: Optional[str] = None
    """named prompt set (common.PROMPT_SETS; default simple_animals, or shapes with --model tiny-shapes); the
    paper's aesthetic runs use DDPO's 45 animals"""
    prompt_file: Optional[str] = None
    """a newline-separated prompt file; overrides --prompts"""
    steps: int = 2000
    """number of optimizer updates (paper, small scale: 2k)"""
    seed: int = 0
    """seed of python, numpy and torch (the tiny base model itself is always built from seed 0)"""
    output_dir: Optional[str] = None
    """run directory; default runs/{exp_name}__{reward}__{seed}__{time}"""
    batch_size: int = 4
    """images per optimizer update (paper, small scale: 4; large scale: 16)"""
    num_inference_steps: int = 50
    """DDIM steps T, at train and test time (paper: 50)"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight w (paper: 7.5); ReFL: 1 is ImageReward's code, which has no guidance"""
    max_step: int = 20
    """ReFL: the step index m is drawn uniformly from the last `max_step` of the T steps (DRaFT's table: 20 of 50;
    ImageReward's code: the last 10 of 40)"""
    loss: Literal["reward", "relu"] = "reward"
    """ReFL: `reward` is −mean r (as DRaFT evaluates ReFL); `relu` is ImageReward's relu(λ − r)·grad_scale"""
    relu_lambda: float = 2.0
    """ReFL: λ of the relu loss, the reward above which a sample stops contributing (ImageReward: 2.0, on its
    own reward's scale)"""
    grad_scale: float = 1e-3
    """ReFL: factor of the relu loss (ImageReward: 1e-3; AdamW is nearly invariant to it)"""
    lora_rank: int = 8
    """LoRA rank (paper, small scale: 8; large scale: 32)"""
    lora_ff: bool = True
    """also adapt the feed-forward layers (the paper found FF + cross-attention slightly better)"""
    learning_rate: float = 4e-4
    """AdamW learning rate (paper, small scale: 4e-4; large scale: 2e-4)"""
    weight_decay: float = 0.1
    """AdamW weight decay (paper: 0.1)"""
    max_grad_norm: float = 0.0
    """clip the gradient norm to this value; 0 disables (the paper does not report clipping)"""
    mixed_precision: str = "auto"
    """dtype of the frozen base weights: auto (fp16 on CUDA, float32 on CPU), no, fp16, bf16; LoRA is float32"""
    track: bool = False
    """also log to Weights & Biases"""
    sample_every: int = 100
    """save a sample grid of fixed prompts and seeds every this many updates (and at start and end)"""
    num_sample_images: int = 8
    """images in the sample grid (the first prompts of the set, seed fixed)"""
    save_every: int = 500
    """save a checkpoint (LoRA + training state) under checkpoints/step_N every this many updates, and at the end"""
    keep_checkpoints: int = 2
    """keep only the newest this many checkpoints (0: keep all)"""
    resume: Optional[str] = None
    """continue the run in this directory from its newest checkpoint, with its own flags (--steps may grow)"""
    max_bad_steps: int = 10
    """stop after this many consecutive updates skipped for a non-finite loss or gradient"""


def sample_with_grad(pipe, cond, uncond, args, m, generator=None):
    """DDIM η = 0 from fresh noise down to step index m (0-based) without gradient; there one guided UNet call
    with gradient and the one-step prediction x̂0. Returns x̂0 latents."""
    pipe.scheduler.set_timesteps(args.num_inference_steps, device=cond.device)
    timesteps = pipe.scheduler.timesteps
    x = common.initial_latents(pipe, cond.shape[0], generator)
    for i, t in enumerate(timesteps):
        # ReFL: steps 0..m−1 are plain sampling (the stop-gradient is here); only the call at x_m has gradient.
        with torch.set_grad_enabled(i == m):
            eps = common.guided_eps(pipe, x, t, cond, uncond, args.guidance_scale, use_checkpoint=True)
            if i == m:  # ReFL: stop sampling and predict x0 in one step from x_m
                return common.predict_x0(pipe.scheduler, eps, t, x)
            x = common.ddim_step(pipe.scheduler, eps, t, x)
    raise ValueError(f"step index m = {m} is outside 0..{len(timesteps) - 1}")


def refl_loss(reward, args):
    """ReFL: −mean r, or ImageReward's relu(λ − r)·grad_scale (samples already above λ give no gradient)."""
    if args.loss == "relu":
        return torch.relu(args.relu_lambda - reward).mean() * args.grad_scale
    return -reward.mean()


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    # Checks that need no model: fail before minutes of loading.
    if not rewards.is_differentiable(args.reward):
        raise SystemExit(f"ReFL backpropagates through the reward, and {args.reward!r} is not differentiable. "
                         "Use a differentiable reward (e.g. aesthetic, hpsv2, pickscore, jpeg_compressibility_diff).")
    if not 1 <= args.max_step <= args.num_inference_steps:  # ReFL
        raise SystemExit(f"--max-step {args.max_step} must be between 1 and --num-inference-steps "
                         f"({args.num_inference_steps})")
    world = common.setup_distributed()  # under torchrun: this process's rank; otherwise a world of one
    if args.batch_size % world.size:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) must divide among {world.size} processes")
    prompts = common.load_prompts(args.prompts, args.prompt_file, args.model)
    run_dir = common.make_run_dir(args.output_dir, args.exp_name, args.reward, args.seed, args.resume)
    device, dtype = common.device_and_dtype(args.mixed_precision)
    common.seed_everything(args.seed)
    rng = random.Random(args.seed)

    # Model, reward, optimizer
    targets = common.ATTENTION_TARGETS + (common.FEEDFORWARD_TARGETS if args.lora_ff else ())
    pipe = common.load_pipeline(args.model, args.lora_rank, device, dtype, lora_targets=targets)
    reward_fn = rewards.load(args.reward, device=device, dtype=dtype)
    params = common.lora_parameters(pipe)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    checkpointer = common.Checkpointer(run_dir, pipe, optimizer, rng, keep=args.keep_checkpoints)
    start, state = checkpointer.restore(args.resume)  # (0, {}) for a new run
    tracker = common.Tracker(run_dir, args, args.track, start_step=start)
    guard, stop = common.UpdateGuard(args.max_bad_steps), common.StopSignal()
    uncond = common.encode_prompts(pipe, [""])
    grid_prompts = prompts[: args.num_sample_images]

    def log_samples(step):  # rank 0 only; its own generator leaves the shared RNG untouched
        if world.is_main:
            images = common.sample_images(pipe, grid_prompts, 0, args.num_inference_steps, args.guidance_scale)
            tracker.samples(step, images, reward_fn(images, grid_prompts).detach())

    if start == 0:
        log_samples(0)
    reward_queries = state.get("reward_queries", 0)
    pbar = tqdm(range(start + 1, args.steps + 1), desc=args.exp_name, initial=start, total=args.steps,
                disable=not world.is_main)
    for step in pbar:
        t0 = time.time()
        # every rank draws the global batch's prompts (and noise) and keeps its share: common.shard
        batch_prompts = common.shard(common.sample_prompts(prompts, args.batch_size, rng))
        cond = common.encode_prompts(pipe, batch_prompts)
        # ReFL: a step index m among the last max_step of the schedule, drawn for each update
        m = rng.randrange(args.num_inference_steps - args.max_step, args.num_inference_steps)
        latents = sample_with_grad(pipe, cond, uncond, args, m)
        images = common.decode(pipe, latents)
        reward = reward_fn(images, batch_prompts)
        reward_queries += args.batch_size
        loss = refl_loss(reward, args)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        common.average_gradients(params)  # under torchrun: the mean over ranks is the global batch's gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        if guard.ok(step, loss=loss, grad_norm=grad_norm):  # a non-finite update is skipped, never applied
            optimizer.step()

        reward = common.gather(reward.detach())  # the global batch's rewards, for logging
        row = tracker.log(
            step,
            charts=dict(reward_mean=reward.mean(), reward_std=reward.std(correction=0), reward_queries=reward_queries,
                        optimizer_steps=step, grad_norm=grad_norm, skipped_updates=guard.skipped,
                        step_seconds=time.time() - t0,
                        refl_step=m, refl_timestep=pipe.scheduler.timesteps[m]),  # ReFL: where x̂0 was taken
            losses=dict(loss=loss),
        )
        pbar.set_postfix(reward=f"{row['reward_mean']:.4g}", s_per_step=f"{row['step_seconds']:.2f}")
        if step % args.sample_every == 0 or step == args.steps:
            log_samples(step)
        stopping = stop.requested(device)  # SIGINT/SIGTERM: save, then exit
        if (args.save_every and step % args.save_every == 0) or step == args.steps or stopping:
            checkpointer.save(step, reward_queries=reward_queries)
        if stopping:
            stop.exit(run_dir, step)

    tracker.close()
    if world.is_main:
        common.save_lora(pipe, run_dir)
        print(f"LoRA, metrics and sample grids in {run_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
