"""Gradients through the sampling chain: checkpointed = plain (exactly), and finite differences in float64."""

import torch

import common
from conftest import directional_derivatives, randomize_lora


def chain_reward(pipe, weights, num_steps=5, window=3, use_checkpoint=False, dtype=torch.float32):
    """DDIM η=0 from fixed noise; the last `window` steps with gradient; decode; a fixed linear reward."""
    cond = common.encode_prompts(pipe, ["a red cube", "a dog"]).to(dtype)
    uncond = common.encode_prompts(pipe, [""]).to(dtype)
    pipe.scheduler.set_timesteps(num_steps)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    for i, t in enumerate(pipe.scheduler.timesteps):
        with torch.set_grad_enabled(i >= num_steps - window):
            noise_pred = common.guided_noise_pred(pipe, x, t, cond, uncond, 7.5, use_checkpoint=use_checkpoint)
            noise_pred = noise_pred.to(dtype)
            x = common.step(pipe.scheduler, noise_pred, t, x)
    images = common.decode(pipe, x.to(pipe.vae.dtype))
    return (images.to(weights.dtype) * weights).sum()


def lora_grads(pipe):
    return [p.grad.clone() for p in common.lora_parameters(pipe)]


def test_step_is_diffusers_step_and_differentiable():
    from diffusers import DDIMScheduler

    from common.models import SD14_SCHEDULER

    s = DDIMScheduler(**SD14_SCHEDULER)
    s.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    for t in s.timesteps:
        ours = common.step(s, eps, t, x)
        torch.testing.assert_close(ours, s.step(eps, t, x, eta=0.0).prev_sample)
    ours.sum().backward()
    assert x.grad.abs().sum() > 0 and eps.grad.abs().sum() > 0


def test_checkpointed_equals_plain_gradients(tiny_pipe):
    randomize_lora(tiny_pipe)
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}
    forward = tiny_pipe.unet.forward

    def counting_forward(*args, **kwargs):  # module hooks are muted during checkpoint recomputation
        calls["n"] += 1
        return forward(*args, **kwargs)

    tiny_pipe.unet.forward = counting_forward

    chain_reward(tiny_pipe, weights, use_checkpoint=False).backward()
    plain, plain_calls = lora_grads(tiny_pipe), calls["n"]
    tiny_pipe.unet.zero_grad(set_to_none=True)
    calls["n"] = 0
    chain_reward(tiny_pipe, weights, use_checkpoint=True).backward()
    ckpt, ckpt_calls = lora_grads(tiny_pipe), calls["n"]

    assert plain_calls == 5 and ckpt_calls == 5 + 3  # the 3 checkpointed calls are recomputed in backward
    assert sum(g.abs().sum() for g in plain) > 0
    # the checkpointed calls recompute the same operations in the same layout: the same gradient to the last bit
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_finite_differences_float64(tiny_pipe):
    pipe = tiny_pipe
    pipe.unet.to(torch.float64)
    pipe.vae.to(torch.float64)
    pipe.text_encoder.to(torch.float64)
    randomize_lora(pipe, std=0.02)
    params = common.lora_parameters(pipe)
    assert all(p.dtype == torch.float64 for p in params)
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    f = lambda: chain_reward(pipe, weights, window=5, use_checkpoint=True, dtype=torch.float64)  # noqa: E731
    analytic, numeric = directional_derivatives(f, params, seed=3)
    assert abs(analytic) > 1e-3
    assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)
