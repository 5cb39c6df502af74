"""RWR: reward-weighted regression, the DDPO paper's baseline for fine-tuning a diffusion model on rewards.

Lee et al., "Aligning Text-to-Image Models using Human Feedback" (2023, arXiv:2302.12192) fine-tune on
reward-weighted denoising; Black, Janner, Du, Kostrikov & Levine, "Training Diffusion Models with Reinforcement
Learning", ICLR 2024 (arXiv:2305.13301), run it in rounds as the RWR baseline DDPO is compared against.

Idea: fine-tune with the ordinary denoising (diffusion) loss on the model's own samples, each weighted by its
reward: L = Σ_i w_i · mean_{CHW} ‖ε − ε̂_θ(x_t, t, c_i)‖² / B, with x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and t ~ U{0..999}.
Weights are exponentiated rewards normalised per prompt, w_i = softmax(β·r)_i · n_prompt (β on the reward's own
scale), or with `--sparse` the filtered variant w_i = 1[r_i ≥ the prompt's 90th percentile]. DDPO reads this as
RL on a one-step MDP (the whole generation is one action, fitted through the denoising loss as a surrogate of
its likelihood), whereas DDPO optimises the exact likelihood of every denoising step. The reward is never
differentiated, so any scorer works.

What differs from `ddpo_sf.py` (marked `# RWR:`): only the final latents x0 are kept (no log-probs, so any η
works); rewards become per-prompt softmax weights instead of advantages; the loss is the weighted denoising loss
at one random timestep per sample instead of −A·log p over the chain; each round's batch is reused for
`num_epochs × num_minibatches` optimizer updates (default 4 × 4), so a round is sampled whenever the last one's
updates are used up and `--steps` still counts optimizer updates.

    python rwr.py --reward jpeg_compressibility --prompts imagenet_animals     # SD1.4 on one GPU
    python rwr.py --model tiny --reward jpeg_compressibility --steps 4 --batch-size 4 --images-per-prompt 2 \
        --num-minibatches 2 --train-batch-size 2 --sample-batch-size 4 --num-inference-steps 10
"""

from __future__ import annotations

