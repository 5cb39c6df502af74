"""DRaFT: Directly Fine-Tuning Diffusion Models on Differentiable Rewards.

Clark, Vicol, Swersky & Fleet, ICLR 2024 (arXiv:2309.17400).

Idea: DDIM sampling with η = 0 is a deterministic function of the initial noise and the model weights, so
a differentiable reward of the decoded image can be backpropagated through the whole sampling chain into
the LoRA weights, like any other loss. Backpropagating through all T = 50 steps is costly and its
gradients explode; DRaFT-K truncates the backward pass to the last K steps (the first T − K steps run
without gradient). K = 1 (DRaFT-1) is the paper's best trade-off of speed and reward; K = T is full DRaFT.

Siblings: `draft_lv.py` (DRaFT-LV) keeps DRaFT-1 and adds n re-noised copies of the last step to lower the
gradient's variance; `alignprop.py` draws the truncation K at random for each batch; `refl.py` scores a
one-step prediction from a random late step instead of the sampled image.

    python draft.py --reward aesthetic --steps 2000              # SD1.4 on one GPU
    python draft.py --model tiny --reward jpeg_compressibility_diff --steps 20 --batch-size 2
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
    exp_name: str = "draft"
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
    k: int = 1
    """truncation: backpropagate through the last K sampling steps only (1 = DRaFT-1, T = full DRaFT)"""
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
    """DDIM η = 0 from fresh noise; gradient flows through the last K steps only. Returns x_0 latents."""
    pipe.scheduler.set_timesteps(args.num_inference_steps, device=cond.device)
    timesteps = pipe.scheduler.timesteps
    x = common.initial_latents(pipe, cond.shape[0], generator)
    for i, t in enumerate(timesteps):
        # DRaFT-K: the first T − K steps are plain sampling; the stop-gradient is here.
        with torch.set_grad_enabled(i >= len(timesteps) - args.k):
            eps = common.guided_eps(pipe, x, t, cond, uncond, args.guidance_scale, use_checkpoint=True)
            x = common.ddim_step(pipe.scheduler, eps, t, x)
    return x


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    # Checks that need no model: fail before minutes of loading.
    if not rewards.is_differentiable(args.reward):
        raise SystemExit(f"DRaFT backpropagates through the reward, and {args.reward!r} is not differentiable. "
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
        latents = sample_with_grad(pipe, cond, uncond, args)
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
                        step_seconds=time.time() - t0),
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
