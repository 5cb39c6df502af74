"""Run bookkeeping shared by the eight scripts: run directory, seeding, precision, logging, sample grids."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed
from .errors import UserError, check_flags, require

if TYPE_CHECKING:
    from .evaluation import GridResult

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_and_dtype(mixed_precision: str) -> tuple[torch.device, torch.dtype]:
    """CUDA when present, and the dtype of the frozen base weights (LoRA weights, stored latents and log-probs stay
    float32 whatever it is; see docs/ALGORITHMS.md §0, "Precision").

    "auto": bf16 on a GPU that computes in bf16 natively (Ampere and newer; the DRaFT paper trained in bf16), fp16
    on older GPUs (with dynamic loss scaling: `UpdateGuard(loss_scaling=True)`), float32 on the CPU. fp16 and bf16
    also run on the CPU, slowly: that is how the tests exercise the precision a GPU runs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if mixed_precision == "auto":
        if device.type == "cuda":
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            mixed_precision = "no"
    if mixed_precision not in PRECISIONS:
        raise UserError(f"--mixed-precision must be auto or one of {list(PRECISIONS)}, got {mixed_precision!r}")
    return device, PRECISIONS[mixed_precision]


def check_run_args(args) -> None:
    """The flag checks every script shares, run before any model loads: the model's name, the prompt set or file,
    the resolution, the seed and the run's intervals. The algorithm's own checks sit next to its fields."""
    from .models import check_model_name
    from .prompts import load_prompts

    check_model_name(args.model)
    load_prompts(args.prompts, args.prompt_file, args.model)
    if args.eval_prompts:
        load_prompts(args.eval_prompts)
    require(args.resolution is None or (args.resolution > 0 and args.resolution % 8 == 0),
            f"--resolution must be a positive multiple of 8 pixels, got {args.resolution}")
    require(0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}")
    check_flags(args, positive=("steps", "batch_size", "num_inference_steps", "lora_rank",
                                "sample_every", "num_sample_images", "sample_seeds", "max_bad_steps"),
                non_negative=("learning_rate", "weight_decay", "max_grad_norm", "guidance_scale", "save_every",
                              "keep_checkpoints"))
    steps = args.eval_num_inference_steps  # None: the training --num-inference-steps
    require(steps is None or steps > 0, f"--eval-num-inference-steps must be > 0, got {steps}")
    require(0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1) (0: off), got {args.ema_decay}")
    require(not args.resume or Path(args.resume).is_dir(), f"--resume {args.resume}: no such run directory")
    if args.output_dir:
        _check_can_create(Path(args.output_dir), f"--output-dir {args.output_dir}")


def _check_can_create(run_dir: Path, what: str) -> None:
    """`run_dir` is a directory, or one that can be made: no file in its place or above it, and write access."""
    require(not run_dir.exists() or run_dir.is_dir(), f"{what} is a file, not a directory")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    require(parent.is_dir(), f"{what}: {parent} is a file, not a directory")
    require(os.access(parent, os.W_OK | os.X_OK), f"{what}: no permission to write in {parent}")


def make_run_dir(output_dir: str | None, script: str, reward: str, seed: int, resume: str | None = None) -> Path:
    """`output_dir`, or runs/{script}__{reward}__{seed}__{time}; with `resume`, that run's directory.
    Refuses a directory holding another run, or one that another process writes. Creates nothing (the Checkpointer
    does, once the model has loaded, and takes the directory's lock: `lock_run_dir`)."""
    if resume:
        _check_unlocked(Path(resume))
        return Path(resume)
    name = reward.replace(":", "-").replace(",", "+")  # "hpsv2:1,aesthetic:0.1" -> "hpsv2-1+aesthetic-0.1"
    name = re.sub(r"[^\w.+-]+", "_", name)[:80]  # URLs, paths and options in a spec: one folder name
    # under torchrun every rank must agree on the time-stamped name: rank 0's is broadcast
    run_dir = Path(output_dir or distributed.broadcast_object(f"runs/{script}__{name}__{seed}__{int(time.time())}"))
    _check_can_create(run_dir, f"run directory {run_dir}")
    _check_unlocked(run_dir)
    check_new_run(run_dir)
    return run_dir


