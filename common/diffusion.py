"""The sampling mechanics every algorithm shares: prompt encoding, the guided policy, the DDIM step with its
log-probability, a no-grad trajectory sampler for the RL scripts, and differentiable decoding."""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .distributed import randn  # draws on the generator's device; under torchrun, sharded from the global batch


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    # half-precision UNet/VAE outputs are promoted to float32; float64 (the gradient tests) is kept
    return x.to(torch.promote_types(x.dtype, torch.float32))


_WARNED_LONG_PROMPT: "weakref.WeakSet" = weakref.WeakSet()  # the pipelines (one per run) that warned already


def _warn_if_truncated(pipe, prompts: list[str]) -> None:
    """One line on stderr, once per pipeline (once per run), the first time a prompt has more tokens than the text
    encoder reads: SD's CLIP encoder drops the rest without a word, so its tail never reaches the image."""
    if pipe in _WARNED_LONG_PROMPT:  # (not per tokenizer: the tiny models of one process share theirs)
        return
    tok = pipe.tokenizer
    limit = tok.model_max_length
    # cut one token past the limit: a prompt reaches it iff it is too long (tokenizing without truncation would
    # also print transformers' own "indexing errors" warning, wrong here: encode_prompts truncates)
    lengths = [len(ids) for ids in tok(prompts, truncation=True, max_length=limit + 1)["input_ids"]]
    long = [p for p, n in zip(prompts, lengths) if n > limit]
    if long:
        _WARNED_LONG_PROMPT.add(pipe)
        shown = long[0] if len(long[0]) <= 80 else long[0][:80] + "…"
        print(f"warning: the prompt {shown!r} is longer than the {limit} tokens the text encoder reads (its start "
              f"and end tokens included); the rest is ignored (reported once, for the first such prompt)",
              file=sys.stderr)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings [B, 77, D] as SD1.4 computes them (padded to 77 tokens, last hidden state); longer
    prompts are truncated, with a warning the first time in a run."""
    tok = pipe.tokenizer
    _warn_if_truncated(pipe, prompts)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids.to(pipe.text_encoder.device))[0]


def guided_noise_pred(
    pipe,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    use_checkpoint: bool = False,
) -> torch.Tensor:
    """The policy: ε̂ = ε(x,t,∅) + w·(ε(x,t,c) − ε(x,t,∅)), one UNet call on the doubled batch; diffusers' pipelines
    call it `noise_pred` (for a v-prediction model it is the guided v̂, which the steps below convert).

    `uncond` is the empty-prompt embedding ([1, 77, D] or [B, 77, D]); `t` a scalar or a per-sample [B]
    tensor. With `use_checkpoint`, the UNet's activations are not stored but recomputed in the backward pass
    (only the inputs are kept): this is what makes backprop through 50 steps fit in memory.
    Returns float32 for a half-precision UNet (float64 stays float64).
    """
    unet = pipe.unet
    b = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device)
    t = t.expand(b) if t.ndim == 0 else t
    dtype = unet.conv_in.weight.dtype  # the base weights' dtype; `unet.dtype` walks every module, per call
    x = torch.cat([latents, latents]).to(dtype)
    emb = torch.cat([uncond.expand(b, -1, -1), cond]).to(dtype)

    def call(x, t, emb):
        return unet(x, t, encoder_hidden_states=emb).sample

    if use_checkpoint and torch.is_grad_enabled():
        out = checkpoint(call, x, torch.cat([t, t]), emb, use_reentrant=False)
    else:
        out = call(x, torch.cat([t, t]), emb)
    noise_pred_uncond, noise_pred_text = _at_least_f32(out).chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def _abar(scheduler, timestep, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t shaped to broadcast against `like` [B, ...]; t scalar or per-sample [B]; t < 0 (the step after the
    last) is the scheduler's final ᾱ (SD1.4: set_alpha_to_one=False, so ᾱ_0)."""
    t = torch.as_tensor(timestep, device=like.device).long()
    t = t.expand(like.shape[0]) if t.ndim == 0 else t
    alphas = scheduler.alphas_cumprod.to(like.device, torch.promote_types(like.dtype, torch.float32))
    abar = torch.where(t >= 0, alphas[t.clamp(min=0)], scheduler.final_alpha_cumprod.to(alphas))
    return abar.view(-1, *([1] * (like.ndim - 1)))


