"""The RL scripts' math (ddpo_sf, ddpo_is, rwr), each checked against an independent computation in this file."""

import dataclasses
import importlib
import math

import numpy as np
import pytest
import torch
import tyro

import common
import ddpo_is
import ddpo_sf
import rwr
from conftest import (SCRIPTS, U32, assert_normwise_close, pair_tolerance, randomize_lora, read_metrics, rounding_tolerance,
                      roundings, script_args, scripts)

# the RL scripts that normalise rewards by DDPO's per-prompt running statistics (GRPO's groups: test_grpo.py)
STAT_TRACKING = [importlib.import_module(n) for n in scripts("rl")
                 if hasattr(importlib.import_module(n), "PerPromptStatTracker")]


GUARD = common.UpdateGuard(max_bad_steps=1)  # no loss scaling: float32


def lora_grads(pipe):
    return [p.grad.clone() for p in common.lora_parameters(pipe)]


def on_policy(pipe, traj, cond, uncond, samples, timestep_idx, args):
    """`traj` with the log-probs of these pairs replaced by the training pass's own evaluation of them (the same
    operations in the same layout, with gradient enabled as in training): the first update's ratio is then 1 exactly.
    The sampler's layout gives it only up to rounding, and float32's bound on that (log_prob_tolerance, about 1e-4
    here) is as large as DDPO's clip range ε = 1e-4; test_ddim_logprob and test_speed_equivalence check the pairing."""
    log_probs = traj.log_probs.clone()
    for i, k, log_prob, _ in ddpo_is.minibatch_log_probs(pipe, traj, cond, uncond, samples, timestep_idx, args):
        log_probs[i, k] = log_prob.detach()
    return dataclasses.replace(traj, log_probs=log_probs)


def pairs_tolerance(pipe, pairs, guidance_scale):
    """conftest's float32 bound for a gradient summed over `pairs` (sample, timestep) pairs, each one guided UNet call
    (forward and backward: 3 times its roundings, guidance's gain 2w − 1) and a log-prob's mean over the latent's
    4·16·16 elements; every pair's roundings are counted as if on one path, which also covers their sum."""
    return rounding_tolerance(pairs * (3 * roundings(pipe.unet) + 4 * 16 * 16), gain=2 * guidance_scale - 1)


def small_batch(pipe, n=4, num_steps=5, seed=0):
    prompts = ["a cat", "a dog", "a cat", "a fox"][:n]
    cond = common.encode_prompts(pipe, prompts)
    uncond = common.encode_prompts(pipe, [""])
    g = torch.Generator().manual_seed(seed)
    traj = common.sample_trajectory(pipe, cond, uncond, num_steps, 5.0, 1.0, generator=g)
    return cond, uncond, traj


# ---------------------------------------------------------------------------------------------- DDPO-IS


def test_is_first_minibatch_gradient_equals_sf_gradient(tiny_pipe):
    """At the weights that sampled the batch (ratio = 1) the clipped surrogate's gradient is −A·∇log p:
    DDPO-SF's."""
    randomize_lora(tiny_pipe)
    n, num_steps = 4, 3
    cond, uncond, traj = small_batch(tiny_pipe, n, num_steps)
    advantages = torch.tensor([1.3, -0.7, 0.2, -2.0])
    params = common.lora_parameters(tiny_pipe)

    every = torch.arange(num_steps).expand(n, num_steps)  # DDPO-SF: every sample at every timestep, in order
    ddpo_sf.accumulate_gradient(tiny_pipe, traj, cond, uncond, advantages, torch.arange(n), every, GUARD,
                                ddpo_sf.Args(train_batch_size=2, guidance_scale=5.0, eta=1.0))
    sf = lora_grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)

    # The minibatch is the whole batch with every timestep, samples shuffled and each sample's timesteps in
    # its own random order. L is a sum over (sample, timestep) pairs, so the order cannot change the gradient
    # of one update; shuffling matters across updates (which pairs each minibatch sees, with
    # timestep_fraction < 1 or num_minibatches > 1), where it decorrelates the updates.
    g = torch.Generator().manual_seed(1)
    samples = torch.randperm(n, generator=g)
    timestep_idx = torch.stack([torch.randperm(num_steps, generator=g) for _ in range(n)])
    args = ddpo_is.Args(train_batch_size=2, guidance_scale=5.0, eta=1.0)
    traj = on_policy(tiny_pipe, traj, cond, uncond, samples, timestep_idx, args)
    stats = ddpo_is.accumulate_gradient(tiny_pipe, traj, cond, uncond, advantages, samples, timestep_idx, GUARD, args)
    is_ = lora_grads(tiny_pipe)

    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0  # ratio 1 exactly
    # mean(−A·1), summed chunk by chunk: n·T + 4 roundings at most, relative to mean |A|
    assert abs(stats["loss"] + advantages.mean().item()) <= (n * num_steps + 4) * U32 * advantages.abs().mean().item()
    assert len(sf) == len(is_) == len(params) and all(a.abs().max() > 0 for a in sf)
    # float32 sums in another order: each within conftest's bound of the exact gradient, so within twice it of each
    # other (pairs_tolerance counts every pair's forward and backward pass through the guided UNet and its log-prob)
    assert_normwise_close(is_, sf, pair_tolerance(pairs_tolerance(tiny_pipe, n * num_steps, 5.0)))


