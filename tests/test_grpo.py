"""GRPO (grpo.py), each piece against an independent computation: group-relative advantages against a group-by-group
recomputation, the first minibatch's gradient against DDPO-IS's, the KL to the base model against torch.distributions
on a separately built base model, the shared initial noise, and the refusal of a batch of partial groups. (The
per-script tests run grpo.py through its command line with its KL and shared noise: conftest.SCRIPTS.)"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import common
import ddpo_is
import grpo
from conftest import U32, U64, ROOT, float64_scheduler, randomize_lora, read_metrics, rounding_tolerance, roundings
from test_rl_algorithms import GUARD, lora_grads, on_policy


def small_args(**kw):
    """Args of a small batch: sampled in chunks of 2, one minibatch, trained in chunks of 2."""
    return grpo.Args(**(dict(sample_batch_size=2, num_minibatches=1, train_batch_size=2) | kw))


def reference_advantages(r, group_size, global_std, clip):
    """(r − mean of its group) / (population std of its group, or of the batch, + 1e-4), clipped; written out."""
    def mean_std(values):
        m = sum(values) / len(values)
        return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))

    out = []
    for start in range(0, len(r), group_size):
        group = list(r[start : start + group_size])
        mean, std = mean_std(group)
        if global_std:
            std = mean_std(list(r))[1]
        out += [min(clip, max(-clip, (v - mean) / (std + 1e-4))) for v in group]
    return np.array(out)


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("clip", [1e9, 0.9])
def test_group_advantages(global_std, clip):
    r = np.random.default_rng(0).normal(size=12) * 3 + 1
    r[4:8] = 2.5  # a group whose rewards are all equal
    args = small_args(batch_size=12, group_size=4, global_std=global_std, adv_clip_max=clip)
    got = grpo.compute_advantages(r, args).numpy()
    np.testing.assert_allclose(got, reference_advantages(r, 4, global_std, clip), rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all() and (got[4:8] == 0).all()
    if clip < 10:  # the clip was exercised
        assert (np.abs(reference_advantages(r, 4, global_std, 1e9)) > clip).any() and np.abs(got).max() == clip
    # a batch of equal rewards: no NaN, every advantage 0
    assert (grpo.compute_advantages(np.full(12, -3.7), args).numpy() == 0).all()


def test_batch_of_whole_groups_and_flags_refused():
    with pytest.raises(common.UserError, match="--batch-size 12 must be a multiple of --group-size 8"):
        small_args(batch_size=12, group_size=8)
    with pytest.raises(common.UserError, match="--group-size must be > 0"):
        grpo.Args(group_size=0)
    with pytest.raises(common.UserError, match="--kl-beta must be >= 0"):
        grpo.Args(kl_beta=-0.1)


def one_prompt_batch(pipe, n, num_steps, seed=0):
    """n images of one prompt: a single group (G·P = n with P = 1)."""
    cond = common.encode_prompts(pipe, ["a cat"] * n)
    uncond = common.encode_prompts(pipe, [""])
    g = torch.Generator().manual_seed(seed)
    traj = common.sample_trajectory(pipe, cond, uncond, num_steps, 5.0, 1.0, generator=g)
    return cond, uncond, traj


def test_first_minibatch_gradient_equals_ddpo_is(tiny_pipe):
    """One prompt per batch, G = the batch, no KL: the group statistics are the batch's, and the first minibatch's
    gradient is DDPO-IS's (batch-normalised advantages) for the same data."""
    randomize_lora(tiny_pipe)
    n, num_steps = 4, 3
    cond, uncond, traj = one_prompt_batch(tiny_pipe, n, num_steps)
    reward = np.array([12.0, -3.5, 7.25, 30.0])
    g_args = small_args(batch_size=n, group_size=n, guidance_scale=5.0, eta=1.0)
    d_args = ddpo_is.Args(batch_size=n, sample_batch_size=2, num_minibatches=1, train_batch_size=2,
                          per_prompt_stat_tracking=False, guidance_scale=5.0, eta=1.0)
    a_grpo = grpo.compute_advantages(reward, g_args)
    a_ddpo = ddpo_is.compute_advantages(["a cat"] * n, reward, None, d_args)
    # (r − mean) / (std + ε), computed in float64 and rounded once to float32, with ε = 1e-4 against 1e-6: their
    # ratio is (std + 1e-6) / (std + 1e-4), about 8e-6 from 1 for this std of 12, plus the two roundings
    torch.testing.assert_close(a_grpo, a_ddpo, rtol=(1e-4 - 1e-6) / (reward.std() + 1e-4) + 3 * U32, atol=0)

    g = torch.Generator().manual_seed(1)
    samples = torch.randperm(n, generator=g)
    timestep_idx = torch.stack([torch.randperm(num_steps, generator=g) for _ in range(n)])
    traj = on_policy(tiny_pipe, traj, cond, uncond, samples, timestep_idx, d_args)  # ratio 1 exactly: no clipping
    ddpo_stats = ddpo_is.accumulate_gradient(tiny_pipe, traj, cond, uncond, a_ddpo, samples, timestep_idx, GUARD,
                                             d_args)
    reference = lora_grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)
    # the same advantages: without a KL term GRPO computes DDPO-IS's operations in its layout, equal to the last bit
    stats = grpo.accumulate_gradient(tiny_pipe, traj, cond, uncond, a_ddpo, samples, timestep_idx, GUARD, g_args)
    ours = lora_grads(tiny_pipe)

    assert "kl" not in stats and stats["clipfrac"] == 0.0 == ddpo_stats["clipfrac"]
    assert float(stats["loss"]) == float(ddpo_stats["loss"])
    assert all(a.abs().max() > 0 for a in reference)
    assert all(torch.equal(b, a) for a, b in zip(reference, ours))