def _x0_and_eps(scheduler, model_output, timestep, sample):
    """x̂0 and ε̂ from the model's output, for ε-prediction (SD1.x) or v-prediction (SD2.x, Salimans & Ho 2022:
    v = √ᾱ·ε − √(1−ᾱ)·x0, so x0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √ᾱ·v + √(1−ᾱ)·x_t), as diffusers' DDIM step does.
    `check_scheduler` refuses every other prediction type before training."""
    alpha_t = _abar(scheduler, timestep, sample)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output, \
            alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
    return (sample - (1 - alpha_t).sqrt() * model_output) / alpha_t.sqrt(), model_output


def _ddim_mean_std(scheduler, model_output, timestep, sample, eta):
    """μ and σ of the DDIM step x_t → x_{t−1} (Song et al. 2021, eq. 12), t scalar or per-sample [B]."""
    # both in the wider dtype: a float64 UNet's step from float32 initial noise takes ᾱ in float64, as re-evaluating
    # the stored (then float64) latent does
    dtype = torch.promote_types(_at_least_f32(sample).dtype, _at_least_f32(model_output).dtype)
    sample, model_output = sample.to(dtype), model_output.to(dtype)
    t = torch.as_tensor(timestep, device=sample.device).long()
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t, alpha_prev = _abar(scheduler, t, sample), _abar(scheduler, t - step, sample)

    x0, eps = _x0_and_eps(scheduler, model_output, t, sample)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    return mean, std


def ddim_mean_std(scheduler, model_output, timestep, sample, eta):
    """μ and σ of the stochastic DDIM step (docs/ALGORITHMS.md §0), for terms between two policies' Gaussians at the
    same step, such as GRPO's KL to the base model (grpo.py)."""
    return _ddim_mean_std(scheduler, model_output, timestep, sample, eta)


def ddim_step(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """Deterministic DDIM (η = 0), differentiable w.r.t. the noise prediction and the sample: the step the
    gradient-based algorithms backpropagate through."""
    return _ddim_mean_std(scheduler, model_output, timestep, sample, 0.0)[0]


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None):
    """One DDIM step x_t → x_{t−1} and log p(x_{t−1} | x_t): the formulas of docs/ALGORITHMS.md §0, "DDIM step with
    log-probability" (x̂0, σ_t, μ, x_prev and log p, in that order).

    Same arithmetic as diffusers' `DDIMScheduler.step` (ε- or v-prediction, no clipping), but `timestep` may
    be a per-sample [B] tensor and the Gaussian's log-density is returned: averaged over C,H,W (not summed;
    DDPO's clip range ε = 1e-4 is calibrated to the mean). With `prev_sample` given (re-evaluating a stored
    trajectory) it is used instead of drawing one. `prev_sample` is returned detached: a constant, as the RL
    algorithms need; the log-prob is differentiable w.r.t. the model through μ. η = 0 is deterministic and
    has no density: log_prob is None (use `ddim_step` to backpropagate through a deterministic step).
    """
    mean, std = _ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        prev_sample = mean if eta == 0 else mean + std * randn(mean.shape, generator, mean.device)
    prev_sample = prev_sample.detach().to(mean.dtype)
    if eta == 0:
        return prev_sample, None
    # log N(x_prev; μ, σ_t²) per element, averaged over C,H,W: "log p" of docs/ALGORITHMS.md §0
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, mean.ndim)))


