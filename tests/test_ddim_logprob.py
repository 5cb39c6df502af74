"""step_with_logprob against torch.distributions and diffusers' DDIMScheduler."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

import common
from common.models import SD14_SCHEDULER
from conftest import assert_normwise_close, float64_copy, log_prob_tolerance, randomize_lora, rounding_tolerance, roundings


@pytest.fixture
def scheduler():
    s = DDIMScheduler(**SD14_SCHEDULER)
    s.set_timesteps(50)
    return s


def reference_mean_std(t, x, eps, eta):
    """μ and σ of p(x_{t-1} | x_t) written out from the DDIM paper (Song et al. 2021, eq. 12), with SD1.4's
    betas computed here from scratch rather than read from the scheduler."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t_prev = t - 20
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else abar[0]  # set_alpha_to_one=False
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    mu = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    return mu, sigma


@pytest.mark.parametrize("t", [981, 501, 21, 1])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_logprob_matches_torch_normal(scheduler, t, eta):
    torch.manual_seed(t)
    x, eps, z = torch.randn(3, 3, 4, 8, 8).unbind(0)
    prev, log_prob = common.step_with_logprob(scheduler, eps, t, x, eta, prev_sample=None)
    mu, sigma = reference_mean_std(t, x, eps, eta)
    expected = torch.distributions.Normal(mu, sigma).log_prob(prev.double()).mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [981, 501, 1])
def test_prev_sample_matches_diffusers_step(scheduler, t):
    torch.manual_seed(0)
    x, eps, z = torch.randn(3, 2, 4, 8, 8).unbind(0)
    # the same noise z in both: our step draws it from g1, the test draws it from an identical g2
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours, _ = common.step_with_logprob(scheduler, eps, t, x, eta=1.0, generator=g1)
    z = torch.randn(x.shape, generator=g2)
    ref = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours0, lp0 = common.step_with_logprob(scheduler, eps, t, x, eta=0.0)
    torch.testing.assert_close(ours0, scheduler.step(eps, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)
    assert lp0 is None  # η = 0: deterministic, no density


def test_per_sample_timesteps(scheduler):
    torch.manual_seed(1)
    ts = torch.tensor([981, 501, 21, 1])
    x, eps = torch.randn(2, 4, 4, 8, 8).unbind(0)
    prev = torch.randn(4, 4, 8, 8)
    _, lp = common.step_with_logprob(scheduler, eps, ts, x, 1.0, prev_sample=prev)
    for i, t in enumerate(ts.tolist()):
        _, lp_i = common.step_with_logprob(scheduler, eps[i : i + 1], t, x[i : i + 1], 1.0,
                                                prev_sample=prev[i : i + 1])
        torch.testing.assert_close(lp[i : i + 1], lp_i)
        mu, sigma = reference_mean_std(t, x[i], eps[i], 1.0)
        expected = torch.distributions.Normal(mu, sigma).log_prob(prev[i].double()).mean()
        assert math.isclose(lp[i].item(), expected.item(), rel_tol=1e-4, abs_tol=1e-4)


def test_logprob_gradient_flows_through_mean_only(scheduler):
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    out, lp = common.step_with_logprob(scheduler, eps, 501, x, 1.0, prev_sample=prev)
    lp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert prev.grad is None  # the sample is a constant
    assert not out.requires_grad


def test_reevaluating_trajectory_gives_ratio_one(tiny_pipe):
    randomize_lora(tiny_pipe)
    cond = common.encode_prompts(tiny_pipe, ["a cat", "a dog", "a fox"])
    uncond = common.encode_prompts(tiny_pipe, [""])
    traj = common.sample_trajectory(tiny_pipe, cond, uncond, 10, 5.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert traj.latents.dtype == torch.float32 and traj.latents.shape == (3, 11, 4, 16, 16)
    assert traj.log_probs.shape == (3, 10)
    # re-evaluate in shuffled per-sample timestep order, as DDPO-IS's training pass does
    perm = torch.stack([torch.randperm(10) for _ in range(3)])
    rows = torch.arange(3)[:, None]
    for j in range(10):
        idx = perm[:, j]
        t = traj.timesteps[idx]
        x, x_prev = traj.latents[rows[:, 0], idx], traj.latents[rows[:, 0], idx + 1]
        noise_pred = common.guided_noise_pred(tiny_pipe, x, t, cond, uncond, 5.0)
        _, lp = common.step_with_logprob(tiny_pipe.scheduler, noise_pred, t, x, 1.0, prev_sample=x_prev)
        ratio = torch.exp(lp - traj.log_probs[rows[:, 0], idx])
        # Sampling and re-evaluation put each sample at another place in the UNet's batch: within float32's rounding
        # of ε̂ (conftest; guidance's gain 2w − 1), which bounds the log-prob's (log_prob_tolerance), about 1e-4
        # here. A sample paired with a neighbouring timestep is off by 2e-2 to 5e2.
        bound = log_prob_tolerance(tiny_pipe.scheduler, noise_pred, t, x, x_prev, 1.0,
                                   rounding_tolerance(roundings(tiny_pipe.unet), gain=2 * 5.0 - 1))
        assert ((ratio - 1).abs() <= bound.exp() - 1).all(), (ratio - 1, bound)


def test_guided_noise_pred_is_cfg_combination(tiny_pipe):
    randomize_lora(tiny_pipe)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    cond = common.encode_prompts(tiny_pipe, ["a cat", "a dog"])
    uncond = common.encode_prompts(tiny_pipe, [""])
    t = torch.tensor([901, 41])
    unet64 = float64_copy(tiny_pipe).unet  # the two branches as separate calls, in float64
    with torch.no_grad():
        e_c = unet64(x.double(), t, encoder_hidden_states=cond.double()).sample
        e_u = unet64(x.double(), t, encoder_hidden_states=uncond.double().expand(2, -1, -1)).sample
        ours = common.guided_noise_pred(tiny_pipe, x, t, cond, uncond, 7.5)
    # conftest's float32 bound for one UNet call, with guidance's gain 2w − 1
    tolerance = rounding_tolerance(roundings(tiny_pipe.unet), gain=2 * 7.5 - 1)
    assert_normwise_close(ours, e_u + 7.5 * (e_c - e_u), tolerance)
