"""GRPO: group-relative policy optimisation (DanceGRPO, Flow-GRPO) on DDPO's denoising MDP, as a diff of DDPO-IS.

Xue et al., "DanceGRPO: Unleashing GRPO on Visual Generation" (arXiv:2505.07818) and Liu et al., "Flow-GRPO:
Training Flow Matching Models via Online RL" (arXiv:2505.05470), on the MDP of Black, Janner, Du, Kostrikov &
Levine, "Training Diffusion Models with Reinforcement Learning", ICLR 2024 (arXiv:2305.13301).

Idea: treat denoising as a T-step MDP whose policy is the guided noise prediction. A DDIM step with η > 0
is a Gaussian, so each sampled step x_t → x_{t−1} has a log-probability that is differentiable in the
weights. The reward of the final image, normalised per prompt into an advantage A, weights these
log-probabilities. The reward is never differentiated, so any scorer works (JPEG size, a VLM, a human).

What differs from `ddpo_is.py` (marked `# GRPO:`), after DanceGRPO (which trains SD1.4; the defaults are its SD
script's) and Flow-GRPO: a batch is batch_size / G prompts × G images (a group; by default one initial noise per
group, as DanceGRPO), and each image's advantage is its reward against its own group's,
A = (r − mean_group) / (std_group + ε), with no statistics kept across batches (DDPO's per-prompt tracker is gone).
An optional KL to the base model, β·‖μ_θ − μ_ref‖² / (2σ_t²) per step, joins the loss. The clipped ratio
(ε = 1e-4, as both), the advantage clip (5, as both), the minibatches and --timestep-fraction are DDPO-IS's.

    python grpo.py --reward hpsv21 --prompts simple_animals     # SD1.4 on one GPU: 4 prompts × 16 images per batch
    python grpo.py --model tiny --reward jpeg_compressibility --steps 4 --batch-size 4 --group-size 2 \
        --num-minibatches 2 --train-batch-size 2 --sample-batch-size 4 --num-inference-steps 10
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from tqdm import tqdm

import common
import rewards


@dataclass
class Args:
    # ---- the algorithm ---------------------------------------------------------------------------------------
    # "ddpo-pytorch" is the authors' LoRA implementation (github.com/kvablack/ddpo-pytorch); the paper's own code
    # (github.com/jannerm/ddpo) fine-tunes the full UNet at lr 1e-5.
    model: str = common.SD14
    """hub id or local diffusers folder of SD1.x/2.x, SDXL or SD3.x (`NAME:no-t5`: SD3 without T5), `tiny` (random
    weights, for CPU smoke tests), `tiny-shapes` (the CPU testbed, shapes/), `tiny-sdxl` / `tiny-sd3`, or
    `sd14-random` / `sdxl-random` / `sd35m-random` (the real architectures with random weights)"""
    reward: str = "aesthetic"
    """any reward of `rewards.REWARDS` (need not be differentiable), a weighted sum `name:w,name:w`, or a reward
    server's URL"""
    prompts: Optional[str] = None
    """named prompt set (common.PROMPT_SETS): simple_animals (aesthetic; the default), imagenet_animals
    (compressibility), animal_activities (alignment); with --model tiny-shapes the default is shapes"""
    prompt_file: Optional[str] = None
    """a newline-separated prompt file; overrides --prompts"""
    steps: int = 800
    """number of optimizer updates; num_inner_epochs × num_minibatches per sampled batch (800 = 200 batches)"""
    batch_size: int = 64
    """images sampled per batch, over all processes (ddpo-pytorch: 256 over 8 GPUs; 64 keeps a 1-GPU batch minutes)"""
    sample_batch_size: int = 8
    """per process: images per sampling call (memory only; ddpo-pytorch: 8 per GPU)"""
    train_batch_size: int = 4
    """per process: images per forward/backward chunk of the training pass (memory only; gradients accumulate)"""
    num_inference_steps: int = 50
    """DDIM steps T (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight w; the guided prediction is the policy (paper: 5.0)"""
    eta: float = 1.0
    """DDIM stochasticity η (a flow model: Flow-GRPO's SDE noise level a, 0.7 there); must be > 0 for the steps to
    have log-probabilities (paper: 1.0)"""
    resolution: Optional[int] = None
    """image side in pixels; default the model's native size (SD1.4: 512)"""
    # DDPO-IS: the batch is reused for several clipped updates.
    num_minibatches: int = 4
    """optimizer updates per pass over a batch: batch_size / num_minibatches samples each (ddpo-pytorch: 4 for
    compressibility; its aesthetic config, this script's default reward, takes 2)"""
    num_inner_epochs: int = 1
    """passes over each sampled batch, reshuffled every time (ddpo-pytorch: 1)"""
    timestep_fraction: float = 1.0
    """fraction of each sample's (shuffled) timesteps trained on, in (0, 1] (ddpo-pytorch: 1.0)"""
    clip_range: float = 1e-4
    """PPO clip ε of the importance ratio; calibrated to log-probs averaged over C,H,W (ddpo-pytorch: 1e-4)"""
    reevaluate_log_probs: Optional[bool] = None
    """recompute the stored log-probs p_old in the training pass's batch layout before the first update (default:
    in half precision, where a GPU's UNet output depends on the batch shape, which would move r = p_θ / p_old away
    from 1 by more than ε before any update, as language-model PPO trainers recompute it; costs one forward per
    trained step)"""
    lora_rank: int = 4
    """LoRA rank on the attention layers (ddpo-pytorch: 4)"""
    learning_rate: float = 3e-4
    """AdamW learning rate (ddpo-pytorch: 3e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (ddpo-pytorch: 1e-4)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (ddpo-pytorch: 1.0)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to ±this (ddpo-pytorch: 5)"""
    # GRPO: groups of images of one prompt, their statistics, and the KL to the base model.
    group_size: int = 16
    """G, images per prompt: a batch is batch_size / G prompts × G images (DanceGRPO's SD1.4 config: 16)"""
    shared_noise: bool = True
    """one initial noise x_T per group (DanceGRPO's SD1.4 script, train_grpo_sd.py, always shares one x_T across the
    whole batch; its FLUX scripts pass --init_same_noise; off in Flow-GRPO and DDPO: --no-shared-noise)"""
    global_std: bool = False
    """divide by the std of the whole batch instead of the group's (off: DanceGRPO's SD1.4 script, the source of
    these defaults, divides by each group's std; Flow-GRPO's configs all set global_std=True)"""
    kl_beta: float = 0.0
    """β of the KL to the base model (DanceGRPO: 0, no KL; Flow-GRPO on SD3.5: 0.04 GenEval and OCR, 0.01 PickScore)"""
    # ---- the run: seed, precision, logging, checkpoints (the same in all scripts) ----------------------------
    exp_name: str = "grpo"
    """name of this experiment (the run directory's prefix)"""
    seed: int = 0
    """seed of python, numpy and torch (the tiny base model itself is always built from seed 0)"""
    output_dir: Optional[str] = None
    """run directory; default runs/{exp_name}__{reward}__{seed}__{time}"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """dtype of the frozen base weights: auto (bf16 on GPUs that support it, else fp16 with loss scaling; float32
    on the CPU), no (float32), fp16, bf16; LoRA weights, latents and log-probs stay float32"""
    timesteps_per_call: int = 1
    """per process: timesteps of each sample in one UNet call of the training pass, train_batch_size × this many
    images per call (speed for memory: fewer, larger calls; the same loss up to float rounding). 1: one timestep per
    call, as ddpo-pytorch (train.py) and trl's DDPOTrainer; diffusers' UNet takes a timestep per sample"""
    track: bool = False
    """also log to Weights & Biases"""
    sample_every: int = 40
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
    save_every: int = 200
    """save a checkpoint (LoRA + training state) under checkpoints/step_N every this many updates, and at the end;
    a multiple of the updates per sampled batch (checkpoints fall between sampled batches)"""
    keep_checkpoints: int = 2
    """keep only the newest this many checkpoints (0: keep all)"""
    resume: Optional[str] = None
    """continue the run in this directory from its newest checkpoint, with its own flags (--steps may grow)"""
    max_bad_steps: int = 10
    """stop after this many consecutive updates skipped for a non-finite reward, loss or gradient"""

    def __post_init__(self):  # every flag is checked before anything loads; a mistake ends in one line
        common.check_run_args(self)
        common.check_flags(self, positive=("timesteps_per_call",))
        for spec in (self.reward, *self.eval_rewards):
            rewards.parse(spec)
        common.check_flags(self, positive=("sample_batch_size", "train_batch_size", "eta", "num_minibatches",
                                           "num_inner_epochs", "clip_range", "group_size"),
                           non_negative=("adv_clip_max", "kl_beta"), fractions=("timestep_fraction",))
        common.require(self.batch_size % self.group_size == 0, f"--batch-size {self.batch_size} must be a multiple "
                       f"of --group-size {self.group_size}")  # GRPO
        common.check_batch_split(self.batch_size, self.sample_batch_size, self.num_minibatches, self.train_batch_size)
        updates_per_batch = self.num_inner_epochs * self.num_minibatches  # DDPO-IS
        common.require(self.save_every % updates_per_batch == 0,
                       f"--save-every {self.save_every} must be a multiple of --num-inner-epochs × --num-minibatches "
                       f"= {updates_per_batch}: checkpoints fall between sampled batches")


# GRPO: group-relative advantages replace DDPO's running per-prompt statistics; nothing is kept across batches.
def compute_advantages(scores: np.ndarray, args) -> torch.Tensor:
    """A = (r − mean_group) / (std_group + 1e-4) over the batch's consecutive groups of group_size images, or divided
    by the whole batch's std with --global-std; population std and ε = 1e-4 as Flow-GRPO (flow_grpo/stat_tracking.py;
    DanceGRPO: sample std + 1e-8). A group of equal rewards gets A = 0."""
    groups = scores.reshape(-1, args.group_size)
    std = scores.std() if args.global_std else groups.std(axis=1, keepdims=True)
    advantages = ((groups - groups.mean(axis=1, keepdims=True)) / (std + 1e-4)).reshape(-1)
    return torch.as_tensor(advantages, dtype=torch.float32).clamp(-args.adv_clip_max, args.adv_clip_max)


def minibatch_log_probs(pipe, traj, cond, uncond, samples, timestep_idx, args):
    """Yield (i, k, log p_θ(x_{t−1} | x_t, c)) for one minibatch: the samples `samples` [M], each at its timestep
    indices `timestep_idx` [M, K] (row m belongs to samples[m]), re-evaluated on the stored trajectory in chunks of
    train_batch_size samples, timesteps_per_call columns of timesteps per UNet call (each sample at its own timestep);
    i and k are flat: pair n is sample i[n] at timestep index k[n]."""
    for s in range(0, len(samples), args.train_batch_size):
        chunk = samples[s : s + args.train_batch_size]
        for j in range(0, timestep_idx.shape[1], args.timesteps_per_call):
            columns = timestep_idx[s : s + args.train_batch_size, j : j + args.timesteps_per_call]
            i, k = chunk.repeat(columns.shape[1]), columns.T.flatten()  # column after column
            t = traj.timesteps[k]
            noise_pred = common.guided_noise_pred(pipe, traj.latents[i, k], t, cond[i], uncond, args.guidance_scale)
            _, log_prob = common.step_with_logprob(pipe.scheduler, noise_pred, t, traj.latents[i, k], args.eta,
                                                        prev_sample=traj.latents[i, k + 1])
            yield i, k, log_prob, noise_pred  # GRPO: and the guided ε̂, for the KL


# DDPO-IS: the PPO-style clipped surrogate replaces −A·log p.
def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """L = mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), r = exp(log p_θ − log p_old): inside the range the gradient is
    −A·r·∇log p (DDPO-SF's at r = 1); a sample whose r left the range in the direction its advantage pushes stops
    contributing gradient, one that left the other way does not. Returns (L, diagnostics)."""
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    clipfrac = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return loss.mean(), dict(approx_kl=0.5 * (diff.detach() ** 2).mean(), clipfrac=clipfrac)


def accumulate_gradient(pipe, traj, cond, uncond, advantages, samples, timestep_idx, guard, args) -> dict:
    """Backpropagate the loss averaged over one minibatch's (sample, timestep) pairs, chunk by chunk (gradients
    accumulate; the caller takes one optimizer step). Returns the loss and its diagnostics, averaged the same way."""
    stats = defaultdict(float)
    for i, k, log_prob, noise_pred in minibatch_log_probs(pipe, traj, cond, uncond, samples, timestep_idx, args):
        loss, diagnostics = clipped_surrogate(log_prob, traj.log_probs[i, k], advantages[i], args.clip_range)
        if args.kl_beta > 0:  # GRPO
            kl = common.kl_to_base(pipe, traj.latents[i, k], traj.timesteps[k], cond[i], uncond, noise_pred,
                                   args.guidance_scale, args.eta)  # ‖μ_θ − μ_ref‖² / (2σ_t²)
            loss, diagnostics["kl"] = loss + args.kl_beta * kl, kl.detach()
        weight = len(i) / len(samples) / timestep_idx.shape[1]  # this chunk's share of the minibatch's mean
        guard.backward(loss * weight)  # × the loss scale in fp16
        for name, value in dict(loss=loss.detach(), **diagnostics).items():
            stats[name] += value * weight  # tensors: no host synchronisation inside the loop
    return dict(stats)


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    world = common.setup_distributed()  # under torchrun: this process's rank; otherwise a world of one
    local_batch = args.batch_size // world.size  # each process samples and trains on its share of the batch
    prompts = common.load_prompts(args.prompts, args.prompt_file, args.model)
    run_dir = common.make_run_dir(args.output_dir, args.exp_name, args.reward, args.seed, args.resume)
    device, dtype = common.device_and_dtype(args.mixed_precision)
    common.seed_everything(args.seed)
    rng = random.Random(args.seed)

    # Model, reward, optimizer
    pipe = common.load_pipeline(args.model, args.lora_rank, device, dtype, lora_targets=common.ATTENTION_TARGETS,
                                resolution=args.resolution)
    reward_fn = rewards.load(args.reward, device=device, dtype=dtype)
    eval_rewards = {spec: rewards.load(spec, device=device, dtype=dtype) for spec in args.eval_rewards}
    params = common.lora_parameters(pipe)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    ema = common.LoraEMA(params, args.ema_decay)  # --ema-decay: the LoRA's moving average (nothing at 0)
    # DDPO-IS: how many of each sample's timesteps are trained on, and where the ratio's denominator comes from
    train_timesteps = max(1, int(args.num_inference_steps * args.timestep_fraction))
    reevaluate = dtype != torch.float32 if args.reevaluate_log_probs is None else args.reevaluate_log_probs

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
    minibatches = []  # the sampled batch's (samples, timestep indices) not yet trained on
    pbar = tqdm(range(start + 1, args.steps + 1), desc=args.exp_name, initial=start, total=args.steps,
                disable=not world.is_main)
    for step in pbar:
        t0 = time.time()
        if not minibatches:  # a new batch once the last one's updates are used up
            # ALGO 1. Sample with the current policy, keeping every latent and its log-prob. Every rank draws the
            # global batch's prompts (and noise) and keeps its share (common.shard).
            drawn = common.sample_prompts(prompts, args.batch_size // args.group_size, rng)  # GRPO: G images each
            all_prompts = [p for p in drawn for _ in range(args.group_size)]
            batch_prompts = common.shard(all_prompts)
            cond = common.encode_prompts(pipe, batch_prompts)
            latents = None  # GRPO: x_T drawn by the sampler, or with --shared-noise each group's first for all of it
            if args.shared_noise:
                latents = common.shard(common.gather(common.initial_latents(pipe, local_batch))[:: args.group_size]
                                       .repeat_interleave(args.group_size, 0))
            traj = common.sample_trajectory(pipe, cond, uncond, args.num_inference_steps, args.guidance_scale,
                                            args.eta, latents, chunk_size=args.sample_batch_size)
            with torch.no_grad():  # all ranks' rewards: the statistics are the global batch's
                reward = common.gather(reward_fn(common.decode(pipe, traj.latents[:, -1]), batch_prompts).float()).cpu()
            reward_queries += args.batch_size
            batch_ok = guard.ok(step, reward=reward)  # a non-finite reward: the whole batch is skipped
            # ALGO 2. Rewards -> advantages (a skipped batch keeps NaN, for the log).
            advantages = torch.full((local_batch,), float("nan"), device=device)
            if batch_ok:
                advantages = common.shard(compute_advantages(reward.numpy(), args)).to(device)
            # ALGO 3. DDPO-IS: per epoch, shuffle the samples and, per sample, the order of its timesteps; split into
            # minibatches, one optimizer update each.
            for _ in range(args.num_inner_epochs):
                samples = torch.randperm(local_batch, device=device)
                timestep_idx = common.shard(torch.stack([torch.randperm(args.num_inference_steps, device=device)
                                                         for _ in range(args.batch_size)]))[:, :train_timesteps]
                minibatches += zip(samples.chunk(args.num_minibatches), timestep_idx.chunk(args.num_minibatches))
            if reevaluate and batch_ok:  # DDPO-IS: p_old in the training layout, so r = 1 on the first update
                with torch.no_grad():
                    for samples, timestep_idx in minibatches[: args.num_minibatches]:
                        for i, k, log_prob, _ in minibatch_log_probs(pipe, traj, cond, uncond, samples, timestep_idx,
                                                                     args):
                            traj.log_probs[i, k] = log_prob

        # ALGO 4. One update on the next minibatch.
        samples, timestep_idx = minibatches.pop(0)
        stats, grad_norm = {}, torch.tensor(float("nan"))
        if batch_ok:
            optimizer.zero_grad(set_to_none=True)
            stats = accumulate_gradient(pipe, traj, cond, uncond, advantages, samples, timestep_idx, guard, args)
            common.average_gradients(params)  # under torchrun: the mean over ranks is the global minibatch's gradient
            grad_norm = guard.clip_grad_norm_(optimizer, args.max_grad_norm)  # undoes fp16's loss scale, then clips
            if guard.ok(step, loss=stats["loss"], grad_norm=grad_norm):  # a non-finite update is never applied
                optimizer.step()
                ema.update()

        # Bookkeeping, the same in all scripts: log, sample grid, checkpoint, stop (a signal, --max-bad-steps)
        row = logger.log(step, charts=dict(reward_mean=reward.mean(), reward_std=reward.std(correction=0),
                                           reward_queries=reward_queries, advantage_abs_mean=advantages.abs().mean(),
                                           grad_norm=grad_norm, step_seconds=time.time() - t0, **guard.charts()),
                         losses=stats)
        pbar.set_postfix(reward=f"{row['reward_mean']:.4g}", s_per_step=f"{row['step_seconds']:.2f}")
        # what a checkpoint of this step holds; none is written inside a sampled batch (it is not saved), so a
        # signal or --max-bad-steps stops once the batch's updates are done
        checkpointer.completed(step, between_batches=not minibatches, reward_queries=reward_queries,
                               guard=guard.state_dict(), ema=ema.state_dict())
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