def predict_x0(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """The one-step prediction x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t (or its v-prediction form)."""
    return _x0_and_eps(scheduler, _at_least_f32(model_output), timestep, _at_least_f32(sample))[0]


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The forward process q(x_t | x0): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (t scalar or per-sample)."""
    alpha_t = _abar(scheduler, timestep, x0)
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """What the UNet is trained to output at x_t = add_noise(x0, ε, t): ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for a
    v-prediction model (diffusers' `get_velocity`)."""
    if scheduler.config.prediction_type == "v_prediction":
        alpha_t = _abar(scheduler, timestep, x0)
        return alpha_t.sqrt() * noise - (1 - alpha_t).sqrt() * x0
    return noise


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler configuration whose DDIM step differs from the one `ddim_step_with_logprob` computes:
    only ε- and v-prediction, without clipping or dynamic thresholding of x̂0 (both would change μ and the
    log-prob). The noise schedule itself (betas, ᾱ, spacing) is read from the scheduler, so any is fine."""
    from .errors import UserError

    cfg = scheduler.config
    problems = []
    if cfg.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        problems.append(f"prediction_type={cfg.prediction_type!r} (supported: epsilon, v_prediction)")
    if cfg.get("clip_sample", False):
        problems.append("clip_sample=True (x̂0 clipping)")
    if cfg.get("thresholding", False):
        problems.append("thresholding=True (dynamic thresholding of x̂0)")
    if problems:
        raise UserError(f"this model's scheduler config changes the DDIM step the algorithms differentiate: "
                        f"{'; '.join(problems)}")


def initial_latents(pipe, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_T ~ N(0, I) in float32, shaped for this pipeline's UNet."""
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return randn((batch_size, c, s, s), generator, pipe.unet.device)


@dataclass
class Trajectory:
    latents: torch.Tensor  # [B, T+1, C, H, W] float32: x_T ... x_0
    log_probs: torch.Tensor  # [B, T] log p_old(x_{t-1} | x_t, c)
    timesteps: torch.Tensor  # [T] the schedule, first (noisiest) to last


@torch.no_grad()
def sample_trajectory(pipe, cond, uncond, num_steps, guidance_scale, eta, latents=None, generator=None,
                      chunk_size: int | None = None) -> Trajectory:
    """Sample with the current policy, keeping what the RL algorithms train on: every latent, its log-prob
    and the timesteps. Latents are stored in float32 whatever the UNet's dtype, so that re-evaluating them
    with unchanged weights reproduces the stored log-probs (ratio 1). `chunk_size` bounds the images per UNet
    call (memory only: chunks are sampled one after the other and concatenated)."""
    n = cond.shape[0]
    if chunk_size is not None and chunk_size < n:
        parts = [sample_trajectory(pipe, cond[s : s + chunk_size], uncond, num_steps, guidance_scale, eta,
                                   None if latents is None else latents[s : s + chunk_size], generator)
                 for s in range(0, n, chunk_size)]
        return Trajectory(torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
                          parts[0].timesteps)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=cond.device)
    x = initial_latents(pipe, n, generator) if latents is None else latents.float()
    all_latents, log_probs = [x], []
    for t in scheduler.timesteps:
        noise_pred = guided_noise_pred(pipe, x, t, cond, uncond, guidance_scale)
        x, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, x, eta, generator=generator)
        all_latents.append(x)
        log_probs.append(log_prob)
    lp = torch.stack(log_probs, 1) if eta > 0 else torch.zeros(x.shape[0], 0, device=x.device)
    return Trajectory(torch.stack(all_latents, 1), lp, scheduler.timesteps.clone())


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decoding to images in [0, 1], [B, 3, H, W], float32 (or float64)."""
    vae = pipe.vae
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (_at_least_f32(images) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(pipe, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(μ, σ²) of images [B, 3, H, W] in [0, 1], in the UNet's latent scale (× scaling_factor),
    float32: what a latent diffusion model is trained on (x0 = μ + σ·z)."""
    vae = pipe.vae
    posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return _at_least_f32(posterior.mean) * scale, _at_least_f32(posterior.std) * scale


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, num_steps: int, guidance_scale: float, eta: float = 0.0):
    """Images for fixed prompts and a fixed seed (sample grids, evaluation): same seed, same initial noise."""
    generator = torch.Generator().manual_seed(seed)
    cond = encode_prompts(pipe, prompts)
    uncond = encode_prompts(pipe, [""])
    traj = sample_trajectory(pipe, cond, uncond, num_steps, guidance_scale, eta, generator=generator)
    return decode(pipe, traj.latents[:, -1])
