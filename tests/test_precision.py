"""Half precision that keeps the gradient: every script's loss in fp16 (with loss scaling) and bf16 base
weights against float32, at SD1.4's sizes; dynamic loss scaling; DDPO-IS's ratio on its first update; the whole CLI
in fp16 and bf16; micro-batching and VAE checkpointing giving the whole batch's gradient; v-prediction.

SD1.4's sizes on the `tiny` model: its latents have D = 4·16·16 elements against SD1.4's 4·64·64, its images 32²
pixels against 512², and the tests train on a few samples and timesteps where the published settings average over
n·T (DDPO: 64 images × 50 steps per update). Every loss here is linear in the advantages (or weights, or reward), so
multiplying them by (test sizes) / (real sizes) gives the per-element gradient a real update has at the UNet's output
(DDPO: about 4e-8, below fp16's smallest subnormal, 6e-8), which is what decides whether fp16 keeps it.
"""

import importlib
import inspect
import math
import os
import subprocess

import pytest
import torch
import tyro

import common
import ddpo_is
import draft
import rwr
from conftest import SCRIPTS, randomize_lora, read_metrics, script_args, script_cli, scripts

D_TEST, D_SD14 = 4 * 16 * 16, 4 * 64 * 64  # latent elements
PIXELS_TEST, PIXELS_SD14 = 32 * 32, 512 * 512
PRECISIONS = [torch.float16, torch.bfloat16]



