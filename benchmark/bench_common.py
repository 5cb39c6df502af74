"""Benchmarks of `common` on the `tiny` model (CPU or GPU), printed as figures:

1. speed: common's sampler (no-grad trajectory + decode) over diffusers' StableDiffusionPipeline for the same
   work (same prompts, latents, steps, guidance, η), the two timed alternately, best of --repeats each.
   Goal ≤ 1.05×.
2. memory: peak memory of backprop through all 50 DDIM steps with checkpointed UNet calls over the same
   without checkpointing. Goal ≤ 0.4×. Each configuration runs in a fresh subprocess; on the CPU the figure
   is the growth of the process's peak resident memory during the forward+backward pass, on CUDA
   torch.cuda.max_memory_allocated.

    python benchmark/bench_common.py [--batch-size 4] [--steps 50] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(args):
    import torch
    from diffusers import StableDiffusionPipeline

    import common

    pipe = common.load_pipeline("tiny", lora_rank=4)
    reference = StableDiffusionPipeline(**{k: getattr(pipe, k)
                                           for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    prompts = common.load_prompts("simple_animals")[: args.batch_size]
    latents = torch.randn(args.batch_size, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = []
    for eta in (0.0, 1.0):
        def ours():
            with torch.no_grad():
                cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, [""])
                traj = common.sample_trajectory(pipe, cond, uncond, args.steps, 7.5, eta, latents=latents)
                return common.decode(pipe, traj.latents[:, -1])

        def theirs():
            return reference(prompts, latents=latents, num_inference_steps=args.steps, guidance_scale=7.5, eta=eta,
                             output_type="pt").images

        # interleave the two so that machine noise hits both alike
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_theirs.append(timed(theirs, 1))
            t_ours.append(timed(ours, 1))
        # the minimum over repeats: the machine's background load only ever adds time
        a, b = min(t_ours), min(t_theirs)
        rows.append(dict(eta=eta, common_s=round(a, 4), pipeline_s=round(b, 4), ratio=round(a / b, 3)))
    return rows


def memory_child(use_checkpoint: bool, batch_size: int, steps: int) -> dict:
    import torch

    import common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = common.load_pipeline("tiny", lora_rank=4, device=device)
    cond, uncond = common.encode_prompts(pipe, ["a cat"] * batch_size), common.encode_prompts(pipe, [""])
    pipe.scheduler.set_timesteps(steps, device=device)

    def run(grad: bool):
        x = common.initial_latents(pipe, batch_size, torch.Generator().manual_seed(0))
        with torch.set_grad_enabled(grad):
            for t in pipe.scheduler.timesteps:
                noise_pred = common.guided_noise_pred(pipe, x, t, cond, uncond, 7.5, use_checkpoint=use_checkpoint)
                x = common.step(pipe.scheduler, noise_pred, t, x)
            loss = common.decode(pipe, x).mean()
        if grad:
            loss.backward()

    run(False)  # warm-up: allocator pools and lazy initialisation outside the measurement
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(True)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run(True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(checkpoint=use_checkpoint, device=device, peak_mb=round(peak / 2**20, 1))


def memory(args):
    out = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--memory-child", str(int(ckpt)), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        out[ckpt] = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(no_checkpoint_mb=out[False]["peak_mb"], checkpoint_mb=out[True]["peak_mb"],
                ratio=round(out[True]["peak_mb"] / out[False]["peak_mb"], 3), device=out[True]["device"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(bool(args.memory_child), args.batch_size, args.steps)))
        return
    print(f"tiny model, batch {args.batch_size}, {args.steps} DDIM steps, guidance 7.5")
    for row in speed(args):
        print(f"speed  eta={row['eta']}: common {row['common_s']:.3f} s, "
              f"StableDiffusionPipeline {row['pipeline_s']:.3f} s"
              f"  -> ratio {row['ratio']:.3f} (goal <= 1.05)")
    m = memory(args)
    print(f"memory backprop through all {args.steps} steps ({m['device']}): checkpointed {m['checkpoint_mb']} MB, "
          f"plain {m['no_checkpoint_mb']} MB  -> ratio {m['ratio']:.3f} (goal <= 0.4)")


if __name__ == "__main__":
    main()
