"""The seven algorithms and GRPO compared at an equal budget of reward queries, on `tiny-shapes`: one command.

    python benchmark/compare.py                 # both comparisons, about an hour on a 2-core CPU
    python benchmark/compare.py --smoke         # the whole pipeline on `--model tiny` in a few minutes
    python benchmark/compare.py --report-only   # redraw tables and plots from the runs already there

Comparison `alignment` (the main one): every script trains on `tiny-shapes` with the reward `shapes_alignment`
(mean log-probability of the prompt's attributes under a classifier, 0 = perfect); the RL scripts only use
its value (they score under no_grad), the gradient scripts backpropagate through it. Every run gets the same
budget of reward queries (images scored, the scripts' cumulative `reward_queries`), 3 seeds each. After each
run the final LoRA is evaluated on fixed prompts and seeds (benchmark/evaluate.py): the exact-match rate
(`shapes_exact_match`, 0/1: every attribute right) and the attribute accuracy (`shapes_attribute_accuracy`, the
fraction of the four attributes right) on the training prompts and on held-out attribute combinations, and the
alignment reward.

Comparison `jpeg` (shorter): DDPO's compressibility task. The RL scripts train on `jpeg_compressibility` (PIL
JPEG file size, black box), the gradient scripts on its differentiable stand-in `jpeg_compressibility_diff`
(DRaFT's); the two families have different training rewards, so their thresholds are separate, and the final
LoRAs are all scored on both rewards (and exact match and attribute accuracy, to see what compressibility costs
in prompt fidelity).

Configuration rule (stated in summary.md): the scripts' own defaults (LoRA rank and targets, weight decay,
gradient clipping, η, DRaFT-LV's n = 2, DDPO-IS's and GRPO's 4 minibatches, RWR's 4 epochs × 4 minibatches, 8 images
per prompt and β) except: T and w from `shapes.RECOMMENDED` for all; one learning rate per family (RL, gradient)
instead of per script, chosen by a short sweep of one script per family on one seed; small batches (4 images per
update for the gradient scripts, their default; 16 per sampled batch for the RL scripts); ReFL's m from the last
40% of the steps (DRaFT's 20 of 50); DDPO-IS's and GRPO's clip range scaled with the learning rate (1e-4 at the
paper's 3e-4); GRPO's groups of 8 (2 prompts × 8 images per batch of 16); `--steps` = budget / queries per update.
The sample grid (the eval curve) is drawn at step 0 and ~6 more times per run from a fixed shuffle of the training
prompts, 48 images in the main comparison (`--grid-images`: 16 gave a grid of prompts the base model already drew
well, see docs/benchmark) and 8, the scripts' default, in the JPEG one.

Cost on this 2-core CPU (one thread per job, T = 20, two jobs at a time, 2026-11-30): 0.19 (DRaFT-LV) to 1.06
(DDPO-IS) seconds of training per reward query, 4.3 s per query for the seven scripts together, plus about 2 min
per run of the main comparison for its 48-image sample grids and ~30 s for the final evaluation. The default
budgets (192 queries × 3 seeds, JPEG 48 × 2 seeds) take about 56 min with `--jobs 2` (107 min summed over runs).

Runs go to `--out`/runs/{comparison}/{algorithm}__s{seed}; a run whose directory holds a finished run of the
same command is skipped (so a rerun resumes), `--fresh` redoes them. Jobs run with OMP_NUM_THREADS=1,
`--jobs` at a time (default 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import analysis  # noqa: E402

ALGORITHMS = ("ddpo_sf", "ddpo_is", "rwr", "draft", "draft_lv", "refl", "alignprop", "grpo")
RL = ("ddpo_sf", "ddpo_is", "rwr", "grpo")
LABELS = dict(ddpo_sf="DDPO-SF", ddpo_is="DDPO-IS", rwr="RWR", draft="DRaFT-1", draft_lv="DRaFT-LV", refl="ReFL",
              alignprop="AlignProp", grpo="GRPO")
GRPO_GROUP = 8  # images per prompt: Flow-GRPO's one-GPU configs (DanceGRPO: 16, which would leave 1 prompt per batch)
PAPER_LR = dict(rl=3e-4)  # DDPO's learning rate, at which its clip range 1e-4 is calibrated


@dataclass
class Comparison:
    """One comparison: a model, prompts, the reward of each family, a budget and the seeds."""

    name: str
    title: str
    model: str
    prompts: str  # training prompt set
    heldout_prompts: str  # held-out prompt set, evaluation only
    rl_reward: str  # reward of ddpo_sf, ddpo_is, rwr, grpo (used as a black box)
    grad_reward: str  # reward of draft, draft_lv, refl, alignprop (differentiated)
    eval_rewards: list[str]  # rewards of the final evaluation
    budget: int  # reward queries per run
    seeds: list[int]
    num_inference_steps: int
    guidance_scale: float
    lr: dict[str, float]  # family ("rl", "grad") -> AdamW learning rate
    rl_batch: int = 16  # images sampled per batch by the RL scripts
    grad_batch: int = 4  # images per update of the gradient scripts
    evals_per_run: int = 6  # sample grids per run after step 0 (the eval curve's resolution)
    num_sample_images: int = 8  # images per sample grid (the scripts' default)
    eval_images: int = 24  # about this many images per prompt set in the final evaluation (evaluate.eval_prompts)
    algorithms: tuple[str, ...] = ALGORITHMS

    def reward(self, algo: str) -> str:
        return self.rl_reward if algo in RL else self.grad_reward

    def family(self, algo: str) -> str:
        return "rl" if algo in RL else "grad"


@dataclass
class Job:
    comparison: Comparison
    algorithm: str
    seed: int
    run_dir: Path
    cmd: list[str]
    steps: int
    queries_per_update: float
    extra: dict = field(default_factory=dict)  # per-algorithm settings for the configuration table


def script_settings(c: Comparison, algo: str) -> tuple[list[str], int, float, dict]:
    """(flags, steps, queries per update, settings for the table) of `algo` in comparison `c`."""
    lr = c.lr[c.family(algo)]
    T = c.num_inference_steps
    if algo == "ddpo_sf":  # one on-policy update per sampled batch
        B = c.rl_batch
        flags = ["--batch-size", B, "--sample-batch-size", min(B, 16), "--train-batch-size", min(B, 16)]
        per_update, settings = B, dict(batch=f"{B} per update")
    elif algo in ("ddpo_is", "grpo"):  # 4 clipped updates per sampled batch (default), clip range scaled with the LR
        B, mb = c.rl_batch, 4
        clip = 1e-4 * lr / PAPER_LR["rl"]
        flags = ["--batch-size", B, "--sample-batch-size", min(B, 16), "--num-minibatches", mb,
                 "--train-batch-size", B // mb, "--clip-range", f"{clip:.3g}"]
        per_update, settings = B / mb, dict(batch=f"{B} per batch, {mb} updates of {B // mb}", clip_range=clip)
        if algo == "grpo":  # GRPO: B / G prompts × G images
            flags += ["--group-size", GRPO_GROUP]
            settings["batch"] = f"{B} per batch ({B // GRPO_GROUP} prompts × {GRPO_GROUP}), {mb} updates of {B // mb}"
    elif algo == "rwr":  # 4 epochs × 4 minibatches per round (default), 8 images per prompt (default)
        B, mb, ep = c.rl_batch, 4, 4
        flags = ["--batch-size", B, "--sample-batch-size", min(B, 16), "--images-per-prompt", 8,
                 "--num-minibatches", mb, "--num-epochs", ep, "--train-batch-size", B // mb]
        per_update, settings = B / (mb * ep), dict(batch=f"{B} per round ({B // 8} prompts × 8), "
                                                         f"{mb * ep} updates of {B // mb}")
    elif algo == "draft":
        flags, per_update = ["--batch-size", c.grad_batch, "--k", 1], c.grad_batch
        settings = dict(batch=f"{c.grad_batch}, K = 1")
    elif algo == "draft_lv":  # every update scores B·(n + 1) images
        flags, per_update = ["--batch-size", c.grad_batch, "--n", 2], c.grad_batch * 3
        settings = dict(batch=f"{c.grad_batch}, n = 2 ({c.grad_batch * 3} queries per update)")
    elif algo == "refl":
        max_step = max(1, round(0.4 * T))
        flags, per_update = ["--batch-size", c.grad_batch, "--max-step", max_step], c.grad_batch
        settings = dict(batch=f"{c.grad_batch}, m in the last {max_step} of {T}")
    elif algo == "alignprop":
        flags, per_update = ["--batch-size", c.grad_batch, "--truncation", "random"], c.grad_batch
        settings = dict(batch=f"{c.grad_batch}, K ~ U{{1..{T}}}")
    else:
        raise ValueError(algo)
    steps = c.budget / per_update
    if steps != int(steps):
        raise ValueError(f"{c.name}: budget {c.budget} is not a multiple of {algo}'s {per_update} queries per update")
    steps = int(steps)
    flags += ["--learning-rate", f"{lr:g}", "--steps", steps]
    settings |= dict(lr=lr, steps=steps, T=T, w=c.guidance_scale, budget=c.budget, reward=c.reward(algo))
    return [str(f) for f in flags], steps, per_update, settings


def plan(comparisons: list[Comparison], out: Path, prompt_files: dict[str, Path]) -> list[Job]:
    """All jobs, ordered so that partial results cover every algorithm: seed 0 of every comparison first."""
    jobs = []
    for c in comparisons:
        for seed in c.seeds:
            for algo in c.algorithms:
                flags, steps, per_update, settings = script_settings(c, algo)
                run_dir = out / "runs" / c.name / f"{algo}__s{seed}"
                sample_every = max(1, steps // c.evals_per_run)
                cmd = [f"{algo}.py", "--model", c.model, "--reward", c.reward(algo),
                       "--prompt-file", str(prompt_files[c.prompts]),
                       "--num-inference-steps", str(c.num_inference_steps),
                       "--guidance-scale", f"{c.guidance_scale:g}", *flags, "--seed", str(seed),
                       "--sample-every", str(sample_every), "--num-sample-images", str(c.num_sample_images),
                       "--save-every", "0", "--output-dir", str(run_dir)]
                jobs.append(Job(c, algo, seed, run_dir, cmd, steps, per_update, settings))
    order = {c.name: i for i, c in enumerate(comparisons)}
    return sorted(jobs, key=lambda j: (j.seed, order[j.comparison.name]))  # stable: algorithm order kept


def shuffled_prompt_file(name: str, out: Path) -> Path:
    """The prompt set written in a fixed shuffled order. Training draws prompts uniformly either way; the order
    only decides the sample grid (the first --num-sample-images prompts), which should span the attributes."""
    import common

    prompts = common.load_prompts(name)
    random.Random(0).shuffle(prompts)
    path = out / "prompts" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# running


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_finished(job: Job) -> bool:
    info = analysis.read_json(job.run_dir / "bench_run.json")
    return bool(info and info.get("cmd") == job.cmd and (job.run_dir / "pytorch_lora_weights.safetensors").is_file())


def _eval_sets(c: Comparison) -> dict[str, str]:
    return dict(train=c.prompts, heldout=c.heldout_prompts)


def eval_done(path: Path, c: Comparison) -> bool:
    """Whether `path` holds an evaluation with every reward and the image count the comparison asks for."""
    result = analysis.read_json(path)
    if not result:
        return False
    return (set(c.eval_rewards) <= set(result["scores"].get("train", {}))
            and result["config"].get("num_images") == c.eval_images)


def _write_eval(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


_FORK_SERVER = None  # the multiprocessing context once started (--fork-server)


def _fork_server():
    """A forkserver context whose server has imported the scripts' third-party libraries (benchmark/_preload.py).
    It inherits this process's environment, so OMP_NUM_THREADS=1 applies to every run."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["benchmark._preload"])
        _FORK_SERVER = ctx
    return _FORK_SERVER


