"""Flow-matching models (SD3.x, docs/ALGORITHMS.md §9) on `tiny-sd3`: the sampler room common/flow.py against diffusers'
FlowMatchEulerDiscreteScheduler and pipeline, Flow-GRPO's SDE step against its formula written out here and
torch.distributions, the SD3 room's prompt encoding against StableDiffusion3Pipeline.encode_prompt, every script for
one update, the LoRA in diffusers' SD3 format, and gradients through the flow chain."""

import json
import math

import pytest
import torch
import tyro

import common
from common.models import tiny_sd3
from conftest import (SCRIPTS, assert_normwise_close, directional_derivatives, pair_tolerance, randomize_lora,
                      read_metrics, rounding_tolerance, roundings, script_args, scripts)

PROMPTS = ["a red cube", "a photo of a dog on the beach"]


@pytest.fixture(scope="module")
def sd3():
    return common.load_pipeline("tiny-sd3", lora_rank=4)


def schedule(steps=5):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(steps)
    return s


def reference_sde(sigmas: list[float], i: int, x, v, a: float):
    """Flow-GRPO's SDE step from step i (sd3_sde_with_logprob.py), written out in float64 from the sigma list:
    s = a·√(σ/(1 − σ)), σ = 1 in the denominator replaced by the next sigma; μ and std = s·√(−Δt)."""
    t, t_next = sigmas[i], sigmas[i + 1]
    dt = t_next - t
    s = a * math.sqrt(t / (1 - (sigmas[1] if t == 1 else t)))
    mean = x * (1 + s * s / (2 * t) * dt) + v * (1 + s * s * (1 - t) / (2 * t)) * dt
    return mean, s * math.sqrt(-dt)


def test_the_first_sigma_is_one_and_handled():
    s = schedule()
    assert s.sigmas[0].item() == 1.0  # SD3's schedule starts at pure noise: Flow-GRPO's special case is reached
    x, v = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    mean, std = common.step_mean_std(s, v, s.timesteps[0], x, 0.7)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()


def test_sde_mean_and_std_match_the_formula_per_sample_timesteps():
    s = schedule(5)
    sigmas = s.sigmas.double().tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    v = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    order = torch.tensor([3, 0, 4, 1, 2])  # each sample at its own step, as the RL scripts re-evaluate them
    mean, std = common.step_mean_std(s, v, s.timesteps[order], x, 0.7)
    for row, i in enumerate(order.tolist()):
        ref_mean, ref_std = reference_sde(sigmas, i, x[row], v[row], 0.7)
        # both in float64 from the same float32 sigmas: they differ by float64 rounding only
        torch.testing.assert_close(mean[row], ref_mean, rtol=1e-12, atol=1e-12)
        assert std[row].flatten().unique().tolist() == pytest.approx([ref_std], rel=1e-12)


def test_sampled_steps_log_prob_is_the_gaussian_density():
    s = schedule(4)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    for i, t in enumerate(s.timesteps):
        prev, log_prob = common.step_with_logprob(s, v, t, x, 0.7, generator=g)
        ref_mean, ref_std = reference_sde(s.sigmas.double().tolist(), i, x.double(), v.double(), 0.7)
        ref = torch.distributions.Normal(ref_mean, ref_std).log_prob(prev.double()).mean(dim=(1, 2, 3))
        # float32 μ against the float64 formula: |δ log p| ≤ |prev − μ|·|δμ|/std² per element, δμ a few float32
        # roundings of |x| + |v|·|Δt| (≤ 8 each), std ≥ 1e-3 here
        torch.testing.assert_close(log_prob.double(), ref, rtol=0, atol=1e-3)


def test_zero_noise_level_is_the_schedulers_euler_step_and_small_noise_converges_to_it():
    s = schedule(5)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    for t in s.timesteps:
        s._step_index = None  # diffusers' step keeps its own position; look it up from t each time
        ours = common.step(s, v, t, x)
        assert torch.equal(ours, s.step(v, t, x).prev_sample)  # the same float32 operations: bit for bit
        prev, log_prob = common.step_with_logprob(s, v, t, x, 0.0)
        assert torch.equal(prev, ours) and log_prob is None
        mean, std = common.step_mean_std(s, v.double(), t, x.double(), 1e-4)
        # μ − ODE step = s²·Δt/(2σ)·(x + (1 − σ)·v), s ∝ a²: 1e-8 relative at a = 1e-4
        torch.testing.assert_close(mean, ours.double(), rtol=0, atol=1e-6)
        assert (std < 1e-3).all()


