"""Speed of the scripts per sampled image (issue 17): side by side with trl 0.23.1's trainers, and where the time goes.

    python benchmark/bench_speed.py trl [--repeats 5] [--threads 1]   # ddpo_is.py / alignprop.py vs trl, alternating
    python benchmark/bench_speed.py profile [ddpo_is alignprop ...]   # one sampled batch per script: phases, UNet calls

`trl` saves `tiny` (random weights, seed 0) to a folder that both sides load, and runs, in turn, each configuration
of CONFIGS and trl's trainer (benchmark/trl_side.py, in the separate virtual environment --venv: trl is not a
dependency of this project) on the same work: DDPO: 2 epochs of 16 images sampled in batches of 8, T = 20, η = 1,
w = 5, 4 clipped updates of 4 images per epoch over every timestep, LoRA rank 4 on the attention projections, PIL
JPEG reward; AlignProp: 8 updates of 4 images, T = 20, η = 0, w = 7.5, gradient through the last K = 10 steps (fixed
truncation, so that both do the same work: trl's random truncation redraws per step, ours per batch), differentiable
JPEG reward. The figure per run is the training loop's seconds (the scripts' summed `step_seconds`; trl:
`trainer.train()`; model loading, the sample grid and saving excluded) per sampled image; the table gives the
median over repeats, its range, and the median of the per-round ratios trl / ours (rounds alternate the sides, so
that a busy machine slows both alike).

`profile` runs a script in this process at the same settings (--model tiny) and splits its step time: UNet forwards
without gradient (sampling), with gradient, the backward pass (including checkpointed recomputation), VAE decode and
encode, the reward, the optimizer step, and the rest; with the UNet calls' count and batch sizes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T = "20"
RL = ["--reward", "jpeg_compressibility", "--num-inference-steps", T, "--batch-size", "16", "--sample-batch-size", "8",
      "--train-batch-size", "4", "--steps", "8"]  # 2 sampled batches of 16
GRAD = ["--reward", "jpeg_compressibility_diff", "--num-inference-steps", T, "--batch-size", "4", "--steps", "8"]
SETTINGS = {  # each script at the settings (T = 20); RL: 32 images, 2 batches; gradient scripts: 8 × 4
    "ddpo_sf": RL,
    "ddpo_is": RL + ["--num-minibatches", "4"],
    "grpo": RL + ["--num-minibatches", "4", "--group-size", "8"],
    "rwr": RL + ["--num-minibatches", "4", "--num-epochs", "1", "--images-per-prompt", "4"],
    "draft": GRAD + ["--k", "1"],
    "draft_lv": GRAD,
    "refl": GRAD,
    "alignprop": GRAD + ["--truncation", "fixed", "--k", "10"],
}
QUIET = ["--sample-every", "1000", "--save-every", "0", "--num-sample-images", "1", "--sample-seeds", "1"]
CONFIGS = {  # (label, script, extra flags) compared with trl's trainer of the same algorithm
    "ddpo": [("ddpo_is.py", "ddpo_is", []),
             ("ddpo_is.py --timesteps-per-call 20", "ddpo_is", ["--timesteps-per-call", "20"])],
    "alignprop": [("alignprop.py", "alignprop", [])],
}


def run_ours(script: str, extra: list[str], pipeline: str, env: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / f"{script}.py"), "--model", pipeline, *SETTINGS[script], *QUIET, *extra,
               "--output-dir", f"{tmp}/run"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    return sum(r["step_seconds"] for r in rows) / 32


def run_trl(algorithm: str, pipeline: str, venv: str, env: dict) -> float:
    flags = ["--epochs", "2"] if algorithm == "ddpo" else ["--epochs", "8", "--k", "10"]
    cmd = [f"{venv}/bin/python", str(ROOT / "benchmark" / "trl_side.py"), algorithm, "--pipeline", pipeline,
           "--steps", T, *flags]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])["s_per_image"]


def compare_with_trl(args) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    import common

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = f"{tmp}/tiny"
        StableDiffusionPipeline(**common.models.tiny_components(0), safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(pipeline)
        for algorithm in args.algorithms:
            times = collections.defaultdict(list)
            for r in range(args.repeats):
                times["trl"].append(run_trl(algorithm, pipeline, args.venv, env))
                for label, script, extra in CONFIGS[algorithm]:
                    times[label].append(run_ours(script, extra, pipeline, env))
                print(f"# {algorithm} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()),
                      flush=True)
            print(f"\n{algorithm}: seconds per sampled image, {args.repeats} alternating rounds, torch "
                  f"{torch.__version__}, threads {args.threads or torch.get_num_threads()}")
            print(f"{'':40s} {'median':>7s} {'range':>15s} {'trl / this (median, range)':>28s}")
            for label, values in times.items():
                ratios = [a / b for a, b in zip(times["trl"], values)]
                print(f"{label:40s} {statistics.median(values):7.3f} {min(values):7.3f}–{max(values):<7.3f} "
                      f"{statistics.median(ratios):12.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")


def profile(script: str) -> dict:
    """Run `script` in this process (tiny, SETTINGS) with timers on the UNet, VAE, reward, backward and optimizer."""
    import importlib

    import torch

    import common
    import rewards

    seconds, calls, batches = collections.Counter(), collections.Counter(), collections.Counter()
    state = dict(outside=True, in_backward=False)  # outside the sample grid / inside a backward pass

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if state["outside"]:
                    seconds[name] += time.perf_counter() - t0
                    calls[name] += 1
        return wrapper

    def flagged(key, fn):  # fn runs with state[key] toggled
        def wrapper(*a, **k):
            state[key] = not state[key]
            try:
                return fn(*a, **k)
            finally:
                state[key] = not state[key]
        return wrapper

    starts = []

    def unet_pre(module, inputs):
        starts.append(time.perf_counter())
        if state["outside"] and state["in_backward"]:  # a checkpoint's recomputation may stop before the output
            batches[f"recomputed in backward, batch {inputs[0].shape[0]}"] += 1

    def unet_post(module, inputs, output):
        elapsed = time.perf_counter() - starts.pop()
        if state["outside"] and not state["in_backward"]:  # recomputed forwards count in the backward pass
            kind = "unet_forward_grad" if torch.is_grad_enabled() else "unet_forward_nograd"
            seconds[kind] += elapsed
            batches[f"{kind} batch {inputs[0].shape[0]}"] += 1

    load_pipeline, load_reward = common.load_pipeline, rewards.load

    def load_and_hook(*a, **k):
        pipe = load_pipeline(*a, **k)
        pipe.unet.register_forward_pre_hook(unet_pre)
        pipe.unet.register_forward_hook(unet_post)
        return pipe

    def load_and_time(*a, **k):
        fn = load_reward(*a, **k)
        fn.forward = timed("reward", fn.forward)
        return fn

    patches = [(common, "load_pipeline", load_and_hook), (rewards, "load", load_and_time),
               (common, "decode", timed("vae_decode", common.decode)),
               (common, "encode", timed("vae_encode", common.encode)),
               (common.UpdateGuard, "backward", flagged("in_backward", timed("backward", common.UpdateGuard.backward))),
               (common.SampleGrid, "__call__", flagged("outside", common.SampleGrid.__call__)),
               (torch.optim.AdamW, "step", timed("optimizer", torch.optim.AdamW.step))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    module = importlib.import_module(script)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            import tyro

            args = tyro.cli(module.Args, args=["--model", "tiny", *SETTINGS[script], *QUIET, "--output-dir", tmp])
            with contextlib.redirect_stdout(sys.stderr):  # the script's closing line
                module.main(args)
            rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    total = sum(r["step_seconds"] for r in rows)
    split = {k: round(v, 2) for k, v in seconds.items()}
    split["other"] = round(total - sum(seconds.values()), 2)
    return dict(script=script, step_seconds=round(total, 2), reward_queries=rows[-1]["reward_queries"],
                updates=len(rows), seconds=split, unet_calls=dict(sorted(batches.items())))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("trl", help="ddpo_is.py and alignprop.py against trl's trainers, alternating")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--algorithms", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    t.add_argument("--venv", default="/work/venv-trl", help="the virtual environment with trl==0.23.1")
    t.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0: torch's default)")
    pr = sub.add_parser("profile", help="where one script's time goes")
    pr.add_argument("scripts", nargs="*", default=list(SETTINGS))
    args = p.parse_args()
    if args.mode == "trl":
        compare_with_trl(args)
    else:
        for script in args.scripts:
            print(json.dumps(profile(script)), flush=True)


if __name__ == "__main__":
    main()
