"""The gradient algorithms (DRaFT-K, DRaFT-LV, ReFL, AlignProp) against computations written out here.

The references use plain (un-checkpointed) UNet calls with the two guidance branches as separate calls,
diffusers' `DDIMScheduler.step(eta=0)`, x̂0 and the re-noising written from `alphas_cumprod`, and their own
VAE decoding; the reward is a fixed linear function of the pixels. Where a script's `main` is run (to test
the loss it builds and the gradient it leaves in `.grad`), the learning rate is 0, so the weights stay put.
"""

import contextlib

import pytest
import torch

import alignprop
import common
import draft
import draft_lv
import refl
import rewards
from conftest import randomize_lora, read_metrics

T, B, W = 6, 2, 7.5  # inference steps, batch, guidance weight


def linear_reward(seed=1):
    weights = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return lambda images, prompts: (images * weights).sum(dim=(1, 2, 3))


def latents(seed=0):
    return torch.randn(B, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def embeddings(pipe, prompts=("a red cube", "a dog")):
    return common.encode_prompts(pipe, list(prompts)), common.encode_prompts(pipe, [""])


def guided(pipe, x, t, cond, uncond):
    """ε̂ = ε(∅) + w·(ε(c) − ε(∅)), two plain UNet calls."""
    e_u = pipe.unet(x, t, encoder_hidden_states=uncond.expand(x.shape[0], -1, -1)).sample
    e_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
    return e_u + W * (e_c - e_u)


def decode(pipe, z):
    return (pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def reference_chain(pipe, x, cond, uncond, k, stop_at=None):
    """DDIM η = 0 with diffusers' step; the first T − k steps under torch.no_grad. With `stop_at` = m, the
    latent x_m (no gradient) and the timestep t_m are returned instead."""
    s = pipe.scheduler
    s.set_timesteps(T)
    for i, t in enumerate(s.timesteps):
        if i == stop_at:
            return x, t
        with torch.no_grad() if i < T - k else contextlib.nullcontext():
            x = s.step(guided(pipe, x, t, cond, uncond), t, x, eta=0.0).prev_sample
    return x


def lora_grad(pipe, loss):
    params = common.lora_parameters(pipe)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_grads_close(ours, ref, rtol=1e-4):
    a, b = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in ref])
    assert b.norm() > 0
    assert (a - b).norm() <= rtol * b.norm(), ((a - b).norm().item(), b.norm().item())


@contextlib.contextmanager
def recorded_unet_calls(pipe):
    """(grad enabled, latent input requires grad) for every UNet call, including checkpoint recomputations
    in the backward pass (module hooks are muted there, so the forward itself is wrapped)."""
    calls, forward = [], pipe.unet.forward

    def recording_forward(sample, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), sample.requires_grad))
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = recording_forward
    try:
        yield calls
    finally:
        pipe.unet.forward = forward


def run_main(module, pipe, tmp_path, monkeypatch, reward, x_T, **overrides):
    """One optimizer step of `module.main` at learning rate 0 on `pipe`, with fixed initial latents and one
    prompt. Returns the metrics row and the LoRA gradient the step left in .grad."""
    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(rewards, "load", lambda *a, **k: reward)
    monkeypatch.setattr(common, "initial_latents", lambda pipe, b, generator=None: x_T.clone())
    (tmp_path / "prompts.txt").write_text("a dog\n")
    run_dir = tmp_path / module.__name__
    settings = dict(model="tiny", reward="jpeg_compressibility_diff", prompt_file=str(tmp_path / "prompts.txt"),
                    steps=1, batch_size=B, num_inference_steps=T, guidance_scale=W, learning_rate=0.0,
                    weight_decay=0.0, max_grad_norm=0.0, num_sample_images=1, save_every=0)
    module.main(module.Args(output_dir=str(run_dir), **(settings | overrides)))
    rows = read_metrics(run_dir)
    steps = (settings | overrides)["steps"]
    assert (run_dir / common.LORA_FILE).is_file() and (run_dir / "samples" / f"step_{steps:06d}.png").is_file()
    return rows[-1], [p.grad.clone() for p in common.lora_parameters(pipe)]


def test_draft_k_sends_no_gradient_before_the_last_k_steps(tiny_pipe):
    pipe, k = tiny_pipe, 2
    randomize_lora(pipe)
    cond, uncond = embeddings(pipe)
    reward = linear_reward()
    with recorded_unet_calls(pipe) as calls:
        x0 = draft.sample_with_grad(pipe, cond, uncond, latents(0), draft.Args(num_inference_steps=T, k=k))
        forward_calls = list(calls)
        ours = lora_grad(pipe, -reward(common.decode(pipe, x0), None).mean())

    # steps 1..T−K: no graph at all; step T−K+1 starts from a constant latent; only its successors carry one
    assert forward_calls == [(False, False)] * (T - k) + [(True, False)] + [(True, True)] * (k - 1)
    assert len(calls) == T + k and all(grad for grad, _ in calls[T:])  # backward recomputes exactly the K calls

    ref_x0 = reference_chain(pipe, latents(0), cond, uncond, k)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-4, atol=1e-5)
    assert_grads_close(ours, lora_grad(pipe, -reward(decode(pipe, ref_x0), None).mean()))