@pytest.fixture(scope="module")
def pipes():
    """The tiny pipeline with float32, fp16 and bf16 base weights (the same weights, rounded) and one LoRA."""
    out = {dtype: common.load_pipeline("tiny", lora_rank=4, dtype=dtype)
           for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    randomize_lora(out[torch.float32], std=0.05)
    for dtype in PRECISIONS:
        for p, q in zip(common.lora_parameters(out[torch.float32]), common.lora_parameters(out[dtype])):
            q.data.copy_(p.data)
    return out


def cosine(a, b):
    # not torch's cosine_similarity: it clamps ‖a‖·‖b‖ at 1e-8, and these gradients have norms of about 1e-8
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def lora_gradient(pipe, backward) -> torch.Tensor:
    """The flat LoRA gradient of one update: `backward(guard)` accumulates it, then the guard unscales (fp16)."""
    params = common.lora_parameters(pipe)
    for p in params:
        p.grad = None
    guard = common.UpdateGuard(1, loss_scaling=pipe.unet.conv_in.weight.dtype == torch.float16)
    backward(guard)
    guard.clip_grad_norm_(params, 0.0)
    return torch.cat([p.grad.flatten() for p in params])


# --- the RL scripts: DDPO-SF, DDPO-IS, GRPO, RWR -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trajectory(pipes):
    pipe = pipes[torch.float32]
    cond = common.encode_prompts(pipe, ["a cat", "a dog"])
    uncond = common.encode_prompts(pipe, [""])
    traj = common.sample_trajectory(pipe, cond, uncond, 50, 5.0, 1.0, generator=torch.Generator().manual_seed(0))
    return cond, uncond, traj


# the RL scripts whose loss is over the stored trajectory's log-probs (RWR's denoising loss: its own test below)
LOG_PROB_SCRIPTS = [name for name in scripts("rl") if hasattr(importlib.import_module(name), "minibatch_log_probs")]


@pytest.mark.parametrize("name", LOG_PROB_SCRIPTS)
@pytest.mark.parametrize("j", [0, 25, 49], ids=["t981", "t481", "t1"])
def test_policy_gradient_survives_half_precision(name, j, pipes, trajectory):
    """One timestep of the DDPO-style loss at SD1.4's sizes: cosine ≥ 0.99 with float32's gradient, in fp16 (loss
    scaled) and with bf16 base weights. Unscaled fp16 gave 0.04 / 0 / 0 (97–100% exact zeros)."""
    module, n_t = importlib.import_module(name), SCRIPTS[name].published_nt
    cond, uncond, traj = trajectory
    n = cond.shape[0]
    advantages = torch.tensor([1.0, -0.7]) * (n * D_TEST) / (n_t * D_SD14)  # one timestep of n samples: ×1/(n·T)
    args = module.Args(model="tiny", train_batch_size=n, guidance_scale=5.0, eta=1.0, num_inference_steps=50,
                       **SCRIPTS[name].args)
    samples, timestep_idx = torch.arange(n), torch.full((n, 1), j)

    def backward(pipe):
        pipe.scheduler.set_timesteps(50)
        return lambda guard: module.accumulate_gradient(pipe, traj, cond, uncond, advantages, samples, timestep_idx,
                                                        guard, args)

    reference = lora_gradient(pipes[torch.float32], backward(pipes[torch.float32]))
    assert reference.abs().max() > 0
    for dtype in PRECISIONS:
        ours = lora_gradient(pipes[dtype], backward(pipes[dtype]))
        print(f"cosine {name} t{j} {dtype}: {cosine(ours, reference):.4f}")  # the figures of the README (pytest -s)
        assert cosine(ours, reference) >= 0.99, (dtype, cosine(ours, reference))
    # the control: fp16 without loss scaling does not keep this gradient
    params = common.lora_parameters(pipes[torch.float16])
    for p in params:
        p.grad = None
    backward(pipes[torch.float16])(common.UpdateGuard(1, loss_scaling=False))
    unscaled = torch.cat([p.grad.flatten() for p in params])
    print(f"cosine {name} t{j} unscaled fp16: " + ("all zero" if unscaled.abs().max() == 0
                                                    else f"{cosine(unscaled, reference):.4f}"))
    assert unscaled.abs().max() == 0 or cosine(unscaled, reference) < 0.9


def test_rwr_gradient_survives_half_precision(pipes, trajectory):
    """RWR's weighted denoising loss at SD1.4's sizes (a minibatch of 16, mean over 16,384 elements)."""
    cond, uncond, traj = trajectory
    x0 = traj.latents[:, -1]
    weights = torch.tensor([1.3, 0.7]) * (2 * D_TEST) / (SCRIPTS["rwr"].published_nt * D_SD14)
    args = rwr.Args(model="tiny", train_batch_size=2, guidance_scale=5.0)

    def backward(pipe):
        def run(guard):
            torch.manual_seed(0)  # the same timesteps and noise in every precision
            rwr.accumulate_gradient(pipe, (x0, torch.zeros_like(x0)), cond, uncond, weights, torch.arange(2), guard,
                                    args)
        return run

    reference = lora_gradient(pipes[torch.float32], backward(pipes[torch.float32]))
    for dtype in PRECISIONS:
        c = cosine(lora_gradient(pipes[dtype], backward(pipes[dtype])), reference)
        print(f"cosine rwr {dtype}: {c:.4f}")
        assert c >= 0.99, dtype


# --- the gradient scripts: DRaFT, DRaFT-LV, ReFL, AlignProp --------------------------------------------------------

def pixel_mean_reward(scale):
    """A reward averaged over the pixels, like a reward model's: its per-pixel gradient is ∝ 1/pixels, here scaled
    from tiny's 32² to SD1.4's 512² pixels and from a batch of 2 to the published 4."""
    w = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))

    def reward(images, prompts):
        return (images.float() * w).mean(dim=(1, 2, 3)) * scale
    return reward


def gradient_script(name):
    """The module, its registry `args` and `extra`, and whether its accumulate_gradient takes re-noising `noises`
    (DRaFT-LV)."""
    module = importlib.import_module(name)
    takes_noises = "noises" in inspect.signature(module.accumulate_gradient).parameters
    return module, SCRIPTS[name].args, SCRIPTS[name].extra, takes_noises