# ------------------------------------------------------------------------------------------- KL to the base model


def fixed_step(pipe, num_steps=5):
    """Two latents at their own timesteps (per-sample t, as in training), their prompts, the guided policy ε̂."""
    pipe.scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = pipe.scheduler.timesteps[torch.tensor([1, 4])]
    cond, uncond = common.encode_prompts(pipe, ["a cat", "a dog"]), common.encode_prompts(pipe, [""])
    return x, t, cond, uncond


def guided_unet(unet, x, t, cond, uncond, w):
    """ε(∅) + w·(ε(c) − ε(∅)) from two separate UNet calls."""
    e_c = unet(x, t, encoder_hidden_states=cond).sample
    e_u = unet(x, t, encoder_hidden_states=uncond.expand(len(x), -1, -1)).sample
    return e_u + w * (e_c - e_u)


def test_kl_is_zero_while_the_lora_is_zero(tiny_pipe):
    x, t, cond, uncond = fixed_step(tiny_pipe)
    args = grpo.Args(guidance_scale=5.0, eta=1.0)
    noise_pred = common.guided_noise_pred(tiny_pipe, x, t, cond, uncond, args.guidance_scale)
    kl = common.kl_to_base(tiny_pipe, x, t, cond, uncond, noise_pred, args.guidance_scale, args.eta)
    assert kl.item() == 0.0  # B = 0: the adapted UNet is the base model exactly
    kl.backward()
    assert all((p.grad == 0).all() for p in common.lora_parameters(tiny_pipe))


def test_kl_equals_gaussian_kl_against_a_separate_base_model(tiny_pipe):
    """The closed form against torch.distributions' KL of N(μ_θ, σ²) and N(μ_ref, σ²), per element and averaged;
    μ from diffusers' DDIMScheduler.step with zero noise, μ_ref from a base model loaded without a LoRA, σ written
    out from ᾱ."""
    randomize_lora(tiny_pipe, seed=3)
    # float64 on both sides: the KL measures the difference of two means about 1e-3 apart (relative), which float32's
    # rounding of each (about 1e-4 at most, conftest) would leave only a digit of
    tiny_pipe.unet.to(torch.float64)
    tiny_pipe.scheduler = float64_scheduler(tiny_pipe.scheduler)
    x, t, cond, uncond = (v.double() if v.is_floating_point() else v for v in fixed_step(tiny_pipe))
    args = grpo.Args(guidance_scale=5.0, eta=0.8)
    noise_pred = common.guided_noise_pred(tiny_pipe, x, t, cond, uncond, args.guidance_scale)
    ours = common.kl_to_base(tiny_pipe, x, t, cond, uncond, noise_pred, args.guidance_scale, args.eta)
    assert ours.dtype == torch.float64

    base = common.load_pipeline("tiny", lora_rank=0)
    base.unet.to(torch.float64)
    scheduler = float64_scheduler(base.scheduler)
    scheduler.set_timesteps(5)
    with torch.no_grad():
        noise_pred_theta = guided_unet(tiny_pipe.unet, x, t, cond, uncond, args.guidance_scale)
        noise_pred_ref = guided_unet(base.unet, x, t, cond, uncond, args.guidance_scale)
    assert (noise_pred_theta - noise_pred_ref).abs().max() > 1e-3  # the LoRA changes the model
    reference = []
    for b in range(2):
        def mean(e):
            return scheduler.step(e[b : b + 1], t[b], x[b : b + 1], eta=args.eta,
                                  variance_noise=torch.zeros_like(x[:1])).prev_sample

        prev = int(t[b]) - 1000 // 5  # below 0 after the last step: the scheduler's final ᾱ
        a_t = scheduler.alphas_cumprod[t[b]]
        a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        sigma = args.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        p_theta, p_ref = Normal(mean(noise_pred_theta), sigma), Normal(mean(noise_pred_ref), sigma)
        reference.append(kl_divergence(p_theta, p_ref).mean())
    assert ours.item() > 0
    # Four float64 UNet evaluations (θ and the base, ours and the reference's), each within t = conftest's bound of
    # its exact value (normwise over the batch), move each sample's difference of means by 4t·‖ε̂‖ at most, and its
    # KL, quadratic in it, by twice that relative to its ‖ε̂_θ − ε̂_base‖ (the step's coefficient scales both alike).
    t64 = rounding_tolerance(roundings(tiny_pipe.unet), gain=2 * args.guidance_scale - 1, u=U64)
    rtol = 2 * 4 * t64 * float(noise_pred_theta.norm() / (noise_pred_theta - noise_pred_ref).flatten(1).norm(dim=1).min())
    torch.testing.assert_close(ours.detach(), torch.stack(reference).mean(), rtol=rtol, atol=0)


