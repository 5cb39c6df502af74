"""The DDIM room (SD1.x, SD2.x, SDXL): ε- or v-prediction on a discrete ᾱ schedule (docs/ALGORITHMS.md §0).

Every function takes the pipeline's `DDIMScheduler` first; common/diffusion.py calls them through `sampler(scheduler)`,
beside the flow-matching room with the same names. t is a scalar or a per-sample [B] tensor; model output and sample
arrive in one dtype, at least float32 (common/diffusion.py promotes them)."""

from __future__ import annotations

import torch


def abar(scheduler, timestep, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t shaped to broadcast against `like` [B, ...]; t scalar or per-sample [B]; t < 0 (the step after the
    last) is the scheduler's final ᾱ (SD1.4: set_alpha_to_one=False, so ᾱ_0)."""
    t = torch.as_tensor(timestep, device=like.device).long()
    t = t.expand(like.shape[0]) if t.ndim == 0 else t
    alphas = scheduler.alphas_cumprod.to(like.device, torch.promote_types(like.dtype, torch.float32))
    abar = torch.where(t >= 0, alphas[t.clamp(min=0)], scheduler.final_alpha_cumprod.to(alphas))
    return abar.view(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(scheduler, model_output, timestep, sample):
    """x̂0 and ε̂ from the model's output, for ε-prediction (SD1.x) or v-prediction (SD2.x, Salimans & Ho 2022:
    v = √ᾱ·ε − √(1−ᾱ)·x0, so x0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √ᾱ·v + √(1−ᾱ)·x_t), as diffusers' DDIM step does.
    `check_scheduler` refuses every other prediction type before training."""
    alpha_t = abar(scheduler, timestep, sample)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output, \
            alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
    return (sample - (1 - alpha_t).sqrt() * model_output) / alpha_t.sqrt(), model_output


def mean_std(scheduler, model_output, timestep, sample, eta):
    """μ and σ of the DDIM step x_t → x_{t−1} (Song et al. 2021, eq. 12), t scalar or per-sample [B]."""
    t = torch.as_tensor(timestep, device=sample.device).long()
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t, alpha_prev = abar(scheduler, t, sample), abar(scheduler, t - step, sample)

    x0, eps = x0_and_eps(scheduler, model_output, t, sample)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    return mean, std


def predict_x0(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """The one-step prediction x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t (or its v-prediction form)."""
    return x0_and_eps(scheduler, model_output, timestep, sample)[0]


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The forward process q(x_t | x0): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (t scalar or per-sample)."""
    alpha_t = abar(scheduler, timestep, x0)
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """What the UNet is trained to output at x_t = add_noise(x0, ε, t): ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for a
    v-prediction model (diffusers' `get_velocity`)."""
    if scheduler.config.prediction_type == "v_prediction":
        alpha_t = abar(scheduler, timestep, x0)
        return alpha_t.sqrt() * noise - (1 - alpha_t).sqrt() * x0
    return noise


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler configuration whose DDIM step differs from the one `mean_std` computes:
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
