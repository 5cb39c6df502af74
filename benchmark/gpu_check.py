"""One prepared GPU check (issue 22): what only a GPU can show about the eight scripts, in one command that fits about
eight minutes on one H100. DIR/gpu_check.json is written after every item (atomically: a run cut off leaves a valid
partial file), with DIR/gpu_check.md, the tables of the README's GPU section; the scripts' output goes to
DIR/gpu_check.log. Nothing is downloaded: `sd14-random` is SD1.4's architecture from the shipped configs.

    python benchmark/gpu_check.py --out DIR                        # one CUDA GPU: sd14-random, 512 px, T = 50
    python benchmark/gpu_check.py --out DIR --device cpu --small   # every item at a tiny size (CI)

The items, most important first (`--only` picks some by id prefix; `--budget-s` stops starting new ones):

update/SCRIPT/bf16  One update of each script through its real `main` at its published defaults, with the JPEG
    rewards (no reward weights): torch.cuda.max_memory_allocated and seconds per update. A gradient script runs its
    published batch (4 images, one backward, VAE checkpointing) and its second update is timed (the first warms up).
    An RL script samples one batch of --rl-batch-size (8: one sampling chunk; the published 64 images × 50 steps take
    minutes per update on an H100) in its published chunks (8 to sample, 4 to train), and its seconds at the published
    batch are extrapolated linearly: the measured batch's time over all its updates × 64 / 8 / (updates per published
    batch). Every part of an update (sampling, decoding, the reward, the training chunks) repeats per image or chunk.
memory/SCRIPT/bf16  The RL scripts' peak at the published batch of 64, which a batch of 8 cannot show (decoding and the
    reward take the whole batch at once): the first update at T = --memory-steps (2), plus the stored trajectory's
    latents of the other 48 steps (64 × 48 × 4·64·64 × 4 bytes, computed; nothing else in an update grows with T).
cosine/ddpo_sf, cosine/draft  The LoRA gradient's cosine with float32 (TF32 off) in fp16 (loss-scaled) and bf16, as
    tests/test_precision.py computes it (benchmark/precision.py), at SD1.4's real sizes. DDPO-SF: one timestep at
    t = 981 / 481 / 1, and unscaled fp16 as the control; DRaFT-1: a whole update (T = 50, K = 1, 2 images).
ratio/stored, ratio/reevaluate  DDPO-IS in bf16, first minibatch: |ratio − 1| (mean, max) and the clipped fraction,
    with --reevaluate-log-probs False and True.
speed/FLAG  Seconds per update of --speed-script (draft) in bf16 with one speed flag changed from the scripts'
    defaults: tf32 (float32 matmuls in TF32), no-sdpa (diffusers' plain attention instead of PyTorch's
    scaled_dot_product_attention), channels-last (UNet and VAE), compile (torch.compile of the UNet; its compilation
    is in the first update, which is not in the figure). speed/compile runs last.
update/SCRIPT/fp16  As bf16, with loss scaling; after speed/channels-last and before speed/compile.

Each item runs in a worker process; an item's error (an OOM, a compile error) is recorded and the next item runs. The
parent restarts the worker past an item that kills it or runs past --item-timeout-s, and stops it at --budget-s +
--grace-s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# import name -> requirements.txt name: what the items import
NEEDED = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
          "accelerate": "accelerate", "open_clip": "open_clip_torch", "kornia": "kornia", "tyro": "tyro",
          "tensorboard": "tensorboard", "safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow",
          "tqdm": "tqdm", "huggingface_hub": "huggingface-hub"}
SCRIPTS = ("ddpo_sf", "ddpo_is", "draft", "draft_lv", "refl", "alignprop", "grpo", "rwr")  # the goals' scripts first
RL = ("ddpo_sf", "ddpo_is", "grpo", "rwr")
SPEED_FLAGS = ("baseline", "tf32", "no-sdpa", "channels-last", "compile")
# the RL scripts' updates average over 64 images × 50 steps (DDPO-SF); the cosine's scaling reads it from here
PUBLISHED_T = 50
STATUS_DONE = ("ok", "error", "timeout", "skipped")
QUIET = ["--sample-seeds", "1", "--sample-every", "100000", "--save-every", "0"]  # a checkpoint at the end only


def now(report) -> float:
    return time.time() - report["started_unix"]


def say(report, text: str) -> None:
    print(f"[{now(report):5.0f}s] {text}", flush=True)


# --- the plan and the report -----------------------------------------------------------------------------------------

def settings(opts) -> dict:
    """Sizes of every item: SD1.4's on a GPU, tiny ones with --small."""
    if opts.small:
        return dict(model="tiny", resolution=8, steps=2, rl_batch_size=opts.rl_batch_size, memory_batch_size=16,
                    memory_steps=1, gradient_updates=2, speed_updates=2, compile_backend="eager", device=opts.device)
    return dict(model="sd14-random", resolution=512, steps=PUBLISHED_T, rl_batch_size=opts.rl_batch_size,
                memory_batch_size=None, memory_steps=opts.memory_steps, gradient_updates=2, speed_updates=3,
                compile_backend="inductor", device=opts.device)


