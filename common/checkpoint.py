"""Runs that survive: exact resume, atomic checkpoints, SIGINT/SIGTERM, and skipped non-finite updates.

A checkpoint is `checkpoints/step_N/` in the run directory:

    pytorch_lora_weights.safetensors   the LoRA in diffusers' format (loadable on its own)
    training_state.pt                  optimizer, every RNG, counters, the algorithm's own state
    manifest.json                      step and SHA-256 of both files, written last

It is written into a temporary directory and renamed into place, so a process killed while saving leaves
either the previous checkpoints or a complete new one; a leftover temporary directory is ignored and
removed by the next save. `--resume RUN_DIR` verifies the newest checkpoint before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import UserError
from .lora import LORA_FILE, load_lora, save_lora

STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"
# Flags that may differ between a run and its resumption (everything else must match args.json).
RESUMABLE_CHANGES = ("resume", "steps", "track", "save_every", "keep_checkpoints", "max_bad_steps", "sample_every")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def _newest_complete(run_dir: str | Path) -> Checkpoint:
    root = Path(run_dir) / "checkpoints"
    complete = []
    for d in root.glob("step_*") if root.is_dir() else []:
        if d.is_dir() and d.name[5:].isdigit() and (d / MANIFEST).is_file():
            complete.append(Checkpoint(d, int(d.name[5:])))
    if not complete:
        raise UserError(f"--resume {run_dir}: no complete checkpoint in {root} (the run stopped before its first "
                         "save); start a new run instead")
    return max(complete, key=lambda c: c.step)


def find_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The newest complete checkpoint of `run_dir`, verified against its manifest (no model needed).

    Raises UserError with what is wrong: no run, no complete checkpoint, or a corrupt one."""
    ckpt = _newest_complete(run_dir)
    try:
        manifest = json.loads((ckpt.path / MANIFEST).read_text())
        bad = [name for name, digest in manifest["files"].items() if _sha256(ckpt.path / name) != digest]
    except (OSError, ValueError, KeyError) as e:
        bad = [f"{MANIFEST} ({e})"]
    if bad or manifest.get("step") != ckpt.step:
        raise UserError(f"--resume {run_dir}: checkpoint {ckpt.path} is corrupt ({', '.join(bad) or 'step mismatch'} "
                         f"does not match {MANIFEST}). Delete that folder to resume from the previous checkpoint.")
    return ckpt


def resume_args(args):
    """With `--resume RUN_DIR`, the run's own flags from RUN_DIR/args.json, so `python draft.py --resume DIR`
    continues the same experiment. Only RESUMABLE_CHANGES (e.g. a larger --steps) may be given anew; any
    other flag that differs from the stored value is refused. Without --resume, `args` unchanged."""
    if not args.resume:
        return args
    run_dir = Path(args.resume)
    try:
        stored = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {run_dir}: not a run directory (cannot read args.json: {e})") from e
    names = {f.name for f in dataclasses.fields(args)}
    if set(stored) != names:
        raise UserError(f"--resume {run_dir}: that run was made by another script (exp_name "
                         f"{stored.get('exp_name')!r}); its flags {sorted(set(stored) ^ names)} do not match "
                         "this one's")
    defaults = type(args)()
    given = {n for n in names if getattr(args, n) != getattr(defaults, n)}  # flags set on the command line
    conflicts = {n: (stored[n], getattr(args, n)) for n in sorted(given - set(RESUMABLE_CHANGES))
                 if stored[n] != getattr(args, n) and n != "output_dir"}
    if conflicts:
        listing = ", ".join(f"--{n.replace('_', '-')} (run: {a!r}, given: {b!r})" for n, (a, b) in conflicts.items())
        raise UserError(f"--resume {run_dir} continues that run with its own flags; these differ: {listing}. "
                         f"Only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE_CHANGES[1:])} may change.")
    merged = {n: stored[n] for n in names} | {n: getattr(args, n) for n in given & set(RESUMABLE_CHANGES)}
    args = dataclasses.replace(args, **(merged | dict(resume=str(run_dir), output_dir=str(run_dir))))
    ckpt = find_checkpoint(run_dir)
    if ckpt.step >= args.steps:
        raise UserError(f"--resume {run_dir}: its checkpoint is at step {ckpt.step} and --steps is {args.steps}; "
                         f"pass a larger --steps to train further")
    _check_lora_rank(ckpt.path / LORA_FILE, args.lora_rank)
    return args


