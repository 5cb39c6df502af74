"""DDPO-SF: Denoising Diffusion Policy Optimization with the score-function (REINFORCE) gradient.

Black, Janner, Du, Kostrikov & Levine, "Training Diffusion Models with Reinforcement Learning", ICLR 2024
(arXiv:2305.13301).

Idea: treat denoising as a T-step MDP whose policy is the guided noise prediction. A DDIM step with η > 0
is a Gaussian, so each sampled step x_t → x_{t−1} has a log-probability that is differentiable in the
weights. The reward of the final image, normalised per prompt into an advantage A, weights these
log-probabilities. The reward is never differentiated, so any scorer works (JPEG size, a VLM, a human).

DDPO-SF takes one on-policy update per sampled batch over every sample and timestep, L = −mean_{i,t} A_i ·
log p_θ(x_{t−1} | x_t, c_i), whose gradient is the score-function estimate. Sibling: `ddpo_is.py` reuses each
batch for several clipped, importance-weighted updates; `diff ddpo_sf.py ddpo_is.py` shows exactly that.

    python ddpo_sf.py --reward jpeg_compressibility --prompts imagenet_animals     # SD1.4 on one GPU
    python ddpo_sf.py --reward jpeg_compressibility --prompts imagenet_animals --batch-size 256 --steps 100 \
        --stat-buffer-size 16                    # DDPO-IS's compressibility run, one update per batch

The second command samples as ddpo-pytorch's compressibility run (config/dgx.py: 100 epochs of 256 images, lr 3e-4,
per-prompt statistics over 16 rewards, T = 50, w = 5) with DDPO-SF's one update per batch (the paper compares the
two at equal samples; ddpo-pytorch has no DDPO-SF config).
    python ddpo_sf.py --model tiny --reward jpeg_compressibility --steps 5 --batch-size 4 --sample-batch-size 4 \
        --num-inference-steps 10
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
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
    steps: int = 200
    """number of optimizer updates; here one update per sampled batch"""
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
    per_prompt_stat_tracking: bool = True
    """normalise rewards by each prompt's running mean/std rather than the batch's (ddpo-pytorch: on)"""
    stat_buffer_size: int = 32
    """rewards kept per prompt for the running statistics (ddpo-pytorch: 32)"""
    stat_min_count: int = 16
    """below this many rewards for a prompt, the batch mean/std are used instead (ddpo-pytorch: 16)"""
    kl_beta: float = 0.0
    """DDPO + KL: β of the per-step KL to the base model, β·‖μ_θ − μ_ref‖² / (2σ_t²) added to the loss as grpo.py does
    (0: off, as the DDPO paper, which has no KL; the term is Flow-GRPO's kl_loss, β 0.01-0.04 on SD3.5)"""
    # ---- the run: seed, precision, logging, checkpoints (the same in all scripts) ----------------------------
    exp_name: str = "ddpo_sf"
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
    sample_every: int = 10
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
    save_every: int = 50
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
        common.check_flags(self, positive=("sample_batch_size", "train_batch_size", "eta", "stat_buffer_size"),
                           non_negative=("adv_clip_max", "stat_min_count", "kl_beta"))
        common.check_batch_split(self.batch_size, self.sample_batch_size, 1, self.train_batch_size)


class PerPromptStatTracker:
    """Running reward statistics per prompt: A = (r − mean_prompt) / (std_prompt + 1e-6)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffers = defaultdict(lambda: deque(maxlen=buffer_size))
        self.min_count = min_count

    def update(self, prompts: list[str], scores: np.ndarray) -> np.ndarray:
        prompts = np.array(prompts)
        advantages = np.empty_like(scores, dtype=np.float64)
        for prompt in np.unique(prompts):
            mine = prompts == prompt
            buffer = self.buffers[prompt]
            buffer.extend(scores[mine].tolist())
            if len(buffer) < self.min_count:  # too few samples of this prompt yet: batch statistics
                mean, std = scores.mean(), scores.std()
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mine] = (scores[mine] - mean) / (std + 1e-6)
        return advantages

    def state_dict(self) -> dict:  # for checkpoints: the buffered rewards per prompt
        return {str(prompt): list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        for prompt, values in state.items():
            self.buffers[prompt].extend(values)


def compute_advantages(prompts: list[str], scores: np.ndarray, stat_tracker, args) -> torch.Tensor:
    if args.per_prompt_stat_tracking:
        advantages = stat_tracker.update(prompts, scores)
    else:
        advantages = (scores - scores.mean()) / (scores.std() + 1e-6)
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
            yield i, k, log_prob, noise_pred  # DDPO + KL: and the guided ε̂, for the KL


def policy_gradient_loss(log_prob, old_log_prob, advantages):
    """L = −mean(A · log p_θ): its gradient is the score-function estimate −A·∇log p. Returns (L, diagnostics);
    approx_kl = ½·mean((log p_θ − log p_old)²) is 0 up to rounding here (on-policy)."""
    loss = -(advantages * log_prob).mean()
    return loss, dict(approx_kl=0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean())


def accumulate_gradient(pipe, traj, cond, uncond, advantages, samples, timestep_idx, guard, args) -> dict:
    """Backpropagate the loss averaged over one minibatch's (sample, timestep) pairs, chunk by chunk (gradients
    accumulate; the caller takes one optimizer step). Returns the loss and its diagnostics, averaged the same way."""
    stats = defaultdict(float)
    for i, k, log_prob, noise_pred in minibatch_log_probs(pipe, traj, cond, uncond, samples, timestep_idx, args):
        loss, diagnostics = policy_gradient_loss(log_prob, traj.log_probs[i, k], advantages[i])
        if args.kl_beta > 0:  # DDPO + KL: the per-step KL to the base model, as grpo.py
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
    stat_tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)

    # Bookkeeping, the same in all scripts: resume, the non-finite guard (with fp16 loss scaling), logs, signals
    guard = common.UpdateGuard(args.max_bad_steps, loss_scaling=dtype == torch.float16)
    checkpointer = common.Checkpointer(run_dir, pipe, optimizer, rng, args)  # this process now writes run_dir
    start, state = checkpointer.restore()  # (0, {}) for a new run
    guard.load_state_dict(state.get("guard", {}))
    ema.load_state_dict(state.get("ema", {}))
    stat_tracker.load_state_dict(state.get("stat_tracker", {}))
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
            all_prompts = common.sample_prompts(prompts, args.batch_size, rng)
            batch_prompts = common.shard(all_prompts)
            cond = common.encode_prompts(pipe, batch_prompts)
            traj = common.sample_trajectory(pipe, cond, uncond, args.num_inference_steps, args.guidance_scale,
                                            args.eta, chunk_size=args.sample_batch_size)
            with torch.no_grad():  # all ranks' rewards: the statistics are the global batch's
                reward = common.gather(reward_fn(common.decode(pipe, traj.latents[:, -1]), batch_prompts).float()).cpu()
            reward_queries += args.batch_size
            batch_ok = guard.ok(step, reward=reward)  # a non-finite reward must not reach the per-prompt statistics
            # ALGO 2. Rewards -> advantages (a skipped batch keeps NaN, for the log).
            advantages = torch.full((local_batch,), float("nan"), device=device)
            if batch_ok:
                advantages = common.shard(compute_advantages(all_prompts, reward.numpy(), stat_tracker, args)).to(device)
            # ALGO 3. One minibatch: every sample, at every timestep in sampling order.
            timestep_idx = torch.arange(args.num_inference_steps, device=device).expand(local_batch, -1)
            minibatches = [(torch.arange(local_batch, device=device), timestep_idx)]

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
                               stat_tracker=stat_tracker.state_dict(), guard=guard.state_dict(), ema=ema.state_dict())
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
