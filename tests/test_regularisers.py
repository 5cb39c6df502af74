"""The regularisers of common/regularisers.py in the scripts (issue 25), each against an independent computation: DDPO's
--kl-beta term against torch.distributions' KL on a separately built base model, the LoRA's EMA against a loop written
here, ReFL's pre-training loss against the loss of diffusers' train_text_to_image example. (The KL itself against
torch.distributions, zero at a zero LoRA and pulling toward the base model: test_grpo.py; resume with an EMA:
test_robustness.py; the refusals: test_refusals.py.)"""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

import common
import rewards
from conftest import (U32, U64, assert_normwise_close, float64_scheduler, pair_tolerance, randomize_lora,
                      rounding_tolerance, roundings)
from conftest import SCRIPTS, scripts
from test_rl_algorithms import GUARD, lora_grads, small_batch


# --- DDPO + KL -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["ddpo_sf", "ddpo_is"])
def test_ddpo_kl_beta_adds_beta_times_the_gradient_of_the_mean_kl(script, tiny_pipe):
    """grad(--kl-beta β) − grad(--kl-beta 0) = β·∇ mean over the minibatch's (sample, timestep) pairs of
    KL(N(μ_θ, σ_t²) ‖ N(μ_ref, σ_t²)), written here with torch.distributions and μ_ref from a base model built
    without a LoRA (not the script's LoRA-disabled UNet)."""
    module = importlib.import_module(script)
    randomize_lora(tiny_pipe, seed=4)
    tiny_pipe.unet.to(torch.float64)  # the KL term is small beside the policy gradient: float64 keeps its digits
    tiny_pipe.scheduler = float64_scheduler(tiny_pipe.scheduler)
    n, num_steps, beta, w = 2, 3, 0.5, 5.0
    cond, uncond, traj = small_batch(tiny_pipe, n, num_steps)
    advantages = torch.tensor([1.0, -0.5])
    samples, timestep_idx = torch.tensor([1, 0]), torch.tensor([[2, 0, 1], [1, 2, 0]])
    grads = []
    for kl_beta in (0.0, beta):
        args = module.Args(train_batch_size=1, guidance_scale=w, eta=1.0, kl_beta=kl_beta)
        stats = module.accumulate_gradient(tiny_pipe, traj, cond, uncond, advantages, samples, timestep_idx, GUARD,
                                           args)
        grads.append(lora_grads(tiny_pipe))
        tiny_pipe.unet.zero_grad(set_to_none=True)
        assert ("kl" in stats) == (kl_beta > 0)

    base = common.load_pipeline("tiny", lora_rank=0)
    base.unet.to(torch.float64)
    kls = []
    for row, i in enumerate(samples.tolist()):
        for k in timestep_idx[row].tolist():
            x, t, c = traj.latents[i : i + 1, k], traj.timesteps[k], cond[i : i + 1]
            mean, std = common.step_mean_std(tiny_pipe.scheduler, common.guided_noise_pred(tiny_pipe, x, t, c, uncond, w),
                                             t, x, 1.0)
            with torch.no_grad():
                mean_ref, _ = common.step_mean_std(tiny_pipe.scheduler,
                                                   common.guided_noise_pred(base, x, t, c, uncond, w), t, x, 1.0)
            kls.append(kl_divergence(Normal(mean, std), Normal(mean_ref, std)).mean())
    (beta * torch.stack(kls).mean()).backward()
    reference = lora_grads(tiny_pipe)
    assert all(g.abs().max() > 0 for g in reference)

    # float64: each of the three gradients within t of its exact value (conftest's bound over every pair's forward and
    # backward passes, guidance's gain 2w − 1); the difference of the two script gradients carries both their errors
    pairs = samples.numel() * timestep_idx.shape[1]
    t = rounding_tolerance(2 * pairs * (3 * roundings(tiny_pipe.unet) + 4 * 16 * 16), gain=2 * w - 1, u=U64)
    norm = lambda gs: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))  # noqa: E731
    ours = [g1 - g0 for g0, g1 in zip(*grads)]
    assert_normwise_close(ours, reference, pair_tolerance(t) * (norm(grads[0]) + norm(grads[1]) + norm(reference))
                          / norm(reference))


@pytest.mark.parametrize("script", ["ddpo_sf", "ddpo_is"])
def test_ddpo_kl_beta_zero_computes_no_kl(script, tiny_pipe, monkeypatch):
    """The default (--kl-beta 0, as the DDPO paper) takes the path of the script before the flag: no base-model
    forward, no KL term, no `kl` in the log."""
    module = importlib.import_module(script)

    def fail(*a, **k):
        raise AssertionError("the KL was computed at --kl-beta 0")

    monkeypatch.setattr(common, "kl_to_base", fail)
    cond, uncond, traj = small_batch(tiny_pipe, 2, 3)
    stats = module.accumulate_gradient(tiny_pipe, traj, cond, uncond, torch.tensor([1.0, -1.0]), torch.arange(2),
                                       torch.arange(3).expand(2, 3), GUARD, module.Args(train_batch_size=1))
    assert "kl" not in stats