def test_full_draft_equals_alignprop_fixed_k_t(tiny_pipe):
    pipe = tiny_pipe
    randomize_lora(pipe)
    cond, uncond = embeddings(pipe)
    reward = linear_reward()
    x_d = draft.sample_with_grad(pipe, cond, uncond, latents(0), draft.Args(num_inference_steps=T, k=T))
    g_draft = lora_grad(pipe, -reward(common.decode(pipe, x_d), None).mean())
    args = alignprop.Args(num_inference_steps=T, truncation="fixed", k=T)
    x_a = alignprop.sample_with_grad(pipe, cond, uncond, latents(0), args, args.k)
    g_align = lora_grad(pipe, -reward(common.decode(pipe, x_a), None).mean())

    torch.testing.assert_close(x_d, x_a, rtol=0, atol=0)
    assert_grads_close(g_align, g_draft, rtol=1e-6)
    ref_x0 = reference_chain(pipe, latents(0), cond, uncond, k=T)
    g_ref = lora_grad(pipe, -reward(decode(pipe, ref_x0), None).mean())
    assert_grads_close(g_draft, g_ref)
    g_last = lora_grad(pipe, -reward(decode(pipe, reference_chain(pipe, latents(0), cond, uncond, k=1)), None).mean())
    diff = sum((a - b).norm() ** 2 for a, b in zip(g_ref, g_last)) ** 0.5
    assert diff > 1e-3 * sum(g.norm() ** 2 for g in g_ref) ** 0.5  # the earlier steps do contribute here


def test_draft_lv_with_n_0_is_draft_1(tiny_pipe, tmp_path, monkeypatch):
    pipe, reward, x_T = tiny_pipe, linear_reward(), latents(3)
    randomize_lora(pipe)
    row_1, g_1 = run_main(draft, pipe, tmp_path, monkeypatch, reward, x_T, k=1)
    row_lv, g_lv = run_main(draft_lv, pipe, tmp_path, monkeypatch, reward, x_T, num_copies=0)
    assert row_lv["loss"] == pytest.approx(row_1["loss"], rel=1e-6)
    assert row_lv["reward_queries"] == row_1["reward_queries"] == B
    assert "reward_renoised_mean" not in row_lv
    assert_grads_close(g_lv, g_1, rtol=1e-6)


def test_draft_lv_loss_is_the_sum_over_the_renoised_copies(tiny_pipe, tmp_path, monkeypatch):
    pipe, reward, x_T, n = tiny_pipe, linear_reward(), latents(4), 2
    randomize_lora(pipe)
    noises, add_noise = [], common.add_noise

    def recording_add_noise(scheduler, x0, noise, t):
        noises.append(noise.clone())
        return add_noise(scheduler, x0, noise, t)

    monkeypatch.setattr(common, "add_noise", recording_add_noise)
    row, ours = run_main(draft_lv, pipe, tmp_path, monkeypatch, reward, x_T, num_copies=n)
    assert len(noises) == n

    cond, uncond = embeddings(pipe, ["a dog"] * B)
    x0 = reference_chain(pipe, x_T, cond, uncond, k=1)
    t1 = pipe.scheduler.timesteps[-1]
    a1 = pipe.scheduler.alphas_cumprod[t1]
    r = [reward(decode(pipe, x0), None)]
    for eps in noises:  # x_{t₁} = √ᾱ·sg(x0) + √(1−ᾱ)·ε, then one guided DDIM step with gradient
        x_t1 = a1.sqrt() * x0.detach() + (1 - a1).sqrt() * eps
        x0_i = pipe.scheduler.step(guided(pipe, x_t1, t1, cond, uncond), t1, x_t1, eta=0.0).prev_sample
        r.append(reward(decode(pipe, x0_i), None))
    r = torch.stack(r)  # [n + 1, B]
    loss = -r.sum(0).mean()

    assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert row["reward_mean"] == pytest.approx(r[0].mean().item(), rel=1e-5)
    assert row["reward_renoised_mean"] == pytest.approx(r[1:].mean().item(), rel=1e-5)
    assert row["reward_queries"] == B * (n + 1) and row["step"] == 1
    assert_grads_close(ours, lora_grad(pipe, loss))


