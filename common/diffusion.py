"""The sampling mechanics every algorithm shares: prompt encoding, the guided policy, the sampler's step with its
log-probability, a no-grad trajectory sampler for the RL scripts, and differentiable decoding.

The model family is read from the pipeline, never from a flag (DESIGN.md, "Model families"). What differs lives in
one room (module) per family, and the functions here call the room of the pipeline or scheduler at hand:
- how prompts become conditioning and how the denoiser is called: `family(pipe)` → common/sd.py (SD1.x/SD2.x),
  common/sdxl.py (SDXL), common/sd3.py (SD3.x), …
- the step and its log-prob, x̂0, the forward process and the regression target: `sampler(scheduler)` →
  common/ddim.py (DDIM on ᾱ, ε- or v-prediction), common/flow.py (rectified flow, Flow-GRPO's SDE), …
The conditioning is one tensor [B, L, D] per prompt batch whatever the family, so the scripts index, shard and
concatenate it as they always did.

A family's room defines `denoiser(pipe)`, `lora_targets(targets)` (the scripts' SD1.x layer names → its denoiser's),
`encode_prompts(pipe, prompts)`, `predict(pipe, x, t, emb)`, where a kohya format exists for it (SD1.x, SDXL; not
SD3) `kohya_modules(pipe, modules)` and `kohya_metadata(pipe)`; optionally `PRETRAINED_KWARGS` (extra
`from_pretrained` arguments, default none) and `HONOURS_FORCE_UPCAST` (whether its pipeline decodes an fp16 VAE in
float32 when the VAE's config says `force_upcast`, default no)."""

from __future__ import annotations

import importlib
import math
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .distributed import randn  # draws on the generator's device; under torchrun, sharded from the global batch

# pipeline class → the room (module of common/) with its conditioning and denoiser call
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
# scheduler class → the room with its step, x̂0, forward process and regression target
SAMPLERS = {"DDIMScheduler": "ddim", "FlowMatchEulerDiscreteScheduler": "flow"}


def family(pipe):
    """The room of this pipeline's model family (common/sd.py, common/sdxl.py, …)."""
    return family_of(type(pipe).__name__)


def family_of(pipeline_class: str):
    """The room of a pipeline class named `pipeline_class` (a model folder's model_index.json `_class_name`)."""
    return _room(FAMILIES, pipeline_class, "a model family these scripts train (supported pipelines")


def sampler(scheduler):
    """The room of this scheduler's sampler (common/ddim.py, …)."""
    return _room(SAMPLERS, type(scheduler).__name__, "a sampler these scripts differentiate (supported")


def _room(table: dict, class_name: str, what: str):
    from .errors import UserError

    if class_name not in table:
        raise UserError(f"{class_name} is not {what}: {', '.join(table)})")
    return importlib.import_module(f".{table[class_name]}", __package__)


def denoiser(pipe) -> torch.nn.Module:
    """The network the LoRA trains: SD's UNet (`pipe.unet`), or a flow model's transformer."""
    return family(pipe).denoiser(pipe)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    # half-precision UNet/VAE outputs are promoted to float32; float64 (the gradient tests) is kept
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _promoted(model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # both in the wider dtype, at least float32: a float64 UNet's step from float32 initial noise takes ᾱ in float64,
    # as re-evaluating the stored (then float64) latent does
    dtype = torch.promote_types(_at_least_f32(sample).dtype, _at_least_f32(model_output).dtype)
    return model_output.to(dtype), sample.to(dtype)


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
    """The conditioning of `prompts` as the family's pipeline computes it, one tensor [B, L, D] (SD1.4: CLIP's last
    hidden state over 77 tokens, [B, 77, 768]); longer prompts are truncated, with a warning the first time in a run."""
    _warn_if_truncated(pipe, prompts)
    return family(pipe).encode_prompts(pipe, prompts)


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
    room = family(pipe)
    b = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device)
    t = t.expand(b) if t.ndim == 0 else t
    # the base weights' dtype (the first parameter is a base weight, never a LoRA factor); `module.dtype` walks every
    # module, per call
    dtype = next(room.denoiser(pipe).parameters()).dtype
    x = torch.cat([latents, latents]).to(dtype)
    emb = torch.cat([uncond.expand(b, -1, -1), cond]).to(dtype)

    def call(x, t, emb):
        return room.predict(pipe, x, t, emb)

    if use_checkpoint and torch.is_grad_enabled():
        out = checkpoint(call, x, torch.cat([t, t]), emb, use_reentrant=False)
    else:
        out = call(x, torch.cat([t, t]), emb)
    noise_pred_uncond, noise_pred_text = _at_least_f32(out).chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def step_mean_std(scheduler, model_output, timestep, sample, eta):
    """μ and σ of the sampler's stochastic step x_t → x_{t−1} (DDIM: docs/ALGORITHMS.md §0), for terms between two
    policies' Gaussians at the same step, such as the KL to the base model (grpo.py)."""
    model_output, sample = _promoted(model_output, sample)
    return sampler(scheduler).mean_std(scheduler, model_output, timestep, sample, eta)