def check_new_run(run_dir: Path) -> None:
    """Refuse a directory that holds a run (a non-empty metrics.jsonl; an empty one is a run that failed before its
    first step, and may be reused)."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        raise UserError(f"{run_dir} already holds a run (metrics.jsonl); choose another --output-dir, "
                        f"or continue it with --resume {run_dir}")


# One writer per run directory: the writing process holds an exclusive flock on RUN_DIR/.lock, which the OS releases
# when that process ends, however it ends. The file holds the writer's PID, for the message of a refused second one.
LOCK = ".lock"
_held: dict[str, object] = {}  # directories this process holds: its in-process runs (tests) take them again


def _holder(run_dir: Path) -> str:
    try:
        pid = (run_dir / LOCK).read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "a process that has not written its PID yet"


def _busy(run_dir: Path, holder: str) -> UserError:
    return UserError(f"{run_dir} is being written by another run ({holder}, holding {run_dir / LOCK}); one process "
                     f"writes a run directory at a time: wait for it to end, stop it (its checkpoint then resumes), "
                     "or choose another --output-dir")


def _check_unlocked(run_dir: Path) -> None:
    """Before anything loads: refuse a directory that another process holds (without writing anything). Rank 0 only:
    under torchrun the other ranks would find rank 0's own lock."""
    if not distributed.world().is_main or str(run_dir.resolve()) in _held or not (run_dir / LOCK).is_file():
        return
    with open(run_dir / LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir, _holder(run_dir)) from None


def lock_run_dir(run_dir: Path) -> None:
    """Create `run_dir` and hold its lock until this process ends; refuse (UserError, naming the holder's PID) while
    another process holds it."""
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # not "w": the holder's PID stays readable until the lock is ours
    for attempt in range(20):  # ~2 s: another process's _check_unlocked holds a shared lock for an instant
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 19:
                holder = _holder(run_dir)
                f.close()
                raise _busy(run_dir, holder) from None
            time.sleep(0.1)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = f


def release_run_dir(run_dir: Path) -> None:
    """Let another process write `run_dir` (a finished in-process run; a process's end releases it anyway)."""
    f = _held.pop(str(run_dir.resolve()), None)
    if f is not None:
        f.close()


def read_jsonl(path: Path, warn: bool = False) -> list[dict]:
    """The rows of a log (metrics.jsonl, eval.jsonl): JSON objects with an integer "step". A last line cut off
    mid-write (a full disk, a killed process) is dropped, with one warning if `warn`; a damaged line before it is
    refused (UserError), since dropping it would lose a logged step silently."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").split("\n") if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError("not an object with an integer step")
        except ValueError as e:
            if n < len(lines):
                raise UserError(f"{path}: line {n} is damaged ({e}): {line[:80]!r}; repair or delete that line "
                                "to continue the run") from None
            if warn:
                print(f"warning: {path}: its last line was cut off mid-write and is dropped: {line[:80]!r}",
                      file=sys.stderr)
            break
        rows.append(row)
    return rows


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path`'s content at once: a process killed meanwhile leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the rows logged up to `last_step` (a resumed run re-logs the steps after its checkpoint; a new run,
    last_step 0, keeps none); returns them."""
    if not path.exists():
        return []
    kept = [row for row in read_jsonl(path) if last_step and row["step"] <= last_step]
    _write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept


