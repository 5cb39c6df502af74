"""The speed flags change how the work is split into UNet calls, never what is computed.

- `--timesteps-per-call N` (DDPO-SF, DDPO-IS, GRPO): N timesteps of each sample in one UNet call of the training
  pass give the gradient and the diagnostics of one timestep per call (the default), up to float rounding; the flat
  (sample, timestep) pairs it yields are the stored trajectory's (the re-evaluated log-probs equal the sampler's);
  a whole DDPO-IS run gives the same samples, rewards and, up to rounding, the same LoRA.
- `--no-unet-checkpointing` (DRaFT, DRaFT-LV, ReFL, AlignProp): storing the activations instead of recomputing
  them gives the same gradient, with one UNet forward less per step with gradient.
"""

import dataclasses
import importlib
import inspect

import pytest
import torch
import tyro

import common
import ddpo_is
import ddpo_sf
import draft
import draft_lv
import grpo
import refl
from conftest import (SCRIPTS, U64, assert_normwise_close, float64_scheduler, log_prob_tolerance, pair_tolerance, randomize_lora,
                      read_metrics, rounding_tolerance, roundings, scripts)


def has_flag(name, flag):
    return flag in {f.name for f in dataclasses.fields(importlib.import_module(name).Args)}


STACKING = [name for name in scripts("rl") if has_flag(name, "timesteps_per_call")]  # RWR: one timestep per sample


def lora_grads(pipe):
    return torch.cat([p.grad.flatten() for p in common.lora_parameters(pipe)])


def count_unet_calls(pipe):
    """A list that collects the batch size of every UNet forward that starts (recomputations included)."""
    sizes = []
    pipe.unet.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]))
    return sizes


@pytest.fixture
def rl_batch(tiny_pipe):
    """4 samples of 3 DDIM steps, shuffled samples, each with its own order of timesteps, distinct advantages. In
    float64: the layouts compared here differ by rounding, which float32 puts within reach of what these tests
    compare (the clip range ε = 1e-4 on the ratio, GRPO's KL between two means 1e-3 apart), and float64 far below."""
    randomize_lora(tiny_pipe, seed=4)
    tiny_pipe.unet.to(torch.float64)
    tiny_pipe.scheduler = float64_scheduler(tiny_pipe.scheduler)
    prompts = ["a cat", "a dog", "a cat", "a fox"]
    cond, uncond = common.encode_prompts(tiny_pipe, prompts), common.encode_prompts(tiny_pipe, [""])
    traj = common.sample_trajectory(tiny_pipe, cond, uncond, 3, 5.0, 1.0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    samples = torch.randperm(4, generator=g)
    timestep_idx = torch.stack([torch.randperm(3, generator=g) for _ in range(4)])
    return dict(traj=traj, cond=cond, uncond=uncond, advantages=torch.tensor([1.3, -0.7, 0.2, -2.0]),
                samples=samples, timestep_idx=timestep_idx)


@pytest.mark.parametrize("name", STACKING)
def test_timesteps_per_call_gives_the_same_gradient(name, tiny_pipe, rl_batch):
    module = importlib.import_module(name)
    flags = dict(SCRIPTS[name].args, **({"kl_beta": 0.5} if has_flag(name, "kl_beta") else {}))  # GRPO: and its KL
    b = rl_batch
    calls = count_unet_calls(tiny_pipe)

    def gradient(timesteps_per_call):
        tiny_pipe.unet.zero_grad(set_to_none=True)
        args = module.Args(train_batch_size=2, guidance_scale=5.0, eta=1.0, timesteps_per_call=timesteps_per_call,
                           **flags)
        guard = common.UpdateGuard(max_bad_steps=1)
        stats = module.accumulate_gradient(tiny_pipe, b["traj"], b["cond"], b["uncond"], b["advantages"], b["samples"],
                                           b["timestep_idx"], guard, args)
        return lora_grads(tiny_pipe), stats

    def unet_calls(sizes):  # GRPO's KL to the base model: one more call of the same size without the LoRA
        return [size for size in sizes for _ in range(2 if flags.get("kl_beta") else 1)]

    plain, plain_stats = gradient(1)
    assert calls == unet_calls([4] * 6)  # 2 chunks × 3 timesteps, each a doubled batch of 2
    for n, sizes in ((2, [8, 4] * 2), (3, [12, 12])):  # 3 = 2 + 1 columns; or all 3 at once
        calls.clear()
        stacked, stats = gradient(n)
        assert calls == unet_calls(sizes)
        # float64 sums in other layouts: each within conftest's bound (u = 2^-53) of the exact gradient, which counts
        # every pair's forward and backward pass through the guided UNet (and GRPO's KL call), and its log-prob
        n_pairs = 4 * 3 * (3 * roundings(tiny_pipe.unet) * (2 if flags.get("kl_beta") else 1) + 4 * 16 * 16)
        assert_normwise_close(stacked, plain, pair_tolerance(rounding_tolerance(n_pairs, gain=2 * 5.0 - 1, u=U64)))
        # The statistics: in float64 the log-probs of two layouts are within 3e-13 of each other (log_prob_tolerance
        # with u = 2^-53), so the ratios, the loss and the clip decisions agree far below 1e-8 relative; GRPO's KL,
        # quadratic in ε̂_θ − ε̂_base (at least 1/60 of ‖ε̂‖ here), within 8·(conftest's bound, 6e-12)·60 = 3e-9.
        assert stats.keys() == plain_stats.keys()
        for key in stats:
            torch.testing.assert_close(stats[key], plain_stats[key], rtol=1e-8, atol=1e-20)


def test_stacked_pairs_are_the_trajectory_s(tiny_pipe, rl_batch):
    """Each flat (i, k) pair re-evaluates sample i's stored step k: at the sampling weights its log-prob is the
    sampler's, so a pairing mistake (a sample at another's timestep) cannot pass."""
    b = rl_batch
    args = ddpo_is.Args(train_batch_size=2, guidance_scale=5.0, eta=1.0, timesteps_per_call=2)
    seen = torch.zeros(4, 3, dtype=torch.int64)
    t64 = rounding_tolerance(roundings(tiny_pipe.unet), gain=2 * 5.0 - 1, u=U64)  # one guided UNet call, float64
    with torch.no_grad():
        for i, k, log_prob, _ in ddpo_is.minibatch_log_probs(tiny_pipe, b["traj"], b["cond"], b["uncond"], b["samples"],
                                                          b["timestep_idx"], args):
            # the sampler's layout and this one's round ε̂ differently: log_prob_tolerance (about 3e-13) bounds the
            # effect; a sample paired with another's timestep is off by 2e-2 or more (test_ddim_logprob)
            x, t = b["traj"].latents[i, k], b["traj"].timesteps[k]
            eps = common.guided_noise_pred(tiny_pipe, x, t, b["cond"][i], b["uncond"], 5.0)
            bound = log_prob_tolerance(tiny_pipe.scheduler, eps, t, x, b["traj"].latents[i, k + 1], 1.0, t64, U64)
            assert ((log_prob - b["traj"].log_probs[i, k]).abs() <= bound).all()
            seen[i, k] += 1
    assert (seen == 1).all()  # every (sample, timestep) pair exactly once


def test_ddpo_is_run_with_stacked_timesteps(tmp_path):
    """Two updates of a whole run (one sampled batch, two minibatches, the second after an update): the same samples
    and rewards, and the same losses and gradient norms up to rounding. (No clipping here: a ratio on the edge of
    the clip range would switch its gradient off in one run and not the other; the LoRAs themselves are not compared,
    since Adam's first step is lr·sign(g) and flips on a gradient entry that rounds to either side of 0.)"""
    def run(name, timesteps_per_call):
        args = tyro.cli(ddpo_is.Args, args=[
            "--model", "tiny", "--reward", "jpeg_compressibility", "--steps", "2", "--batch-size", "4",
            "--sample-batch-size", "4", "--train-batch-size", "2", "--num-minibatches", "2", "--num-inference-steps",
            "4", "--num-sample-images", "1", "--sample-seeds", "1", "--clip-range", "10", "--learning-rate", "1e-4",
            "--timesteps-per-call", str(timesteps_per_call), "--output-dir", str(tmp_path / name)])
        ddpo_is.main(args)
        return read_metrics(tmp_path / name)

    plain, stacked = run("plain", 1), run("stacked", 3)
    assert [r["reward_mean"] for r in stacked] == [r["reward_mean"] for r in plain]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in stacked] == pytest.approx([r[key] for r in plain], rel=1e-4), key
    assert plain[0]["grad_norm"] > 0