def _run(cmd: list[str], log: Path, fork: bool) -> int:
    """Run `python *cmd` from the repository root with output appended to `log`; the exit code."""
    if fork:
        from benchmark._forkrun import run_script

        process = _fork_server().Process(target=run_script, args=(cmd[0], cmd[1:], str(log)))
        process.start()
        process.join()
        return process.exitcode
    with open(log, "a") as f:
        return subprocess.call([sys.executable, *cmd], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)


def _call(cmd: list[str], log: Path, fork: bool = True, attempts: int = 4) -> float:
    """Run the script command `cmd` (["draft.py", "--flag", ...]) as `python *cmd` would, from the repository root,
    output appended to `log`; retried on failure (the scripts may be edited while the benchmark runs). With
    `fork`, in a process forked from a server that has the third-party libraries imported (saves 10-20 s of
    imports per run here); otherwise in a fresh interpreter. Returns the wall time of the successful attempt."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"\n$ python {' '.join(cmd)}   # attempt {attempt}\n")
        rc = _run(cmd, log, fork)
        if rc == 0:
            return time.time() - t0
        print(f"  {cmd[0]} failed (exit {rc}, attempt {attempt}/{attempts}); log: {log}", flush=True)
        time.sleep(30)  # e.g. a script caught mid-edit: give it time
    raise RuntimeError(f"{cmd[0]} failed {attempts} times; see {log}")


def execute(job: Job, out: Path, fresh: bool, lock: threading.Lock, eval_lock: threading.Lock,
            skip_eval: bool = False, fork: bool = True) -> str:
    """Train (unless finished), then evaluate the final LoRA (unless evaluated). Returns what was done.

    Training runs the script in a subprocess; the evaluation runs in this process (one at a time, under
    `eval_lock`), which saves a second start of torch and diffusers per run (~10 s each on this machine)."""
    from benchmark import evaluate
    log = out / "logs" / job.comparison.name / f"{job.algorithm}__s{job.seed}.log"
    done = []
    if fresh or not run_finished(job):
        if job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        with lock:
            print(f"[{time.strftime('%H:%M:%S')}] train {job.comparison.name}/{job.algorithm} seed {job.seed}: "
                  f"{job.steps} updates", flush=True)
        wall = _call(job.cmd, log, fork)
        info = dict(cmd=job.cmd, wall_seconds=round(wall, 2),
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (job.run_dir / "bench_run.json").write_text(json.dumps(info, indent=2))
        (job.run_dir / "final_eval.json").unlink(missing_ok=True)
        done.append(f"trained in {wall:.0f} s")
    final = job.run_dir / "final_eval.json"
    if not eval_done(final, job.comparison) and not skip_eval:
        with eval_lock:
            c = job.comparison
            result = evaluate.evaluate_run(job.run_dir, _eval_sets(c), c.eval_rewards, c.eval_images)
        _write_eval(result, final)
        done.append(f"evaluated in {result['seconds']:.0f} s")
    return ", ".join(done) or "already done"


def evaluate_base(c: Comparison, out: Path, fresh: bool) -> None:
    """The base model's scores, once per sampler the comparison uses (η = 0 gradient, η = 1 RL)."""
    from benchmark import evaluate

    for eta in sorted({1.0 if a in RL else 0.0 for a in c.algorithms}):
        path = out / "base" / f"{c.name}__eta{eta:g}.json"
        if fresh or not eval_done(path, c):
            print(f"[{time.strftime('%H:%M:%S')}] evaluate base model ({c.name}, η = {eta:g})", flush=True)
            _write_eval(evaluate.evaluate(c.model, None, _eval_sets(c), c.eval_rewards, c.eval_images,
                                          c.num_inference_steps, c.guidance_scale, eta), path)


