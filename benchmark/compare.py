"""The eight algorithms compared at an equal budget of reward queries on `tiny-shapes`, each at its own learning
rate chosen on a validation split: one command.

    python benchmark/compare.py --jobs 2        # sweep, both comparisons: about 2 h on an idle 2-core CPU
    python benchmark/compare.py --smoke         # the whole pipeline on `--model tiny` in a few minutes
    python benchmark/compare.py --report-only   # redraw tables and plots from the runs already there
    python benchmark/compare.py --model tiny-shapes-flow --comparisons alignment --lr ... --out DIR  # flow rows
    python benchmark/compare.py --stage rl-jpeg --jobs 2        # the RL scripts' learning curves: about 2.7 h
    python benchmark/compare.py --stage rl-alignment --jobs 2   # (measured on rl-jpeg: docs/benchmark/rl.md)

Three stages, in this order:

1. *Learning-rate sweep* (`sweep`): every algorithm gets the same tuning budget: one run per rate of
   `--sweep-rates` (1e-4, 3e-4, 1e-3, 3e-3) at the main comparison's budget and settings, on one seed
   (`--sweep-seed` 100, which is not a seed of the final table), scored on the VALIDATION split of the evaluation
   (benchmark/evaluate.py: the other half of the training captions, other initial noise). Where an algorithm's best
   rate sits at an edge of its grid, the grid is widened by one half-decade on that side (1e-4 -> 3e-5, 3e-3 ->
   1e-2) and the new rate run, until the best rate is inside the grid or the next rate would leave
   `--sweep-limits` (1e-5, 3e-2). The chosen rate is the one with the best validation score; ties go to the
   smaller rate (analysis.choose_rates). Written to lr_sweep.csv and lr_sweep.png.
2. *Comparison `alignment`* (the main one): every script trains on `tiny-shapes` with the reward `shapes_alignment`
   (mean log-probability of the prompt's attributes under a classifier, 0 = perfect) at its chosen rate, 3 seeds;
   the RL scripts only use the reward's value (they score under no_grad), the gradient scripts backpropagate
   through it. Every run gets the same budget of reward queries (images scored, the scripts' cumulative
   `reward_queries`). The final LoRA is evaluated on the TEST split only: the exact-match rate
   (`shapes_exact_match`, 0/1: every attribute right), the attribute accuracy (`shapes_attribute_accuracy`, the
   fraction of the four attributes right) and the alignment reward, on the test half of the training captions and
   of the held-out attribute combinations.
3. *Comparison `jpeg`* (shorter): DDPO's compressibility task at the same chosen rates. The RL scripts train on
   `jpeg_compressibility` (PIL JPEG file size, black box), the gradient scripts on its differentiable stand-in
   `jpeg_compressibility_diff` (DRaFT's); the two families have different training rewards, so their thresholds
   are separate, and the final LoRAs are all scored on both rewards (and exact match and attribute accuracy, to
   see what compressibility costs in prompt fidelity).

Configuration rule (stated in summary.md): the scripts' own defaults (LoRA rank and targets, weight decay,
gradient clipping, η, DRaFT-LV's n = 2, DDPO-IS's and GRPO's 4 minibatches, RWR's 4 epochs × 4 minibatches, 8 images
per prompt, β and its re-encoding) except: T and w from `shapes.RECOMMENDED` for all; the learning rate of the
sweep; small batches (4 images per update for the gradient scripts, their default; 16 per sampled batch for the RL
scripts); ReFL's m from the last 40% of the steps (DRaFT's 20 of 50); DDPO-IS's and GRPO's clip range scaled with
the learning rate (1e-4 at the paper's 3e-4; why: `clip_range`); GRPO's groups of 8 (2 prompts × 8 images per
batch of 16); `--steps` = budget / queries per update. The sample grid (the eval curve, `--grid-images` images:
the first prompts of the training file, which puts test-split captions first, × 2 seeds) is drawn at step 0 and
4 more times per run in the main comparison; the sweep's runs draw a 2-image grid at the start and end only.

Cost on this 2-core CPU (one thread per job, T = 20, two jobs at a time): about 5.3 s of training per reward query
for the eight scripts together when the machine is otherwise idle, plus about a minute per run of the main
comparison for its sample grids and ~30 s for each evaluation; see docs/benchmark for the measured wall time.

RL stages (`--stage rl-jpeg`, `--stage rl-alignment`; issue 27, docs/benchmark/rl.md section 4): the four RL
scripts only (DDPO-SF, DDPO-IS, RWR, GRPO), on one task each: `jpeg_compressibility` (PIL JPEG file size, DDPO's
first task) or `shapes_alignment`, both black boxes to them; `--budget` default 2048 reward queries per run (rl.md's
~2,000, rounded to 128 sampled batches of 16 so that the 8 sample grids per run, `--evals-per-run`, fall every 256
queries for every script), 3 seeds, the main comparison's sampling and batch settings, final evaluation on the test
split. Learning rates: by default the table STAGE_LR, the rates the main comparison's sweep chose at 192 queries
(DDPO-SF 1e-5, DDPO-IS 1e-3, RWR 1e-5, GRPO 3e-3; docs/benchmark/summary.md), so no sweep runs; DDPO-SF's and RWR's
1e-5 is the sweep's lower limit, "chosen" there because nothing moved at any rate, not because it learned. With
`--stage-sweep` stage 1 runs instead, at the stage's budget on the validation split with one seed, and the stage
uses its choices: 4 rates × 4 scripts plus any widening, about 3-4 h with `--jobs 2` on an idle machine (0.8 s
per query at T = 20, RWR about half: estimates), before the stage's own ~2.7 h. `--lr` still fixes single rates;
`--script-flags ALGO=FLAGS` passes a script further flags (e.g. rwr='--beta 20'), recorded in its command. The
report adds a claims table (DDPO-IS vs DDPO-SF, DDPO vs RWR, GRPO vs DDPO-IS, and per reward query against the
gradient scripts of the main comparison on the same task when its summary.json is at hand: benchmark/results or
docs/benchmark). Output in benchmark/results/<stage> (smoke: benchmark/results/smoke-<stage>).

Runs go to `--out`/runs/{comparison}/{algorithm}__s{seed} (the sweep: runs/sweep/{algorithm}__lr{rate}__s{seed});
a run whose directory holds a finished run of the same command is skipped (so a rerun resumes), `--fresh` redoes
them; an RL stage's runs save a checkpoint with every sample grid, and a run stopped midway continues from its last
one (`--resume`: the same result, the scripts resume bit-exactly). Jobs run with OMP_NUM_THREADS=1, `--jobs` at a
time (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import analysis  # noqa: E402
from benchmark.analysis import LABELS, RL  # noqa: E402 (there, not here, so that report.py needs nothing of this file)

ALGORITHMS = ("ddpo_sf", "ddpo_is", "rwr", "draft", "draft_lv", "refl", "alignprop", "grpo")
GRPO_GROUP = 8  # images per prompt: Flow-GRPO's one-GPU configs (DanceGRPO: 16, which would leave 1 prompt per batch)
PAPER_LR = 3e-4  # DDPO's learning rate, at which its clip range 1e-4 is calibrated
PAPER_CLIP = 1e-4
SWEEP_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
SWEEP_LIMITS = (1e-5, 3e-2)  # the sweep widens a grid whose best rate is at an edge, but not beyond these
SWEEP_SEED = 100  # the sweep's training seed: not one of the final table's, so no final run was selected on
STAGES = ("rl-jpeg", "rl-alignment")  # the RL stages (issue 27): one task each, run and reported separately
# reward queries per run of an RL stage: docs/benchmark/rl.md section 4's ~2,000, made 128 sampled batches of 16
STAGE_BUDGET = 2048
STAGE_EVALS = 8  # sample grids per RL-stage run after step 0: every 256 queries at the default budget
# the rates the main comparison's sweep chose at 192 queries (docs/benchmark/summary.md); DDPO-SF's and RWR's 1e-5 is
# the sweep's lower limit, "chosen" because nothing moved there: --stage-sweep chooses again at the stage's budget
STAGE_LR = dict(ddpo_sf=1e-5, ddpo_is=1e-3, rwr=1e-5, grpo=3e-3)


@dataclass
class Comparison:
    """One comparison: a model, prompts, the reward of each family, a budget, the seeds and each algorithm's
    learning rates (one each, several in the sweep)."""

    name: str
    title: str
    model: str
    prompts: str  # training prompt set
    heldout_prompts: str | None  # held-out prompt set, evaluation only (None: not evaluated)
    rl_reward: str  # reward of ddpo_sf, ddpo_is, rwr, grpo (used as a black box)
    grad_reward: str  # reward of draft, draft_lv, refl, alignprop (differentiated)
    eval_rewards: list[str]  # rewards of the final evaluation
    budget: int  # reward queries per run
    seeds: list[int]
    num_inference_steps: int
    guidance_scale: float
    lr: dict[str, list[float]]  # algorithm -> AdamW learning rates
    split: str = "test"  # the evaluation's half of each prompt set: "validation" for the sweep, "test" otherwise
    rl_batch: int = 16  # images sampled per batch by the RL scripts
    grad_batch: int = 4  # images per update of the gradient scripts
    evals_per_run: int = 4  # sample grids per run after step 0 (the eval curve's resolution); 0: only at the end
    num_sample_images: int = 8  # images per sample grid (the scripts' default)
    eval_images: int = 24  # about this many images per prompt set in the final evaluation (evaluate.eval_prompts)
    algorithms: tuple[str, ...] = ALGORITHMS
    # an RL stage: the main comparison (its name) whose gradient runs the stage's claims table compares against per
    # reward query; None: no claims table (the main comparison)
    claims_against: str | None = None
    # the RL scripts' sampler: DDIM η (1: DDPO's) or, on a flow model, Flow-GRPO's noise level a (0.7, its SD3.5
    # configs); the base model is evaluated under it too. Passed as --eta only when it is not the scripts' default 1.
    rl_eta: float = 1.0
    # an RL stage: each run saves a checkpoint with every sample grid, so that a stopped invocation resumes a run
    # from its last grid instead of redoing it (a stage's runs take half an hour; the main comparison's, minutes)
    checkpoints: bool = False
    # algorithm -> further flags of its script in every run (--script-flags), e.g. rwr: ["--beta", "20"]
    script_flags: dict = field(default_factory=dict)

    def reward(self, algo: str) -> str:
        return self.rl_reward if algo in RL else self.grad_reward

    @property
    def sweep(self) -> bool:
        return self.split == "validation"

    def eval_sets(self) -> dict[str, str]:
        return dict(train=self.prompts) | (dict(heldout=self.heldout_prompts) if self.heldout_prompts else {})


@dataclass(eq=False)  # compared and hashed by identity: the report maps jobs to their runs
class Job:
    comparison: Comparison
    algorithm: str
    seed: int
    lr: float
    run_dir: Path
    cmd: list[str]
    steps: int
    queries_per_update: float
    extra: dict = field(default_factory=dict)  # per-algorithm settings for the configuration table

    @property
    def eval_file(self) -> Path:
        """The final LoRA's evaluation on the comparison's split: validation_eval.json or test_eval.json."""
        return self.run_dir / f"{self.comparison.split}_eval.json"


def clip_range(lr: float) -> float:
    """DDPO-IS's and GRPO's clip range at learning rate `lr`: DDPO's 1e-4 at its 3e-4, scaled with the rate.

    Kept from the earlier benchmark, for the sweep's sake: under Adam a parameter moves about lr per update, so the
    log-ratio log(p_θ / p_old) that the clip bounds grows about linearly with the rate. A clip fixed at 1e-4 would
    cut the later minibatches' gradients off ever sooner as the rate rises (at 3e-3, after ~1/10 of an update's
    move), and the sweep would measure the clip, not the rate; scaled, every rate clips the same fraction of that
    move, as DDPO's pair (3e-4, 1e-4) does. The clip fractions logged by the sweep's runs say how often it acts."""
    return PAPER_CLIP * lr / PAPER_LR


def script_settings(c: Comparison, algo: str, lr: float) -> tuple[list[str], int, float, dict]:
    """(flags, steps, queries per update, settings for the table) of `algo` at learning rate `lr` in `c`."""
    T = c.num_inference_steps
    if algo == "ddpo_sf":  # one on-policy update per sampled batch
        B = c.rl_batch
        flags = ["--batch-size", B, "--sample-batch-size", min(B, 16), "--train-batch-size", min(B, 16)]
        per_update, settings = B, dict(batch=f"{B} per update")
    elif algo in ("ddpo_is", "grpo"):  # 4 clipped updates per sampled batch (default), clip range scaled with the LR
        B, mb = c.rl_batch, 4
        clip = clip_range(lr)
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
        flags, per_update = ["--batch-size", c.grad_batch, "--num-copies", 2], c.grad_batch * 3
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
    """All jobs, ordered so that partial results cover every algorithm: seed 0 of every comparison first (the
    sweep: its rates in order)."""
    jobs = []
    for c in comparisons:
        for seed in c.seeds:
            for algo in c.algorithms:
                for lr in c.lr.get(algo, []):
                    flags, steps, per_update, settings = script_settings(c, algo, lr)
                    name = f"{algo}__lr{lr:g}__s{seed}" if c.sweep else f"{algo}__s{seed}"
                    run_dir = out / "runs" / c.name / name
                    sample_every = max(1, steps // c.evals_per_run) if c.evals_per_run else steps
                    # checkpoints fall between sampled batches (the RL scripts require it): a whole number of them
                    per_batch = round(c.rl_batch / per_update) if algo in RL else 1
                    save_every = max(per_batch, sample_every // per_batch * per_batch) if c.checkpoints else 0
                    extra = c.script_flags.get(algo, [])
                    cmd = [f"{algo}.py", "--model", c.model, "--reward", c.reward(algo),
                           "--prompt-file", str(prompt_files[c.prompts]),
                           "--num-inference-steps", str(c.num_inference_steps),
                           "--guidance-scale", f"{c.guidance_scale:g}", *flags, *extra, "--seed", str(seed),
                           *(["--eta", f"{c.rl_eta:g}"] if algo in RL and c.rl_eta != 1.0 else []),
                           "--sample-every", str(sample_every), "--num-sample-images", str(c.num_sample_images),
                           "--save-every", str(save_every), "--output-dir", str(run_dir)]
                    # --script-flags: never over a flag the run's own command sets (or --resume)
                    names = [w.partition("=")[0] for w in extra if w.startswith("--")]
                    given = [w.partition("=")[0] for w in cmd if w.startswith("--")]
                    clash = sorted({n for n in names if n == "--resume" or given.count(n) > names.count(n)})
                    if clash:
                        raise SystemExit(f"--script-flags {algo}: {', '.join(clash)} is set by the benchmark "
                                         "itself (use --lr for the learning rate)")
                    if extra:
                        settings = settings | dict(flags=" ".join(extra))
                    jobs.append(Job(c, algo, seed, lr, run_dir, cmd, steps, per_update, settings))
    order = {c.name: i for i, c in enumerate(comparisons)}
    return sorted(jobs, key=lambda j: (j.seed, order[j.comparison.name]))  # stable: algorithm order kept


def training_prompt_file(name: str, out: Path) -> Path:
    """The prompt set written test-split captions first, each half in a fixed shuffle. Training draws prompts
    uniformly either way; the order only decides the sample grid (the first --num-sample-images / 2 prompts), which
    so draws test captions only, spread over the attributes."""
    import common
    from benchmark.evaluate import split_prompts

    prompts = common.load_prompts(name)
    halves = [split_prompts(prompts, split) for split in ("test", "validation")]
    for i, half in enumerate(halves):
        random.Random(i).shuffle(half)
    path = out / "prompts" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(halves[0] + halves[1]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# running


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def identity(cmd: list[str]) -> list[str]:
    """A run's command less its --save-every value: checkpoints are bookkeeping, the run's result is the same."""
    i = cmd.index("--save-every") if "--save-every" in cmd else None
    return cmd if i is None else cmd[:i] + cmd[i + 2 :]


def run_finished(job: Job) -> bool:
    info = analysis.read_json(job.run_dir / "bench_run.json")
    return bool(info and "finished" in info and identity(info.get("cmd", [])) == identity(job.cmd)
                and (job.run_dir / "pytorch_lora_weights.safetensors").is_file())


def resumable(job: Job) -> tuple[int, float] | None:
    """(step, training seconds) of the checkpoint an unfinished run of this command left, or None: no checkpoint,
    or a run of another command (bench_run.json is written with the command when a run starts)."""
    from common import UserError, find_checkpoint

    info = analysis.read_json(job.run_dir / "bench_run.json")
    if not job.comparison.checkpoints or not info or identity(info.get("cmd", [])) != identity(job.cmd):
        return None
    try:
        step = find_checkpoint(job.run_dir).step
    except UserError:
        return None
    if step >= job.steps:  # stopped after its last update but before it was recorded: nothing left to resume
        return None
    seconds = [row["seconds"] for row in analysis.read_jsonl(job.run_dir / "metrics.jsonl") if row["step"] <= step]
    return step, (seconds[-1] if seconds else 0.0)


def eval_done(path: Path, c: Comparison) -> bool:
    """Whether `path` holds an evaluation of the comparison's split with every reward and prompt set and the image
    count the comparison asks for."""
    result = analysis.read_json(path)
    if not result:
        return False
    return (result["config"].get("split", "test") == c.split and set(c.eval_sets()) <= set(result["scores"])
            and set(c.eval_rewards) <= set(result["scores"].get("train", {}))
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


def _call(command: Callable[[], list[str]], log: Path, fork: bool = True, attempts: int = 4) -> float:
    """Run the script command that `command()` returns (["draft.py", "--flag", ...]) as `python *cmd` would, from the
    repository root, output appended to `log`; retried on failure (the scripts may be edited while the benchmark
    runs), `command()` called again before every attempt so that a retry continues from what the failed one left.
    With `fork`, in a process forked from a server that has the third-party libraries imported (saves 10-20 s of
    imports per run here); otherwise in a fresh interpreter. Returns the wall time of the successful attempt."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        cmd = command()
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"\n$ python {' '.join(cmd)}   # attempt {attempt}\n")
        rc = _run(cmd, log, fork)
        if rc == 0:
            return time.time() - t0
        if rc == 2:  # the script refused its flags (one line in the log): the same command fails again
            raise RuntimeError(f"{cmd[0]} refused its flags (exit 2); see {log}")
        print(f"  {cmd[0]} failed (exit {rc}, attempt {attempt}/{attempts}); log: {log}", flush=True)
        time.sleep(30)  # e.g. a script caught mid-edit: give it time
    raise RuntimeError(f"{cmd[0]} failed {attempts} times; see {log}")


