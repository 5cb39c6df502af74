"""The flow-matching room (SD3.x): rectified flow x_σ = (1 − σ)·x0 + σ·ε, a model predicting the velocity v ≈ ε − x0,
sampled from σ = 1 to 0 on `FlowMatchEulerDiscreteScheduler`'s shifted sigmas (docs/ALGORITHMS.md §9).

The same functions as common/ddim.py, called by common/diffusion.py through `sampler(scheduler)`. The stochastic step is
Flow-GRPO's SDE (Liu et al. 2025, yifan123/flow_grpo, `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`); its noise
level a is the scripts' `eta` (a = 0: the deterministic Euler ODE step, exactly `FlowMatchEulerDiscreteScheduler.step`).

σ of a timestep: timesteps are σ·num_train_timesteps (the scheduler's definition, and what the transformer is conditioned
on). A timestep of the current schedule takes its σ from `scheduler.sigmas` (the very value diffusers' step uses); any
other timestep (RWR's integer t ~ U{0..999}) σ = t / num_train_timesteps, so the noise level and the transformer's
timestep always agree. σ_next (the step's target) exists only on the schedule."""

from __future__ import annotations

import torch


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.promote_types(like.dtype, torch.float32)).view(-1, *([1] * (like.ndim - 1)))


def _schedule_index(scheduler, timestep, like):
    """(t as a [B] float tensor, index of each t in `scheduler.timesteps`, whether it is there)."""
    t = torch.as_tensor(timestep, device=like.device).float()
    t = t.expand(like.shape[0]) if t.ndim == 0 else t
    match = scheduler.timesteps.to(t.device)[None, :] == t[:, None]
    return t, match.int().argmax(1), match.any(1)


def sigma(scheduler, timestep, like: torch.Tensor) -> torch.Tensor:
    """σ_t shaped to broadcast against `like` [B, ...] (see the module's docstring for off-schedule t)."""
    t, index, on = _schedule_index(scheduler, timestep, like)
    sigmas = scheduler.sigmas.to(t.device)
    return _column(torch.where(on, sigmas[index], t / scheduler.config.num_train_timesteps), like)


def mean_std(scheduler, model_output, timestep, sample, eta):
    """μ and σ of Flow-GRPO's SDE step x_σ → x_σ' (docs/ALGORITHMS.md §9), t scalar or per-sample [B]:
    s = a·√(σ / (1 − σ)) (σ = 1 at the first step: 1 − σ is replaced by 1 − sigmas[1], as Flow-GRPO does),
    μ = x·(1 + s²·Δ/(2σ)) + v·(1 + s²·(1 − σ)/(2σ))·Δ and std = s·√(−Δ) with Δ = σ' − σ < 0."""
    t, index, on = _schedule_index(scheduler, timestep, sample)
    if not bool(on.all()):
        raise ValueError(f"timestep {t[~on][0].item()} is not on the scheduler's current schedule "
                         f"{scheduler.timesteps.tolist()} (call set_timesteps first)")
    sigmas = scheduler.sigmas.to(sample.device)
    s, s_next = _column(sigmas[index], sample), _column(sigmas[index + 1], sample)
    dt = s_next - s
    # the first step's σ = 1 would divide by zero; Flow-GRPO's std there uses the next sigma below 1 (sigma_max)
    level = eta * (s / (1 - torch.where(s == 1, sigmas[1].to(s), s))).sqrt()
    mean = sample * (1 + level**2 / (2 * s) * dt) + model_output * (1 + level**2 * (1 - s) / (2 * s)) * dt
    return mean, level * (-dt).sqrt()


def predict_x0(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """x̂0 = x_σ − σ·v (the velocity's endpoint: `FlowMatchEulerDiscreteScheduler`'s x0 in its stochastic step)."""
    return sample - sigma(scheduler, timestep, sample) * model_output


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The forward process x_σ = (1 − σ)·x0 + σ·ε (`FlowMatchEulerDiscreteScheduler.scale_noise`)."""
    s = sigma(scheduler, timestep, x0)
    return (1 - s) * x0 + s * noise


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The velocity v = dx_σ/dσ = ε − x0 the transformer is trained to output (SD3's flow-matching loss)."""
    return noise - x0


def check_scheduler(scheduler) -> None:
    """Refuse a configuration whose step differs from `mean_std`'s Euler step on the scheduler's sigmas: dynamic
    shifting (its sigmas depend on a resolution-dependent μ that `set_timesteps(n)` is not given), stochastic sampling
    (a different step), inverted sigmas (Mochi's convention, σ = 0 is noise). Any other sigma schedule (shift,
    shift_terminal, Karras/exponential/beta sigmas) is read from `scheduler.sigmas`, so it is fine."""
    from .errors import UserError

    cfg = scheduler.config
    problems = [f"{name}=True" for name in ("use_dynamic_shifting", "stochastic_sampling", "invert_sigmas")
                if cfg.get(name, False)]
    if problems:
        raise UserError(f"this model's scheduler config changes the flow-matching step the algorithms "
                        f"differentiate: {'; '.join(problems)}")