# ---------------------------------------------------------------------------------------------------------------
# configuration


def recommended(model: str) -> dict:
    """shapes.RECOMMENDED (T and w of tiny-shapes) for tiny-shapes; small fixed settings for tiny."""
    if model == "tiny":
        return dict(num_inference_steps=4, guidance_scale=5.0)
    import shapes

    return dict(shapes.RECOMMENDED)


def comparisons(a) -> list[Comparison]:
    """The two comparisons of the benchmark (or of --smoke), with the command-line overrides applied."""
    if a.smoke:
        rec = recommended("tiny")
        common_kw = dict(model="tiny", prompts="simple_animals", heldout_prompts="imagenet_animals",
                         num_inference_steps=rec["num_inference_steps"], guidance_scale=rec["guidance_scale"],
                         lr=dict(rl=a.lr_rl or 3e-3, grad=a.lr_grad or 3e-3), evals_per_run=3, num_sample_images=4,
                         eval_images=8, rl_batch=16)
        main = Comparison("alignment", "smoke: jpeg_compressibility_diff for all (RL as a black box)",
                          rl_reward="jpeg_compressibility_diff", grad_reward="jpeg_compressibility_diff",
                          eval_rewards=["jpeg_compressibility_diff", "jpeg_compressibility"], budget=a.budget or 48,
                          seeds=a.seeds or [0, 1], **common_kw)
        jpeg = Comparison("jpeg", "smoke: jpeg_compressibility (RL) / jpeg_compressibility_diff (gradient)",
                          rl_reward="jpeg_compressibility", grad_reward="jpeg_compressibility_diff",
                          eval_rewards=["jpeg_compressibility", "jpeg_compressibility_diff"],
                          budget=a.jpeg_budget or 48, seeds=a.jpeg_seeds or [0], **common_kw)
    else:
        rec = recommended(a.model)
        common_kw = dict(model=a.model, prompts="shapes", heldout_prompts="shapes_heldout",
                         num_inference_steps=rec["num_inference_steps"], guidance_scale=rec["guidance_scale"],
                         lr=dict(rl=a.lr_rl, grad=a.lr_grad), eval_images=a.eval_images)
        main = Comparison("alignment", "tiny-shapes, shapes_alignment (RL: black box; gradient: backpropagated)",
                          rl_reward="shapes_alignment", grad_reward="shapes_alignment",
                          eval_rewards=["shapes_exact_match", "shapes_attribute_accuracy", "shapes_alignment"],
                          budget=a.budget,
                          seeds=a.seeds or [0, 1, 2], num_sample_images=a.grid_images, **common_kw)
        jpeg = Comparison("jpeg", "tiny-shapes, jpeg_compressibility (RL, PIL) / jpeg_compressibility_diff (gradient)",
                          rl_reward="jpeg_compressibility", grad_reward="jpeg_compressibility_diff",
                          eval_rewards=["jpeg_compressibility", "jpeg_compressibility_diff", "shapes_exact_match",
                                        "shapes_attribute_accuracy"],
                          budget=a.jpeg_budget, seeds=a.jpeg_seeds or [0, 1], **common_kw)
        jpeg.eval_images = max(1, a.eval_images // 4)
    chosen = [c for c in (main, jpeg) if c.name in a.comparisons]
    for c in chosen:
        c.algorithms = tuple(x for x in ALGORITHMS if x in a.algorithms)
    return chosen


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmark/results, "
                   "benchmark/results/smoke with --smoke; both git-ignored)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one torch thread); at most 2 here")
    p.add_argument("--fresh", action="store_true", help="redo finished runs and evaluations")
    p.add_argument("--smoke", action="store_true", help="tiny budgets on --model tiny with the JPEG rewards")
    p.add_argument("--report-only", action="store_true", help="only aggregate the runs already in --out")
    p.add_argument("--model", default="tiny-shapes")
    p.add_argument("--budget", type=int, default=192, help="reward queries per run, main comparison")
    p.add_argument("--jpeg-budget", type=int, default=48, help="reward queries per run, JPEG comparison")
    p.add_argument("--seeds", type=int, nargs="+", help="main comparison (default 0 1 2)")
    p.add_argument("--jpeg-seeds", type=int, nargs="+", help="JPEG comparison (default 0 1)")
    p.add_argument("--lr-rl", type=float, default=1e-3, help="AdamW learning rate of ddpo_sf, ddpo_is, rwr, grpo")
    p.add_argument("--lr-grad", type=float, default=1e-3, help="AdamW learning rate of the four gradient scripts")
    p.add_argument("--eval-images", type=int, default=48, help="about this many images per prompt set in the final "
                   "evaluation of the main comparison (every prompt the same number of times; JPEG: a quarter)")
    p.add_argument("--grid-images", type=int, default=48, help="images in each run's sample grid, the eval curve the "
                   "threshold is read from, main comparison (the first of the shuffled training prompts)")
    p.add_argument("--skip-eval", action="store_true", help="no final evaluations (for a quick sweep)")
    p.add_argument("--no-fork-server", action="store_true", help="start every run in a fresh interpreter instead of "
                   "forking it from a server with torch and diffusers already imported")
    p.add_argument("--comparisons", nargs="+", default=["alignment", "jpeg"], choices=["alignment", "jpeg"])
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    a = p.parse_args(argv)
    if a.smoke:
        a.model = "tiny"
        if a.budget == p.get_default("budget"):
            a.budget = None
        if a.jpeg_budget == p.get_default("jpeg_budget"):
            a.jpeg_budget = None
        if a.lr_rl == p.get_default("lr_rl"):
            a.lr_rl = None
        if a.lr_grad == p.get_default("lr_grad"):
            a.lr_grad = None
    a.out = a.out or ROOT / "benchmark" / "results" / ("smoke" if a.smoke else "")
    return a