# --- the EMA of the LoRA -------------------------------------------------------------------------------------------

def hand_ema(initial, updates, decay):
    """flow_grpo's EMA (flow_grpo/ema.py) written out: after the n-th update (n = 0, 1, …), with
    d = min(decay, (1 + n) / (10 + n)), average ← d·average + (1 − d)·weights."""
    average = [w.clone() for w in initial]
    for n, weights in enumerate(updates):
        d = min(decay, (1 + n) / (10 + n))
        average = [d * a + (1 - d) * w for a, w in zip(average, weights)]
    return average


def assert_ema_close(ours, reference, updates):
    # each update rounds d·a, (1 − d)·w and their sum: at most 3 roundings per update of values no larger than the
    # largest weight seen, so the error is below 3·updates·u of that
    scale = max(float(r.abs().max()) for r in reference)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=3 * updates * U32 * scale)


@pytest.mark.parametrize("decay", [0.5, 0.99])
def test_ema_against_a_hand_loop(decay):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    initial = [p.detach().clone() for p in params]
    ema, seen = common.LoraEMA(params, decay), []
    for _ in range(6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        seen.append([p.detach().clone() for p in params])
    reference = hand_ema(initial, seen, decay)
    assert_ema_close(ema.shadow, reference, 6)
    with ema.applied():  # the parameters hold the average inside, and the trained weights come back exactly
        assert_ema_close([p.detach() for p in params], reference, 6)
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, seen[-1]))
    restored = common.LoraEMA(params, decay)  # a checkpoint's state continues the same average
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 6 and all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))


def test_ema_off_stores_nothing_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    ema = common.LoraEMA([p], 0.0)
    ema.update()
    with ema.applied():
        assert torch.equal(p.detach(), torch.ones(3))
    assert ema.state_dict() == {} and ema.shadow == []


def _lora_of(path, targets):
    """The LoRA parameters of the tiny model with the diffusers-format file `path` loaded (via a folder)."""
    import shutil
    import tempfile

    pipe = common.load_pipeline("tiny", lora_rank=4, lora_targets=targets)
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(path, f"{d}/{common.LORA_FILE}")
        common.load_lora(pipe, d)
    return pipe, [p.detach().clone() for p in common.lora_parameters(pipe)]


def test_draft_saves_the_ema_of_its_updates_and_samples_the_grid_with_it(tmp_path):
    """draft.py --ema-decay 0.5 for 3 updates: lora_ema.safetensors equals the hand loop over the LoRA after each
    update (its checkpoints), from the LoRA the run started with; the last sample grid was drawn with it."""
    import draft

    out = tmp_path / "run"
    draft.main(common.cli(draft.Args, args=[
        "--model", "tiny", "--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--k", "2", "--steps", "3",
        "--num-inference-steps", "4", "--lora-rank", "4", "--ema-decay", "0.5", "--save-every", "1",
        "--keep-checkpoints", "0", "--num-sample-images", "2", "--sample-every", "100", "--output-dir", str(out)]))
    targets = common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS  # draft.py's default --lora-ff
    common.seed_everything(0)  # the run's seed: the same initial LoRA (A drawn, B = 0)
    initial = [p.detach().clone() for p in common.lora_parameters(common.load_pipeline("tiny", 4, lora_targets=targets))]
    updates = [_lora_of(out / f"checkpoints/step_{s}" / common.LORA_FILE, targets)[1] for s in (1, 2, 3)]
    pipe, ours = _lora_of(out / common.EMA_FILE, targets)
    assert_ema_close(ours, hand_ema(initial, updates, 0.5), 3)
    assert any(not torch.equal(a, b) for a, b in zip(ours, updates[-1]))  # the average is not the last LoRA
    assert load_file(str(out / common.LORA_FILE)).keys() == load_file(str(out / common.EMA_FILE)).keys()

    last = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][-1]
    reward_fn = rewards.load("jpeg_compressibility_diff")
    grid = common.SampleGrid(common.load_prompts(None, None, "tiny"), 2, 2, reward_fn, {}, 4, 7.5, 0.0)(pipe)
    assert last["step"] == 3 and last["scores"] == grid.scores.tolist()  # the same images, to the bit


# --- ReFL's pre-training loss --------------------------------------------------------------------------------------