def execute(job: Job, out: Path, fresh: bool, lock: threading.Lock, eval_lock: threading.Lock,
            skip_eval: bool = False, fork: bool = True) -> str:
    """Train (unless finished), then evaluate the final LoRA on the comparison's split (unless evaluated). Returns
    what was done.

    Training runs the script in a subprocess; the evaluation runs in this process (one at a time, under
    `eval_lock`), which saves a second start of torch and diffusers per run (~10 s each on this machine)."""
    from benchmark import evaluate
    c = job.comparison
    log = out / "logs" / c.name / f"{job.run_dir.name}.log"
    done = []
    if fresh or not run_finished(job):
        if fresh and job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        resume = None

        def start() -> list[str]:
            """Before every attempt: continue from this command's newest checkpoint (on a retry, the one the failed
            attempt left), else start in an emptied run directory (a failed attempt's metrics would make the script
            refuse it)."""
            nonlocal resume
            resume = resumable(job)
            if job.run_dir.exists() and resume is None:
                shutil.rmtree(job.run_dir)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=job.cmd), indent=2))  # started
            with lock:
                print(f"[{time.strftime('%H:%M:%S')}] train {c.name}/{job.algorithm} lr {job.lr:g} seed {job.seed}: "
                      + (f"resumed at update {resume[0]} of {job.steps}" if resume else f"{job.steps} updates"),
                      flush=True)
            return job.cmd + (["--resume", str(job.run_dir)] if resume else [])

        wall = _call(start, log, fork)
        # a resumed run's wall time: this invocation's plus the training seconds its log holds up to the checkpoint
        # (the stopped invocation's start-up is not counted)
        info = dict(cmd=job.cmd, wall_seconds=round(wall + (resume[1] if resume else 0.0), 2),
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if resume:
            info["resumed_at_update"] = resume[0]
        (job.run_dir / "bench_run.json").write_text(json.dumps(info, indent=2))
        job.eval_file.unlink(missing_ok=True)
        done.append(f"trained in {wall:.0f} s")
    if not eval_done(job.eval_file, c) and not skip_eval:
        with eval_lock:
            result = evaluate.evaluate_run(job.run_dir, c.eval_sets(), c.eval_rewards, c.eval_images, c.split)
        _write_eval(result, job.eval_file)
        done.append(f"{c.split} evaluation in {result['seconds']:.0f} s")
    return ", ".join(done) or "already done"


def base_file(out: Path, c: Comparison, eta: float) -> Path:
    """The base model's evaluation on the comparison's split with DDIM η = `eta`."""
    return out / "base" / f"{c.name}__{c.split}__eta{eta:g}.json"


def evaluate_base(c: Comparison, out: Path, fresh: bool) -> None:
    """The base model's scores on the comparison's split, once per sampler it uses (η = 0 gradient, `rl_eta` RL)."""
    from benchmark import evaluate

    for eta in sorted({c.rl_eta if a in RL else 0.0 for a in c.algorithms}):
        path = base_file(out, c, eta)
        if fresh or not eval_done(path, c):
            print(f"[{time.strftime('%H:%M:%S')}] evaluate base model ({c.name}, {c.split} split, η = {eta:g})",
                  flush=True)
            _write_eval(evaluate.evaluate(c.model, None, c.eval_sets(), c.eval_rewards, c.eval_images,
                                          c.num_inference_steps, c.guidance_scale, eta, split=c.split), path)


def run_jobs(jobs: list[Job], a, out: Path, report_state: dict, t_start: float) -> list[Job]:
    """Run `jobs`, `a.jobs` at a time, refreshing the report (report.write(**report_state)) after each; the jobs
    that failed."""
    from benchmark import report

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
                print(f"[{time.strftime('%H:%M:%S')}] {n}/{len(jobs)} {j.comparison.name}/{j.algorithm} lr {j.lr:g} "
                      f"seed {j.seed}: {what}", flush=True)
            try:  # refresh the report as results come in (cheap), so partial results are always there
                report.write(**report_state, elapsed=time.time() - t_start, final=False)
            except Exception as e:
                print(f"  report failed: {type(e).__name__}: {e}", flush=True)
    if failed:
        print(f"{len(failed)} runs failed: {[f'{j.comparison.name}/{j.run_dir.name}' for j in failed]}")
    return failed


def sweep_scores(jobs: list[Job]) -> dict[str, dict[float, float]]:
    """algorithm -> {learning rate: validation score} of the sweep's finished and evaluated runs (the training
    reward's mean on the validation split of the training prompts)."""
    scores: dict[str, dict[float, float]] = {}
    for j in jobs:
        result = analysis.read_json(j.eval_file)
        if result and eval_done(j.eval_file, j.comparison):
            scores.setdefault(j.algorithm, {})[j.lr] = result["scores"]["train"][j.comparison.reward(j.algorithm)]
    return scores


def run_sweep(sweep: Comparison, a, out: Path, prompt_files: dict, report_state: dict,
              t_start: float) -> dict[str, float]:
    """Stage 1: run the sweep, widening each algorithm's grid while its best rate is at an edge; the chosen rates.
    `sweep.lr` grows in place, so the report sees every rate that was run."""
    while True:
        jobs = plan([sweep], out, prompt_files)
        report_state["jobs"] = jobs + [j for j in report_state["jobs"] if j.comparison is not sweep]
        if not a.report_only:
            run_jobs(jobs, a, out, report_state, t_start)
        scores = sweep_scores(jobs)
        wider = {algo: analysis.widen(scores.get(algo, {}), a.sweep_limits) for algo in sweep.algorithms}
        wider = {algo: lr for algo, lr in wider.items() if lr is not None and lr not in sweep.lr[algo]}
        if not wider:  # (with --report-only the loop stops at the first added rate that has no run on disk)
            return analysis.choose_rates(scores)
        for algo, lr in wider.items():
            print(f"[{time.strftime('%H:%M:%S')}] sweep: {LABELS[algo]}'s best rate is at the edge of "
                  f"{sorted(sweep.lr[algo])}: adding {lr:g}", flush=True)
            sweep.lr[algo] = sorted(sweep.lr[algo] + [lr])


# ---------------------------------------------------------------------------------------------------------------
# configuration


def recommended(model: str) -> dict:
    """The testbed model's sampling settings (`shapes.recommended`: T and w of tiny-shapes or tiny-shapes-flow);
    small fixed settings for tiny."""
    if model == "tiny":
        return dict(num_inference_steps=4, guidance_scale=5.0)
    import shapes

    return shapes.recommended(model)


def rl_eta(model: str) -> float:
    """The RL scripts' sampler noise: DDPO's η = 1 on DDIM; Flow-GRPO's noise level 0.7 on the flow testbed."""
    return 0.7 if model == "tiny-shapes-flow" else 1.0


def comparisons(a) -> tuple[Comparison, list[Comparison]]:
    """The sweep and the two comparisons of the benchmark (or of --smoke), with the command-line overrides applied.
    The comparisons' learning rates are empty until the sweep has chosen them (`--lr` fixes some in advance)."""
    fixed = dict(a.lr)
    rates = {algo: [fixed[algo]] if algo in fixed else list(a.sweep_rates) for algo in ALGORITHMS}
    if a.stage != "all":
        main = stage_comparison(a)
        chosen = [main]
    elif a.smoke:
        rec = recommended("tiny")
        common_kw = dict(model="tiny", prompts="simple_animals", num_inference_steps=rec["num_inference_steps"],
                         guidance_scale=rec["guidance_scale"], evals_per_run=3, num_sample_images=4, eval_images=8,
                         rl_batch=16)
        main = Comparison("alignment", "smoke: jpeg_compressibility_diff for all (RL as a black box)",
                          heldout_prompts="imagenet_animals", rl_reward="jpeg_compressibility_diff",
                          grad_reward="jpeg_compressibility_diff",
                          eval_rewards=["jpeg_compressibility_diff", "jpeg_compressibility"], budget=a.budget or 48,
                          seeds=a.seeds or [0, 1], lr={}, **common_kw)
        jpeg = Comparison("jpeg", "smoke: jpeg_compressibility (RL) / jpeg_compressibility_diff (gradient)",
                          heldout_prompts="imagenet_animals", rl_reward="jpeg_compressibility",
                          grad_reward="jpeg_compressibility_diff",
                          eval_rewards=["jpeg_compressibility", "jpeg_compressibility_diff"],
                          budget=a.jpeg_budget or 48, seeds=a.jpeg_seeds or [0], lr={}, **common_kw)
    else:
        rec = recommended(a.model)
        common_kw = dict(model=a.model, prompts="shapes", num_inference_steps=rec["num_inference_steps"],
                         guidance_scale=rec["guidance_scale"], eval_images=a.eval_images, rl_eta=rl_eta(a.model))
        main = Comparison("alignment", f"{a.model}, shapes_alignment (RL: black box; gradient: backpropagated)",
                          heldout_prompts="shapes_heldout", rl_reward="shapes_alignment",
                          grad_reward="shapes_alignment",
                          eval_rewards=["shapes_exact_match", "shapes_attribute_accuracy", "shapes_alignment"],
                          budget=a.budget, seeds=a.seeds or [0, 1, 2], num_sample_images=a.grid_images, lr={},
                          **common_kw)
        jpeg = Comparison("jpeg", f"{a.model}, jpeg_compressibility (RL, PIL) / jpeg_compressibility_diff (gradient)",
                          heldout_prompts="shapes_heldout", rl_reward="jpeg_compressibility",
                          grad_reward="jpeg_compressibility_diff",
                          eval_rewards=["jpeg_compressibility", "jpeg_compressibility_diff", "shapes_exact_match",
                                        "shapes_attribute_accuracy"],
                          budget=a.jpeg_budget, seeds=a.jpeg_seeds or [0, 1], lr={}, **common_kw)
        jpeg.eval_images = max(1, a.eval_images // 4)
    if a.stage == "all":
        chosen = [c for c in (main, jpeg) if c.name in a.comparisons]
    # the sweep: the main comparison's training at one seed, scored on the validation split by its training reward
    sweep = Comparison(**{**main.__dict__, "name": "sweep", "title": f"learning-rate sweep ({main.title})",
                          "heldout_prompts": None, "eval_rewards": sorted({main.rl_reward, main.grad_reward}),
                          "seeds": [a.sweep_seed], "lr": rates, "split": "validation", "evals_per_run": 0,
                          "num_sample_images": 2, "claims_against": None})
    for c in [sweep, *chosen]:
        c.algorithms = tuple(x for x in ALGORITHMS if x in a.algorithms)
        c.script_flags = dict(a.script_flags)
    if a.sweep_seed in sweep.seeds and a.sweep_seed in main.seeds:
        raise SystemExit(f"--sweep-seed {a.sweep_seed} is also a seed of the final table: choose another")
    return sweep, chosen


def stage_comparison(a) -> Comparison:
    """The RL stage `a.stage` (rl-jpeg or rl-alignment): the RL scripts on one task at the stage's budget, 3 seeds,
    the test split; with --smoke on `--model tiny` with tiny budgets (rl-alignment then trains on the smoke's
    stand-in, jpeg_compressibility_diff as a black box, since tiny draws no shapes)."""
    task = a.stage.removeprefix("rl-")  # also the name of the main comparison on the same task
    if a.smoke:
        rec = recommended("tiny")
        reward = "jpeg_compressibility" if task == "jpeg" else "jpeg_compressibility_diff"
        kw = dict(model="tiny", prompts="simple_animals", heldout_prompts="imagenet_animals", rl_reward=reward,
                  eval_rewards=[reward], budget=a.budget or 32, seeds=a.seeds or [0, 1],
                  evals_per_run=a.evals_per_run or 2, num_sample_images=4, eval_images=8,
                  title=f"smoke: RL scripts on tiny, {reward} (black box)")
    else:
        rec = recommended(a.model)
        if task == "jpeg":
            reward, evals = "jpeg_compressibility", ["jpeg_compressibility", "jpeg_compressibility_diff",
                                                     "shapes_exact_match", "shapes_attribute_accuracy"]
        else:
            reward, evals = "shapes_alignment", ["shapes_exact_match", "shapes_attribute_accuracy", "shapes_alignment"]
        kw = dict(model=a.model, prompts="shapes", heldout_prompts="shapes_heldout", rl_reward=reward, rl_eta=rl_eta(a.model),
                  eval_rewards=evals, budget=a.budget, seeds=a.seeds or [0, 1, 2], evals_per_run=a.evals_per_run,
                  num_sample_images=a.grid_images, eval_images=a.eval_images,
                  title=f"{a.model}, RL scripts on {reward} (black box), {a.budget} reward queries")
    return Comparison(name=a.stage, grad_reward=kw["rl_reward"], lr={}, claims_against=task, checkpoints=True,
                      num_inference_steps=rec["num_inference_steps"], guidance_scale=rec["guidance_scale"], **kw)


def _algo_rate(text: str) -> tuple[str, float]:
    algo, _, rate = text.partition("=")
    if algo not in ALGORITHMS:
        raise argparse.ArgumentTypeError(f"--lr {text}: unknown algorithm {algo!r} (one of {', '.join(ALGORITHMS)})")
    try:
        return algo, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr {text}: expected ALGORITHM=RATE, e.g. draft=1e-3") from None


def _algo_flags(text: str) -> tuple[str, list[str]]:
    algo, sep, flags = text.partition("=")
    if algo not in ALGORITHMS or not sep:
        raise argparse.ArgumentTypeError(f"--script-flags {text}: expected ALGORITHM=FLAGS with ALGORITHM one of "
                                         f"{', '.join(ALGORITHMS)}, e.g. rwr='--beta 20'")
    try:
        words = shlex.split(flags)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--script-flags {text}: {e}") from None
    return algo, words


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmark/results, "
                   "benchmark/results/smoke with --smoke; both git-ignored)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one torch thread); at most 2 here")
    p.add_argument("--fresh", action="store_true", help="redo finished runs and evaluations")
    p.add_argument("--smoke", action="store_true", help="tiny budgets on --model tiny with the JPEG rewards")
    p.add_argument("--report-only", action="store_true", help="only aggregate the runs already in --out")
    p.add_argument("--model", default="tiny-shapes", choices=["tiny-shapes", "tiny-shapes-flow"],
                   help="the testbed: its DDPM (SD1.4's layout) or its rectified flow (SD3's, docs/flow.md)")
    p.add_argument("--budget", type=int, default=None, help="reward queries per run, main comparison and sweep "
                   f"(default 192; an RL stage: {STAGE_BUDGET})")
    p.add_argument("--stage", default="all", choices=["all", *STAGES], help="all: the sweep and the comparisons "
                   "(default); rl-jpeg / rl-alignment: the RL scripts' learning curves on one task (issue 27)")
    p.add_argument("--stage-sweep", action="store_true", help="an RL stage: choose the learning rates by a sweep "
                   "at the stage's budget on the validation split (one seed; about 3-4 h with --jobs 2) instead "
                   "of the fixed table STAGE_LR")
    p.add_argument("--evals-per-run", type=int, default=None, help="an RL stage: sample grids per run after step 0 "
                   f"(default {STAGE_EVALS}; smoke 2)")
    p.add_argument("--jpeg-budget", type=int, default=48, help="reward queries per run, JPEG comparison")
    p.add_argument("--seeds", type=int, nargs="+", help="main comparison (default 0 1 2)")
    p.add_argument("--jpeg-seeds", type=int, nargs="+", help="JPEG comparison (default 0 1)")
    p.add_argument("--sweep-rates", type=float, nargs="+", default=list(SWEEP_RATES),
                   help="each algorithm's initial learning-rate grid (smoke: 3e-3 1e-2)")
    p.add_argument("--sweep-limits", type=float, nargs=2, default=list(SWEEP_LIMITS), metavar=("LOW", "HIGH"),
                   help="a grid whose best rate is at an edge is widened by half-decades up to these rates")
    p.add_argument("--sweep-seed", type=int, default=SWEEP_SEED, help="training seed of the sweep's runs")
    p.add_argument("--lr", type=_algo_rate, nargs="+", default=[], metavar="ALGORITHM=RATE",
                   help="fix these algorithms' learning rates instead of sweeping them, e.g. --lr draft=1e-3")
    p.add_argument("--eval-images", type=int, default=48, help="about this many images per prompt set in the final "
                   "evaluation of the main comparison and the sweep (every prompt of the split the same number of "
                   "times; JPEG: a quarter)")
    p.add_argument("--grid-images", type=int, default=32, help="images in each run's sample grid, the eval curve the "
                   "threshold is read from, main comparison (the first test-split training prompts × 2 seeds)")
    p.add_argument("--skip-eval", action="store_true", help="no final evaluations (for a quick look; the sweep "
                   "then chooses nothing)")
    p.add_argument("--no-fork-server", action="store_true", help="start every run in a fresh interpreter instead of "
                   "forking it from a server with torch and diffusers already imported")
    p.add_argument("--script-flags", type=_algo_flags, nargs="+", default=[], metavar="ALGORITHM=FLAGS",
                   help="further flags for one script's runs, e.g. rwr='--beta 20' (recorded in each run's command "
                   "and the report's configuration table; the flags the benchmark sets are refused)")
    p.add_argument("--comparisons", nargs="+", default=["alignment", "jpeg"], choices=["alignment", "jpeg"])
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    a = p.parse_args(argv)
    a.script_flags = dict(a.script_flags)  # later entries for one algorithm win
    stage = a.stage != "all"
    if stage:
        if a.algorithms == p.get_default("algorithms"):
            a.algorithms = list(RL)
        elif not set(a.algorithms) <= set(RL):
            p.error(f"--stage {a.stage} runs the RL scripts only ({', '.join(RL)}), not "
                    f"{', '.join(x for x in a.algorithms if x not in RL)}")
        if not a.stage_sweep:  # the fixed table; --lr overrides single rates (later entries win in dict())
            a.lr = [(x, STAGE_LR[x]) for x in a.algorithms] + a.lr
    elif a.stage_sweep or a.evals_per_run is not None:
        p.error("--stage-sweep and --evals-per-run apply to an RL stage only (--stage rl-jpeg or rl-alignment)")
    if a.evals_per_run is not None and a.evals_per_run < 1:
        p.error(f"--evals-per-run must be at least 1, got {a.evals_per_run}")
    if a.smoke:
        a.model = "tiny"
        if a.jpeg_budget == p.get_default("jpeg_budget"):
            a.jpeg_budget = None
        if a.sweep_rates == p.get_default("sweep_rates"):
            a.sweep_rates, a.sweep_limits = [3e-3, 1e-2], [3e-3, 1e-2]
    else:
        a.budget = a.budget or (STAGE_BUDGET if stage else 192)
        a.evals_per_run = a.evals_per_run or STAGE_EVALS
    name = (a.stage if stage else "") if not a.smoke else ("smoke-" + a.stage if stage else "smoke")
    a.out = a.out or ROOT / "benchmark" / "results" / name
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
    sweep, comps = comparisons(a)
    prompt_files = {c.prompts: training_prompt_file(c.prompts, out) for c in [sweep, *comps]}
    (out / "git.txt").write_text(_git_state())
    fixed = dict(a.lr)
    # every rate fixed by --lr (e.g. another testbed model at the rates the sweep chose on tiny-shapes): no sweep
    sweeping = not all(x in fixed for x in sweep.algorithms)
    state = dict(comps=[sweep, *comps] if sweeping else comps, jobs=[], out=out)
    if a.stage != "all":
        state["title"] = (f"RL stage `{a.stage}`: the RL scripts' learning curves at {comps[0].budget} reward "
                          f"queries, {len(comps[0].seeds)} seeds (`compare.py --stage {a.stage}"
                          + (" --stage-sweep" if a.stage_sweep else "") + (" --smoke" if a.smoke else "") + "`)")
    if not a.report_only and not a.skip_eval:
        for c in state["comps"]:
            evaluate_base(c, out, a.fresh)
    if sweeping:
        print(f"stage 1: learning-rate sweep on the validation split, output in {out}", flush=True)
        chosen = run_sweep(sweep, a, out, prompt_files, state, t_start)
    else:
        print("stage 1 skipped: every learning rate is fixed by "
              + ("the RL stages' table STAGE_LR (or --lr)" if a.stage != "all" else "--lr"), flush=True)
        chosen = {x: fixed[x] for x in sweep.algorithms}
    missing = [LABELS[x] for x in sweep.algorithms if x not in chosen]
    if missing:
        print(f"no learning rate chosen for {', '.join(missing)} (no evaluated sweep run): left out", flush=True)
    for c in comps:
        c.lr = {algo: [lr] for algo, lr in chosen.items()}
    jobs = plan(comps, out, prompt_files)
    state["jobs"] += jobs
    (out / "commands.txt").write_text("".join(f"OMP_NUM_THREADS=1 python {' '.join(j.cmd)}\n" for j in state["jobs"]))
    if not a.report_only:
        print(f"stage 2: {len(jobs)} runs at the chosen rates "
              f"({', '.join(f'{LABELS[x]} {lr:g}' for x, lr in chosen.items())}), {a.jobs} at a time", flush=True)
        run_jobs(jobs, a, out, state, t_start)
    report.write(**state, elapsed=None if a.report_only else time.time() - t_start, final=True)
    print(f"summary: {out / 'summary.md'}; invocation took {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
