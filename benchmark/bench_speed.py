"""Speed of the scripts per sampled image (issue 17): side by side with trl 0.23.1's trainers, and where the time goes.

    python benchmark/bench_speed.py trl [--repeats 5] [--threads 1]    # ddpo_is.py / alignprop.py vs trl, alternating
    python benchmark/bench_speed.py profile [ddpo_is alignprop ...]    # one run per script: phases, UNet calls
    python benchmark/bench_speed.py profile ddpo_is --model tiny-shapes # the same on the testbed (docs/benchmark/rl.md)
    python benchmark/bench_speed.py measure SCRIPT [FLAGS ...]         # one run: its loop's seconds, as JSON

Every run is on `tiny` (random weights, seed 0) at SETTINGS, the issue's: T = 20 and 32 sampled images per run. RL
scripts: 2 batches of 16 sampled in chunks of 8, η = 1, w = 5, chunks of 4 images in the training pass (DDPO-IS and
GRPO: 4 clipped updates of 4 images per batch over every timestep). Gradient scripts: 8 updates of 4 images, η = 0,
w = 7.5; AlignProp with the fixed truncation K = 10 (trl's random truncation redraws per step, ours per batch: a
fixed K is the same work on both sides). LoRA rank 4 on the attention projections (DRaFT: and the feed-forward
layers); PIL JPEG reward for the RL scripts, the differentiable JPEG stand-in for the gradient scripts.

A run's figure is its training loop: from the end of the step-0 sample grid to the last update's log line (model
loading, the grid and saving excluded; trl: `trainer.train()`), as wall-clock seconds and as this process's CPU
seconds. On a machine that other work keeps busy, the CPU seconds of a one-thread run (--threads 1) are the steadier
measure of the work done; the wall-clock seconds are what an idle machine shows.

`trl` saves `tiny` to a folder that both sides load and runs, in turn, trl's trainer (benchmark/trl_side.py, in the
separate virtual environment --venv: trl is not a dependency of this project) and each configuration of CONFIGS, so
that a busy machine slows both alike; it prints medians over the rounds, their range, and the median of the per-round
ratios trl / ours.

`profile` splits a run's step time: UNet forwards without gradient (sampling), with gradient, the backward pass
(checkpointed recomputation included), VAE decode and encode, the reward, the optimizer step, the rest; with the UNet
calls' count and batch sizes (a doubled batch: the classifier-free guidance's two halves).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
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
      "--train-batch-size", "4"]
GRAD = ["--reward", "jpeg_compressibility_diff", "--num-inference-steps", T, "--batch-size", "4", "--steps", "8"]
SETTINGS = {  # 32 sampled images per run; RL: 2 batches of 16, gradient scripts: 8 updates of 4
    "ddpo_sf": RL + ["--steps", "2"],
    "ddpo_is": RL + ["--steps", "8", "--num-minibatches", "4"],
    "grpo": RL + ["--steps", "8", "--num-minibatches", "4", "--group-size", "8"],
    "rwr": RL + ["--steps", "8", "--num-minibatches", "4", "--num-epochs", "1", "--images-per-prompt", "4"],
    "draft": GRAD + ["--k", "1"],
    "draft_lv": GRAD,
    "refl": GRAD,
    "alignprop": GRAD + ["--truncation", "fixed", "--k", "10"],
}
IMAGES = 32
QUIET = ["--sample-every", "1000", "--save-every", "0", "--num-sample-images", "1", "--sample-seeds", "1"]
FAST = {  # the opt-in speed flags (issue 17): the same math, more memory
    "ddpo_sf": ["--timesteps-per-call", T], "ddpo_is": ["--timesteps-per-call", T], "grpo": ["--timesteps-per-call", T],
    "draft": ["--no-unet-checkpointing"], "draft_lv": ["--no-unet-checkpointing"], "refl": ["--no-unet-checkpointing"],
    "alignprop": ["--no-unet-checkpointing"],
}
CONFIGS = {  # trl's trainer -> (label, script, extra flags) run next to it
    "ddpo": [("ddpo_is.py", "ddpo_is", []), ("ddpo_is.py " + " ".join(FAST["ddpo_is"]), "ddpo_is", FAST["ddpo_is"])],
    "alignprop": [("alignprop.py", "alignprop", []),
                  ("alignprop.py " + " ".join(FAST["alignprop"]), "alignprop", FAST["alignprop"])],
}


@contextlib.contextmanager
def patched(patches):
    """setattr(owner, name, value) for each (owner, name, value), undone on exit."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def clocks():
    return time.perf_counter(), time.process_time()


def run_script(script: str, argv: list[str], patches=()) -> dict:
    """Run `script`'s main in this process on `argv` (+ an output folder) and time its loop: from the end of the
    step-0 sample grid to the last log line. Returns wall and CPU seconds and the run's metrics rows."""
    import tyro

    import common

    marks = {}

    def after(key, fn, first_only=False):  # record the clocks when fn returns
        def wrapper(*a, **k):
            result = fn(*a, **k)
            if not (first_only and key in marks):
                marks[key] = clocks()
            return result
        return wrapper

    module = importlib.import_module(script)
    with patched(patches), tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        with patched([(common.SampleGrid, "__call__", after("start", common.SampleGrid.__call__, first_only=True)),
                      (common.Logger, "log", after("end", common.Logger.log))]):
            module.main(tyro.cli(module.Args, args=[*argv, "--output-dir", tmp]))
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    (w0, c0), (w1, c1) = marks["start"], marks["end"]
    return dict(wall=w1 - w0, cpu=c1 - c0, rows=rows)