def step(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """The deterministic step (DDIM η = 0), differentiable w.r.t. the model's output and the sample: the step the
    gradient-based algorithms backpropagate through."""
    return step_mean_std(scheduler, model_output, timestep, sample, 0.0)[0]


def step_with_logprob(scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None):
    """One sampler step x_t → x_{t−1} and log p(x_{t−1} | x_t): for DDIM the formulas of docs/ALGORITHMS.md §0,
    "DDIM step with log-probability" (x̂0, σ_t, μ, x_prev and log p, in that order).

    Same arithmetic as diffusers' `DDIMScheduler.step` (ε- or v-prediction, no clipping), but `timestep` may
    be a per-sample [B] tensor and the Gaussian's log-density is returned: averaged over C,H,W (not summed;
    DDPO's clip range ε = 1e-4 is calibrated to the mean). With `prev_sample` given (re-evaluating a stored
    trajectory) it is used instead of drawing one. `prev_sample` is returned detached: a constant, as the RL
    algorithms need; the log-prob is differentiable w.r.t. the model through μ. η = 0 is deterministic and
    has no density: log_prob is None (use `step` to backpropagate through a deterministic step).
    """
    mean, std = step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        prev_sample = mean if eta == 0 else mean + std * randn(mean.shape, generator, mean.device)
    prev_sample = prev_sample.detach().to(mean.dtype)
    if eta == 0:
        return prev_sample, None
    # log N(x_prev; μ, σ_t²) per element, averaged over C,H,W: "log p" of docs/ALGORITHMS.md §0
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, mean.ndim)))


def predict_x0(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """The one-step prediction x̂0 from the model's output at x_t (DDIM: (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t)."""
    model_output, sample = _promoted(model_output, sample)
    return sampler(scheduler).predict_x0(scheduler, model_output, timestep, sample)


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The forward process q(x_t | x0) at t (scalar or per-sample) (DDIM: √ᾱ_t·x0 + √(1−ᾱ_t)·ε)."""
    return sampler(scheduler).add_noise(scheduler, x0, noise, timestep)


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """What the denoiser is trained to output at x_t = add_noise(x0, ε, t) (DDIM: ε, or v for v-prediction)."""
    return sampler(scheduler).denoising_target(scheduler, x0, noise, timestep)


def check_scheduler(scheduler) -> None:
    """Refuse (UserError) a scheduler whose step differs from the one the algorithms differentiate."""
    sampler(scheduler).check_scheduler(scheduler)


def initial_latents(pipe, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_T ~ N(0, I) in float32, shaped for this pipeline's denoiser (UNet or transformer)."""
    net = denoiser(pipe)
    c, s = net.config.in_channels, net.config.sample_size
    return randn((batch_size, c, s, s), generator, net.device)


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
        x, log_prob = step_with_logprob(scheduler, noise_pred, t, x, eta, generator=generator)
        all_latents.append(x)
        log_probs.append(log_prob)
    lp = torch.stack(log_probs, 1) if eta > 0 else torch.zeros(x.shape[0], 0, device=x.device)
    return Trajectory(torch.stack(all_latents, 1), lp, scheduler.timesteps.clone())


def _vae(pipe):
    """The VAE, moved to float32 for good (once) where the family's pipeline would decode in float32: fp16 weights and
    a config that says `force_upcast` (SDXL's VAE overflows in fp16). StableDiffusionXLPipeline upcasts it for each
    decode and casts it back; here a cast back would copy the VAE twice per call and make a checkpointed decoder
    recompute in fp16. Its 84 M parameters cost 0.2 GB more in float32."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", False) \
            and getattr(family(pipe), "HONOURS_FORCE_UPCAST", False):
        vae.to(torch.float32)
    return vae
def _vae_shift(vae) -> float:
    # SD3's VAE latents are (z − shift_factor)·scaling_factor; SD1.x/SDXL have no shift (None in their configs)
    return vae.config.get("shift_factor") or 0.0


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decoding to images in [0, 1], [B, 3, H, W], float32 (or float64)."""
    vae = _vae(pipe)
    images = vae.decode((latents / vae.config.scaling_factor + _vae_shift(vae)).to(vae.dtype)).sample
    return (_at_least_f32(images) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(pipe, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(μ, σ²) of images [B, 3, H, W] in [0, 1], in the denoiser's latent scale ((z − shift_factor)
    × scaling_factor), float32: what a latent diffusion model is trained on (x0 = μ + σ·z)."""
    vae = _vae(pipe)
    posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return (_at_least_f32(posterior.mean) - _vae_shift(vae)) * scale, _at_least_f32(posterior.std) * scale


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, num_steps: int, guidance_scale: float, eta: float = 0.0):
    """Images for fixed prompts and a fixed seed (sample grids, evaluation): same seed, same initial noise."""
    generator = torch.Generator().manual_seed(seed)
    cond = encode_prompts(pipe, prompts)
    uncond = encode_prompts(pipe, [""])
    traj = sample_trajectory(pipe, cond, uncond, num_steps, guidance_scale, eta, generator=generator)
    return decode(pipe, traj.latents[:, -1])