def test_kl_gradient_pulls_toward_the_base_model(tiny_pipe):
    """One normalised gradient step on the KL alone brings the LoRA's output closer to the base output; the LoRA is
    enabled and trainable again after the base model's forward."""
    randomize_lora(tiny_pipe, seed=5)
    x, t, cond, uncond = fixed_step(tiny_pipe)
    args = grpo.Args(guidance_scale=5.0, eta=1.0)
    params = common.lora_parameters(tiny_pipe)
    base = common.load_pipeline("tiny", lora_rank=0)

    def distance():
        with torch.no_grad():
            return (guided_unet(tiny_pipe.unet, x, t, cond, uncond, 5.0) - guided_unet(base.unet, x, t, cond, uncond,
                                                                                     5.0)).norm()

    before = distance()
    noise_pred = common.guided_noise_pred(tiny_pipe, x, t, cond, uncond, args.guidance_scale)
    kl = common.kl_to_base(tiny_pipe, x, t, cond, uncond, noise_pred, args.guidance_scale, args.eta)
    kl.backward()
    assert len(params) == len(common.lora_parameters(tiny_pipe)) and all(p.requires_grad for p in params)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p -= 0.05 * p.grad / norm
    after = distance()
    assert 0 < after < before, (before, after)
    with torch.no_grad():
        noise_pred = common.guided_noise_pred(tiny_pipe, x, t, cond, uncond, args.guidance_scale)
        assert common.kl_to_base(tiny_pipe, x, t, cond, uncond, noise_pred, args.guidance_scale, args.eta) < kl.detach()


# ------------------------------------------------------------------------------------------------ the script


@pytest.mark.parametrize("shared", [False, True])
def test_groups_share_their_prompt_and_optionally_their_noise(shared, tmp_path, monkeypatch):
    """The sampler gets batch_size / G prompts each repeated G times; with --shared-noise, one x_T per group. With a
    KL weight the KL is logged, exactly 0 on the first update (the LoRA starts at zero) and positive once the LoRA
    has moved; without one it is absent."""
    seen = []
    sample_trajectory = common.sample_trajectory

    def spy(pipe, cond, *rest, **kw):
        traj = sample_trajectory(pipe, cond, *rest, **kw)
        seen.append((cond, traj.latents[:, 0]))
        return traj

    monkeypatch.setattr(common, "sample_trajectory", spy)
    grpo.main(grpo.Args(model="tiny", reward="jpeg_compressibility", steps=2, batch_size=6, group_size=3,
                        num_minibatches=1, train_batch_size=6, sample_batch_size=2, num_inference_steps=2,
                        shared_noise=shared, kl_beta=0.04 if shared else 0.0, output_dir=str(tmp_path / "run"),
                        sample_every=100, num_sample_images=2, save_every=0))
    for cond, x_T in seen:  # one sampled batch per update
        for group in (slice(0, 3), slice(3, 6)):
            assert (cond[group] == cond[group][:1]).all()
            assert (x_T[group] == x_T[group][:1]).all() == shared
        assert (x_T[0] != x_T[3]).any()
    first, second = read_metrics(tmp_path / "run")
    if shared:
        assert first["kl"] == 0.0 and second["kl"] > 0
    else:
        assert "kl" not in first and "kl" not in second


def test_cli_refuses_a_batch_of_partial_groups(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--model", "tiny", "--batch-size", "6",
                          "--group-size", "4", "--output-dir", str(out)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == "grpo.py: error: --batch-size 6 must be a multiple of --group-size 4"
    assert not out.exists()
