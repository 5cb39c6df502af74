"""Does half precision keep the gradient? One update's LoRA gradient with fp16 (loss-scaled) and bf16 base weights
against float32's, as a cosine (issue 11). Shared by tests/test_precision.py (`tiny` on the CPU, scaled to SD1.4's
sizes) and benchmark/gpu_check.py (`sd14-random` on CUDA, at SD1.4's real sizes), so both compute the same thing.

The loss terms are scaled to what a published update gives them: every loss here is linear in its advantages (or
reward), so multiplying them by (sizes computed) / (SD1.4's sizes of a real update) gives the per-element gradient a
real update has at the UNet's output (DDPO: about 4e-8, below fp16's smallest subnormal, 6e-8), which is what decides
whether fp16 keeps it. On SD1.4's own sizes the factor of the model's size is 1.
"""

from __future__ import annotations

import torch

import common

D_SD14, PIXELS_SD14 = 4 * 64 * 64, 512 * 512  # latent elements and pixels of SD1.4 at 512 px
HALF = (torch.float16, torch.bfloat16)


def randomize_lora(pipe, std=0.05, seed=0):
    """Give the zero-initialised LoRA B matrices non-zero values so that the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in common.lora_parameters(pipe):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * std)


def precision_pipes(model: str = "tiny", device="cpu", resolution: int | None = None) -> dict:
    """`model` with float32, fp16 and bf16 base weights (the same weights, rounded) and one randomized LoRA."""
    out = {dtype: common.load_pipeline(model, lora_rank=4, device=device, dtype=dtype, resolution=resolution)
           for dtype in (torch.float32, *HALF)}
    randomize_lora(out[torch.float32], std=0.05)
    for dtype in HALF:
        for p, q in zip(common.lora_parameters(out[torch.float32]), common.lora_parameters(out[dtype])):
            q.data.copy_(p.data)
    return out


def cosine(a, b):
    # not torch's cosine_similarity: it clamps ‖a‖·‖b‖ at 1e-8, and these gradients have norms of about 1e-8
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def lora_gradient(pipe, backward, loss_scaling: bool | None = None) -> torch.Tensor:
    """The flat LoRA gradient of one update: `backward(guard)` accumulates it, then the guard unscales. Loss scaling
    in fp16 unless `loss_scaling` says otherwise (False: the control that shows what fp16 loses without it)."""
    params = common.lora_parameters(pipe)
    for p in params:
        p.grad = None
    if loss_scaling is None:
        loss_scaling = next(common.denoiser(pipe).parameters()).dtype == torch.float16
    guard = common.UpdateGuard(1, loss_scaling=loss_scaling)
    backward(guard)
    guard.clip_grad_norm_(torch.optim.SGD(params), 0.0)  # the optimizer only names the gradients to unscale
    return torch.cat([p.grad.flatten() for p in params])


def half_precision_cosines(pipes: dict, backward_for) -> tuple[torch.Tensor, dict]:
    """float32's gradient, and the cosine of fp16's (loss-scaled) and bf16's with it; `backward_for(pipe)` gives the
    update's `backward(guard)` on that pipeline."""
    reference = lora_gradient(pipes[torch.float32], backward_for(pipes[torch.float32]))
    return reference, {dtype: cosine(lora_gradient(pipes[dtype], backward_for(pipes[dtype])), reference)
                       for dtype in HALF}


def latent_elements(pipe) -> int:
    net = common.denoiser(pipe)
    return net.config.in_channels * net.config.sample_size**2


def policy_gradient_backward(module, pipe, traj, cond, uncond, j: int, n_t: int, args, advantages=(1.0, -0.7)):
    """`backward(guard)` of one timestep (index j) of an RL script's loss (`module.accumulate_gradient`) over the
    samples of `traj`, as a real update weighs it: the advantages × 1/(n·T) of the published n·T = `n_t` pairs
    averaged over, and × this model's latent elements / SD1.4's (log-probs are means over them)."""
    n = cond.shape[0]
    device = cond.device
    scaled = torch.tensor(advantages, device=device) * (n * latent_elements(pipe)) / (n_t * D_SD14)
    samples, timestep_idx = torch.arange(n, device=device), torch.full((n, 1), j, device=device)
    pipe.scheduler.set_timesteps(args.num_inference_steps)
    return lambda guard: module.accumulate_gradient(pipe, traj, cond, uncond, scaled, samples, timestep_idx, guard,
                                                    args)


def pixel_mean_reward(scale: float, size: int = 32):
    """A reward averaged over the pixels, like a reward model's: its per-pixel gradient is ∝ 1/pixels, × `scale`."""
    w = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1))

    def reward(images, prompts):
        return (images.float() * w.to(images.device)).mean(dim=(1, 2, 3)) * scale
    return reward


def gradient_inputs(pipe, n: int = 2, copies: int = 2):
    """The prompts, initial latents and DRaFT-LV's noises of one update of a gradient script, seeded."""
    net = common.denoiser(pipe)
    c, s = net.config.in_channels, net.config.sample_size
    device = net.device
    latents = torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(2)).to(device)
    noises = [torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(3 + i)).to(device)
              for i in range(copies)]
    return ["a cat", "a dog", "a cow", "a fox"][:n], latents, noises


def reward_gradient_backward(module, pipe, prompts, latents, noises, args, extra=(), published_batch: int = 4):
    """`backward(guard)` of a gradient script's update (`module.accumulate_gradient`: backprop through the last steps
    and the VAE decoder) under `pixel_mean_reward`, scaled from this model's pixels and this batch to SD1.4's 512²
    pixels and the published batch. `noises` are DRaFT-LV's (ignored by the others)."""
    size = common.denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    reward_fn = pixel_mean_reward(size * size / PIXELS_SD14 * len(prompts) / published_batch, size)
    cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, [""])
    more = (noises,) if module.__name__ == "draft_lv" else ()
    return lambda guard: module.accumulate_gradient(pipe, reward_fn, prompts, cond, uncond, latents, *more, guard,
                                                    args, *extra)
