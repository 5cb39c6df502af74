"""Seconds per update and peak memory of the eight scripts on SD1.4's real architecture (`--model sd14-random`), or on
SDXL-base's (`--model sdxl-random`, issue 23).

Issue 11, part 5 (GRPO added). Each run is one script through its real command line (tyro parses the same flags) in
a fresh subprocess: a small wrapper in this file runs the script's `main(args)` in that process and afterwards reads
the process's peak memory, CUDA `torch.cuda.max_memory_allocated` on a GPU (weights, activations, optimizer state;
what the allocator reserves on top is not counted) or the peak resident set size (`getrusage` ru_maxrss) on the CPU.
The seconds are the script's own `step_seconds` of its update (the mean over the updates after the first with
--steps > 1), so loading the model is not in them; for DDPO-IS and RWR the first update of a batch also samples the
batch that their later updates reuse.

Settings: every script at its published defaults (its `Args`: T, batch sizes, K, n, ...) except what this file
sets for all: the JPEG rewards, which need no weights (`jpeg_compressibility` for the RL scripts,
`jpeg_compressibility_diff` for the gradient ones), so the reward model's own memory is not counted (a neural
reward adds its weights, e.g. HPSv2's ViT-H, and in the gradient scripts its activations); a sample grid of
`--num-sample-images` (default 1) images; and on the CPU a smaller resolution, T and RL batch (below). The four
gradient scripts run in four variants: one backward for the whole batch or micro-batches of one image
(`--train-batch-size`), each with and without gradient checkpointing of the VAE decoder (`--vae-checkpointing`).

Goals (issue 11, on one GPU at 512 px and the published defaults): DDPO-SF and DDPO-IS ≤ 10 GB (ddpo-pytorch's
claim), every gradient script ≤ 24 GB; RWR has none. SDXL (issue 23, at 1024 px): DDPO ≤ 40 GB, every script ≤ 80 GB.
On the CPU the table says what fits in 24 GB.

    python benchmark/bench_sd14.py                               # GPU: 512 px, T = 50, published batches
    python benchmark/bench_sd14.py --resolution 128 --num-inference-steps 2 --scripts draft.py,ddpo_sf.py
    python benchmark/bench_sd14.py --markdown                    # the table as in docs/gpu.md
    python benchmark/bench_sd14.py --model sdxl-random --mixed-precision bf16 --resolution 256 --rl-batch-size 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RL_SCRIPTS = ("ddpo_sf.py", "ddpo_is.py", "rwr.py", "grpo.py")
GRADIENT_SCRIPTS = ("draft.py", "draft_lv.py", "refl.py", "alignprop.py")
GOAL_GB = {"ddpo_sf.py": 10, "ddpo_is.py": 10, **{s: 24 for s in GRADIENT_SCRIPTS}}  # issue 11 (SD1.4)
# issue 23 (SDXL): every script within 80 GB, DDPO within 40 GB
GOALS_GB = {"sd14-random": GOAL_GB, "sdxl-random": {s: 40 if s.startswith("ddpo") else 80
                                                    for s in RL_SCRIPTS + GRADIENT_SCRIPTS}}
NATIVE_RESOLUTION = {"sd14-random": 512, "sdxl-random": 1024}
CPU_LIMIT_GB = 24  # what "fits" means on the CPU: this project's machines have 24 GB
# the gradient scripts' variants: (name, --train-batch-size (None: the whole batch), --vae-checkpointing)
VARIANTS = {"plain": (None, False), "vae-ckpt": (None, True), "micro-1": (1, False), "micro-1+vae-ckpt": (1, True)}


def child(result_file: str, script: str, argv: list[str]) -> None:
    """In the subprocess: run SCRIPT's `main` on ARGV as its command line would, then write the peak memory."""
    import torch
    import tyro

    cuda = torch.cuda.is_available()  # a fresh process: both peaks start from nothing
    module = importlib.import_module(script.removesuffix(".py"))  # the scripts are importable modules
    module.main(tyro.cli(module.Args, args=argv))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(result_file).write_text(json.dumps(dict(device="cuda" if cuda else "cpu", peak_bytes=peak)))


def script_default(script: str, field: str):
    """A published default, read from the script's `Args`."""
    return getattr(importlib.import_module(script.removesuffix(".py")).Args(), field)


def shared_flags(opts) -> list[str]:
    return ["--model", getattr(opts, "model", "sd14-random"), "--resolution", str(opts.resolution),
            "--num-inference-steps", str(opts.num_inference_steps), "--steps", str(opts.steps), "--num-sample-images",
            str(opts.num_sample_images), "--mixed-precision", opts.mixed_precision]


