"""DDPO-IS: Denoising Diffusion Policy Optimization with importance sampling and PPO-style clipping.

Black, Janner, Du, Kostrikov & Levine, "Training Diffusion Models with Reinforcement Learning", ICLR 2024
(arXiv:2305.13301).

Idea: treat denoising as a T-step MDP whose policy is the guided noise prediction. A DDIM step with η > 0
is a Gaussian, so each sampled step x_t → x_{t−1} has a log-probability that is differentiable in the
weights. The reward of the final image, normalised per prompt into an advantage A, weights these
log-probabilities. DDPO-IS reuses each sampled batch for several updates: after the first update the
weights θ no longer generated the data, so each step's term is reweighted by the importance ratio
r = p_θ / p_old, and, as in PPO, clipped to [1 − ε, 1 + ε] so that the policy cannot move far from the one
that sampled the batch: L = mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), ε = 1e-4 (calibrated to log-probs
averaged over C,H,W). The reward is never differentiated, so any scorer works.

What differs from `ddpo_sf.py` (marked `# DDPO-IS:` below): the loss is the clipped surrogate instead of
−A·log p; each sampled batch gives `num_inner_epochs × num_minibatches` optimizer updates, each over a
shuffled minibatch of samples and per-sample shuffled timesteps (optionally a `timestep_fraction` of them);
`--steps` still counts optimizer updates, so a new batch is sampled whenever the last one is used up. On the
first minibatch the weights are those that sampled the batch (ratio = 1) and the gradient equals DDPO-SF's.
Defaults: the paper samples 256 images per epoch and takes 4 updates (minibatches of 64) on 8 GPUs; on a
single GPU we sample 64 and take 4 updates on minibatches of 16.

    python ddpo_is.py --reward jpeg_compressibility --prompts imagenet_animals     # SD1.4 on one GPU
    python ddpo_is.py --model tiny --reward jpeg_compressibility --steps 4 --batch-size 4 --num-minibatches 2 \
        --train-batch-size 2 --sample-batch-size 4 --num-inference-steps 10
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

import common
import rewards


@dataclass
class Args:
    exp_name: str = "ddpo_is"
    """name of this experiment (the run directory's prefix)"""
    model: str = common.SD14
    """hub id, local diffusers folder, `tiny` (random weights, for CPU smoke tests) or `tiny-shapes` (the CPU
    testbed pretrained on coloured shapes, shapes/)"""
    reward: str = "aesthetic"
    """any reward of `rewards.REWARDS` (need not be differentiable), or a weighted sum `name:w,name:w`"""
    prompts: Optional[str] = None
    """named prompt set (common.PROMPT_SETS): simple_animals (aesthetic; the default), imagenet_animals
    (compressibility), animal_activities (alignment); with --model tiny-shapes the default is shapes"""
    prompt_file: Optional[str] = None
    """a newline-separated prompt file; overrides --prompts"""
    steps: int = 800
    """number of optimizer updates; num_inner_epochs × num_minibatches per sampled batch (800 = 200 batches)"""
    seed: int = 0
    """seed of python, numpy and torch (the tiny base model itself is always built from seed 0)"""
    output_dir: Optional[str] = None
    """run directory; default runs/{exp_name}__{reward}__{seed}__{time}"""
    batch_size: int = 64
    """images sampled per batch, over all processes (paper: 256 across 8 GPUs; 64 keeps a 1-GPU batch minutes)"""
    sample_batch_size: int = 8
    """images per sampling call per process (memory only; paper: 8 per GPU)"""
    train_batch_size: int = 4
    """per process: images per forward/backward chunk of the training pass (memory only; gradients are accumulated)"""
    # DDPO-IS: the batch is reused for several clipped updates.
    num_minibatches: int = 4
    """optimizer updates per pass over a batch: batch_size / num_minibatches samples each, over all processes
    (paper: 4)"""
    num_inner_epochs: int = 1
    """passes over each sampled batch, reshuffled every time (paper: 1)"""
    timestep_fraction: float = 1.0
    """fraction of each sample's (shuffled) timesteps trained on, in (0, 1] (paper: 1.0)"""
    clip_range: float = 1e-4
    """PPO clip ε of the importance ratio; calibrated to log-probs averaged over C,H,W (paper: 1e-4)"""
    num_inference_steps: int = 50
    """DDIM steps T (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight w; the guided prediction is the policy (paper: 5.0)"""
    eta: float = 1.0
    """DDIM stochasticity η; must be > 0 for the steps to have log-probabilities (paper: 1.0)"""
    lora_rank: int = 4
    """LoRA rank on the attention layers (paper: 4)"""
    learning_rate: float = 3e-4
    """AdamW learning rate (paper: 3e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (DDPO's code: 1e-4)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (paper: 1.0)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to ±this (paper: 5)"""
    per_prompt_stat_tracking: bool = True
    """normalise rewards by each prompt's running mean/std rather than the batch's (paper: on)"""
    stat_buffer_size: int = 32
    """rewards kept per prompt for the running statistics"""
    stat_min_count: int = 16
    """below this many rewards for a prompt, the batch mean/std are used instead"""
    mixed_precision: str = "auto"
    """dtype of the frozen base weights: auto (fp16 on CUDA, float32 on CPU), no, fp16, bf16; LoRA is float32"""
    track: bool = False
    """also log to Weights & Biases"""
    sample_every: int = 40
    """save a sample grid of fixed prompts and seeds every this many updates (and at start and end)"""
    num_sample_images: int = 8
    """images in the sample grid (the first prompts of the set, seed fixed)"""
    save_every: int = 200
    """save a checkpoint (LoRA + training state) under checkpoints/step_N every this many updates, and at the end;
    a multiple of num_inner_epochs × num_minibatches (checkpoints fall between sampled batches)"""
    keep_checkpoints: int = 2
    """keep only the newest this many checkpoints (0: keep all)"""
    resume: Optional[str] = None
    """continue the run in this directory from its newest checkpoint, with its own flags (--steps may grow)"""
    max_bad_steps: int = 10
    """stop after this many consecutive updates skipped for a non-finite reward, loss or gradient"""


class PerPromptStatTracker:
    """Running reward statistics per prompt: A = (r − mean_prompt) / (std_prompt + 1e-6)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffers = defaultdict(lambda: deque(maxlen=buffer_size))
        self.min_count = min_count

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts = np.array(prompts)
        advantages = np.empty_like(rewards, dtype=np.float64)
        for prompt in np.unique(prompts):
            mine = prompts == prompt
            buffer = self.buffers[prompt]
            buffer.extend(rewards[mine].tolist())
            if len(buffer) < self.min_count:  # too few samples of this prompt yet: batch statistics
                mean, std = rewards.mean(), rewards.std()
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mine] = (rewards[mine] - mean) / (std + 1e-6)
        return advantages

    def state_dict(self) -> dict:  # for checkpoints: the buffered rewards per prompt
        return {str(prompt): list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        for prompt, values in state.items():
            self.buffers[prompt].extend(values)


def compute_advantages(prompts, rewards_np, tracker, args) -> torch.Tensor:
    if args.per_prompt_stat_tracking:
        advantages = tracker.update(prompts, rewards_np)
    else:
        advantages = (rewards_np - rewards_np.mean()) / (rewards_np.std() + 1e-6)
    return torch.as_tensor(advantages, dtype=torch.float32).clamp(-args.adv_clip_max, args.adv_clip_max)


# DDPO-IS: the PPO-style clipped surrogate replaces −A·log p.
def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """L = mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), r = exp(log p_θ − log p_old); returns (L, approx_kl, clipfrac).

    Inside the clip range the gradient is −A·r·∇log p (= DDPO-SF's at r = 1). Once r leaves the range in the
    direction its advantage pushes it (A > 0 and r > 1 + ε, or A < 0 and r < 1 − ε), the clipped branch is
    the max and is constant: that sample stops contributing gradient. Leaving in the other direction is not
    clipped, so a step that made things worse can always be undone.
    """
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * (diff.detach() ** 2).mean()
    clipfrac = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl, clipfrac


def accumulate_clipped_gradient(pipe, traj, cond, uncond, advantages, samples, timestep_idx, args) -> dict:
    """Backpropagate the clipped surrogate averaged over one minibatch: the samples `samples` [M] and, for each,
    the timestep indices `timestep_idx` [M, K] (its shuffled steps; row m belongs to samples[m]).

    Gradients are accumulated over the K timesteps and over chunks of train_batch_size samples; the caller
    takes one optimizer step afterwards.
    """
    # DDPO-IS: a minibatch of samples with per-sample timesteps, instead of every sample at every timestep.
    n, num_steps = timestep_idx.shape
    loss_sum, kl_sum, clipfrac_sum = 0.0, 0.0, 0.0
    for s in range(0, n, args.train_batch_size):
        i = samples[s : s + args.train_batch_size]
        for j in range(num_steps):
            k = timestep_idx[s : s + args.train_batch_size, j]  # DDPO-IS: each sample at its own timestep
            t = traj.timesteps[k]
            eps = common.guided_eps(pipe, traj.latents[i, k], t, cond[i], uncond, args.guidance_scale)
            _, log_prob = common.ddim_step_with_logprob(
                pipe.scheduler, eps, t, traj.latents[i, k], args.eta, prev_sample=traj.latents[i, k + 1]
            )
            # DDPO-IS: the clipped surrogate, weighted so that the sum over chunks and timesteps is its mean.
            old_log_prob = traj.log_probs[i, k]
            loss, approx_kl, clipfrac = clipped_surrogate(log_prob, old_log_prob, advantages[i], args.clip_range)
            weight = len(i) / (n * num_steps)
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            kl_sum += approx_kl.item() * weight
            clipfrac_sum += clipfrac.item() * weight
    return dict(loss=loss_sum, approx_kl=kl_sum, clipfrac=clipfrac_sum)


def main(args: Args) -> None:
    args = common.resume_args(args)  # --resume: that run's flags; its checkpoint is verified here
    # Checks that need no model: fail before minutes of loading.
    rewards.parse(args.reward)
    if args.eta <= 0:
        raise SystemExit("DDPO needs stochastic steps (--eta > 0): with η = 0 a DDIM step has no log-probability.")
    # DDPO-IS: the batch is split into minibatches, each into train_batch_size chunks.
    if args.num_minibatches < 1 or args.num_inner_epochs < 1:
        raise SystemExit("--num-minibatches and --num-inner-epochs must be at least 1")
    world = common.setup_distributed()  # under torchrun: this process's rank; otherwise a world of one
    local_batch = args.batch_size // world.size  # each process samples and trains on its share of the batch
    if args.batch_size % world.size or local_batch % args.sample_batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} over {world.size} process(es) must be a multiple of "
                         f"--sample-batch-size {args.sample_batch_size} per process")
    if local_batch % args.num_minibatches:
        raise SystemExit(f"--batch-size {args.batch_size} over {world.size} process(es) must be a multiple of "
                         f"--num-minibatches {args.num_minibatches}")
    minibatch_size = local_batch // args.num_minibatches
    if minibatch_size % args.train_batch_size:
        raise SystemExit(f"the minibatch (--batch-size / processes / --num-minibatches = {minibatch_size}) must be a "
                         f"multiple of --train-batch-size {args.train_batch_size}")
    updates_per_batch = args.num_inner_epochs * args.num_minibatches  # DDPO-IS: several updates per sampled batch
    if args.save_every % updates_per_batch:
        raise SystemExit(f"--save-every {args.save_every} must be a multiple of --num-inner-epochs × --num-minibatches "
                         f"= {updates_per_batch}: checkpoints are taken between sampled batches")
    if not 0 < args.timestep_fraction <= 1:
        raise SystemExit(f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}")
    prompts = common.load_prompts(args.prompts, args.prompt_file, args.model)
    run_dir = common.make_run_dir(args.output_dir, args.exp_name, args.reward, args.seed, args.resume)
    device, dtype = common.device_and_dtype(args.mixed_precision)
    common.seed_everything(args.seed)
    rng = random.Random(args.seed)

    # Model, reward, optimizer
    pipe = common.load_pipeline(args.model, args.lora_rank, device, dtype, lora_targets=common.ATTENTION_TARGETS)
    reward_fn = rewards.load(args.reward, device=device, dtype=dtype)
    params = common.lora_parameters(pipe)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    stat_tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    checkpointer = common.Checkpointer(run_dir, pipe, optimizer, rng, keep=args.keep_checkpoints)
    start, state = checkpointer.restore(args.resume)  # (0, {}) for a new run; always between sampled batches
    stat_tracker.load_state_dict(state.get("stat_tracker", {}))
    tracker = common.Tracker(run_dir, args, args.track, start_step=start)
    guard, stop = common.UpdateGuard(args.max_bad_steps), common.StopSignal()
    uncond = common.encode_prompts(pipe, [""])
    grid_prompts = prompts[: args.num_sample_images]

    def log_samples(step):  # rank 0 only; its own generator leaves the shared RNG untouched
        if world.is_main:
            images = common.sample_images(pipe, grid_prompts, 0, args.num_inference_steps, args.guidance_scale,
                                          args.eta)
            tracker.samples(step, images, reward_fn(images, grid_prompts))

    if start == 0:
        log_samples(0)
    reward_queries = state.get("reward_queries", 0)
    # DDPO-IS: how many of each sample's timesteps are trained on.
    train_timesteps = max(1, int(args.num_inference_steps * args.timestep_fraction))
    pbar = tqdm(range(start + 1, args.steps + 1), desc=args.exp_name, initial=start, total=args.steps,
                disable=not world.is_main)
    for step in pbar:
        t0 = time.time()
        if (step - 1) % updates_per_batch == 0:  # DDPO-IS: a new batch once the last one's updates are used up
            # 1. Sample with the current policy, keeping every latent and its log-prob. Every rank draws the global
            # batch's prompts (and noise) and keeps its share (common.shard).
            all_prompts = common.sample_prompts(prompts, args.batch_size, rng)
            batch_prompts = common.shard(all_prompts)
            cond = common.encode_prompts(pipe, batch_prompts)
            chunks = [
                common.sample_trajectory(pipe, cond[s : s + args.sample_batch_size], uncond, args.num_inference_steps,
                                         args.guidance_scale, args.eta)
                for s in range(0, local_batch, args.sample_batch_size)
            ]
            traj = common.Trajectory(torch.cat([c.latents for c in chunks]), torch.cat([c.log_probs for c in chunks]),
                                     chunks[0].timesteps)
            with torch.no_grad():  # all ranks' rewards: the statistics are the global batch's
                reward = common.gather(reward_fn(common.decode(pipe, traj.latents[:, -1]), batch_prompts).float()).cpu()
            reward_queries += args.batch_size
            # a non-finite reward must not reach the per-prompt statistics: the whole batch is skipped
            batch_ok = guard.ok(step, reward=reward)
            advantages = torch.full((local_batch,), float("nan"), device=device)

            if batch_ok:
                # 2. Rewards -> advantages.
                advantages = compute_advantages(all_prompts, reward.numpy(), stat_tracker, args)
                advantages = common.shard(advantages).to(device)

            # DDPO-IS: per epoch, shuffle the samples and, per sample, the order of its timesteps.
            plan = []
            for _ in range(args.num_inner_epochs):
                samples = torch.randperm(local_batch, device=device)
                timestep_idx = common.shard(torch.stack([torch.randperm(args.num_inference_steps, device=device)
                                                         for _ in range(args.batch_size)]))[:, :train_timesteps]
                plan += zip(samples.chunk(args.num_minibatches), timestep_idx.chunk(args.num_minibatches))

        # 3. One clipped update on the next minibatch (DDPO-IS: off-policy after the batch's first update).
        minibatch, minibatch_timesteps = plan[(step - 1) % updates_per_batch]
        stats, grad_norm = {}, torch.tensor(float("nan"))
        if batch_ok:
            optimizer.zero_grad(set_to_none=True)
            stats = accumulate_clipped_gradient(pipe, traj, cond, uncond, advantages, minibatch, minibatch_timesteps,
                                                args)
            common.average_gradients(params)  # under torchrun: the mean over ranks is the global minibatch's gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
            if guard.ok(step, loss=stats["loss"], grad_norm=grad_norm):  # a non-finite update is never applied
                optimizer.step()

        row = tracker.log(
            step,
            charts=dict(reward_mean=reward.mean(), reward_std=reward.std(correction=0), reward_queries=reward_queries,
                        optimizer_steps=step, advantage_abs_mean=advantages.abs().mean(), grad_norm=grad_norm,
                        skipped_updates=guard.skipped, step_seconds=time.time() - t0),
            losses=stats,
        )
        pbar.set_postfix(reward=f"{row['reward_mean']:.4g}", s_per_step=f"{row['step_seconds']:.2f}")
        if step % args.sample_every == 0 or step == args.steps:
            log_samples(step)
        stopping = stop.requested(device)  # SIGINT/SIGTERM: save at the end of this batch's updates, then exit
        if step % updates_per_batch == 0:  # DDPO-IS: checkpoints fall between sampled batches
            if (args.save_every and step % args.save_every == 0) or step == args.steps or stopping:
                checkpointer.save(step, reward_queries=reward_queries, stat_tracker=stat_tracker.state_dict())
            if stopping:
                stop.exit(run_dir, step)

    tracker.close()
    if world.is_main:
        common.save_lora(pipe, run_dir)
        print(f"LoRA, metrics and sample grids in {run_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