def _git_state() -> str:
    """The commit and the modified tracked files at the start (the scripts may be edited while this runs)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return f"commit {git('rev-parse', 'HEAD')}\nstarted {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n" \
           f"modified tracked files:\n{git('status', '--short', '--untracked-files=no')}\n"


def main(argv=None):
    a = parse_args(argv)
    # before torch is imported here or in the fork server: one thread, offline, unbuffered logs
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    import torch

    torch.set_num_threads(1)  # the in-process evaluations, like the runs, use one thread
    from benchmark import report

    t_start = time.time()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    comps = comparisons(a)
    prompt_files = {c.prompts: shuffled_prompt_file(c.prompts, out) for c in comps}
    jobs = plan(comps, out, prompt_files)
    (out / "git.txt").write_text(_git_state())
    (out / "commands.txt").write_text("".join(
        f"OMP_NUM_THREADS=1 python {' '.join(j.cmd)}\n" for j in jobs))
    if not a.report_only:
        print(f"{len(jobs)} runs, {a.jobs} at a time; output in {out}", flush=True)
        for c in comps:
            if not a.skip_eval:
                evaluate_base(c, out, a.fresh)
        lock, eval_lock = threading.Lock(), threading.Lock()
        failed = []
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            futures = {pool.submit(execute, j, out, a.fresh, lock, eval_lock, a.skip_eval, not a.no_fork_server): j
                       for j in jobs}
            for n, future in enumerate(as_completed(futures), 1):
                j = futures[future]
                try:
                    what = future.result()
                except Exception as e:  # keep going: the report shows what is missing
                    failed.append(j)
                    what = f"FAILED: {e}"
                with lock:
                    print(f"[{time.strftime('%H:%M:%S')}] {n}/{len(jobs)} {j.comparison.name}/{j.algorithm} "
                          f"seed {j.seed}: {what}", flush=True)
                try:  # refresh the report as results come in (cheap), so partial results are always there
                    report.write(comps, jobs, out, elapsed=time.time() - t_start, final=False)
                except Exception as e:
                    print(f"  report failed: {type(e).__name__}: {e}", flush=True)
        if failed:
            print(f"{len(failed)} runs failed: {[f'{j.comparison.name}/{j.algorithm}/s{j.seed}' for j in failed]}")
    report.write(comps, jobs, out, elapsed=None if a.report_only else time.time() - t_start, final=True)
    print(f"summary: {out / 'summary.md'}; invocation took {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
