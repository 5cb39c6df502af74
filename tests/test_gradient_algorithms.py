"""The gradient algorithms (DRaFT-K, DRaFT-LV, ReFL, AlignProp) against computations written out here.

The references use plain (un-checkpointed) UNet calls with the two guidance branches as separate calls,
diffusers' `DDIMScheduler.step(eta=0)`, x̂0 and the re-noising written from `alphas_cumprod`, and their own
VAE decoding; the reward is a fixed linear function of the pixels. Where a script's `main` is run (to test
the loss it builds and the gradient it leaves in `.grad`), the learning rate is 0, so the weights stay put.

The scripts run in float32 and the references in float64 (`float64_copy`), compared within the float32 rounding
bound of conftest for the chain's length (`tolerance`); two scripts' paths that compute the same operations are
compared exactly.
"""

import contextlib

import torch

import alignprop
import common
import draft
import draft_lv
import refl
import rewards
from conftest import assert_normwise_close, float64_copy, randomize_lora, read_metrics, rounding_tolerance, roundings

T, B, W = 4, 2, 7.5  # inference steps, batch, guidance weight


def linear_reward(seed=1):
    weights = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))

    def reward(images, prompts):
        return (images * weights).sum(dim=(1, 2, 3))

    reward.weights = weights
    return reward


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


def tolerance(pipe, unet_calls, decode=True, backward=False):
    """conftest's float32 bound for a result of `unet_calls` guided UNet calls in sequence, then the decoder and the
    reward's sum (`decode`), and their backward pass: guidance's gain 2W − 1 on every call's error."""
    n = unet_calls * roundings(pipe.unet)
    if decode:
        n += roundings(pipe.vae.post_quant_conv, pipe.vae.decoder) + 3 * 32 * 32
    return rounding_tolerance(3 * n if backward else n, gain=2 * W - 1)


def reward_bound(reward, images_ref, tol):
    """A bound on |r − r_ref| of each image, for the linear reward r = ⟨w, image⟩ of images within `tol` (normwise,
    over the batch) of `images_ref`: ‖w‖·tol·‖images_ref‖ (Cauchy–Schwarz), whatever cancellation the sum has."""
    return float(reward.weights.norm() * tol * images_ref.detach().norm())


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

    pipe64 = float64_copy(pipe)
    ref_x0 = reference_chain(pipe64, latents(0).double(), cond.double(), uncond.double(), k)
    assert_normwise_close(x0, ref_x0, tolerance(pipe, T, decode=False))
    ref = lora_grad(pipe64, -reward(decode(pipe64, ref_x0), None).mean())
    assert_normwise_close(ours, ref, tolerance(pipe, T, backward=True))


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

    # the same operations in the same layout (one function's code in two scripts): equal to the last bit
    assert torch.equal(x_d, x_a) and all(torch.equal(a, d) for a, d in zip(g_align, g_draft))
    pipe64 = float64_copy(pipe)
    ref_x0 = reference_chain(pipe64, latents(0).double(), cond.double(), uncond.double(), k=T)
    g_ref = lora_grad(pipe64, -reward(decode(pipe64, ref_x0), None).mean())
    assert_normwise_close(g_draft, g_ref, tolerance(pipe, T, backward=True))
    # the earlier steps do contribute here: K = 1's gradient is far from K = T's (float32 is enough for that)
    g_last = lora_grad(pipe, -reward(decode(pipe, reference_chain(pipe, latents(0), cond, uncond, k=1)), None).mean())
    diff = sum((a - b).norm() ** 2 for a, b in zip(g_ref, g_last)) ** 0.5
    assert diff > 1e-3 * sum(g.norm() ** 2 for g in g_ref) ** 0.5