def test_is_partial_minibatch_is_mean_over_its_pairs(tiny_pipe):
    """A minibatch of some samples at some of their timesteps: the gradient of −mean A·log p over exactly those
    (sample, timestep) pairs, computed here pair by pair."""
    randomize_lora(tiny_pipe, seed=2)
    cond, uncond, traj = small_batch(tiny_pipe, 4, 4, seed=3)
    advantages = torch.tensor([0.5, -1.5, 2.0, 1.0])
    samples = torch.tensor([3, 0])
    timestep_idx = torch.tensor([[2, 0], [1, 3]])  # sample 3 at steps 2, 0; sample 0 at steps 1, 3
    args = ddpo_is.Args(train_batch_size=1, guidance_scale=5.0, eta=1.0)
    traj = on_policy(tiny_pipe, traj, cond, uncond, samples, timestep_idx, args)
    ddpo_is.accumulate_gradient(tiny_pipe, traj, cond, uncond, advantages, samples, timestep_idx, GUARD, args)
    ours = lora_grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)

    loss = 0.0
    for i, ks in [(3, [2, 0]), (0, [1, 3])]:
        for k in ks:
            x, t = traj.latents[i : i + 1, k], traj.timesteps[k]
            noise_pred = common.guided_noise_pred(tiny_pipe, x, t, cond[i : i + 1], uncond, 5.0)
            x_prev = traj.latents[i : i + 1, k + 1]
            _, lp = common.step_with_logprob(tiny_pipe.scheduler, noise_pred, t, x, 1.0, prev_sample=x_prev)
            loss = loss - advantages[i] * lp.sum() / 4
    loss.backward()
    # as in the test above: two float32 sums in other orders
    assert_normwise_close(ours, lora_grads(tiny_pipe), pair_tolerance(pairs_tolerance(tiny_pipe, 4, 5.0)))


EPS = 1e-4


def surrogate_grad(log_prob, old, adv):
    lp = log_prob.clone().requires_grad_(True)
    loss, diagnostics = ddpo_is.clipped_surrogate(lp, old, adv, EPS)
    loss.backward()
    return loss.detach(), diagnostics["approx_kl"], diagnostics["clipfrac"], lp.grad


def test_clipped_surrogate_inside_range_is_importance_weighted_score():
    old = torch.tensor([-1.0, -2.0, 0.5, 3.0, -0.3])
    delta = torch.tensor([0.5e-4, -0.9e-4, 0.0, 0.2e-4, -0.4e-4])  # |ratio − 1| < ε for all
    adv = torch.tensor([1.0, -2.0, 0.7, -0.1, 3.0])
    loss, kl, clipfrac, grad = surrogate_grad(old + delta, old, adv)
    delta = ((old + delta) - old).double()  # the difference float32 actually sees
    ratio = torch.exp(delta)
    n = len(old)
    # float32 against float64: exp (1 ulp = 2u at most), the product with −A, the mean's 1/n and its backward's
    # product: 5 roundings of at most u each, per element; the loss's mean of n terms of both signs adds n roundings,
    # relative to Σ|A·r| rather than to the (smaller) sum
    expected = -adv.double() * ratio
    torch.testing.assert_close(grad.double(), expected / n, rtol=5 * U32, atol=0)  # d/dlog p of mean(−A·r) = −A·r/n
    assert abs(float(loss) - float(expected.mean())) <= (5 + n) * U32 * float(expected.abs().mean())
    assert float(clipfrac) == 0.0
    assert float(kl) == pytest.approx(0.5 * float((delta**2).mean()), rel=1e-5)