def plan(opts) -> list[dict]:
    items = [dict(id=f"update/{s}/bf16", kind="update", script=s, precision="bf16") for s in SCRIPTS]
    items += [dict(id=f"memory/{s}/bf16", kind="memory", script=s, precision="bf16") for s in RL]
    items += [dict(id=f"cosine/{s}", kind="cosine", script=s) for s in ("ddpo_sf", "draft")]
    items += [dict(id=f"ratio/{name}", kind="ratio", script="ddpo_is", reevaluate=name == "reevaluate")
              for name in ("stored", "reevaluate")]
    speed = [dict(id=f"speed/{f}", kind="speed", script=opts.speed_script, flag=f) for f in SPEED_FLAGS]
    items += speed[:-1]
    items += [dict(id=f"update/{s}/fp16", kind="update", script=s, precision="fp16") for s in SCRIPTS]
    items += speed[-1:]
    if opts.only:
        items = [i for i in items if any(i["id"].startswith(p) for p in opts.only.split(","))]
    return [dict(i, status="pending") for i in items]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(out: Path, report: dict) -> None:
    report["elapsed_s"] = round(now(report), 1)
    write_atomically(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    write_atomically(out / "gpu_check.md", markdown(report))


def pins() -> dict:
    """requirements.txt's pinned versions, by distribution name."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return dict(line.strip().split("==") for line in lines if "==" in line)


def environment() -> tuple[dict, list[str]]:
    """The installed versions of what the items import, and the missing packages (with their pins)."""
    pinned, versions, missing = pins(), {}, []
    for module, dist in NEEDED.items():
        if importlib.util.find_spec(module) is None:
            missing.append(f"{dist}=={pinned[dist]}" if dist in pinned else dist)
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "?"
    differ = {d: f"{v} (requirements.txt: {pinned[d]})" for d, v in versions.items() if d in pinned and v != pinned[d]}
    return dict(python=platform.python_version(), packages=versions, differ_from_requirements=differ), missing


# --- the markdown tables ---------------------------------------------------------------------------------------------

def fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def state(item) -> str:
    """ok (with fp16's skipped updates), pending, skipped, or the error's first line."""
    if item["status"] == "ok":
        skipped = int(item["figures"].get("skipped_updates", 0))
        return f"ok, {skipped} of {item['figures']['updates']} updates skipped (fp16 overflow)" if skipped else "ok"
    return f"{item['status']}: {item['error']}" if item.get("error") else item["status"]


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def goal(script, peak_gb, device) -> str:
    from benchmark.bench_sd14 import GOAL_GB

    limit = GOAL_GB.get(f"{script}.py")
    if limit is None or peak_gb is None:
        return "no goal" if limit is None else f"≤ {limit} GB?"
    if device != "cuda":
        return f"goal ≤ {limit} GB on CUDA"
    return f"{'≤' if peak_gb <= limit else '>'} {limit} GB goal"


def markdown(report: dict) -> str:
    s, items, device = report["settings"], report["items"], report["settings"]["device"]
    by_kind = {k: [i for i in items if i["kind"] == k] for k in ("update", "memory", "cosine", "ratio", "speed")}
    where = report.get("environment", {}).get("device_name", device)
    out = [f"GPU check on {where}: `{s['model']}`, {s['resolution']} px, T = {s['steps']}, the JPEG rewards "
           f"({report.get('finished_note', 'unfinished')}; {report.get('elapsed_s', 0):.0f} s)."]
    mem = "peak GB (max_memory_allocated)" if device == "cuda" else "peak RSS GB (process)"
    rows = []
    for i in by_kind["update"]:
        f = i.get("figures", {})
        verdict = "batch 64: below" if i["script"] in RL else goal(i["script"], f.get("peak_gb"), device)
        rows.append([f"`{i['script']}.py`", i["precision"], fmt(f.get("batch")), fmt(f.get("seconds_measured")),
                     fmt(f.get("seconds_per_update")), fmt(f.get("peak_gb")), verdict, state(i)])
    out += ["", "**One update per script at the published defaults**, s/update at the published batch (RL scripts: "
            f"extrapolated from a batch of {s['rl_batch_size']}, see benchmark/gpu_check.py)",
            "", table(["script", "precision", "batch run", "s/update run", "s/update published batch", mem, "goal",
                       "status"], rows)]
    rows = []
    for i in by_kind["memory"]:
        f = i.get("figures", {})
        rows.append([f"`{i['script']}.py`", fmt(f.get("batch")), fmt(f.get("peak_gb")), fmt(f.get("trajectory_gb")),
                     fmt(f.get("peak_gb_at_published_T")), goal(i["script"], f.get("peak_gb_at_published_T"), device),
                     state(i)])
    if rows:
        out += ["", f"**RL scripts' peak at the published batch** (bf16; one update at T = {s['memory_steps']} plus "
                f"the trajectory's latents of the other steps up to T = {s['steps']})", "",
                table(["script", "batch", f"peak GB at T = {s['memory_steps']}", "+ latents GB",
                       f"peak GB at T = {s['steps']}", "goal", "status"], rows)]
    rows = []
    for i in by_kind["cosine"]:
        for r in i.get("figures", {}).get("rows", [{}]):
            unscaled = "all zero" if r.get("fp16_unscaled_zero_fraction") == 1 else fmt(r.get("fp16_unscaled"), 4)
            rows.append([f"`{i['script']}.py`", r.get("what", "–"), fmt(r.get("fp16"), 4), fmt(r.get("bf16"), 4),
                         unscaled, state(i)])
    if rows:
        out += ["", "**Gradient cosine with float32** (LoRA gradient; fp16 loss-scaled; unscaled fp16 is the control)",
                "", table(["script", "what", "fp16", "bf16", "fp16 unscaled", "status"], rows)]
    rows = []
    for i in by_kind["ratio"]:
        f = i.get("figures", {})
        rows.append(["on" if i["reevaluate"] else "off", fmt(f.get("ratio_dev_mean"), 3),
                     fmt(f.get("ratio_dev_max"), 3), fmt(f.get("clipfrac"), 3), fmt(f.get("clip_range"), 3), state(i)])
    if rows:
        out += ["", "**DDPO-IS, bf16, first minibatch**: |ratio − 1| before any update", "",
                table(["--reevaluate-log-probs", "mean", "max", "clipped fraction", "clip range ε", "status"], rows)]
    rows = []
    base = next((i.get("figures", {}).get("seconds_measured") for i in by_kind["speed"] if i["flag"] == "baseline"),
                None)
    for i in by_kind["speed"]:
        f = i.get("figures", {})
        ratio = f["seconds_measured"] / base if base and f.get("seconds_measured") else None
        rows.append([i["flag"], fmt(f.get("seconds_measured")), fmt(ratio), fmt(f.get("first_update_s")),
                     fmt(f.get("peak_gb")), state(i)])
    if rows:
        script = by_kind["speed"][0]["script"]
        out += ["", f"**Speed flags** (`{script}.py`, bf16, published defaults; one flag changed from the scripts' "
                "defaults)", "", table(["flag", "s/update", "× baseline", "first update s", mem, "status"], rows)]
    return "\n".join(out) + "\n"


# --- the worker: the items --------------------------------------------------------------------------------------------

def shared_copy(module):
    """A copy of `module` whose parameters are new Parameter objects over the same storage: changing a copy's
    parameters (dtype, device, memory format: `p.data = ...`) leaves the original's untouched."""
    import torch

    memo = {id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


class ComponentCache:
    """The built-in models' modules, built once in float32 and cast once per dtype (on the CPU), and handed to
    every run as fresh modules sharing those weights: drawing SD1.4's 1.07 B random weights takes ~5 s a run.
    A half-precision build is the float32 one rounded (models.random_weights_), which a cast reproduces."""

    def __init__(self):
        self.built = {}

    def wrap(self, build):
        import torch

        def cached(seed: int = 0, dtype=torch.float32) -> dict:
            key = (build.__name__, seed)
            if (key, torch.float32) not in self.built:
                self.built[key, torch.float32] = build(seed, torch.float32)
            if (key, dtype) not in self.built:
                self.built[key, dtype] = {k: shared_copy(v).to(dtype) if isinstance(v, torch.nn.Module) else v
                                          for k, v in self.built[key, torch.float32].items()}
            return {k: shared_copy(v) if isinstance(v, torch.nn.Module) else
                    v if k == "tokenizer" else copy.deepcopy(v) for k, v in self.built[key, dtype].items()}
        return cached


class Worker:
    """The items, each a method taking its plan entry and returning its figures; one worker runs them in turn."""

    def __init__(self, opts, report, out: Path):
        import benchmark._preload  # noqa: F401  (the scripts' libraries: imported once, outside the items' time)
        import torch

        import common

        self.opts, self.report, self.out, self.s = opts, report, out, report["settings"]
        self.cuda = self.s["device"] == "cuda"
        if self.cuda:
            report["environment"].update(device_name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                                         torch=torch.__version__)
        else:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
            report["environment"].update(torch=torch.__version__, device_name=f"CPU ({platform.machine()}, "
                                                                              f"{torch.get_num_threads()} threads)")
        for script in SCRIPTS:
            importlib.import_module(script)
        self.cache = ComponentCache()
        self.patches = [(common.models, name, self.cache.wrap(getattr(common.models, name)))
                        for name in ("sd14_random_components", "tiny_components")]
        self.patches += [
            # no sample grids: outside the timed updates, ~1 s twice a run on a GPU
            (common.SampleGrid, "__call__", lambda grid, pipe: None), (common.Logger, "samples", lambda *a: 0.0)]
        self.pipes = []  # the pipelines the current item loaded (speed flags, latent size)
        t0 = time.time()
        self.warm_up()
        report["environment"]["warm_up_s"] = round(time.time() - t0, 1)

    def warm_up(self):
        """Build the model (once: ComponentCache) and run the kernels of a UNet forward and backward and a decode,
        so that the first item's timed update does not pay the process's first CUDA calls (cuBLAS, cuDNN, loading
        kernels): the RL scripts' one measured batch is extrapolated eightfold."""
        import torch

        import common
        from benchmark.bench_speed import patched

        with patched(self.patches):
            pipe = common.load_pipeline(self.s["model"], 4, "cuda" if self.cuda else "cpu", torch.bfloat16,
                                        resolution=self.s["resolution"])
        cond, uncond = common.encode_prompts(pipe, ["a cat"] * 4), common.encode_prompts(pipe, [""])
        x = common.initial_latents(pipe, 4, torch.Generator().manual_seed(0))
        common.guided_noise_pred(pipe, x, pipe.scheduler.timesteps[0], cond, uncond, 5.0).mean().backward()
        with torch.no_grad():
            common.decode(pipe, x[:1])

    # memory: CUDA's allocator peak, or the process's resident peak (VmHWM, reset through clear_refs) on the CPU
    def reset_peak(self) -> float:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**30
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        return 0.0

    def peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        status = Path("/proc/self/status")
        if status.exists():
            return int(re.search(r"VmHWM:\s*(\d+)", status.read_text()).group(1)) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def argv(self, script, precision, batch=None, steps=None, updates=None) -> list[str]:
        """The command line of one run: bench_sd14's flags (its rewards, the RL batch with the minibatches that fit
        it, ReFL's window, the gradient scripts' published variant) at this check's sizes, with a quiet run.
        `updates` None: an RL script's whole sampled batch (all the updates that reuse it), a gradient script's
        --gradient-updates."""
        from benchmark import bench_sd14

        o = argparse.Namespace(model=self.s["model"], resolution=self.s["resolution"], steps=1, num_sample_images=1,
                               num_inference_steps=steps or self.s["steps"], mixed_precision=precision, reward=None,
                               rl_batch_size=batch)
        flags = bench_sd14.script_flags(f"{script}.py", "vae-ckpt", o) + QUIET
        if updates is None:
            updates = updates_per_batch(parse(script, bench_sd14.shared_flags(o) + flags)) if script in RL \
                else self.s["gradient_updates"]
        o.steps = updates
        return bench_sd14.shared_flags(o) + flags

    def load_pipeline(self, flag: str | None):
        """common.load_pipeline, remembering the pipeline and applying one speed flag to it."""
        import common

        load = common.load_pipeline

        def loaded(*a, **k):
            pipe = load(*a, **k)
            self.pipes.append(pipe)
            if flag == "no-sdpa":
                from diffusers.models.attention_processor import AttnProcessor

                pipe.unet.set_attn_processor(AttnProcessor())
                pipe.vae.set_attn_processor(AttnProcessor())
            elif flag == "channels-last":
                import torch

                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            elif flag == "compile":
                pipe.unet.compile(backend=self.s["compile_backend"])
            return pipe
        return loaded

    def run(self, script, argv, flag=None, more_patches=()) -> dict:
        """One run of SCRIPT's main in this process (bench_speed.run_script): its metrics rows and peak memory."""
        import common
        from benchmark.bench_speed import run_script

        self.pipes.clear()
        base = self.reset_peak()
        patches = [*self.patches, (common, "load_pipeline", self.load_pipeline(flag)), *more_patches]
        rows = run_script(script, argv, patches=patches)["rows"]
        return dict(rows=rows, peak_gb=self.peak(), base_gb=base, argv=argv)

    def update(self, item) -> dict:
        script = item["script"]
        batch = self.s["rl_batch_size"] if script in RL else None
        return self.timed(script, self.argv(script, item["precision"], batch))

    def timed(self, script, argv, flag=None) -> dict:
        """Seconds per update after the first (a gradient script) or the first batch (an RL script) when there are
        more, and an RL script's seconds at the published batch: its batch's time × 64 / batch / updates per batch."""
        r = self.run(script, argv, flag)
        seconds, args = [row["step_seconds"] for row in r["rows"]], parse(script, argv)
        per_batch = updates_per_batch(args) if script in RL else 1
        warm = seconds[per_batch:] or seconds
        f = dict(batch=args.batch_size, seconds_measured=sum(warm) / len(warm), first_update_s=seconds[0],
                 updates=len(seconds), peak_gb=r["peak_gb"], base_gb=r["base_gb"],
                 skipped_updates=r["rows"][-1].get("skipped_updates", 0), flags=" ".join(argv))
        f["seconds_per_update"] = f["seconds_measured"]
        if script in RL:
            published = importlib.import_module(script).Args()
            f["seconds_per_update"] = (sum(warm) / (len(warm) / per_batch) * published.batch_size / args.batch_size
                                       / updates_per_batch(published))
        return f

    def memory(self, item) -> dict:
        script = item["script"]
        # the first update: sampling, decoding and scoring the batch, one minibatch
        argv = self.argv(script, item["precision"], self.s["memory_batch_size"], self.s["memory_steps"], updates=1)
        r = self.run(script, argv)
        pipe = self.pipes[0]
        latents = pipe.unet.config.in_channels * pipe.unet.config.sample_size ** 2
        batch = parse(script, argv).batch_size
        extra = batch * (self.s["steps"] - self.s["memory_steps"]) * latents * 4 / 2**30  # float32 latents
        return dict(batch=batch, peak_gb=r["peak_gb"], base_gb=r["base_gb"], trajectory_gb=extra,
                    peak_gb_at_published_T=r["peak_gb"] + extra, flags=" ".join(argv))

    def cosine(self, item) -> dict:
        import torch

        import common
        from benchmark import precision
        from benchmark.bench_speed import patched

        module = importlib.import_module(item["script"])
        device = "cuda" if self.cuda else "cpu"
        T = self.s["steps"]
        with patched(self.patches), float32_exact():
            pipes = precision.precision_pipes(self.s["model"], device, self.s["resolution"])
            rows = []
            if item["script"] == "ddpo_sf":
                fp32 = pipes[torch.float32]
                cond, uncond = common.encode_prompts(fp32, ["a cat", "a dog"]), common.encode_prompts(fp32, [""])
                traj = common.sample_trajectory(fp32, cond, uncond, T, 5.0, 1.0,
                                                generator=torch.Generator().manual_seed(0))
                args = module.Args(model=self.s["model"], train_batch_size=2, guidance_scale=5.0, eta=1.0,
                                   num_inference_steps=T)
                for j in sorted({0, T // 2, T - 1}):
                    def backward(pipe):
                        return precision.policy_gradient_backward(module, pipe, traj, cond, uncond, j,
                                                                  64 * PUBLISHED_T, args)
                    reference, cosines = precision.half_precision_cosines(pipes, backward)
                    unscaled = precision.lora_gradient(pipes[torch.float16], backward(pipes[torch.float16]),
                                                       loss_scaling=False)
                    rows.append(dict(what=f"t = {int(traj.timesteps[j])}", fp16=cosines[torch.float16],
                                     bf16=cosines[torch.bfloat16], reference_norm=float(reference.norm()),
                                     fp16_unscaled=precision.cosine(unscaled, reference)
                                     if unscaled.abs().max() > 0 else 0.0,
                                     fp16_unscaled_zero_fraction=float((unscaled == 0).double().mean())))
            else:
                args = module.Args(model=self.s["model"], num_inference_steps=T, batch_size=2, k=1)
                for pipe in pipes.values():  # as draft.py's default (the same gradient: tests/test_precision.py)
                    pipe.vae.enable_gradient_checkpointing()
                prompts, latents, noises = precision.gradient_inputs(pipes[torch.float32], n=2)

                def backward(pipe):
                    return precision.reward_gradient_backward(module, pipe, prompts, latents, noises, args)
                reference, cosines = precision.half_precision_cosines(pipes, backward)
                rows.append(dict(what=f"K = 1 of T = {T}, batch 2", fp16=cosines[torch.float16],
                                 bf16=cosines[torch.bfloat16], reference_norm=float(reference.norm())))
        return dict(rows=rows, peak_gb=self.peak())

    def ratio(self, item) -> dict:
        import torch

        import ddpo_is

        deviations = []
        surrogate = ddpo_is.clipped_surrogate

        def recording(log_prob, old_log_prob, advantages, clip_range):  # |r − 1| of every pair the update sees
            deviations.append(torch.expm1(log_prob.detach() - old_log_prob).abs().flatten().double().cpu())
            return surrogate(log_prob, old_log_prob, advantages, clip_range)

        argv = self.argv("ddpo_is", "bf16", self.s["rl_batch_size"], updates=1)  # the first minibatch's update
        argv += ["--reevaluate-log-probs", str(item["reevaluate"])]
        r = self.run("ddpo_is", argv, more_patches=[(ddpo_is, "clipped_surrogate", recording)])
        dev, row, eps = torch.cat(deviations), r["rows"][0], parse("ddpo_is", argv).clip_range
        return dict(ratio_dev_mean=float(dev.mean()), ratio_dev_max=float(dev.max()), clipfrac=row["clipfrac"],
                    clipfrac_recomputed=float((dev > eps).double().mean()), approx_kl=row["approx_kl"], clip_range=eps,
                    pairs=dev.numel(), peak_gb=r["peak_gb"], flags=" ".join(argv))

    def speed(self, item) -> dict:
        import torch

        script = item["script"]
        argv = self.argv(script, "bf16", self.s["rl_batch_size"] if script in RL else None)
        updates = (updates_per_batch(parse(script, argv)) if script in RL else 1) * self.s["speed_updates"]
        argv = self.argv(script, "bf16", self.s["rl_batch_size"] if script in RL else None, updates=updates)
        previous = torch.get_float32_matmul_precision()
        if item["flag"] == "tf32":
            torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls (cuDNN's convolutions: default on)
        try:
            return self.timed(script, argv, flag=item["flag"])
        finally:
            torch.set_float32_matmul_precision(previous)


def parse(script: str, argv: list[str]):
    """The Args a command line gives SCRIPT (its checks run, nothing loads)."""
    import tyro

    module = importlib.import_module(script)
    return tyro.cli(module.Args, args=argv)


def updates_per_batch(args) -> int:
    """Optimizer updates per sampled batch of an RL script's Args: DDPO-SF 1, DDPO-IS and GRPO inner epochs ×
    minibatches, RWR epochs × minibatches."""
    return getattr(args, "num_inner_epochs", getattr(args, "num_epochs", 1)) * getattr(args, "num_minibatches", 1)


@contextlib.contextmanager
def float32_exact():
    """float32 without TF32 (matmuls and cuDNN convolutions), the reference of the cosines."""
    import torch

    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


def summary(item) -> str:
    f = item.get("figures", {})
    parts = []
    for key, label in (("peak_gb", "peak {:.2f} GB"), ("seconds_measured", "{:.2f} s/update run"),
                       ("seconds_per_update", "{:.1f} s/update at the published batch"),
                       ("peak_gb_at_published_T", "{:.2f} GB at the published T"), ("clipfrac", "clipfrac {:.3f}"),
                       ("ratio_dev_max", "max |r − 1| {:.2e}")):
        if isinstance(f.get(key), (int, float)):
            parts.append(label.format(f[key]))
    for r in f.get("rows", []):
        parts.append(f"{r['what']}: fp16 {r['fp16']:.4f} bf16 {r['bf16']:.4f}")
    return ", ".join(parts)


def worker(opts) -> int:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's item timeout: the stacks, into the log
    out = Path(opts.out)
    report = json.loads((out / "gpu_check.json").read_text())  # the parent's plan: the pending items, in order
    pending = [i for i in report["items"] if i["status"] == "pending"]
    w = None
    for n, item in enumerate(pending):
        if now(report) > report["budget_s"]:
            for rest in pending[n:]:
                rest.update(status="skipped", error=f"--budget-s {report['budget_s']:g} spent")
            save(out, report)
            say(report, f"budget of {report['budget_s']:g} s spent: {len(pending) - n} items skipped")
            break
        if w is None:  # the imports and the device, outside the items' time
            try:
                w = Worker(opts, report, out)
            except ImportError as e:  # a package the parent's check does not name (a dependency of one it does)
                traceback.print_exc(file=sys.stderr)
                report["error"] = f"cannot import {e.name or e} ({e}): pip install -r requirements.txt"
                for rest in pending[n:]:
                    rest.update(status="skipped", error=report["error"])
                save(out, report)
                return 4
        item.update(status="running", started_s=round(now(report), 1))
        save(out, report)
        say(report, f"{item['id']} ...")
        t0 = time.time()
        try:
            item["figures"] = getattr(w, item["kind"])(item)
            item["status"] = "ok"
        except (Exception, SystemExit) as e:  # an OOM, a compile error, a script's refusal: recorded, then the next
            traceback.print_exc(file=sys.stderr)
            first = (str(e).strip().splitlines() or [""])[0]
            if isinstance(e, SystemExit):
                first += " (a script refused its command line: gpu_check.log has its message)"
            item.update(status="error", error=f"{type(e).__name__}: {first}"[:300])
        item["seconds"] = round(time.time() - t0, 1)
        w.pipes.clear()  # the item's pipelines go before the next item's memory is measured
        save(out, report)
        say(report, f"{item['id']} {item['status']} in {item['seconds']:.0f} s: "
                    + (summary(item) if item["status"] == "ok" else item["error"]))
        if item["status"] == "error" and w.cuda and not cuda_usable():
            say(report, "the CUDA context is unusable after this error: a fresh worker continues")
            return 3
    return 0


def cuda_usable() -> bool:
    import torch

    try:
        (torch.ones(1, device="cuda") + 1).item()
        return True
    except Exception:
        return False


# --- the parent: plan, workers, deadline ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="every item at a tiny size: `tiny`, 8 px, T = 2 (CI)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no item after this many seconds (420)")
    p.add_argument("--grace-s", type=float, default=60.0,
                   help="stop the item still running this long after the budget, as timed out (60)")
    p.add_argument("--item-timeout-s", type=float, default=300.0,
                   help="stop an item running longer than this as timed out and go on with the next (300)")
    p.add_argument("--only", default=None, help="comma-separated id prefixes of the items to run (e.g. update/,ratio/)")
    p.add_argument("--rl-batch-size", type=int, default=8, help="the RL scripts' measured batch (8: one sample chunk)")
    p.add_argument("--memory-steps", type=int, default=2, help="T of the RL scripts' published-batch memory run (2)")
    p.add_argument("--speed-script", default="draft", choices=SCRIPTS, help="the script of the speed flags (draft)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fail(out: Path, report: dict, message: str) -> int:
    """A reason the check cannot run: one line on stderr, and the same in the JSON and the markdown."""
    report.update(error=message, finished_note=f"not run: {message}")
    save(out, report)
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)
    return 2


def run_worker(opts, argv: list[str], out: Path, log, started: float) -> str | int:
    """One worker over the pending items. Returns its exit code, "item-timeout" (an item ran past --item-timeout-s)
    or "deadline" (--budget-s + --grace-s passed); a stopped worker first dumps its threads' stacks to the log."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker"]
    proc = subprocess.Popen(cmd, stderr=log, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)
    while proc.poll() is None:
        time.sleep(0.5)
        reason = "deadline" if time.time() > started + opts.budget_s + opts.grace_s else None
        if reason is None:
            with contextlib.suppress(OSError, ValueError):  # the worker replaces the file atomically
                running = [i for i in json.loads((out / "gpu_check.json").read_text())["items"]
                           if i["status"] == "running"]
                if running and time.time() - started - running[0]["started_s"] > opts.item_timeout_s:
                    reason = "item-timeout"
        if reason:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)  # faulthandler: where it was, into gpu_check.log
                time.sleep(2)
                os.killpg(proc.pid, signal.SIGKILL)  # not SIGTERM: the scripts take it as "stop after this update"
            proc.wait()
            return reason
    return proc.returncode


def main(argv=None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    out = Path(opts.out)
    if opts.worker:
        return worker(opts)
    out.mkdir(parents=True, exist_ok=True)
    env, missing = environment()
    report = dict(command=" ".join(["python benchmark/gpu_check.py", *argv]), started_unix=started,
                  budget_s=opts.budget_s, grace_s=opts.grace_s, settings=settings(opts), environment=env,
                  items=plan(opts))
    if missing:
        return fail(out, report, f"missing Python packages: {', '.join(missing)} (pip install -r requirements.txt)")
    if opts.device == "cuda":
        import torch  # only here: the CPU mode's parent stays light

        if not torch.cuda.is_available():
            return fail(out, report, f"no CUDA device (torch {torch.__version__}, built for CUDA "
                                     f"{torch.version.cuda}); for the CPU mode pass --device cpu --small")
    for name, version in env["differ_from_requirements"].items():
        say(report, f"note: {name} {version}")
    save(out, report)
    say(report, f"{len(report['items'])} items on {opts.device}, budget {opts.budget_s:g} s; "
                f"results in {out / 'gpu_check.json'}, the scripts' output in {out / 'gpu_check.log'}")
    with open(out / "gpu_check.log", "a") as log:
        while any(i["status"] == "pending" for i in report["items"]):
            done_before = sum(i["status"] in STATUS_DONE for i in report["items"])
            code = run_worker(opts, argv, out, log, started)
            report = json.loads((out / "gpu_check.json").read_text())
            why = {"deadline": f"stopped at --budget-s + --grace-s = {opts.budget_s + opts.grace_s:g} s",
                   "item-timeout": f"stopped after --item-timeout-s {opts.item_timeout_s:g} s (stacks: gpu_check.log)"}
            for i in report["items"]:
                if i["status"] == "running":
                    i.update(status="timeout" if code in why else "error", seconds=round(now(report) - i["started_s"]),
                             error=why.get(code, f"the worker process died (exit {code}; gpu_check.log)"))
                    say(report, f"{i['id']} {i['status']}: {i['error']}")
            if code == "deadline" or sum(i["status"] in STATUS_DONE for i in report["items"]) == done_before:
                for i in report["items"]:
                    if i["status"] == "pending":
                        i.update(status="skipped", error="no time left" if code == "deadline"
                                 else f"the worker process failed before its first item (exit {code}; gpu_check.log)")
            save(out, report)
    counts = {s: sum(i["status"] == s for i in report["items"]) for s in ("ok", "error", "timeout", "skipped")}
    report["finished_note"] = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    save(out, report)
    say(report, f"done: {report['finished_note']}")
    print((out / "gpu_check.md").read_text(), flush=True)
    if report.get("error"):  # the worker could not start
        print(f"gpu_check: {report['error']}", file=sys.stderr, flush=True)
        return 2
    return 0 if counts["ok"] == len(report["items"]) else 1


if __name__ == "__main__":
    sys.exit(main())