def test_denoising_loss_equals_diffusers_train_text_to_image(tiny_pipe):
    """common.denoising_loss against the loss of diffusers' examples/text_to_image/train_text_to_image.py, written out
    here with its own calls (latent_dist.sample, DDPMScheduler.add_noise, torch.randint, F.mse_loss) on the same
    draws of torch's generator."""
    from diffusers import DDPMScheduler

    randomize_lora(tiny_pipe, seed=1)
    g = torch.Generator().manual_seed(0)
    side = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
    images = torch.rand(3, 3, side, side, generator=g)
    captions = ["a red circle", "two blue squares", "a cat"]
    cond = common.encode_prompts(tiny_pipe, captions)

    torch.manual_seed(7)
    ours = common.denoising_loss(tiny_pipe, images, cond)

    torch.manual_seed(7)
    noise_scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)  # the example trains with DDPM's
    with torch.no_grad():
        latents = tiny_pipe.vae.encode(images * 2 - 1).latent_dist.sample() * tiny_pipe.vae.config.scaling_factor
    # the example's randn_like follows the latents' memory layout, which for this VAE's output is not contiguous and
    # would hand out the same draws in another order: contiguous, they are common.randn's
    noise = torch.randn_like(latents.contiguous())
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    assert noise_scheduler.config.prediction_type == "epsilon"
    target = noise
    model_pred = tiny_pipe.unet(noisy_latents, timesteps, encoder_hidden_states=cond).sample
    reference = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")

    # the UNet's output within t of its exact value (conftest's bound; the VAE's rounding moves x0 far less, its
    # latents being rounded once more per operation at most): the loss, mean of (pred − target)², moves by at most
    # 2·t·‖pred‖·‖pred − target‖/N + (t‖pred‖)²/N, relative to ‖pred − target‖²/N
    t = rounding_tolerance(roundings(tiny_pipe.unet, tiny_pipe.vae))
    p, e = model_pred.detach().double().norm(), (model_pred - target).detach().double().norm()
    rtol = pair_tolerance(2 * t * p / e + (t * p / e) ** 2)
    torch.testing.assert_close(ours.detach().double(), reference.detach().double(), rtol=float(rtol), atol=0)
    ours.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in common.lora_parameters(tiny_pipe))


