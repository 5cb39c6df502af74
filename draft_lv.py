"""DRaFT-LV: DRaFT-1 with a lower-variance gradient from re-noised copies of the last step.

Clark, Vicol, Swersky & Fleet, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", ICLR 2024
(arXiv:2309.17400): the same paper as DRaFT (`draft.py`), section "DRaFT-LV".

Idea: DRaFT-1 backpropagates through the last sampling step only, so its gradient comes from one noisy
sample of that step per image. DRaFT-LV reuses the sampled image x0: it draws fresh noise ε, re-noises
the detached x0 to the last timestep of the schedule t₁, x_{t₁} = √ᾱ_{t₁}·sg(x0) + √(1−ᾱ_{t₁})·ε, and
denoises it again with one guided DDIM step with gradient to x0ⁱ; it does this n times (n = 2). The loss
sums the rewards, L = −mean(r(x0) + Σ_i r(x0ⁱ)), and one update follows from the summed gradients. Each extra term
costs one UNet call, one decode and one reward, not a new T-step chain: the paper reports it about 2× more
sample-efficient than DRaFT-1 and ReFL for about 10% more compute.

What differs from `draft.py` (marked `# DRaFT-LV:`): K = 1 is fixed (no --k), `renoise_with_grad` and
--n are new, the loss sums n + 1 rewards per image (one backward per term, one optimizer step), and
`reward_queries` counts every scored image, B·(n + 1) per update. `reward_mean` is the sampled x0's reward;
`reward_renoised_mean` the copies'.

    python draft_lv.py --reward hpsv2 --steps 2000              # SD1.4 on one GPU
    python draft_lv.py --model tiny --reward jpeg_compressibility_diff --steps 20 --batch-size 2
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
import tyro
from tqdm import tqdm

import common
import rewards


@dataclass
class Args:
    exp_name: str = "draft_lv"
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
    """classifier-free guidance weight w (paper: 7.5)"""
    n: int = 2
    """DRaFT-LV: re-noised copies of the last step per image, each scored and backpropagated (paper: 2;
    0 is DRaFT-1)"""
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


def sample_with_grad(pipe, cond, uncond, args, generator=None):
    """DDIM η = 0 from fresh noise; gradient flows through the last step only (DRaFT-1). Returns x_0 latents."""
    pipe.scheduler.set_timesteps(args.num_inference_steps, device=cond.device)
    timesteps = pipe.scheduler.timesteps
    x = common.initial_latents(pipe, cond.shape[0], generator)
    for i, t in enumerate(timesteps):
        # DRaFT-LV: K = 1 as in DRaFT-1; the first T − 1 steps are plain sampling, the stop-gradient is here.
        with torch.set_grad_enabled(i >= len(timesteps) - 1):
            eps = common.guided_eps(pipe, x, t, cond, uncond, args.guidance_scale, use_checkpoint=True)
            x = common.ddim_step(pipe.scheduler, eps, t, x)
    return x


def renoise_with_grad(pipe, x0, cond, uncond, args, generator=None):
    """DRaFT-LV: one re-noised copy x0ⁱ of the sample x0: noise sg(x0) to t₁, one guided DDIM step with gradient.

    Call after `sample_with_grad` (the scheduler's timesteps are set). ε is drawn on the CPU from `generator`
    (the shared RNG when None, sharded under torchrun), so a CPU generator gives the same copies on any device."""
    t1 = pipe.scheduler.timesteps[-1]  # the last (least noisy) timestep of the schedule
    noise = common.randn(x0.shape, generator).to(x0.device, x0.dtype)
    # DRaFT-LV: the stop-gradient is on x0: each copy's gradient reaches the weights through this one step only.
    x = common.add_noise(pipe.scheduler, x0.detach(), noise, t1)
    eps = common.guided_eps(pipe, x, t1, cond, uncond, args.guidance_scale, use_checkpoint=True)
    return common.ddim_step(pipe.scheduler, eps, t1, x)


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    # Checks that need no model: fail before minutes of loading.
    if not rewards.is_differentiable(args.reward):
        raise SystemExit(f"DRaFT backpropagates through the reward, and {args.reward!r} is not differentiable. "
                         "Use a differentiable reward (e.g. aesthetic, hpsv2, pickscore, jpeg_compressibility_diff).")
    if args.n < 0:  # DRaFT-LV
        raise SystemExit(f"--n {args.n} must be >= 0 (the number of re-noised copies; 0 is DRaFT-1)")
    if args.num_inference_steps < 1:
        raise SystemExit(f"--num-inference-steps {args.num_inference_steps} must be >= 1")
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
        optimizer.zero_grad(set_to_none=True)
        latents = sample_with_grad(pipe, cond, uncond, args)
        x0, scores = latents.detach(), []
        # DRaFT-LV: score x0, then n re-noised copies of it; the gradients of the n + 1 terms of
        # L = −mean(r(x0) + Σ_i r(x0ⁱ)) add up in .grad (a backward per term keeps one decoder graph in memory).
        for i in range(args.n + 1):
            if i > 0:
                latents = renoise_with_grad(pipe, x0, cond, uncond, args)
            reward = reward_fn(common.decode(pipe, latents), batch_prompts)
            (-reward.mean()).backward()
            scores.append(reward.detach())
        reward_queries += args.batch_size * (args.n + 1)  # DRaFT-LV: every scored image counts
        reward, loss = scores[0], -torch.stack(scores).sum(0).mean()

        common.average_gradients(params)  # under torchrun: the mean over ranks is the global batch's gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        if guard.ok(step, loss=loss, grad_norm=grad_norm):  # a non-finite update is skipped, never applied
            optimizer.step()

        reward = common.gather(reward)  # the global batch's rewards, for logging
        charts = dict(reward_mean=reward.mean(), reward_std=reward.std(correction=0), reward_queries=reward_queries,
                      optimizer_steps=step, grad_norm=grad_norm, skipped_updates=guard.skipped,
                      step_seconds=time.time() - t0)
        if args.n:  # DRaFT-LV: the copies' mean reward (close to reward_mean: t₁ is a nearly clean timestep)
            charts["reward_renoised_mean"] = common.gather(torch.stack(scores[1:], 1)).mean()
        row = tracker.log(step, charts=charts, losses=dict(loss=loss))
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