def measure(script: str, extra: list[str], model: str = "tiny") -> dict:
    run = run_script(script, ["--model", model, *SETTINGS[script], *QUIET, *extra])
    queries = run["rows"][-1]["reward_queries"]
    return dict(script=script, flags=extra, wall=round(run["wall"], 3), cpu=round(run["cpu"], 3), images=IMAGES,
                reward_queries=queries, updates=len(run["rows"]), wall_per_image=round(run["wall"] / IMAGES, 4),
                cpu_per_image=round(run["cpu"] / IMAGES, 4), wall_per_query=round(run["wall"] / queries, 4))


def child(cmd: list[str], env: dict, cwd=ROOT) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=cwd)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
            trl_flags = ["--epochs", "2"] if algorithm == "ddpo" else ["--epochs", "8", "--k", "10"]
            runs = collections.defaultdict(list)
            for r in range(args.repeats):
                runs["trl"].append(child([f"{args.venv}/bin/python", str(ROOT / "benchmark" / "trl_side.py"),
                                          algorithm, "--pipeline", pipeline, "--steps", T, *trl_flags], env,
                                         cwd=tmp))
                for label, script, extra in CONFIGS[algorithm]:
                    runs[label].append(child([sys.executable, __file__, "measure", script, *extra, "--model",
                                              pipeline], env))
                print(f"# {algorithm} round {r + 1}: " + ", ".join(
                    f"{k} {v[-1]['wall_per_image']:.3f} s ({v[-1]['cpu_per_image']:.3f} CPU s)" for k, v in runs.items()),
                    flush=True)
            print(f"\n{algorithm}: seconds per sampled image, {args.repeats} alternating rounds, torch "
                  f"{torch.__version__}, threads {args.threads or torch.get_num_threads()}")
            for clock in ("wall", "cpu"):
                print(f"{clock + ' s / image':38s} {'median':>7s} {'range':>15s}   trl / this: median (range)")
                for label, values in runs.items():
                    ours = [v[f"{clock}_per_image"] for v in values]
                    ratios = [t[f"{clock}_per_image"] / o for t, o in zip(runs["trl"], ours)]
                    print(f"{label:38s} {statistics.median(ours):7.3f} {min(ours):7.3f}–{max(ours):<7.3f}   "
                          f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")


def profile(script: str, extra: list[str], model: str = "tiny") -> dict:
    """One run of `script` (`model`, SETTINGS) with timers on the UNet, VAE, reward, backward and optimizer."""
    import torch

    import common
    import rewards

    seconds, batches = collections.Counter(), collections.Counter()
    state = dict(outside=True, in_backward=False)  # outside the sample grid / inside a backward pass

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += (time.perf_counter() - t0) * state["outside"]
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
            batches[f"{kind}, batch {inputs[0].shape[0]}"] += 1

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

    run = run_script(script, ["--model", model, *SETTINGS[script], *QUIET, *extra], patches=[
        (common, "load_pipeline", load_and_hook), (rewards, "load", load_and_time),
        (common, "decode", timed("vae_decode", common.decode)), (common, "encode", timed("vae_encode", common.encode)),
        (common.UpdateGuard, "backward", flagged("in_backward", timed("backward", common.UpdateGuard.backward))),
        (common.SampleGrid, "__call__", flagged("outside", common.SampleGrid.__call__)),
        (torch.optim.AdamW, "step", timed("optimizer", torch.optim.AdamW.step))])
    total = sum(r["step_seconds"] for r in run["rows"])
    split = {k: round(v, 2) for k, v in seconds.items()}
    split["other"] = round(total - sum(seconds.values()), 2)
    return dict(script=script, flags=extra, step_seconds=round(total, 2), images=IMAGES,
                reward_queries=run["rows"][-1]["reward_queries"], updates=len(run["rows"]), seconds=split,
                unet_calls=dict(sorted(batches.items())))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("trl", help="ddpo_is.py and alignprop.py against trl's trainers, alternating")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--algorithms", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    t.add_argument("--venv", default="/work/venv-trl", help="the virtual environment with trl==0.23.1")
    t.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0: torch's default)")
    pr = sub.add_parser("profile", help="where the time of each script goes")
    pr.add_argument("scripts", nargs="*", default=list(SETTINGS))
    pr.add_argument("--fast", action="store_true", help="with the opt-in speed flags (FAST)")
    pr.add_argument("--model", default="tiny", help="tiny, or tiny-shapes (the testbed the benchmark trains)")
    m = sub.add_parser("measure", help="one run of one script, its loop's seconds as JSON")
    m.add_argument("script", choices=tuple(SETTINGS))
    m.add_argument("--model", default="tiny")
    args, extra = p.parse_known_args()
    if extra and args.mode != "measure":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.mode == "trl":
        compare_with_trl(args)
    elif args.mode == "profile":
        for script in args.scripts:
            print(json.dumps(profile(script, FAST.get(script, []) if args.fast else [], args.model)), flush=True)
    else:
        print(json.dumps(measure(args.script, extra, args.model)))


if __name__ == "__main__":
    main()