def test_empirical_std_of_sampled_steps():
    s = schedule(5)
    n = 256 * 16 * 8 * 8  # elements drawn per step: the std estimate's relative standard error is 1/√(2n) = 0.0027
    x = torch.randn(256, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    v = torch.randn_like(x)
    g = torch.Generator().manual_seed(4)
    for i, t in enumerate(s.timesteps):
        prev, _ = common.step_with_logprob(s, v, t, x, 0.7, generator=g)
        ref_mean, ref_std = reference_sde(s.sigmas.double().tolist(), i, x.double(), v.double(), 0.7)
        residual = prev.double() - ref_mean
        assert abs(residual.std().item() / ref_std - 1) < 5 / math.sqrt(2 * n)  # 5 standard errors
        assert abs(residual.mean().item()) < 5 * ref_std / math.sqrt(n)


def test_x0_renoising_and_velocity_target():
    s = schedule(5)
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    t = s.timesteps[[1, 2, 4]]
    xt = common.add_noise(s, x0, eps, t)
    torch.testing.assert_close(xt, s.scale_noise(x0, t, eps))  # diffusers' forward process, per-sample t
    target = common.denoising_target(s, x0, eps, t)
    torch.testing.assert_close(target, eps - x0)
    # the exact velocity recovers x0 from x_t: x̂0 = x_t − σ·v
    torch.testing.assert_close(common.predict_x0(s, target, t, xt), x0, rtol=1e-5, atol=1e-5)
    # a timestep off the schedule (RWR's integer t ~ U{0..999}) has σ = t/1000, the transformer's own reading of t
    t_int = torch.tensor([0, 250, 999])
    sigma = torch.tensor([0.0, 0.25, 0.999]).view(-1, 1, 1, 1)
    torch.testing.assert_close(common.add_noise(s, x0, eps, t_int), (1 - sigma) * x0 + sigma * eps)


@pytest.mark.parametrize("change, message", [
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (dict(stochastic_sampling=True), "stochastic_sampling"),
    (dict(invert_sigmas=True), "invert_sigmas"),
])
def test_a_flow_scheduler_whose_step_differs_is_refused(change, message):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(common.UserError, match=message):
        common.check_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0, **change))
    common.check_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=False))