@pytest.mark.parametrize("name", scripts("gradient"))
def test_reward_gradient_survives_half_precision(name, pipes):
    """Backprop through the last steps and the VAE decoder at SD1.4's sizes: cosine ≥ 0.99 with float32's."""
    module, flags, extra, takes_noises = gradient_script(name)
    args = module.Args(model="tiny", num_inference_steps=4, batch_size=2, **flags)
    reward_fn = pixel_mean_reward(PIXELS_TEST / PIXELS_SD14 * 2 / 4)
    prompts = ["a cat", "a dog"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    noises = [torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)]

    def backward(pipe):
        cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, [""])
        more = (noises,) if takes_noises else ()
        return lambda guard: module.accumulate_gradient(pipe, reward_fn, prompts, cond, uncond, latents, *more,
                                                        guard, args, *extra)

    reference = lora_gradient(pipes[torch.float32], backward(pipes[torch.float32]))
    assert reference.abs().max() > 0
    for dtype in PRECISIONS:
        ours = lora_gradient(pipes[dtype], backward(pipes[dtype]))
        print(f"cosine {name} {dtype}: {cosine(ours, reference):.4f}")
        assert cosine(ours, reference) >= 0.99, (dtype, cosine(ours, reference))


@pytest.mark.parametrize("name", scripts("gradient"))
def test_micro_batches_and_vae_checkpointing_give_the_whole_batch_gradient(name, pipes):
    """--train-batch-size 1 (four backward passes) and the decoder's gradient checkpointing give the gradient of
    one backward pass over the batch of 4."""
    module, flags, extra, takes_noises = gradient_script(name)
    pipe = pipes[torch.float32]
    prompts = ["a cat", "a dog", "a cow", "a fox"]
    cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, [""])
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    more = ([torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5 + i)) for i in range(2)],) \
        if takes_noises else ()
    reward_fn = pixel_mean_reward(1.0)

    def gradient(train_batch_size):
        args = module.Args(model="tiny", num_inference_steps=4, batch_size=4, train_batch_size=train_batch_size,
                           **flags)
        return lora_gradient(pipe, lambda guard: module.accumulate_gradient(
            pipe, reward_fn, prompts, cond, uncond, latents, *more, guard, args, *extra))

    whole = gradient(None)
    micro = gradient(1)
    pipe.vae.enable_gradient_checkpointing()
    try:
        checkpointed = gradient(2)
    finally:
        pipe.vae.disable_gradient_checkpointing()
    scale = float(whole.abs().max())
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(checkpointed, whole, rtol=1e-4, atol=1e-5 * scale)


# --- dynamic loss scaling ------------------------------------------------------------------------------------------

def test_overflow_skips_the_update_and_lowers_the_scale():
    p = torch.nn.Parameter(torch.zeros(3))
    guard = common.UpdateGuard(max_bad_steps=2, loss_scaling=True, init_scale=2.0**16, growth_interval=2)
    assert common.UpdateGuard(1, loss_scaling=True).scale == 2.0**24 and common.UpdateGuard(1).scale == 1.0
    for step, grad in enumerate([torch.tensor([1.0, float("inf"), 0.0])] * 3 + [torch.ones(3)] * 2, start=1):
        p.grad = grad * guard.scale  # what backward through the scaled loss leaves
        norm = guard.clip_grad_norm_([p], 0.0)
        ok = guard.ok(step, loss=torch.tensor(1.0), grad_norm=norm)
        if step <= 3:  # overflows: skipped, the scale halves, and they do not stop the run (max_bad_steps 2)
            assert not ok and guard.scale == 2.0 ** (16 - step)
        else:
            assert ok and torch.equal(p.grad, torch.ones(3))  # unscaled exactly
    assert guard.scale == 2.0**14  # two good updates (growth_interval 2) doubled it once
    assert guard.skipped == 3 and guard.charts() == dict(skipped_updates=3, loss_scale=2.0**14)
    restored = common.UpdateGuard(max_bad_steps=2, loss_scaling=True)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_without_loss_scaling_a_non_finite_gradient_counts_toward_max_bad_steps():
    guard = common.UpdateGuard(max_bad_steps=2)
    assert not guard.ok(1, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("nan")))
    with pytest.raises(SystemExit, match="2 consecutive steps"):
        guard.ok(2, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("nan")))


# --- DDPO-IS: the ratio on the first update ------------------------------------------------------------------------