class Logger:
    """metrics.jsonl (one object per optimizer step), TensorBoard scalars, and optionally wandb."""

    def __init__(self, run_dir: Path, args, track: bool = False, project: str = "reward-finetuning",
                 start_step: int = 0, reward_fn=None):
        """`start_step` > 0 continues a resumed run: rows and TensorBoard events after it are discarded.
        `reward_fn`: the training reward; when it is a weighted sum (`rewards.load("a:1,b:0.1")`), each term is logged
        too, as reward/<term>: the mean over the global batch of the term's unweighted score.
        Under torchrun only rank 0 writes; on the other ranks every method is a no-op."""
        from torch.utils.tensorboard import SummaryWriter

        self.enabled = distributed.world().is_main
        self.wandb = None
        self.start = time.time()
        weights = getattr(reward_fn, "weights", {})
        weighted = len(weights) > 1 or any(w != 1 for w in weights.values())  # one term of weight 1 is the total
        # every rank records: the means are over all ranks' images
        self.terms = reward_fn if weighted and hasattr(reward_fn, "take_recorded") else None
        self.term_means: dict[str, torch.Tensor] = {}
        if self.terms is not None:
            self.terms.take_recorded()
        if not self.enabled:
            return
        if track:
            try:
                import wandb
            except ImportError as e:
                raise UserError("--track logs to Weights & Biases: `pip install wandb` first (it is optional)") from e
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        config = dataclasses.asdict(args)
        for log in ("metrics.jsonl", "eval.jsonl"):  # every log readable (resume_args has checked) before any write
            read_jsonl(run_dir / log)
        _write_atomic(run_dir / "args.json", json.dumps(config, indent=2, default=str))
        _truncate_jsonl(run_dir / "eval.jsonl", start_step)
        kept = _truncate_jsonl(run_dir / "metrics.jsonl", start_step)
        if kept:  # a resumed run's clock continues from its last kept row
            self.start -= kept[-1].get("seconds", 0)
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if start_step else None)
        table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items())
        self.writer.add_text("hyperparameters", table)
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        if track:
            self.wandb = wandb.init(project=project, name=run_dir.name, config=config, dir=str(run_dir),
                                    id=run_dir.name, resume="allow")

    def log(self, step: int, charts: dict, losses: dict) -> dict:
        """Write one optimizer step. Values may be tensors; `seconds` since the start (of the first of a resumed run's
        sessions, not counting the time between them) is added."""
        if self.terms is not None:
            recorded = self.terms.take_recorded()
            if recorded:  # a step that scored a batch (the later updates on the same batch repeat its values)
                self.term_means = {f"reward/{t}": distributed.gather(v.float()).mean() for t, v in recorded.items()}
        charts = {k: float(torch.as_tensor(v).detach()) for k, v in charts.items()}
        losses = {k: float(torch.as_tensor(v).detach()) for k, v in losses.items()}
        terms = {k: float(v) for k, v in self.term_means.items()}
        row = {"step": step, **charts, **terms, **losses, "seconds": round(time.time() - self.start, 3)}
        if not self.enabled:
            return row
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        scalars = ({f"charts/{k}": v for k, v in charts.items()} | terms
                   | {f"losses/{k}": v for k, v in losses.items()})
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        return row

    def samples(self, step: int, grid: GridResult) -> float:
        """The fixed-prompt, fixed-seed sample grid (`evaluation.SampleGrid`'s result): samples/step_XXXXXX.png
        (step 0 is the base model) with the prompts, seeds, scores, step and means written on it; the same picture
        in TensorBoard; the grid's mean training reward as charts/eval_reward, each held-out reward's mean as
        eval/<name> and the diversity as eval/diversity; all of them in one row of eval.jsonl. Returns eval_reward."""
        values = grid.metrics()
        if not self.enabled:
            return values["eval_reward"]
        picture = save_grid(grid.images, self.run_dir / "samples" / f"step_{step:06d}.png", grid.seeds_per_prompt,
                            grid.row_captions(), grid.cell_captions(), header=grid.header(step))
        self.writer.add_image("samples", picture, step)
        self.writer.add_scalar("charts/eval_reward", values["eval_reward"], step)
        for k, v in values.items():
            if k.startswith("eval/"):
                self.writer.add_scalar(k, v, step)
        with open(self.run_dir / "eval.jsonl", "a") as f:
            row = {"step": step, "eval_reward": values["eval_reward"], "scores": grid.scores.float().tolist()}
            f.write(json.dumps(row | {k: v for k, v in values.items() if k != "eval_reward"}) + "\n")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"charts/eval_reward": values["eval_reward"], "samples": wandb.Image(picture)}
                           | {k: v for k, v in values.items() if k.startswith("eval/")}, step=step)
        return values["eval_reward"]

    def close(self) -> None:
        """The run has finished: close its logs and release its directory (`lock_run_dir`)."""
        if not self.enabled:
            return
        self.metrics.close()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        release_run_dir(self.run_dir)


def save_grid(images: torch.Tensor, path: Path, ncol: int = 4, row_captions: list[str] | None = None,
              cell_captions: list[str] | None = None, header: str | None = None) -> torch.Tensor:
    """Save images [B,3,H,W] in [0,1] as one PNG grid, `ncol` per row, small images enlarged, with the captions and
    header of `evaluation.captioned_grid`; returns the same picture as a [3,H,W] tensor in [0,1] for TensorBoard."""
    from .evaluation import captioned_grid

    canvas = captioned_grid(images, ncol, row_captions, cell_captions, header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
