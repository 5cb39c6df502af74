"""DRaFT-LV: DRaFT-1 with a lower-variance gradient from re-noised copies of the last step.

Clark, Vicol, Swersky & Fleet, ICLR 2024 (arXiv:2309.17400), §4 "DRaFT-LV": the same paper as `draft.py`.

Idea: DRaFT-1's gradient comes from one noisy sample of the last step per image. DRaFT-LV re-noises the detached x0
n times (n = 2) to the last timestep t₁, x_{t₁} = √ᾱ_{t₁}·sg(x0) + √(1−ᾱ_{t₁})·ε, denoises each copy with one guided
DDIM step with gradient to x0ⁱ, and sums the rewards: L = −mean(r(x0) + Σ_i r(x0ⁱ)), n + 1 terms as the text says
("noise the generated image n times, and use the summed reward gradient"; App. C.1: "an additional n times";
Algorithm 1 could not be consulted here). Paper: ~2× DRaFT-1's and ReFL's sample efficiency for ~10% more compute.
Differs from `draft.py` (marked `# DRaFT-LV:`): K = 1, the copies, reward_queries B·(n + 1).

    python draft_lv.py --reward hpsv2 --steps 2000              # SD1.4 on one GPU: the paper's small-scale setting

As `draft.py`: 2k updates of 4 images, n = 2, T = 50, LoRA rank 8, lr 4e-4 are the defaults (the paper's small
scale); --batch-size 16 --lora-rank 32 --learning-rate 2e-4 its large scale.
    python draft_lv.py --model tiny --reward jpeg_compressibility_diff --steps 20 --batch-size 2
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from tqdm import tqdm

import common
import rewards


@dataclass
class Args:
    # ---- the algorithm ---------------------------------------------------------------------------------------
    model: str = common.SD14
    """hub id or local diffusers folder of SD1.x/2.x, SDXL or SD3.x (`NAME:no-t5`: SD3 without T5), `tiny` (random
    weights, for CPU smoke tests), `tiny-shapes` (the CPU testbed, shapes/), `tiny-sdxl` / `tiny-sd3`, or
    `sd14-random` / `sdxl-random` / `sd35m-random` (the real architectures with random weights)"""
    reward: str = "aesthetic"
    """a differentiable reward of `rewards.REWARDS`, or a weighted sum such as `hpsv2:1,aesthetic:0.1`"""
    prompts: Optional[str] = None
    """named prompt set (common.PROMPT_SETS; default simple_animals, or shapes with --model tiny-shapes); the
    paper's aesthetic runs use DDPO's 45 animals"""
    prompt_file: Optional[str] = None
    """a newline-separated prompt file; overrides --prompts"""
    steps: int = 2000
    """number of optimizer updates (paper, small scale: 2k)"""
    batch_size: int = 4
    """images per optimizer update, over all processes (paper, small scale: 4; large scale: 16)"""
    train_batch_size: Optional[int] = None
    """per process: images per forward/backward chunk (memory only: the gradients of the chunks add up to the whole
    batch's); default the whole per-process batch"""
    num_inference_steps: int = 50
    """DDIM steps T, at train and test time (paper: 50)"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight w (paper: 7.5)"""
    resolution: Optional[int] = None
    """image side in pixels; default the model's native size (SD1.4: 512)"""
    num_copies: int = 2
    """DRaFT-LV: n, the re-noised copies of the last step per image, each scored and backpropagated (paper: n = 2;
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
    kl_beta: float = 0.0
    """DRaFT-LV + KL: β of β·mean ‖ε̂_θ − ε̂_ref‖² at the sampling chain's step with gradient (not at the re-noised
    copies), ε̂_ref the base model's guided prediction (the LoRA disabled) at the same latent: DPOK's bound of the KL
    to the base model (Fan et al., NeurIPS 2023, Lemma 4.2), as draft.py's (0: off, as DRaFT)"""
    vae_checkpointing: bool = True
    """recompute the VAE decoder's activations in the backward pass instead of storing them (diffusers' gradient
    checkpointing): the decoder at 512 px is the memory wall of backprop through the image, for one more decoder
    forward (about 2% of a DRaFT-1 update)"""
    # ---- the run: seed, precision, logging, checkpoints (the same in all scripts) ----------------------------
    exp_name: str = "draft_lv"
    """name of this experiment (the run directory's prefix)"""
    seed: int = 0
    """seed of python, numpy and torch (the tiny base model itself is always built from seed 0)"""
    output_dir: Optional[str] = None
    """run directory; default runs/{exp_name}__{reward}__{seed}__{time}"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """dtype of the frozen base weights: auto (bf16 on GPUs that support it, else fp16 with loss scaling; float32
    on the CPU), no (float32), fp16, bf16; LoRA weights and latents stay float32"""
    unet_checkpointing: bool = True
    """recompute the activations of each UNet call with gradient in the backward pass instead of storing them (what
    makes backprop through 50 steps fit in memory; AlignProp's and trl's code do it); --no-unet-checkpointing keeps
    them: one UNet forward less per step with gradient, the same gradient, memory for all of those steps"""
    track: bool = False
    """also log to Weights & Biases"""
    sample_every: int = 100
    """save a sample grid of fixed prompts and seeds every this many updates (and at start and end)"""
    num_sample_images: int = 8
    """images in the sample grid: its first num_sample_images / sample_seeds prompts, each with every seed"""
    eval_num_inference_steps: Optional[int] = None
    """sampling steps of the sample grid (None: --num-inference-steps); Flow-GRPO trains SD3.5 at 10 steps and
    evaluates at 40 (config.sample.eval_num_steps; docs/flow.md)"""
    sample_seeds: int = 2
    """seeds per prompt in the sample grid; with ≥ 2, eval/diversity (the mean distance between the images of one
    prompt) is logged: it falls when a run collapses to one image"""
    eval_prompts: Optional[str] = None
    """a held-out prompt set (common.PROMPT_SETS) for the sample grid, instead of the training prompts"""
    eval_rewards: tuple[str, ...] = ()
    """other rewards scored on the sample grid, logged as eval/<name>: held-out rewards that reveal reward hacking
    (train on aesthetic, watch hpsv2; on tiny-shapes train on shapes_alignment, watch shapes_exact_match)"""
    ema_decay: float = 0.0
    """decay d of an exponential moving average of the LoRA weights, updated after every optimizer update, in [0, 1)
    (0: off, as the papers; flow_grpo trains with d = 0.9 applied every 8 updates, about 0.987 per update, with a
    warm-up: config/grpo.py, scripts/train_sd3.py); the sample grid shows the average, saved as lora_ema.safetensors"""
    save_every: int = 500
    """save a checkpoint (LoRA + training state) under checkpoints/step_N every this many updates, and at the end"""
    keep_checkpoints: int = 2
    """keep only the newest this many checkpoints (0: keep all)"""
    resume: Optional[str] = None
    """continue the run in this directory from its newest checkpoint, with its own flags (--steps may grow)"""
    max_bad_steps: int = 10
    """stop after this many consecutive updates skipped for a non-finite loss or gradient"""

    def __post_init__(self):  # every flag is checked before anything loads; a mistake ends in one line
        common.check_run_args(self)
        for spec in (self.reward, *self.eval_rewards):
            rewards.parse(spec)
        common.require(rewards.is_differentiable(self.reward), f"DRaFT backpropagates through the reward, and "
                       f"{self.reward!r} is not differentiable. Use a differentiable reward (e.g. aesthetic, hpsv2, "
                       "pickscore, jpeg_compressibility_diff).")
        common.check_flags(self, positive=("train_batch_size",) if self.train_batch_size is not None else (),
                           non_negative=("kl_beta",))
        common.check_batch_split(self.batch_size, train_batch_size=self.train_batch_size)
        common.check_flags(self, non_negative=("num_copies",))  # DRaFT-LV


def sample_with_grad(pipe, cond, uncond, latents, args, gaps=None):
    """DDIM η = 0 from the initial noise `latents`; gradient flows through the last step only. Returns x_0; with a list
    `gaps`, appends the step with gradient's ‖ε̂_θ − ε̂_ref‖² (DRaFT-LV + KL)."""
    pipe.scheduler.set_timesteps(args.num_inference_steps, device=cond.device)
    timesteps = pipe.scheduler.timesteps
    x = latents
    for i, t in enumerate(timesteps):
        # DRaFT-1: the first T − 1 steps are plain sampling; the stop-gradient is here.
        with torch.set_grad_enabled(i >= len(timesteps) - 1):  # DRaFT-LV: K = 1, DRaFT-1's sampling
            noise_pred = common.guided_noise_pred(pipe, x, t, cond, uncond, args.guidance_scale,
                                                  use_checkpoint=args.unet_checkpointing)
            if gaps is not None and torch.is_grad_enabled():  # DRaFT-LV + KL
                gaps.append(common.prediction_gap(pipe, x, t, cond, uncond, noise_pred, args.guidance_scale))
            x = common.step(pipe.scheduler, noise_pred, t, x)
    return x