def test_timesteps_per_call_is_checked():
    with pytest.raises(common.UserError, match="--timesteps-per-call must be > 0, got 0"):
        tyro.cli(ddpo_sf.Args, args=["--model", "tiny", "--reward", "jpeg_compressibility", "--timesteps-per-call", "0"])


@pytest.mark.parametrize("name", scripts("gradient"))
def test_no_unet_checkpointing_gives_the_same_gradient(name, tiny_pipe):
    module, flags, extra = importlib.import_module(name), SCRIPTS[name].args, SCRIPTS[name].extra
    randomize_lora(tiny_pipe, seed=5)
    prompts = ["a cat", "a dog"]
    cond, uncond = common.encode_prompts(tiny_pipe, prompts), common.encode_prompts(tiny_pipe, [""])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    noises = ([torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)],) \
        if "noises" in inspect.signature(module.accumulate_gradient).parameters else ()  # DRaFT-LV's copies
    weights = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))

    def reward_fn(images, prompts):
        return (images * weights).mean(dim=(1, 2, 3))

    calls = count_unet_calls(tiny_pipe)

    def gradient(unet_checkpointing):
        tiny_pipe.unet.zero_grad(set_to_none=True)
        calls.clear()
        args = module.Args(model="tiny", num_inference_steps=4, batch_size=2, unet_checkpointing=unet_checkpointing,
                           **flags)
        module.accumulate_gradient(tiny_pipe, reward_fn, prompts, cond, uncond, latents, *noises,
                                   common.UpdateGuard(max_bad_steps=1), args, *extra)
        return lora_grads(tiny_pipe), len(calls)

    (checkpointed, n_checkpointed), (stored, n_stored) = gradient(True), gradient(False)
    assert checkpointed.abs().max() > 0
    assert torch.equal(stored, checkpointed)  # recomputed by the same operations in the same layout: to the last bit
    assert n_checkpointed - n_stored == SCRIPTS[name].unet_calls_with_grad