def test_refl_scores_the_one_step_prediction_at_step_m(tiny_pipe):
    pipe, m = tiny_pipe, 3
    randomize_lora(pipe)
    cond, uncond = embeddings(pipe)
    reward = linear_reward()
    args = refl.Args(num_inference_steps=T, guidance_scale=W, max_step=T)
    with recorded_unet_calls(pipe) as calls:
        x0_hat = refl.sample_with_grad(pipe, cond, uncond, latents(0), args, m)
        assert calls == [(False, False)] * m + [(True, False)]  # sampling stops at step m
        r = reward(common.decode(pipe, x0_hat), None)
        loss = refl.refl_loss(r, args)
        ours = lora_grad(pipe, loss)

    x_m, t_m = reference_chain(pipe, latents(0), cond, uncond, k=0, stop_at=m)
    assert t_m == pipe.scheduler.timesteps[m]
    a = pipe.scheduler.alphas_cumprod[t_m]
    ref_x0 = (x_m - (1 - a).sqrt() * guided(pipe, x_m, t_m, cond, uncond)) / a.sqrt()
    ref_r = reward(decode(pipe, ref_x0), None)
    torch.testing.assert_close(x0_hat, ref_x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r, ref_r, rtol=1e-5, atol=1e-4)
    assert loss.item() == pytest.approx(-ref_r.mean().item(), rel=1e-5)
    assert_grads_close(ours, lora_grad(pipe, -ref_r.mean()))


def test_refl_relu_loss_through_main(tiny_pipe, tmp_path, monkeypatch):
    pipe, reward, x_T = tiny_pipe, linear_reward(), latents(5)
    randomize_lora(pipe)
    cond, uncond = embeddings(pipe, ["a dog"] * B)

    def reference_reward():  # --max-step 1 pins m to the last step, T − 1
        x_m, t_m = reference_chain(pipe, x_T, cond, uncond, k=0, stop_at=T - 1)
        a = pipe.scheduler.alphas_cumprod[t_m]
        return reward(decode(pipe, (x_m - (1 - a).sqrt() * guided(pipe, x_m, t_m, cond, uncond)) / a.sqrt()), None)

    with torch.no_grad():
        r = reference_reward()
    lam, scale = r.mean().item(), 1e-3  # λ between the two rewards: one sample is above it and gives no gradient
    assert r.max() - r.min() > 1e-3
    row, ours = run_main(refl, pipe, tmp_path, monkeypatch, reward, x_T, max_step=1, loss="relu",
                         relu_lambda=lam, grad_scale=scale)
    ref_r = reference_reward()  # after main: its optimizer step (learning rate 0) touches the weights in place
    ref_loss = torch.relu(lam - ref_r).mean() * scale
    assert row["refl_step"] == T - 1 and row["refl_timestep"] == pipe.scheduler.timesteps[-1]
    assert row["loss"] == pytest.approx(ref_loss.item(), rel=1e-4)
    assert row["reward_mean"] == pytest.approx(ref_r.mean().item(), rel=1e-5)
    assert_grads_close(ours, lora_grad(pipe, ref_loss))


def test_alignprop_random_truncation_is_logged(tiny_pipe, tmp_path, monkeypatch):
    row, grads = run_main(alignprop, tiny_pipe, tmp_path, monkeypatch, linear_reward(), latents(6), steps=2)
    assert row["k"] == int(row["k"]) and 1 <= row["k"] <= T
    assert row["reward_queries"] == 2 * B and row["step"] == 2
    assert sum(g.abs().sum() for g in grads) > 0


def test_alignprop_default_clip_is_not_active_on_tiny_shapes(tmp_path):
    """AlignProp's configs clip at 5.0 on the loss × 0.01 (about 500 on −mean r): on a typical tiny-shapes update the
    gradient norm stays below it, so the update is Adam's, not normalised-gradient Adam (as a clip of 1.0 on the
    unscaled loss made it)."""
    out = tmp_path / "run"
    alignprop.main(alignprop.Args(model="tiny-shapes", reward="shapes_alignment", steps=2, batch_size=2,
                                  num_inference_steps=10, num_sample_images=1, sample_seeds=1, sample_every=100,
                                  save_every=0, output_dir=str(out)))
    rows = read_metrics(out)
    defaults = alignprop.Args()
    assert (defaults.loss_coeff, defaults.max_grad_norm) == (0.01, 5.0)
    norms = [row["grad_norm"] for row in rows]  # measured: 0.011 (K = 1) and 0.29 (K = 8)
    assert all(0 < n < defaults.max_grad_norm for n in norms), norms
    # on the unscaled loss these updates were clipped by the old default, 1.0
    assert max(norms) / defaults.loss_coeff > 1.0, norms