def _check_lora_rank(path: Path, rank: int) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora.down" in k}  # diffusers' format
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise UserError(f"--resume: cannot read the LoRA file {path} ({e})") from e
    if ranks != {rank}:
        raise UserError(f"--resume: {path} holds LoRA rank(s) {sorted(ranks)}, but the run's --lora-rank is {rank}")


def _rng_state(rng: random.Random) -> dict:
    np_state = np.random.get_state()
    state = dict(
        python=random.getstate(),
        script=rng.getstate(),
        numpy=(np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, rng: random.Random) -> None:
    random.setstate(state["python"])
    rng.setstate(state["script"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped.

        ckpt = common.Checkpointer(run_dir, pipe, optimizer, rng, keep=args.keep_checkpoints)
        start, state = ckpt.restore(args.resume)     # (0, {}) for a fresh run
        ...
        ckpt.save(step, reward_queries=reward_queries, stat_tracker=stat_tracker.state_dict())

    Keyword arguments of `save` (counters, the algorithm's state: tensors, numbers, strings, lists, dicts)
    come back from `restore`. Only rank 0 writes; every rank restores the same state."""

    def __init__(self, run_dir: Path, pipe, optimizer: torch.optim.Optimizer, rng: random.Random, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.pipe, self.optimizer, self.rng, self.keep = pipe, optimizer, rng, keep

    def save(self, step: int, **state) -> Path | None:
        final = self.root / f"step_{step}"
        if distributed.world().is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".tmp_*"):  # from a process killed while saving
                shutil.rmtree(leftover, ignore_errors=True)
            tmp = self.root / f".tmp_step_{step}"
            save_lora(self.pipe, tmp)
            torch.save(dict(step=step, optimizer=self.optimizer.state_dict(), rng=_rng_state(self.rng), state=state),
                       tmp / STATE_FILE)
            files = {name: _sha256(tmp / name) for name in (LORA_FILE, STATE_FILE)}
            (tmp / MANIFEST).write_text(json.dumps(dict(step=step, files=files), indent=1))
            for name in (LORA_FILE, STATE_FILE, MANIFEST):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # re-saving a step (e.g. a resumed run's last step): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
            fd = os.open(self.root, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            steps = sorted(int(d.name[5:]) for d in self.root.glob("step_*") if d.name[5:].isdigit())
            for old in steps[: max(0, len(steps) - self.keep)] if self.keep > 0 else []:
                shutil.rmtree(self.root / f"step_{old}", ignore_errors=True)
        distributed.barrier()
        return final

    def restore(self, resume: str | None) -> tuple[int, dict]:
        """Load the newest checkpoint of the `resume` run into the model, optimizer and RNGs: (step, state).
        `resume_args` has verified it before the model loaded."""
        if not resume:
            return 0, {}
        ckpt = _newest_complete(resume)
        load_lora(self.pipe, ckpt.path)
        saved = torch.load(ckpt.path / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"], self.rng)
        print(f"resumed {resume} from {ckpt.path.name}")
        return saved["step"], saved["state"]


class StopSignal:
    """SIGINT (Ctrl-C) or SIGTERM (pre-emption, torchrun stopping) asks the run to stop after the current
    update: the script saves a checkpoint and exits with 128 + the signal number. A second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this update (DDPO-IS, GRPO, RWR: after the updates of "
              "this sampled batch) with a checkpoint; Ctrl-C again aborts without one", file=sys.stderr, flush=True)

    def requested(self, device=None) -> bool:
        """Whether any rank was signalled (a collective under torchrun: call it on every rank)."""
        return distributed.any_rank(bool(self.signum), device)

    def exit(self, run_dir: Path, step: int):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"stopped at step {step}; continue with --resume {run_dir}", file=sys.stderr)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))


class UpdateGuard:
    """Skip updates whose loss, gradients or rewards are not finite, stop after `max_bad_steps` bad steps in a row,
    and, with fp16 base weights, scale the loss so that its gradient survives half precision:

        guard = common.UpdateGuard(args.max_bad_steps, loss_scaling=dtype == torch.float16)
        guard.backward(loss)                                    # (loss × scale).backward()
        grad_norm = guard.clip_grad_norm_(params, max_norm)     # unscale, then clip
        if guard.ok(step, loss=loss, grad_norm=grad_norm):
            optimizer.step()

    Why loss scaling (Micikevicius et al., "Mixed Precision Training", 2018; torch.amp.GradScaler does the same):
    the backward pass through fp16 base weights carries every activation gradient in fp16, whose smallest
    subnormal is 6e-8. DDPO's loss is divided by n·T and averaged over 16,384 latent elements on SD1.4, so the
    gradient reaching the UNet output is about 4e-8 per element: unscaled, fp16 trains on zeros and rounding noise
    while clipping and Adam still take full-size steps. The loss is multiplied by S; the LoRA gradients, float32, are
    divided by S before clipping. S starts at 2^24, not GradScaler's 2^16: a reward's gradient averaged over 512²
    pixels and backpropagated through the VAE decoder and the last step (DRaFT-1) kept cosine 0.93 with float32's
    at 2^16, 0.9994 at 2^20 and 0.9999 at 2^24 (tests/test_precision.py); a reward with larger gradients overflows
    at first and S halves until it fits. A non-finite gradient with a finite loss is an fp16
    overflow: the update is skipped and S halved; after `growth_interval` good updates S doubles. bf16 has
    float32's exponent range and needs no scaling. Overflow skips count toward `max_bad_steps` only once S < 1.

    Under torchrun the verdict (and so S) is agreed by all ranks. `skipped` counts skipped checks (logged per
    step). `state_dict()` goes into checkpoints, so a resumed run continues with the same scale."""

    def __init__(self, max_bad_steps: int, loss_scaling: bool = False, init_scale: float = 2.0**24,
                 growth_interval: int = 2000):
        self.max_bad_steps = max_bad_steps
        self.loss_scaling = loss_scaling
        self.scale = init_scale if loss_scaling else 1.0
        self.growth_interval = growth_interval
        self.good_updates = 0  # since the last change of scale
        self.skipped = 0
        self.consecutive = 0
        self.last_bad_step = -1

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, with the loss multiplied by the current scale (1 without loss scaling)."""
        (loss * self.scale if self.loss_scaling else loss).backward()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Divide the gradients by the loss scale, then clip their norm to `max_norm` (0: no clipping); returns the
        norm before clipping, as `torch.nn.utils.clip_grad_norm_` does."""
        if self.loss_scaling:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))

    def ok(self, step: int, **values) -> bool:
        bad = [name for name, v in values.items() if not torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all()]
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
        if not distributed.any_rank(bool(bad), device):
            if self.loss_scaling:
                self.good_updates += 1
                if self.good_updates >= self.growth_interval:
                    self.scale, self.good_updates = self.scale * 2, 0
            return True
        self.skipped += 1
        if self.loss_scaling and bad == ["grad_norm"] and self.scale >= 1:  # an fp16 overflow: lower the scale
            self.scale, self.good_updates = self.scale / 2, 0
            print(f"step {step}: fp16 gradient overflow; update skipped, loss scale lowered to {self.scale:g}",
                  file=sys.stderr)
            return False
        if step != self.last_bad_step:
            self.consecutive = self.consecutive + 1 if step == self.last_bad_step + 1 else 1
            self.last_bad_step = step
        print(f"step {step}: non-finite {', '.join(bad) or 'values on another rank'}; update skipped "
              f"({self.consecutive} bad step(s) in a row, {self.skipped} skipped in total)", file=sys.stderr)
        if self.consecutive >= self.max_bad_steps:
            raise SystemExit(
                f"stopping at step {step}: {self.consecutive} consecutive steps with non-finite "
                f"{', '.join(bad) or 'values'} (--max-bad-steps {self.max_bad_steps}). Likely causes: a learning rate "
                "too high for this reward's scale (try 10x lower or --max-grad-norm 1), fp16 overflow (try "
                "--mixed-precision bf16 or no), or a reward model returning NaN/inf for these images. The last good "
                "checkpoint is in checkpoints/; --resume it after changing the cause.")
        return False

    def charts(self) -> dict:
        """What to log every step: the skipped updates so far, and the loss scale when scaling."""
        return dict(skipped_updates=self.skipped) | (dict(loss_scale=self.scale) if self.loss_scaling else {})

    def state_dict(self) -> dict:
        return dict(scale=self.scale, good_updates=self.good_updates, skipped=self.skipped)

    def load_state_dict(self, state: dict) -> None:
        self.scale = state.get("scale", self.scale)
        self.good_updates = state.get("good_updates", 0)
        self.skipped = state.get("skipped", 0)