def test_clipped_surrogate_outside_range():
    old = torch.zeros(6)
    #                  A>0,r>1+ε  A<0,r<1−ε  A>0,r<1−ε  A<0,r>1+ε  A>0,inside  A<0,inside
    delta = torch.tensor([1e-3, -1e-3, -1e-3, 1e-3, 0.3e-4, -0.3e-4])
    adv = torch.tensor([2.0, -1.5, 0.8, -0.6, 1.0, -1.0])
    loss, kl, clipfrac, grad = surrogate_grad(old + delta, old, adv)
    n = len(old)
    ratio = np.exp(delta.double().numpy())
    expected = -adv.double().numpy() * ratio / n
    expected[:2] = 0.0  # moved in the direction its advantage pushes it, past the clip: no gradient
    np.testing.assert_allclose(grad.double().numpy(), expected, rtol=1e-6, atol=0)
    assert grad[0] == 0 and grad[1] == 0  # exactly zero, not small
    # loss: the clipped branch for the first two, the unclipped one for the rest
    a, r = adv.double().numpy(), ratio
    per = np.maximum(-a * r, -a * np.clip(r, 1 - EPS, 1 + EPS))
    assert abs(float(loss) - per.mean()) <= (5 + n) * U32 * np.abs(per).mean()  # as in the test above
    assert float(clipfrac) == pytest.approx(np.mean(np.abs(r - 1) > EPS))  # 4/6
    assert float(clipfrac) == pytest.approx(4 / 6)
    assert float(kl) == pytest.approx(0.5 * np.mean(delta.double().numpy() ** 2), rel=1e-4)


# ------------------------------------------------------------------------------------------- advantages


def reference_advantages(history, prompts, r, buffer, min_count):
    out = np.empty(len(r))
    for p in set(prompts):
        mine = np.array([q == p for q in prompts])
        history.setdefault(p, []).extend(r[mine].tolist())
        recent = history[p][-buffer:]
        if len(recent) < min_count:
            mean, std = r.mean(), r.std()
        else:
            mean, std = np.mean(recent), np.std(recent)
        out[mine] = (r[mine] - mean) / (std + 1e-6)
    return out


@pytest.mark.parametrize("module", STAT_TRACKING, ids=lambda m: m.__name__)
def test_per_prompt_advantages(module):
    buffer, min_count = 5, 3
    args = module.Args(stat_buffer_size=buffer, stat_min_count=min_count, adv_clip_max=1e9)
    tracker = module.PerPromptStatTracker(buffer, min_count)
    rng = np.random.default_rng(0)
    history, fallbacks, tracked = {}, 0, 0
    for _ in range(8):
        prompts = list(rng.choice(["cat", "dog", "fox"], size=4))
        r = rng.normal(size=4) * 3 + 1
        before = {p: len(history.get(p, [])) for p in set(prompts)}
        expected = reference_advantages(history, prompts, r, buffer, min_count)
        for p in set(prompts):
            n_now = min(buffer, before[p] + prompts.count(p))
            fallbacks += n_now < min_count
            tracked += n_now >= min_count
        got = module.compute_advantages(prompts, r, tracker, args)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert fallbacks > 0 and tracked > 0  # both the batch fallback and the per-prompt buffers were exercised