@pytest.mark.parametrize("no_t5", [False, True])
def test_encode_prompts_is_the_pipelines_encode_prompt(no_t5):
    pipe = common.load_pipeline("tiny-sd3" + (":no-t5" if no_t5 else ""), lora_rank=0)
    assert (pipe.text_encoder_3 is None) == no_t5
    ours = common.encode_prompts(pipe, PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert ours.shape == (2, 77 + 256 + 1, 64)
    assert torch.equal(ours[:, :-1], embeds)
    assert torch.equal(ours[:, -1, : pooled.shape[1]], pooled) and not ours[:, -1, pooled.shape[1]:].any()
    if no_t5:
        assert not ours[:, 77:-1].any()


def test_ode_sampler_and_decode_are_the_pipelines(sd3):
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(2, 16, 16, 16, generator=g)
    cond, uncond = common.encode_prompts(sd3, PROMPTS), common.encode_prompts(sd3, [""])
    ours = common.sample_trajectory(sd3, cond, uncond, 4, 4.5, 0.0, latents=latents)
    with torch.no_grad():
        theirs = sd3(PROMPTS, num_inference_steps=4, guidance_scale=4.5, latents=latents, output_type="latent").images
        images = sd3(PROMPTS, num_inference_steps=4, guidance_scale=4.5, latents=latents, output_type="pt").images
    # The same operations, but the pipeline encodes the empty prompt as a batch of 2 (ours: of 1), which rounds
    # differently in the text encoders' matmuls: float32 rounding of the encoders and 4 transformer calls, amplified
    # by the guidance (2w − 1) (conftest's bound); a wrong step, sigma or guidance is orders of magnitude above it.
    n = roundings(sd3.text_encoder, sd3.text_encoder_2, sd3.text_encoder_3) + 4 * roundings(sd3.transformer)
    assert_normwise_close(ours.latents[:, -1], theirs, pair_tolerance(rounding_tolerance(n, gain=2 * 4.5 - 1)))
    assert torch.equal(ours.timesteps, sd3.scheduler.timesteps)
    # decoding applies the VAE's shift factor as the pipeline does, images in [0, 1]: the same operations
    assert torch.equal(common.decode(sd3, theirs), images)


def test_lora_targets_are_flow_grpos():
    pipe = common.load_pipeline("tiny-sd3", lora_rank=2, lora_targets=common.ATTENTION_TARGETS)
    adapted = {n.removesuffix(".lora_A.default").split(".", 2)[2] for n, _ in pipe.transformer.named_modules()
               if n.endswith(".lora_A.default")}
    # flow_grpo scripts/train_sd3.py target_modules
    assert adapted == {"attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                       "attn.to_out.0", "attn.to_q", "attn.to_v"}
    ff = common.load_pipeline("tiny-sd3", lora_rank=2,
                              lora_targets=common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS)
    names = {n for n, _ in ff.transformer.named_modules() if n.endswith(".lora_A.default")}
    assert any(".ff_context.net.2." in n for n in names) and any(".ff.net.0.proj." in n for n in names)


@pytest.mark.parametrize("script", scripts())
def test_every_script_trains_on_tiny_sd3(script, tmp_path):
    """One update through the script's own command-line parser; the LoRA then loads into a StableDiffusion3Pipeline
    built from the same configs with diffusers' own loader, and changes its output."""
    module = __import__(script)
    args = script_args(script, "--steps", "1", "--num-inference-steps", "3", "--num-sample-images", "2",
                       "--output-dir", str(tmp_path / "run"))
    args[args.index("--model") + 1] = "tiny-sd3"
    module.main(tyro.cli(module.Args, args=args))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])

    pipe = tiny_sd3(0)
    x, t = torch.randn(1, 16, 16, 16), torch.tensor([500.0])
    emb = common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        before = pipe.transformer(x, emb[:, :-1], emb[:, -1, :48], t).sample
        pipe.load_lora_weights(str(tmp_path / "run"))
        after = pipe.transformer(x, emb[:, :-1], emb[:, -1, :48], t).sample
    assert (after - before).abs().max() > 0
    assert SCRIPTS[script].kind in ("rl", "gradient")


def test_grpo_run_draws_its_grid_with_eval_num_inference_steps(tmp_path):
    """Flow-GRPO's split (train at 10 steps, evaluate at 40), here 2 and 3: the run's logged base-model grid (step 0:
    the LoRA is still zero) has the scores and diversity of `common.sample_images` at 3 steps with the run's η, and
    not those at the 2 training steps."""
    import grpo
    import rewards
    from common.evaluation import diversity

    args = script_args("grpo", "--steps", "1", "--num-inference-steps", "2", "--eval-num-inference-steps", "3",
                       "--num-sample-images", "2", "--sample-seeds", "2", "--output-dir", str(tmp_path / "run"))
    args[args.index("--model") + 1] = "tiny-sd3"
    args = tyro.cli(grpo.Args, args=args)
    grpo.main(args)
    row = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[0])
    assert row["step"] == 0

    pipe = common.load_pipeline("tiny-sd3", lora_rank=args.lora_rank)
    prompt = common.load_prompts(args.prompts, args.prompt_file, args.model)[:1]

    def grid(steps):  # seed 0's image, then seed 1's: the grid's row-major order for one prompt
        return torch.cat([common.sample_images(pipe, prompt, s, steps, args.guidance_scale, args.eta) for s in (0, 1)])

    images = grid(3)
    assert row["scores"] == rewards.load(args.reward)(images, prompt * 2).float().tolist()
    assert row["eval/diversity"] == diversity(images, 2) != diversity(grid(2), 2)