def script_flags(script: str, variant: str, opts) -> list[str]:
    """The flags of one run besides the shared ones: its reward, the CPU's reductions, the variant's switches."""
    rl = script in RL_SCRIPTS
    flags = ["--reward", opts.reward or ("jpeg_compressibility" if rl else "jpeg_compressibility_diff")]
    if rl and opts.rl_batch_size:
        flags += ["--batch-size", str(opts.rl_batch_size)]
        for field in ("sample_batch_size", "train_batch_size"):  # a batch below them (SDXL on the CPU) sets them
            if opts.rl_batch_size < script_default(script, field):
                flags += [f"--{field.replace('_', '-')}", str(opts.rl_batch_size)]
        if script != "ddpo_sf.py":  # minibatches must hold whole train batches
            minibatches = script_default(script, "num_minibatches")
            train_batch = script_default(script, "train_batch_size")
            flags += ["--num-minibatches", str(max(1, min(minibatches, opts.rl_batch_size // train_batch)))]
        # the batch must hold whole groups (GRPO) or prompts' image sets (RWR): smaller ones below the published size
        group = {"grpo.py": "group_size", "rwr.py": "images_per_prompt"}.get(script)
        if group and opts.rl_batch_size < script_default(script, group):
            flags += [f"--{group.replace('_', '-')}", str(opts.rl_batch_size)]
    if script == "refl.py" and opts.num_inference_steps < script_default(script, "max_step"):
        flags += ["--max-step", str(opts.num_inference_steps)]  # m is drawn from the last max_step steps
    if not rl:
        train_batch, vae_ckpt = VARIANTS[variant]
        batch = getattr(opts, "gradient_batch_size", None) or script_default(script, "batch_size")
        if batch != script_default(script, "batch_size"):
            flags += ["--batch-size", str(batch)]
        flags += ["--train-batch-size", str(train_batch or batch)]
        flags += ["--vae-checkpointing" if vae_ckpt else "--no-vae-checkpointing"]
    return flags


def read_run(run_dir: Path, result_file: Path) -> dict:
    """seconds per update (from the run's metrics.jsonl) and peak memory (from the wrapper's result file)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in rows]
    result = json.loads(result_file.read_text())
    return dict(seconds=statistics.mean(seconds[1:] or seconds), peak_gb=result["peak_bytes"] / 2**30,
                device=result["device"])


def run_one(script: str, variant: str, opts) -> dict:
    flags = script_flags(script, variant, opts)
    row = dict(script=script, variant=variant, flags=" ".join(flags), model=getattr(opts, "model", "sd14-random"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, __file__, "--child", str(tmp / "result.json"), script, *shared_flags(opts), *flags,
               "--output-dir", str(tmp / "run")]
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
        row["wall_s"] = time.time() - t0
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            return dict(row, error=f"exit {res.returncode}: {last}")
        return dict(row, **read_run(tmp / "run", tmp / "result.json"))


def verdict(row: dict) -> str:
    """Against issue 11's goal on a GPU; on the CPU, whether the run fits in 24 GB."""
    if "error" in row:
        return "failed"
    if row["device"] == "cpu":
        return "fits 24 GB" if row["peak_gb"] <= CPU_LIMIT_GB else "over 24 GB"
    goal = GOALS_GB[row.get("model", "sd14-random")].get(row["script"])
    if goal is None:
        return "no goal"
    return f"{'≤' if row['peak_gb'] <= goal else '>'} {goal} GB goal"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as a plain-text table (or a markdown one, for docs/gpu.md)."""
    header = ["script", "variant", "s/update", "peak GB", "verdict", "wall s", "flags"]
    lines = []
    for r in rows:
        if "error" in r:
            cells = [r["script"], r["variant"], "-", "-", verdict(r), f"{r['wall_s']:.0f}", r["error"]]
        else:
            cells = [r["script"], r["variant"], f"{r['seconds']:.2f}", f"{r['peak_gb']:.2f}", verdict(r),
                     f"{r['wall_s']:.0f}", r["flags"]]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(c if i < 6 else f"`{c}`" for i, c in enumerate(cells)) + " |"
                                for cells in lines])
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header[:-1])]
    fmt = "  ".join(f"{{:{w}s}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*cells) for cells in [header, *lines])


def parse_args(argv=None):
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", default=",".join(RL_SCRIPTS + GRADIENT_SCRIPTS),
                   help="comma-separated scripts to run (default: all eight)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated variants of the gradient scripts, of {', '.join(VARIANTS)}")
    p.add_argument("--model", default="sd14-random", choices=sorted(GOALS_GB),
                   help="the architecture, with random weights (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels, a multiple of 64 (default: the model's on a GPU, SD1.4's 512 or "
                        "SDXL's 1024; 128 on the CPU)")
    p.add_argument("--num-inference-steps", type=int, default=50 if cuda else 2,
                   help="DDIM steps T (default: 50 on a GPU, the published value; 2 on the CPU)")
    p.add_argument("--rl-batch-size", type=int, default=None if cuda else 16,
                   help="--batch-size of the RL scripts (default: theirs, 64, on a GPU; 16 on the CPU)")
    p.add_argument("--gradient-batch-size", type=int, default=None,
                   help="--batch-size of the gradient scripts (default: theirs, 4)")
    p.add_argument("--reward", default=None,
                   help="reward of every run (default: jpeg_compressibility for the RL scripts, "
                        "jpeg_compressibility_diff for the gradient scripts; no weights needed)")
    p.add_argument("--mixed-precision", default="auto", help="the scripts' --mixed-precision (default auto)")
    p.add_argument("--steps", type=int, default=1, help="updates per run (default 1)")
    p.add_argument("--num-sample-images", type=int, default=1, help="images in the runs' sample grids (default 1)")
    p.add_argument("--markdown", action="store_true", help="print the table in markdown")
    opts = p.parse_args(argv)
    if opts.resolution is None:
        opts.resolution = NATIVE_RESOLUTION[opts.model] if cuda else 128
    return opts


def main():
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    opts = parse_args()
    scripts = opts.scripts.split(",")
    unknown = [s for s in scripts if s not in RL_SCRIPTS + GRADIENT_SCRIPTS] + [
        v for v in opts.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown script or variant: {', '.join(unknown)}")
    print("every run:", " ".join(shared_flags(opts)), flush=True)
    rows = []
    for script in scripts:
        for variant in (["defaults"] if script in RL_SCRIPTS else opts.variants.split(",")):
            rows.append(run_one(script, variant, opts))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows, opts.markdown))


if __name__ == "__main__":
    main()