def renoise_with_grad(pipe, x0, cond, uncond, noise, args):
    """DRaFT-LV: one re-noised copy x0ⁱ of the sample x0: noise sg(x0) with `noise` to t₁, the last (least noisy)
    timestep of the schedule, then one guided DDIM step with gradient. Call after `sample_with_grad`."""
    t1 = pipe.scheduler.timesteps[-1]
    # DRaFT-LV: the stop-gradient is on x0: each copy's gradient reaches the weights through this one step only.
    x = common.add_noise(pipe.scheduler, x0.detach(), noise, t1)
    noise_pred = common.guided_noise_pred(pipe, x, t1, cond, uncond, args.guidance_scale,
                                          use_checkpoint=args.unet_checkpointing)
    return common.step(pipe.scheduler, noise_pred, t1, x)


def backpropagate_reward(pipe, reward_fn, x0, prompts, batch_size, guard, penalty=0.0):
    """Decode x0, score it, and backpropagate this chunk's share of L's term −mean r over the batch of `batch_size`.
    Returns the rewards and the share of L, detached."""
    reward = reward_fn(common.decode(pipe, x0), prompts)
    loss = (-reward.mean() + penalty) * len(reward) / batch_size
    guard.backward(loss)  # × the loss scale in fp16
    return reward.detach(), loss.detach()