def test_lora_round_trip_through_load_lora(sd3, tmp_path):
    randomize_lora(sd3, std=0.05)
    path = common.save_lora(sd3, tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    other = common.load_pipeline("tiny-sd3", lora_rank=4)
    common.load_lora(other, tmp_path)
    for a, b in zip(common.lora_parameters(sd3), common.lora_parameters(other)):
        assert torch.equal(a, b)


def flow_chain_reward(pipe, weights, use_checkpoint=False, dtype=torch.float32, steps=3):
    """The Euler ODE from fixed noise with gradient through every step (DRaFT's K = T), decode, a linear reward."""
    cond = common.encode_prompts(pipe, PROMPTS).to(dtype)
    uncond = common.encode_prompts(pipe, [""]).to(dtype)
    pipe.scheduler.set_timesteps(steps)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    for t in pipe.scheduler.timesteps:
        v = common.guided_noise_pred(pipe, x, t, cond, uncond, 4.5, use_checkpoint=use_checkpoint).to(dtype)
        x = common.step(pipe.scheduler, v, t, x)
    return (common.decode(pipe, x.to(pipe.vae.dtype)).to(weights.dtype) * weights).sum()


def _rms_norm_in_float64(self, x):
    # diffusers' RMSNorm formula with its variance in the input's dtype: diffusers computes it in float32 whatever the
    # input (a half-precision safeguard), which leaves float32 rounding (~1e-7 relative) in a float64 forward, above
    # what central differences at h = 1e-6 resolve
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return x if self.weight is None else x * self.weight + (0 if self.bias is None else self.bias)


def test_flow_gradients_checkpointed_equal_plain_and_finite_differences(monkeypatch):
    from diffusers.models.normalization import RMSNorm

    pipe = common.load_pipeline("tiny-sd3", lora_rank=2)
    randomize_lora(pipe, std=0.05)
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    params = common.lora_parameters(pipe)
    flow_chain_reward(pipe, weights).backward()
    plain = [p.grad.clone() for p in params]
    pipe.transformer.zero_grad(set_to_none=True)
    flow_chain_reward(pipe, weights, use_checkpoint=True).backward()
    assert sum(g.abs().sum() for g in plain) > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(params, plain))  # recomputed identically

    for module in (pipe.transformer, pipe.vae):
        module.to(torch.float64)
    monkeypatch.setattr(RMSNorm, "forward", _rms_norm_in_float64)
    pipe.transformer.zero_grad(set_to_none=True)
    weights = weights.double()
    f = lambda: flow_chain_reward(pipe, weights, use_checkpoint=True, dtype=torch.float64)  # noqa: E731
    analytic, numeric = directional_derivatives(f, params, seed=9)
    assert abs(analytic) > 1e-3
    # central differences: O(h²) truncation and float64 rounding of f / h (f ~ 1e2: 1e-14 / 1e-6), far below 1e-5
    assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)