def test_image_caption_folders_in_both_layouts(tmp_path, tiny_pipe):
    """`--pretrain-data` reads same-name .txt captions or diffusers' metadata.jsonl, to the same pairs, and resizes
    the images to the model's size; the shapes writer makes such a folder of training (not held-out) captions."""
    from shapes import data

    txt = tmp_path / "txt"
    data.write_image_folder(txt, 5, seed=1)
    meta = tmp_path / "meta"
    meta.mkdir()
    rows = []
    for image in sorted(txt.glob("*.png")):
        (meta / f"img_{image.name}").write_bytes(image.read_bytes())
        rows.append(json.dumps(dict(file_name=f"img_{image.name}", text=image.with_suffix(".txt").read_text().strip())))
    (meta / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    a, b = common.PretrainData(txt, tiny_pipe), common.PretrainData(meta, tiny_pipe)
    assert a.captions == b.captions and torch.equal(a.images, b.images) and len(a) == 5
    side = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
    assert a.images.shape == (5, 3, side, side) and 0 <= a.images.min() and a.images.max() <= 1
    assert all(not data.is_heldout(data.parse_caption(c)) for c in a.captions)


def test_refl_adds_the_weighted_pretraining_loss(tmp_path, monkeypatch):
    """refl.py --pretrain-data: each update backpropagates w·L_pre (a probe added to L_pre receives gradient w per
    update), its logged loss is the ReFL loss plus w·L_pre, and L_pre is logged."""
    import refl
    from shapes import data

    data.write_image_folder(tmp_path / "pre", 8)
    probe, denoising_loss = torch.zeros((), requires_grad=True), common.denoising_loss
    monkeypatch.setattr(common, "denoising_loss", lambda *a: denoising_loss(*a) + probe)
    out = tmp_path / "run"
    refl.main(common.cli(refl.Args, args=[
        "--model", "tiny", "--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--max-step", "2",
        "--steps", "2", "--num-inference-steps", "4", "--num-sample-images", "2", "--sample-every", "100",
        "--pretrain-data", str(tmp_path / "pre"), "--pretrain-weight", "3", "--output-dir", str(out)]))
    assert probe.grad.item() == 2 * 3.0  # d(w·(L_pre + probe))/d probe = w, over 2 updates
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["pretrain_loss"] > 0
        # loss = −mean r + 3·L_pre: the two float32 means of the same two rewards, one product and one sum, each
        # rounded once, relative to the terms' size
        size = abs(row["reward_mean"]) + 3 * row["pretrain_loss"]
        assert abs(row["loss"] - (-row["reward_mean"] + 3 * row["pretrain_loss"])) <= 6 * U32 * size


# --- DRaFT + KL ----------------------------------------------------------------------------------------------------

def test_draft_kl_gaps_against_a_separate_base_model(tiny_pipe):
    """draft.sample_with_grad's gaps (DRaFT-K, K = 2 of T = 4) against ‖ε̂_θ − ε̂_ref‖² written out along diffusers'
    DDIM chain, ε̂_ref from a base model built without a LoRA: the values and the gradient of their sum (which flows
    through ε̂_θ and, for K > 1, through the latent into the earlier step with gradient; ε̂_ref is held constant)."""
    import draft
    from diffusers import DDIMScheduler

    T, k, w = 4, 2, 7.5
    randomize_lora(tiny_pipe, seed=6)
    tiny_pipe.unet.to(torch.float64)  # the gaps are small differences of two predictions: float64 keeps their digits
    tiny_pipe.scheduler = float64_scheduler(tiny_pipe.scheduler)
    cond, uncond = (e.double() for e in (common.encode_prompts(tiny_pipe, ["a cat", "a dog"]),
                                         common.encode_prompts(tiny_pipe, [""])))
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gaps = []
    draft.sample_with_grad(tiny_pipe, cond, uncond, x_T, draft.Args(num_inference_steps=T, k=k, guidance_scale=w,
                                                                   unet_checkpointing=False), gaps)
    assert len(gaps) == k
    sum(gaps).backward()
    ours = lora_grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)

    base = common.load_pipeline("tiny", lora_rank=0)
    base.unet.to(torch.float64)
    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    scheduler.set_timesteps(T)

    def guided(unet, x, t):
        e_u = unet(x, t, encoder_hidden_states=uncond.expand(len(x), -1, -1)).sample
        e_c = unet(x, t, encoder_hidden_states=cond).sample
        return e_u + w * (e_c - e_u)

    x, reference, ratio = x_T, [], 0.0
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= T - k):
            e = guided(tiny_pipe.unet, x, t)
            if i >= T - k:
                with torch.no_grad():
                    e_ref = guided(base.unet, x, t)
                reference.append(((e - e_ref) ** 2).mean())
                ratio = max(ratio, float(e.detach().norm() / (e.detach() - e_ref).norm()))  # a gap's error gain
            x = scheduler.step(e, t, x, eta=0.0).prev_sample
    # float64 on both sides, one UNet path each through ≤ k steps (forward: N roundings, with backward: 3N), guidance's
    # gain 2w − 1; a gap is the square of a difference of two predictions, whose relative error is the predictions'
    # times ‖ε̂‖/‖ε̂ − ε̂_ref‖ (`ratio`), doubled by the square
    t_forward = rounding_tolerance(k * roundings(tiny_pipe.unet), gain=2 * w - 1, u=U64)
    torch.testing.assert_close(torch.stack(gaps).detach(), torch.stack(reference).detach(),
                               rtol=pair_tolerance(2 * ratio * t_forward), atol=0)
    sum(reference).backward()
    t_backward = rounding_tolerance(3 * k * roundings(tiny_pipe.unet), gain=2 * w - 1, u=U64)
    assert_normwise_close(ours, lora_grads(tiny_pipe), pair_tolerance((1 + 2 * ratio) * t_backward))


@pytest.mark.parametrize("name", scripts("gradient"))
def test_gradient_scripts_add_beta_times_the_gaps_to_their_loss(name, tiny_pipe, monkeypatch):
    """accumulate_gradient backpropagates β·Σ gaps with each chunk's share of the batch (a probe added to every gap
    receives β per UNet call with gradient of the sampling chain: K for DRaFT-K and AlignProp, 1 for DRaFT-LV, whose
    re-noised copies carry none, and ReFL), and computes no gap at --kl-beta 0."""
    import inspect

    module = importlib.import_module(name)
    probe, prediction_gap = torch.zeros((), requires_grad=True), common.prediction_gap
    monkeypatch.setattr(common, "prediction_gap", lambda *a: prediction_gap(*a) + probe)
    prompts = ["a cat", "a dog"]
    cond, uncond = common.encode_prompts(tiny_pipe, prompts), common.encode_prompts(tiny_pipe, [""])
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    noises = ([torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)],) \
        if "noises" in inspect.signature(module.accumulate_gradient).parameters else ()  # DRaFT-LV's copies
    reward_fn = rewards.load("jpeg_compressibility_diff")
    s = SCRIPTS[name]
    calls = {"draft": 2, "alignprop": 4}.get(name, 1)  # the registry's K; DRaFT-LV and ReFL: one call with gradient
    for beta in (0.25, 0.0):
        args = module.Args(num_inference_steps=4, train_batch_size=1, kl_beta=beta, **s.args)
        module.accumulate_gradient(tiny_pipe, reward_fn, prompts, cond, uncond, x_T, *noises, GUARD, args, *s.extra)
        assert (probe.grad is None) if beta == 0 else probe.grad.item() == beta * calls  # two chunks of half each
        probe.grad = None