import random
import time
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
    steps: int = 3200
    """number of optimizer updates; num_epochs × num_minibatches per round (3200 = 200 rounds of 64 images)"""
    batch_size: int = 64
    """images sampled per round, over all processes (DDPO: 256 over 8 GPUs; 64 keeps a 1-GPU round minutes)"""
    images_per_prompt: int = 8
    """RWR: images sampled per drawn prompt, so that each prompt's softmax compares several rewards (with one
    image per prompt every weight would be 1 and the reward would be ignored)"""
    sample_batch_size: int = 8
    """per process: images per sampling call (memory only)"""
    train_batch_size: int = 4
    """per process: images per forward/backward chunk of the training pass (memory only; gradients accumulate)"""
    # RWR: several passes of weighted regression over each round's samples.
    num_epochs: int = 4
    """passes over each round's samples, reshuffled every time"""
    num_minibatches: int = 4
    """optimizer updates per pass: batch_size / num_minibatches samples each"""
    beta: float = 0.2
    """inverse temperature β of the weights softmax(β·r), on the reward's own scale (DDPO: 0.2)"""
    sparse: bool = False
    """filtered RWR: weight 1 for rewards at or above the prompt's --percentile, 0 otherwise"""
    percentile: float = 90.0
    """per-prompt reward percentile kept by --sparse (DDPO: 90)"""
    reencode: bool = True
    """RWR: regress a fresh sample of the VAE posterior of each decoded image, as the DDPO paper's code does
    (jannerm/ddpo: pipeline callbacks.py `vae_fn` encodes the images, training/diffusion.py samples the latent at every
    update); --no-reencode regresses the sampler's final latent itself"""
    num_inference_steps: int = 50
    """DDIM steps T of the sampler (DDPO: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight w; the guided prediction is the model being regressed (DDPO: 5.0)"""
    eta: float = 1.0
    """DDIM stochasticity η of the sampler (DDPO's sampler: 1.0; a flow model: the SDE noise level a); no log-probs
    are needed, so η = 0 works too"""
    resolution: Optional[int] = None
    """image side in pixels; default the model's native size (SD1.4: 512)"""
    lora_rank: int = 4
    """LoRA rank on the attention layers (ddpo-pytorch's LoRA setting: 4)"""
    learning_rate: float = 3e-4
    """AdamW learning rate (ddpo-pytorch's LoRA setting: 3e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (ddpo-pytorch: 1e-4)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (ddpo-pytorch: 1.0)"""
    # ---- the run: seed, precision, logging, checkpoints (the same in all scripts) ----------------------------
    exp_name: str = "rwr"
    """name of this experiment (the run directory's prefix)"""
    seed: int = 0
    """seed of python, numpy and torch (the tiny base model itself is always built from seed 0)"""
    output_dir: Optional[str] = None
    """run directory; default runs/{exp_name}__{reward}__{seed}__{time}"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """dtype of the frozen base weights: auto (bf16 on GPUs that support it, else fp16 with loss scaling; float32
    on the CPU), no (float32), fp16, bf16; LoRA weights and latents stay float32"""
    track: bool = False
    """also log to Weights & Biases"""
    sample_every: int = 160
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
    save_every: int = 800
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
        for spec in (self.reward, *self.eval_rewards):
            rewards.parse(spec)
        common.check_flags(self, positive=("sample_batch_size", "train_batch_size", "num_epochs", "num_minibatches",
                                           "images_per_prompt"), non_negative=("eta", "beta"))
        common.check_batch_split(self.batch_size, self.sample_batch_size, self.num_minibatches, self.train_batch_size)
        common.require(self.batch_size % self.images_per_prompt == 0, f"--batch-size {self.batch_size} must be a "
                       f"multiple of --images-per-prompt {self.images_per_prompt}")  # RWR
        common.require(0 <= self.percentile <= 100, f"--percentile must be in [0, 100], got {self.percentile}")
        updates_per_round = self.num_epochs * self.num_minibatches  # RWR
        common.require(self.save_every % updates_per_round == 0,
                       f"--save-every {self.save_every} must be a multiple of --num-epochs × --num-minibatches "
                       f"= {updates_per_round}: checkpoints fall between rounds")


# RWR: per-prompt reward weights replace the per-prompt advantage statistics.
def rwr_weights(prompts: list[str], scores: np.ndarray, beta: float, sparse: bool = False,
                percentile: float = 90.0) -> np.ndarray:
    """w_i = softmax(β·r)_i · n_prompt over the samples sharing prompt i's text (mean weight 1 per prompt);
    `sparse`: w_i = 1[r_i ≥ np.percentile(r_prompt, percentile)]."""
    prompts, scores = np.array(prompts), np.asarray(scores, dtype=np.float64)
    weights = np.empty_like(scores)
    for prompt in np.unique(prompts):
        mine = prompts == prompt
        r = scores[mine]
        if sparse:
            weights[mine] = (r >= np.percentile(r, percentile)).astype(np.float64)
        else:
            z = np.exp(beta * (r - r.max()))  # shifted by the max: same softmax, no overflow
            weights[mine] = z / z.sum() * len(r)
    return weights


# RWR: the weighted denoising loss replaces −A·log p over the chain.
def weighted_denoising_loss(pipe, x0, cond, uncond, weights, timesteps, noise, guidance_scale, normaliser):
    """Σ_i w_i · mean_{CHW} ‖target_i − ε̂_guided(x_t, t_i, c_i)‖² / normaliser, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; the
    target is ε (v for a v-prediction model)."""
    x_t = common.add_noise(pipe.scheduler, x0, noise, timesteps)
    noise_pred = common.guided_noise_pred(pipe, x_t, timesteps, cond, uncond, guidance_scale)
    target = common.denoising_target(pipe.scheduler, x0, noise, timesteps)
    per_sample = ((target - noise_pred) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return (weights * per_sample).sum() / normaliser


def accumulate_gradient(pipe, posterior, cond, uncond, weights, samples, guard, args) -> dict:
    """Backpropagate the weighted denoising loss of the minibatch `samples`, each at a fresh x0 ~ N(μ, σ²) of its
    `posterior` (σ = 0 for the sampler's own latents), t ~ U{0..999} and noise ε, in chunks of train_batch_size
    (gradients accumulate; the caller takes one optimizer step)."""
    loss_sum = 0.0
    mean, std = posterior
    for s in range(0, len(samples), args.train_batch_size):
        i = samples[s : s + args.train_batch_size]
        x0_i = mean[i] + std[i] * common.randn(mean[i].shape, device=mean.device)
        # RWR: one random training timestep per sample, anywhere in the 1000-step forward process
        # (drawn for the global batch and sharded under torchrun, so that ranks never share noise)
        t = common.randint(pipe.scheduler.config.num_train_timesteps, len(i), device=x0_i.device)
        noise = common.randn(x0_i.shape, device=x0_i.device)
        loss = weighted_denoising_loss(pipe, x0_i, cond[i], uncond, weights[i], t, noise, args.guidance_scale,
                                       len(samples))
        guard.backward(loss)  # × the loss scale in fp16
        loss_sum += loss.detach()  # a tensor: no host synchronisation inside the loop
    return dict(loss=loss_sum)


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
        if not minibatches:  # a new round once the last one's updates are used up
            # ALGO 1. Sample with the current model; RWR: only the final latents x0 are kept, and each drawn prompt is
            # repeated images_per_prompt times, for the per-prompt weights. Every rank draws the global round's
            # prompts (and noise) and keeps its share (common.shard).
            drawn = common.sample_prompts(prompts, args.batch_size // args.images_per_prompt, rng)
            all_prompts = [p for p in drawn for _ in range(args.images_per_prompt)]
            batch_prompts = common.shard(all_prompts)
            cond = common.encode_prompts(pipe, batch_prompts)
            x0 = common.sample_trajectory(pipe, cond, uncond, args.num_inference_steps, args.guidance_scale, args.eta,
                                          chunk_size=args.sample_batch_size).latents[:, -1]
            with torch.no_grad():  # all ranks' rewards: a prompt's weights use all of its images
                images = common.decode(pipe, x0)
                reward = common.gather(reward_fn(images, batch_prompts).float()).cpu()
                # RWR: what is regressed, as a posterior (μ, σ): the decoded images re-encoded, as the paper's code
                posterior = common.encode(pipe, images) if args.reencode else (x0, torch.zeros_like(x0))
            reward_queries += args.batch_size
            batch_ok = guard.ok(step, reward=reward)  # a non-finite reward: the whole round is skipped
            # ALGO 2. Rewards -> weights (RWR: instead of advantages).
            w = rwr_weights(all_prompts, reward.numpy(), args.beta, args.sparse, args.percentile)
            weights = common.shard(torch.as_tensor(w, dtype=torch.float32, device=device))
            effective_sample_size = w.sum() ** 2 / max((w**2).sum(), 1e-12)
            # ALGO 3. RWR: per epoch, shuffle the samples and split them into minibatches, one update each.
            minibatches = [mb for _ in range(args.num_epochs)
                           for mb in torch.randperm(local_batch, device=device).chunk(args.num_minibatches)]

        # ALGO 4. One update on the next minibatch.
        samples = minibatches.pop(0)
        stats, grad_norm = {}, torch.tensor(float("nan"))
        if batch_ok:
            optimizer.zero_grad(set_to_none=True)
            stats = accumulate_gradient(pipe, posterior, cond, uncond, weights, samples, guard, args)
            common.average_gradients(params)  # under torchrun: the mean over ranks is the global minibatch's gradient
            grad_norm = guard.clip_grad_norm_(optimizer, args.max_grad_norm)  # undoes fp16's loss scale, then clips
            if guard.ok(step, loss=stats["loss"], grad_norm=grad_norm):  # a non-finite update is never applied
                optimizer.step()
                ema.update()

        # Bookkeeping, the same in all scripts: log, sample grid, checkpoint, stop (a signal, --max-bad-steps)
        row = logger.log(step, charts=dict(reward_mean=reward.mean(), reward_std=reward.std(correction=0),
                                           reward_queries=reward_queries, weight_max=w.max(),
                                           effective_sample_size=effective_sample_size,
                                           grad_norm=grad_norm, step_seconds=time.time() - t0, **guard.charts()),
                         losses=stats)
        pbar.set_postfix(reward=f"{row['reward_mean']:.4g}", s_per_step=f"{row['step_seconds']:.2f}")
        # what a checkpoint of this step holds; none is written inside a sampled round (it is not saved), so a
        # signal or --max-bad-steps stops once the round's updates are done
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