def test_lora_tools_on_an_sd3_lora(tmp_path, capsys):
    """scale / mix / grid / export (peft) on a transformer LoRA, each output loaded by diffusers' SD3 loader; kohya
    export refused in one line."""
    import lora_tools

    pipe = common.load_pipeline("tiny-sd3", lora_rank=2)
    randomize_lora(pipe, std=0.05)
    common.save_lora(pipe, tmp_path / "a")
    x, t = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(10)), torch.tensor([500.0])
    emb = common.encode_prompts(pipe, ["a cat"])

    def out(pipe):
        with torch.no_grad():
            return pipe.transformer(x, emb[:, :-1], emb[:, -1, :48], t).sample

    base = tiny_sd3(0)
    before = out(base)
    base.load_lora_weights(str(tmp_path / "a"), adapter_name="a")
    base.set_adapters(["a"], [0.5])  # diffusers' own scaling of the original LoRA: the reference
    half = out(base)
    assert (half - before).abs().max() > 0

    lora_tools.main(["scale", str(tmp_path / "a"), "--scale", "0.5", "--model", "tiny-sd3",
                     "--output", str(tmp_path / "half")])
    lora_tools.main(["mix", f"{tmp_path / 'a'}:0.25", f"{tmp_path / 'a'}:0.25", "--model", "tiny-sd3",
                     "--output", str(tmp_path / "mix")])
    for name in ("half", "mix"):
        other = tiny_sd3(0)
        other.load_lora_weights(str(tmp_path / name))
        # B·A scaled by 0.5 (exact in binary) or [0.25·B, 0.25·B]·[A; A]: rounding of the rank-2 or rank-4 products
        torch.testing.assert_close(out(other), half, rtol=1e-5, atol=1e-6)

    lora_tools.main(["export", str(tmp_path / "a"), "--format", "peft", "--model", "tiny-sd3",
                     "--output", str(tmp_path / "peft")])
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    lora_tools.main(["grid", str(tmp_path / "a"), "--model", "tiny-sd3", "--scales", "0,1", "--seeds", "0",
                     "--num-prompts", "1", "--num-inference-steps", "2", "--output", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        lora_tools.main(["export", str(tmp_path / "a"), "--format", "kohya", "--model", "tiny-sd3",
                         "--output", str(tmp_path / "k.safetensors")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and "kohya" in err and "Traceback" not in err
    assert not (tmp_path / "k.safetensors").exists()


def test_model_card_of_an_sd3_run(tmp_path):
    from common.publish import write_model_card

    common.save_lora(common.load_pipeline("tiny-sd3", lora_rank=2), tmp_path)
    card = write_model_card(tmp_path, dict(model=common.models.SD35M + ":no-t5", reward="pickscore", steps=1,
                                           num_inference_steps=40, guidance_scale=4.5, eta=0.7)).read_text()
    assert "base_model: stabilityai/stable-diffusion-3.5-medium\n" in card
    assert ("StableDiffusion3Pipeline.from_pretrained('stabilityai/stable-diffusion-3.5-medium', text_encoder_3=None, "
            "tokenizer_3=None") in card
    assert "A LoRA on the transformer" in card and "eta=" not in card and "DDIMScheduler" not in card


def test_a_local_sd3_folder_loads_with_its_flow_scheduler(tmp_path):
    """A diffusers SD3 folder is loaded by the class its model_index.json names, keeping its FlowMatchEuler scheduler
    (shift from its config); ":no-t5" leaves T5 out; the conditioning is the built pipeline's."""
    tiny_sd3(0).save_pretrained(tmp_path / "sd3")
    pipe = common.load_pipeline(str(tmp_path / "sd3"), lora_rank=2)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    assert torch.equal(common.encode_prompts(pipe, PROMPTS), common.encode_prompts(tiny_sd3(0), PROMPTS))
    assert common.load_pipeline(str(tmp_path / "sd3") + ":no-t5", lora_rank=0).text_encoder_3 is None


def test_reevaluating_a_stored_trajectory_gives_its_log_probs(sd3):
    """The RL scripts' ratio is 1 before the first update: each stored step re-evaluated at per-sample timesteps (in
    shuffled order) gives the stored log-prob, the same operations on the same values."""
    cond, uncond = common.encode_prompts(sd3, PROMPTS), common.encode_prompts(sd3, [""])
    traj = common.sample_trajectory(sd3, cond, uncond, 4, 4.5, 0.7, generator=torch.Generator().manual_seed(11))
    assert traj.log_probs.shape == (2, 4) and torch.isfinite(traj.log_probs).all()
    for k in (3, 0, 2, 1):
        t = traj.timesteps[[k, k]]
        with torch.no_grad():
            v = common.guided_noise_pred(sd3, traj.latents[:, k], t, cond, uncond, 4.5)
        prev, log_prob = common.step_with_logprob(sd3.scheduler, v, t, traj.latents[:, k], 0.7,
                                                  prev_sample=traj.latents[:, k + 1])
        assert torch.equal(log_prob, traj.log_probs[:, k]), k


def test_random_weights_give_rms_norm_scales_of_one():
    """sd35m-random's initialiser (common.models.random_weights_) on SD3.5's layers: the RMS q/k norms' scales are 1,
    as every norm's (0 would silence attention), the linear layers uniform in ±1/√fan_in."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from diffusers.models.normalization import RMSNorm

    from common.models import random_weights_

    with init_empty_weights(include_buffers=False):
        net = SD3Transformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                                    pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
    random_weights_(net, 0)
    norms = [m for m in net.modules() if isinstance(m, RMSNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    q = net.transformer_blocks[0].attn.to_q.weight
    assert q.abs().max() <= q.shape[1] ** -0.5 and q.std() > 0


def test_resolution_counts_the_transformers_patch_size():
    pipe = common.load_pipeline("tiny-sd3", lora_rank=0, resolution=48)  # VAE factor 2 × patch 2: multiples of 4 px
    assert common.initial_latents(pipe, 1).shape == (1, 16, 24, 24)
    assert common.sample_images(pipe, ["a cat"], 0, 2, 4.5).shape == (1, 3, 48, 48)
    with pytest.raises(common.UserError, match="multiple of 4 px"):
        common.load_pipeline("tiny-sd3", lora_rank=0, resolution=42)