class LayoutDependentUNet(torch.nn.Module):
    """A UNet whose output depends on the batch it is computed in, as a GPU's half-precision kernels do (other tile
    shapes and reduction orders for other batch shapes): a relative perturbation of bf16's size (2^-8), seeded by
    the batch's shape and timesteps, so the same layout gives the same output and another layout another one."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)

    def forward(self, x, t, encoder_hidden_states):
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        layout = hash((tuple(x.shape), tuple(torch.as_tensor(t).flatten().tolist()))) % 2**31
        noise = torch.randn(out.sample.shape, generator=torch.Generator().manual_seed(layout)) * 2.0**-8
        out.sample = out.sample * (1 + noise)
        return out


@pytest.mark.parametrize("reevaluate", [False, True])
def test_first_update_ratio_in_a_layout_dependent_precision(reevaluate, tmp_path, monkeypatch):
    """Sampling (4 samples at one timestep) and training (chunks of 2 at per-sample timesteps) use other layouts.
    Where the UNet's output depends on the layout, the stored log-probs put the first update's ratio off 1 by more
    than ε = 1e-4 (clipfrac > 0); --reevaluate-log-probs (the default in half precision) recomputes them in the
    training layout and the first update is exactly on-policy (ratio 1, clipfrac 0)."""
    pipe = common.load_pipeline("tiny", lora_rank=4)
    pipe.unet = LayoutDependentUNet(pipe.unet)
    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pipe)
    out = tmp_path / "run"
    ddpo_is.main(ddpo_is.Args(model="tiny", reward="jpeg_compressibility", steps=1, batch_size=4, sample_batch_size=4,
                              train_batch_size=2, num_minibatches=2, num_inference_steps=4, save_every=2,
                              num_sample_images=2, output_dir=str(out), reevaluate_log_probs=reevaluate))
    row = read_metrics(out)[0]
    if reevaluate:
        assert row["clipfrac"] == 0.0 and row["approx_kl"] == 0.0
    else:
        assert row["clipfrac"] > 0.5 and math.sqrt(2 * row["approx_kl"]) > 1e-4


def test_first_update_ratio_in_each_precision_on_this_cpu(pipes, trajectory):
    """Measured here: the stored log-probs (sampled 2 at a time at one timestep) re-evaluated in the training layout
    (1 sample per chunk, shuffled timesteps) at the same weights. On this CPU fp16 and bf16 kernels do not depend on
    the layout (|ratio − 1| exactly 0) and float32's differ by rounding (< 1e-5): within ε = 1e-4 in every
    precision without re-evaluation. (A GPU's half-precision kernels do depend on it: the test above.)"""
    cond, uncond, _ = trajectory
    for dtype, pipe in pipes.items():
        traj = common.sample_trajectory(pipe, cond, uncond, 10, 5.0, 1.0, generator=torch.Generator().manual_seed(0))
        args = ddpo_is.Args(model="tiny", train_batch_size=1, guidance_scale=5.0, eta=1.0, num_inference_steps=10)
        order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i)) for i in range(2)])
        worst = 0.0
        with torch.no_grad():
            for i, k, log_prob in ddpo_is.minibatch_log_probs(pipe, traj, cond, uncond, torch.arange(2), order, args):
                worst = max(worst, float((log_prob - traj.log_probs[i, k]).abs().max()))
        print(f"first-update |log ratio| {dtype}: max {worst:.2e}")  # |ratio − 1| to first order
        assert worst < 1e-5, (dtype, worst)


# --- the whole CLI in half precision -------------------------------------------------------------------------------

HALF_FLAGS = ("--steps", "1", "--num-inference-steps", "3", "--num-sample-images", "2", "--train-batch-size", "1")


def check_half_precision_run(out, precision):
    row = read_metrics(out)[0]
    assert math.isfinite(row["loss"]) and row["reward_queries"] > 0
    assert ("loss_scale" in row) == (precision == "fp16")  # dynamic loss scaling in fp16 only
    assert (out / common.LORA_FILE).is_file()


