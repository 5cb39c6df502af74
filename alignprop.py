"""AlignProp: backpropagation through the whole sampling chain with a randomized truncation.

Prabhudesai, Goyal, Pathak & Fragkiadaki, "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation" (arXiv:2310.03739, 2023).

Idea: as in DRaFT, DDIM sampling with η = 0 is a differentiable function of the weights, and a differentiable
reward of the decoded image is backpropagated through the chain into LoRA weights on the attention layers.
Gradient checkpointing of every UNet call (only each step's input latent is stored, activations are recomputed
in the backward pass) makes the full 50-step backward pass fit in memory. To keep the gradient from
collapsing onto the last steps or exploding through all of them, the truncation is random: for each batch
K ~ U{1..T} is drawn and the gradient flows through the last K steps only. `--truncation fixed --k 1` is the
K = 1 variant the paper also reports (the same estimator as DRaFT-1). AlignProp's released code (main.py)
draws the cut with random.randint(0, 50) afresh at every step and detaches ε̂ of the steps before it; here
one K is drawn per batch (a single cut).

What differs from `draft.py` (marked `# AlignProp:`): K is drawn per batch (--truncation random) or fixed
(--truncation fixed --k K) and logged as `k`; LoRA rank 4 on attention only; AdamW lr 1e-3 and gradient-norm
clip 1.0. With `--truncation fixed --k K` the update is DRaFT-K's.

    python alignprop.py --reward aesthetic --steps 2000             # SD1.4 on one GPU
    python alignprop.py --model tiny --reward jpeg_compressibility_diff --steps 20 --batch-size 2
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
    exp_name: str = "alignprop"
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
    """number of optimizer updates"""
    seed: int = 0
    """seed of python, numpy and torch (the tiny base model itself is always built from seed 0)"""
    output_dir: Optional[str] = None
    """run directory; default runs/{exp_name}__{reward}__{seed}__{time}"""
    batch_size: int = 4
    """images per optimizer update (AlignProp's code: 128 by gradient accumulation; 4 fits one GPU)"""
    num_inference_steps: int = 50
    """DDIM steps T, at train and test time (paper: 50)"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight w (paper: 7.5)"""
    truncation: Literal["random", "fixed"] = "random"
    """AlignProp: `random` draws K ~ U{1..T} for each batch; `fixed` always uses --k"""
    k: int = 1
    """AlignProp: K of `--truncation fixed`, the last K sampling steps backpropagated (1: the paper's K = 1
    variant; T: full backpropagation)"""
    lora_rank: int = 4
    """LoRA rank (paper: 4)"""
    lora_ff: bool = False
    """also adapt the feed-forward layers (AlignProp: attention only; DRaFT adds them)"""
    learning_rate: float = 1e-3
    """AdamW learning rate (paper: 1e-3)"""
    weight_decay: float = 0.1
    """AdamW weight decay (AlignProp's aesthetic and HPS configs: 0.1)"""
    max_grad_norm: float = 1.0
    """clip the gradient norm to this value; 0 disables (paper-era setting: 1.0; the released aesthetic and
    HPS configs use 5.0)"""
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


def sample_with_grad(pipe, cond, uncond, args, k, generator=None):
    """DDIM η = 0 from fresh noise; gradient flows through the last k steps only. Returns x_0 latents."""
    pipe.scheduler.set_timesteps(args.num_inference_steps, device=cond.device)
    timesteps = pipe.scheduler.timesteps
    x = common.initial_latents(pipe, cond.shape[0], generator)
    for i, t in enumerate(timesteps):
        # AlignProp: the first T − K steps are plain sampling, for this batch's K; the stop-gradient is here.
        with torch.set_grad_enabled(i >= len(timesteps) - k):
            eps = common.guided_eps(pipe, x, t, cond, uncond, args.guidance_scale, use_checkpoint=True)
            x = common.ddim_step(pipe.scheduler, eps, t, x)
    return x


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    # Checks that need no model: fail before minutes of loading.
    if not rewards.is_differentiable(args.reward):
        raise SystemExit(f"AlignProp backpropagates through the reward, and {args.reward!r} is not differentiable. "
                         "Use a differentiable reward (e.g. aesthetic, hpsv2, pickscore, jpeg_compressibility_diff).")
    if not 1 <= args.k <= args.num_inference_steps:
        raise SystemExit(f"--k {args.k} must be between 1 and --num-inference-steps ({args.num_inference_steps})")
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
        # AlignProp: the truncation K ~ U{1..T}, drawn for each batch
        k = rng.randint(1, args.num_inference_steps) if args.truncation == "random" else args.k
        latents = sample_with_grad(pipe, cond, uncond, args, k)
        images = common.decode(pipe, latents)
        reward = reward_fn(images, batch_prompts)
        reward_queries += args.batch_size
        loss = -reward.mean()

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
                        k=k),  # AlignProp: the truncation used
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