@pytest.mark.parametrize("module", STAT_TRACKING, ids=lambda m: m.__name__)
def test_advantage_clip_and_batch_normalisation(module):
    r = np.array([0.0] * 49 + [100.0])
    prompts = ["p"] * 50
    args = module.Args(per_prompt_stat_tracking=False, adv_clip_max=5.0)
    got = module.compute_advantages(prompts, r, None, args).numpy()
    raw = (r - r.mean()) / (r.std() + 1e-6)
    assert raw.max() > 5  # the outlier is clipped
    np.testing.assert_allclose(got, np.clip(raw, -5, 5), rtol=1e-5)
    assert got.max() == pytest.approx(5.0)

    r = np.random.default_rng(1).normal(size=6)
    args = module.Args(per_prompt_stat_tracking=False)
    got = module.compute_advantages(["a", "b", "a", "b", "c", "a"], r, None, args)
    np.testing.assert_allclose(got.numpy(), (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- RWR


PROMPTS = ["cat", "dog", "cat", "fox", "dog", "cat", "cat", "dog"]
REWARDS = np.array([1.0, -2.0, 3.5, 0.3, 4.0, -1.0, 2.0, 0.0])


def test_rwr_weights_are_per_prompt_softmax_times_count():
    beta = 0.7
    got = rwr.rwr_weights(PROMPTS, REWARDS, beta)
    for p in set(PROMPTS):
        idx = [i for i, q in enumerate(PROMPTS) if q == p]
        denom = sum(math.exp(beta * REWARDS[j]) for j in idx)
        for i in idx:
            assert got[i] == pytest.approx(math.exp(beta * REWARDS[i]) / denom * len(idx), rel=1e-12)
        assert got[idx].sum() == pytest.approx(len(idx))
    assert got[PROMPTS.index("fox")] == pytest.approx(1.0)  # a prompt sampled once gets weight 1

    np.testing.assert_allclose(rwr.rwr_weights(PROMPTS, REWARDS, 0.0), np.ones(8))
    np.testing.assert_allclose(rwr.rwr_weights(PROMPTS, REWARDS, 1e-9), np.ones(8), rtol=1e-7)
    big = rwr.rwr_weights(PROMPTS, REWARDS * 1e4, 0.2)  # no overflow on large rewards
    assert np.isfinite(big).all()


@pytest.mark.parametrize("percentile", [90.0, 50.0])
def test_rwr_sparse_weights_are_percentile_indicators(percentile):
    got = rwr.rwr_weights(PROMPTS, REWARDS, 0.2, sparse=True, percentile=percentile)
    for p in set(PROMPTS):
        idx = [i for i, q in enumerate(PROMPTS) if q == p]
        threshold = np.percentile(REWARDS[idx], percentile)
        for i in idx:
            assert got[i] == float(REWARDS[i] >= threshold)
    assert got[PROMPTS.index("cat")] == 0.0 and got[2] == 1.0  # cat: best of 4 (3.5) kept at 90%


def test_rwr_loss_is_weighted_guided_denoising_mse(tiny_pipe):
    tiny_pipe.unet.to(torch.float64)  # float64: batched and separate UNet calls agree far below the tolerance
    randomize_lora(tiny_pipe, seed=4)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500, 999])
    w = torch.tensor([0.5, 1.2, 1.3], dtype=torch.float64)
    cond = common.encode_prompts(tiny_pipe, ["a cat", "a dog", "a fox"]).double()
    uncond = common.encode_prompts(tiny_pipe, [""]).double()

    # these 3 samples as one train_batch_size chunk of a minibatch of B = 6: the sum is divided by 6
    loss = rwr.weighted_denoising_loss(tiny_pipe, x0, cond, uncond, w, t, noise, 5.0, 6)
    loss.backward()
    ours = lora_grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)

    ab = tiny_pipe.scheduler.alphas_cumprod[t].double().view(3, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    e_c = tiny_pipe.unet(x_t, t, encoder_hidden_states=cond).sample
    e_u = tiny_pipe.unet(x_t, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
    noise_pred = e_u + 5.0 * (e_c - e_u)
    reference = sum(w[i] * ((noise[i] - noise_pred[i]) ** 2).mean() for i in range(3)) / 6
    reference.backward()
    loss, reference = loss.detach(), reference.detach()
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(float(reference), rel=1e-7)
    for a, b in zip(lora_grads(tiny_pipe), ours):  # (common keeps ᾱ_t in float32: ~1e-8 relative)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


def test_rwr_regresses_a_fresh_sample_of_the_vae_posterior(tiny_pipe):
    """--reencode (the paper's code): the decoded images' VAE posterior N(μ, σ²) (diffusers' encoder, × the scaling
    factor), and each minibatch regresses x0 = μ + σ·z with a fresh z, drawn before the timestep and the noise."""
    randomize_lora(tiny_pipe, seed=6)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    mean, std = common.encode(tiny_pipe, images)
    posterior = tiny_pipe.vae.encode(images * 2 - 1).latent_dist
    scale = tiny_pipe.vae.config.scaling_factor
    torch.testing.assert_close(mean, posterior.mean * scale)
    torch.testing.assert_close(std, posterior.std * scale)
    assert float(std.min()) > 0

    cond = common.encode_prompts(tiny_pipe, ["a cat", "a dog"])
    uncond = common.encode_prompts(tiny_pipe, [""])
    weights = torch.tensor([0.7, 1.3])
    args = rwr.Args(model="tiny", train_batch_size=2)
    torch.manual_seed(8)
    rwr.accumulate_gradient(tiny_pipe, (mean, std), cond, uncond, weights, torch.arange(2), GUARD, args)
    ours = lora_grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)

    torch.manual_seed(8)
    x0 = mean + std * torch.randn(mean.shape)
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn(x0.shape)
    rwr.weighted_denoising_loss(tiny_pipe, x0, cond, uncond, weights, t, noise, args.guidance_scale, 2).backward()
    assert all(torch.equal(b, a) for a, b in zip(lora_grads(tiny_pipe), ours))  # the same operations: exactly


# ------------------------------------------------------------------------------------- the loops, refusals


@pytest.mark.parametrize("name", [n for n in scripts() if SCRIPTS[n].updates_per_batch > 1])
def test_steps_count_optimizer_updates(name, tmp_path):
    """Several updates per sampled batch and --steps one more than a batch gives: exactly that many updates, the
    second batch sampled for the last one."""
    module, u, out = importlib.import_module(name), SCRIPTS[name].updates_per_batch, tmp_path / "run"
    args = tyro.cli(module.Args, args=script_args(name, "--steps", str(u + 1), "--num-inference-steps", "2",
                                                  "--output-dir", str(out), "--sample-every", "100",
                                                  "--num-sample-images", "2", "--save-every", "0"))
    module.main(args)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, u + 2))
    assert [r["reward_queries"] for r in rows] == [args.batch_size] * u + [2 * args.batch_size]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (out / common.LORA_FILE).is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000.png", f"step_{u + 1:06d}.png"]