def test_draft_lv_with_n_0_is_draft_1(tiny_pipe, tmp_path, monkeypatch):
    pipe, reward, x_T = tiny_pipe, linear_reward(), latents(3)
    randomize_lora(pipe)
    row_1, g_1 = run_main(draft, pipe, tmp_path, monkeypatch, reward, x_T, k=1)
    row_lv, g_lv = run_main(draft_lv, pipe, tmp_path, monkeypatch, reward, x_T, num_copies=0)
    # n = 0 leaves DRaFT-1's operations, in its layout: equal to the last bit
    assert row_lv["loss"] == row_1["loss"]
    assert row_lv["reward_queries"] == row_1["reward_queries"] == B
    assert "reward_renoised_mean" not in row_lv
    assert all(torch.equal(a, b) for a, b in zip(g_lv, g_1))


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

    pipe64 = float64_copy(pipe)  # after main: learning rate 0 left the weights as they were
    cond, uncond = (e.double() for e in embeddings(pipe, ["a dog"] * B))
    x0 = reference_chain(pipe64, x_T.double(), cond, uncond, k=1)
    t1 = pipe64.scheduler.timesteps[-1]
    a1 = pipe64.scheduler.alphas_cumprod[t1]
    images = [decode(pipe64, x0)]
    for eps in noises:  # x_{t₁} = √ᾱ·sg(x0) + √(1−ᾱ)·ε, then one guided DDIM step with gradient
        x_t1 = a1.sqrt() * x0.detach() + (1 - a1).sqrt() * eps.double()
        x0_i = pipe64.scheduler.step(guided(pipe64, x_t1, t1, cond, uncond), t1, x_t1, eta=0.0).prev_sample
        images.append(decode(pipe64, x0_i))
    r = torch.stack([reward(x, None) for x in images])  # [n + 1, B]
    loss = -r.sum(0).mean()

    # each r within reward_bound of its reference; the loss sums n + 1 of them (a mean over the batch of each)
    bound = reward_bound(reward, torch.stack(images), tolerance(pipe, T + 1))
    assert abs(row["loss"] - loss.item()) <= (n + 1) * bound
    assert abs(row["reward_mean"] - r[0].mean().item()) <= bound
    assert abs(row["reward_renoised_mean"] - r[1:].mean().item()) <= bound
    assert row["reward_queries"] == B * (n + 1) and row["step"] == 1
    assert_normwise_close(ours, lora_grad(pipe64, loss), tolerance(pipe, T + 1, backward=True))


def test_refl_scores_the_one_step_prediction_at_step_m(tiny_pipe):
    pipe, m = tiny_pipe, 2
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

    pipe64 = float64_copy(pipe)
    cond, uncond = cond.double(), uncond.double()
    x_m, t_m = reference_chain(pipe64, latents(0).double(), cond, uncond, k=0, stop_at=m)
    assert t_m == pipe.scheduler.timesteps[m]
    a = pipe64.scheduler.alphas_cumprod[t_m]
    ref_x0 = (x_m - (1 - a).sqrt() * guided(pipe64, x_m, t_m, cond, uncond)) / a.sqrt()
    images = decode(pipe64, ref_x0)
    ref_r = reward(images, None)
    assert_normwise_close(x0_hat, ref_x0, tolerance(pipe, m + 1, decode=False))
    bound = reward_bound(reward, images, tolerance(pipe, m + 1))
    assert (r - ref_r).abs().max() <= bound and abs(loss.item() + ref_r.mean().item()) <= bound
    assert_normwise_close(ours, lora_grad(pipe64, -ref_r.mean()), tolerance(pipe, m + 1, backward=True))


def test_refl_relu_loss_through_main(tiny_pipe, tmp_path, monkeypatch):
    pipe, reward, x_T = tiny_pipe, linear_reward(), latents(5)
    randomize_lora(pipe)
    cond, uncond = (e.double() for e in embeddings(pipe, ["a dog"] * B))

    def reference(pipe64):  # --max-step 1 pins m to the last step, T − 1: the images and their rewards
        x_m, t_m = reference_chain(pipe64, x_T.double(), cond, uncond, k=0, stop_at=T - 1)
        a = pipe64.scheduler.alphas_cumprod[t_m]
        images = decode(pipe64, (x_m - (1 - a).sqrt() * guided(pipe64, x_m, t_m, cond, uncond)) / a.sqrt())
        return images, reward(images, None)

    with torch.no_grad():
        images, r = reference(float64_copy(pipe))
    bound = reward_bound(reward, images, tolerance(pipe, T))
    lam, scale = r.mean().item(), 1e-3  # λ between the two rewards: one sample is above it and gives no gradient
    assert (r.max() - r.min()) / 2 > bound  # and neither float32 reward can round to the other side of λ
    row, ours = run_main(refl, pipe, tmp_path, monkeypatch, reward, x_T, max_step=1, loss="relu",
                         relu_lambda=lam, grad_scale=scale)
    pipe64 = float64_copy(pipe)  # after main: learning rate 0 left the weights as they were
    _, ref_r = reference(pipe64)
    ref_loss = torch.relu(lam - ref_r).mean() * scale
    assert row["refl_step"] == T - 1 and row["refl_timestep"] == pipe.scheduler.timesteps[-1]
    assert abs(row["loss"] - ref_loss.item()) <= scale * bound  # relu is 1-Lipschitz
    assert abs(row["reward_mean"] - ref_r.mean().item()) <= bound
    assert_normwise_close(ours, lora_grad(pipe64, ref_loss), tolerance(pipe, T, backward=True))


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