CLI_HALF = [scripts(kind)[0] for kind in ("rl", "gradient")]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("script", CLI_HALF)
def test_cli_trains_in_half_precision(script, precision, tmp_path):
    """One update through the real command line with fp16 or bf16 base weights, in micro-batches of one image (one
    script of each kind: a subprocess costs ~10 s of CPU, mostly imports; the others run in-process below)."""
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = script_cli(script, *HALF_FLAGS, "--mixed-precision", precision, "--output-dir", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_half_precision_run(out, precision)


@pytest.mark.parametrize("script", [s for s in scripts() if s not in CLI_HALF])
def test_every_other_script_trains_in_fp16(script, tmp_path):
    """The same update for every other script, in this process (its `main` with the real command-line parser), with
    fp16 base weights and loss scaling: every cast in the script's own loop meets half precision."""
    module, out = importlib.import_module(script), tmp_path / "run"
    module.main(tyro.cli(module.Args, args=script_args(script, *HALF_FLAGS, "--mixed-precision", "fp16",
                                                        "--sample-seeds", "1", "--output-dir", str(out))))
    check_half_precision_run(out, "fp16")


# --- v-prediction ---------------------------------------------------------------------------------------------------

def test_v_prediction_step_log_prob_and_x0_match_diffusers():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**(common.models.SD14_SCHEDULER | dict(prediction_type="v_prediction")))
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[3]
    ref = scheduler.step(v, t, x, eta=1.0, variance_noise=z)
    ours, log_prob = common.ddim_step_with_logprob(scheduler, v, t, x, 1.0, generator=None,
                                                   prev_sample=ref.prev_sample)
    torch.testing.assert_close(common.predict_x0(scheduler, v, t, x), ref.pred_original_sample)
    torch.testing.assert_close(common.ddim_step(scheduler, v, t, x), scheduler.step(v, t, x, eta=0.0).prev_sample)
    # the log-density of the sample diffusers drew: its mean is prev_sample − σ·z
    abar_t, abar_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 100]
    sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    normal = torch.distributions.Normal(ref.prev_sample - sigma * z, sigma)
    torch.testing.assert_close(log_prob, normal.log_prob(ref.prev_sample).mean(dim=(1, 2, 3)))
    # the denoising target of RWR is v = √ᾱ·ε − √(1−ᾱ)·x0, diffusers' get_velocity
    torch.testing.assert_close(common.denoising_target(scheduler, x, z, t.expand(2)),
                               scheduler.get_velocity(x, z, t.expand(2)))


@pytest.mark.parametrize("change,message", [(dict(prediction_type="sample"), "prediction_type='sample'"),
                                            (dict(clip_sample=True), "clip_sample=True"),
                                            (dict(thresholding=True), "thresholding=True")])
def test_a_scheduler_whose_step_differs_is_refused(change, message):
    from diffusers import DDIMScheduler

    with pytest.raises(common.UserError, match=message):
        common.check_scheduler(DDIMScheduler(**(common.models.SD14_SCHEDULER | change)))
    common.check_scheduler(DDIMScheduler(**(common.models.SD14_SCHEDULER | dict(prediction_type="v_prediction"))))


def test_resume_restores_the_loss_scale(tmp_path):
    """In fp16 a JPEG reward (about 10³, gradients far larger than a reward model's) overflows at 2^24: the first
    updates are skipped and the scale halves. Two updates in one go and one + one resumed log the same scales and end
    with the same LoRA: the scale (and the skip count) come back from the checkpoint."""
    import tyro
    from safetensors.torch import load_file

    flags = ["--model", "tiny", "--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--num-inference-steps",
             "3", "--num-sample-images", "1", "--sample-seeds", "1", "--sample-every", "100", "--mixed-precision",
             "fp16", "--save-every", "1"]
    once, twice = tmp_path / "once", tmp_path / "twice"
    draft.main(tyro.cli(draft.Args, args=[*flags, "--steps", "2", "--output-dir", str(once)]))
    draft.main(tyro.cli(draft.Args, args=[*flags, "--steps", "1", "--output-dir", str(twice)]))
    draft.main(tyro.cli(draft.Args, args=["--resume", str(twice), "--steps", "2"]))
    a, b = read_metrics(once), read_metrics(twice)
    assert a[0]["loss_scale"] < 2.0**24 and a[0]["skipped_updates"] >= 1  # it did overflow
    assert [(r["loss_scale"], r["skipped_updates"]) for r in a] == [(r["loss_scale"], r["skipped_updates"]) for r in b]
    la, lb = load_file(str(once / common.LORA_FILE)), load_file(str(twice / common.LORA_FILE))
    assert all(torch.equal(la[k], lb[k]) for k in la)