def accumulate_gradient(pipe, reward_fn, prompts, cond, uncond, latents, noises, guard, args):
    """Backpropagate L = −mean(r(x0) + Σ_i r(x0ⁱ)) over the batch, train_batch_size images at a time: each chunk is
    backpropagated as soon as it is scored, so only one chunk's graph is in memory, and the gradients add up to the
    whole batch's. Returns the rewards (per image, per term) and L, detached."""
    results = []
    for s in range(0, len(prompts), args.train_batch_size or len(prompts)):
        chunk = slice(s, s + (args.train_batch_size or len(prompts)))
        gaps = [] if args.kl_beta > 0 else None  # DRaFT-LV + KL: β·‖ε̂_θ − ε̂_ref‖² joins the chunk's loss, with x0's
        x0 = sample_with_grad(pipe, cond[chunk], uncond, latents[chunk], args, gaps)
        penalty = args.kl_beta * sum(gaps) if gaps else 0.0
        # DRaFT-LV: x0 and its n re-noised copies, scored and backpropagated in turn: L = −mean(r(x0) + Σ_i r(x0ⁱ)).
        for n, x in enumerate([x0] + [renoise_with_grad(pipe, x0, cond[chunk], uncond, noise[chunk], args)
                                      for noise in noises]):
            results.append(backpropagate_reward(pipe, reward_fn, x, prompts[chunk], len(prompts), guard,
                                                penalty if n == 0 else 0.0))
    scores, losses = zip(*results)
    n = args.num_copies + 1  # DRaFT-LV: n + 1 results per chunk
    return torch.stack([torch.cat(scores[i::n]) for i in range(n)], 1), sum(losses)


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    world = common.setup_distributed()  # under torchrun: this process's rank; otherwise a world of one
    prompts = common.load_prompts(args.prompts, args.prompt_file, args.model)
    run_dir = common.make_run_dir(args.output_dir, args.exp_name, args.reward, args.seed, args.resume)
    device, dtype = common.device_and_dtype(args.mixed_precision)
    common.seed_everything(args.seed)
    rng = random.Random(args.seed)

    # Model, reward, optimizer
    targets = common.ATTENTION_TARGETS + (common.FEEDFORWARD_TARGETS if args.lora_ff else ())
    pipe = common.load_pipeline(args.model, args.lora_rank, device, dtype, lora_targets=targets,
                                resolution=args.resolution)
    if args.vae_checkpointing:
        pipe.vae.enable_gradient_checkpointing()
    reward_fn = rewards.load(args.reward, device=device, dtype=dtype)
    eval_rewards = {spec: rewards.load(spec, device=device, dtype=dtype) for spec in args.eval_rewards}
    params = common.lora_parameters(pipe)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    ema = common.LoraEMA(params, args.ema_decay)  # --ema-decay: the LoRA's moving average (nothing at 0)

    # Bookkeeping, the same in all scripts: resume, the non-finite guard (with fp16 loss scaling), logs, signals
    guard = common.UpdateGuard(args.max_bad_steps, loss_scaling=dtype == torch.float16)
    checkpointer = common.Checkpointer(run_dir, pipe, optimizer, rng, args)  # this process now writes run_dir
    start, state = checkpointer.restore()  # (0, {}) for a new run
    guard.load_state_dict(state.get("guard", {}))
    ema.load_state_dict(state.get("ema", {}))
    reward_queries = state.get("reward_queries", 0)
    logger = common.Logger(run_dir, args, args.track, start_step=start, reward_fn=reward_fn)  # + reward/<term>
    stop = common.StopSignal(guard)  # SIGINT/SIGTERM, or --max-bad-steps bad updates in a row
    uncond = common.encode_prompts(pipe, [""])
    grid = common.SampleGrid.from_args(args, prompts, reward_fn, eval_rewards)  # fixed prompts × seeds

    def log_samples(step):  # rank 0 only; the grid's own generators leave the shared RNG untouched
        if world.is_main:
            with ema.applied():  # --ema-decay: the grid shows the average
                logger.samples(step, grid(pipe))

    if start == 0:
        log_samples(0)
    pbar = tqdm(range(start + 1, args.steps + 1), desc=args.exp_name, initial=start, total=args.steps,
                disable=not world.is_main)
    for step in pbar:
        t0 = time.time()
        # ALGO 1. The batch's prompts and initial noise: every rank draws the global batch's and keeps its share.
        batch_prompts = common.shard(common.sample_prompts(prompts, args.batch_size, rng))
        cond = common.encode_prompts(pipe, batch_prompts)
        latents = common.initial_latents(pipe, len(batch_prompts))
        noises = [common.randn(latents.shape, device=device) for _ in range(args.num_copies)]  # DRaFT-LV: ε per copy

        # ALGO 2. Sample with gradient through the last step, re-noise, decode, score: L = −mean(r(x0) + Σ_i r(x0ⁱ)).
        optimizer.zero_grad(set_to_none=True)
        reward, loss = accumulate_gradient(pipe, reward_fn, batch_prompts, cond, uncond, latents, noises, guard, args)
        reward_queries += args.batch_size * (args.num_copies + 1)  # DRaFT-LV: every scored image counts
        common.average_gradients(params)  # under torchrun: the mean over ranks is the global batch's gradient
        grad_norm = guard.clip_grad_norm_(optimizer, args.max_grad_norm)  # undoes fp16's loss scale, then clips
        if guard.ok(step, loss=loss, grad_norm=grad_norm):  # a non-finite update is skipped, never applied
            optimizer.step()
            ema.update()

        # Bookkeeping, the same in all scripts: log, sample grid, checkpoint, stop (a signal, --max-bad-steps)
        reward = common.gather(reward)  # the global batch's rewards, for logging
        reward, renoised = reward[:, 0], reward[:, 1:]  # DRaFT-LV: x0's, and the copies' (close: t₁ is nearly clean)
        row = logger.log(step, charts=dict(reward_mean=reward.mean(), reward_std=reward.std(correction=0),
                                           reward_queries=reward_queries, grad_norm=grad_norm,
                                           step_seconds=time.time() - t0, **guard.charts())
                         | (dict(reward_renoised_mean=renoised.mean()) if args.num_copies else {}),
                         losses=dict(loss=loss))
        pbar.set_postfix(reward=f"{row['reward_mean']:.4g}", s_per_step=f"{row['step_seconds']:.2f}")
        # what a checkpoint of this step holds (and what a reward failing before the next one completes saves)
        checkpointer.completed(step, reward_queries=reward_queries, guard=guard.state_dict(), ema=ema.state_dict())
        if step % args.sample_every == 0 or step == args.steps:
            log_samples(step)
        checkpointer.save_or_stop(step, stop, device)  # every --save-every, at the end, and to stop

    logger.close()
    if world.is_main:
        common.finish_run(pipe, run_dir, args, ema)  # the LoRA (diffusers', kohya's, --ema-decay's), the model card
        print(f"LoRA, metrics and sample grids in {run_dir}")


if __name__ == "__main__":
    with common.user_errors(rewards.RewardError):  # a user's mistake ends in one line on stderr, not a traceback
        main(common.cli(Args))  # common.cli: tyro.cli, noting which flags were given (for --resume)
