"""Runs that survive: exact resume, atomic checkpoints, SIGINT/SIGTERM, and skipped non-finite updates.

A checkpoint is `checkpoints/step_N/` in the run directory:

    pytorch_lora_weights.safetensors   the LoRA in diffusers' format (loadable on its own)
    training_state.pt                  optimizer, every RNG, counters, the algorithm's own state
    manifest.json                      step and SHA-256 of both files, written last

It is written into a temporary directory and renamed into place, so a process killed while saving leaves
either the previous checkpoints or a complete new one; a leftover temporary directory is ignored and
removed by the next save. `--resume RUN_DIR` verifies the newest checkpoint before any model is loaded.

One process writes a run directory at a time (`run.lock_run_dir`). Every stop of a training run leaves a checkpoint
of its last complete step: a signal or `--max-bad-steps` after the current update (DDPO-IS, GRPO, RWR: after the
sampled batch's updates), a reward that fails (`RewardError`, e.g. a reward server gone) at once, from the state
recorded when the last step completed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import FAILURE_HOOKS, UserError, flag
from .lora import LORA_FILE, load_lora, save_lora
from .run import check_new_run, lock_run_dir, read_jsonl

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
        files = manifest["files"]
        if sorted(files) != sorted((LORA_FILE, STATE_FILE)):  # a manifest listing fewer files vouches for less
            raise ValueError(f"it lists {sorted(files)}, not {LORA_FILE} and {STATE_FILE}")
        bad = [name for name, digest in files.items() if _sha256(ckpt.path / name) != digest]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        bad, manifest = [f"{MANIFEST} ({e})"], {}
    if bad or manifest.get("step") != ckpt.step:
        raise UserError(f"--resume {run_dir}: checkpoint {ckpt.path} is corrupt ({', '.join(bad) or 'step mismatch'} "
                         f"does not match {MANIFEST}). Delete that folder to resume from the previous checkpoint.")
    return ckpt


GIVEN = "_given_flags"  # the attribute `cli` sets on the parsed arguments


def cli(cls, args: list[str] | None = None):
    """`tyro.cli(cls, args=args)` (args None: the command line) that also records which flags were given, so that
    `--resume` can refuse a given flag that differs from the run's even when it equals the script's default."""
    import tyro

    argv = sys.argv[1:] if args is None else list(args)
    parsed = tyro.cli(cls, args=argv)
    setattr(parsed, GIVEN, given_flags(cls, argv))
    return parsed


def given_flags(cls, argv: list[str]) -> frozenset[str]:
    """The fields of dataclass `cls` that `argv` sets: `--name value`, `--name=value`, `--name` and `--no-name`
    (booleans), with `-` or `_` between words, as tyro accepts them."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in names and name.startswith("no_"):
            name = name[3:]
        if name in names:
            given.add(name)
    return frozenset(given)


def _fits(value, hint) -> bool:
    """Whether a value read from args.json has the field's type (int, float, bool, str, Optional, Literal, tuple)."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, p) for p in params)
    if origin is typing.Literal:
        return value in params
    if origin is tuple:
        return isinstance(value, list) and all(_fits(v, params[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


# Flags added to the scripts after runs were made: an args.json from before lacks them, and its run behaved as the
# flag at this value does (each is "off" there), so a resume fills the value in and says so. A new flag whose default
# changes nothing goes here; one that changes training must not (such runs cannot be continued as they were).
ADDED_FLAGS = {"ema_decay": 0.0, "kl_beta": 0.0, "pretrain_data": None, "pretrain_weight": 1.0,
               "eval_num_inference_steps": None}


def _stored_args(run_dir: Path, cls) -> dict:
    """RUN_DIR/args.json as field values of `cls`, each checked against the field's type; flags of ADDED_FLAGS that
    it predates get their inert value (one line on stderr)."""
    try:
        stored = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {run_dir}: not a run directory (cannot read args.json: {e})") from e
    if not isinstance(stored, dict):
        raise UserError(f"--resume {run_dir}: not a run directory (args.json is not a JSON object)")
    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    missing = names - set(stored)
    if missing and set(stored) < names and missing <= set(ADDED_FLAGS):  # a run of this script from before them
        stored |= {name: ADDED_FLAGS[name] for name in missing}
        if distributed.launched_rank() == 0:
            print(f"--resume {run_dir}: its args.json predates {', '.join(flag(n) for n in sorted(missing))}; "
                  f"continuing with {', '.join(f'{flag(n)} {ADDED_FLAGS[n]}' for n in sorted(missing))}, as it ran",
                  file=sys.stderr)
    if set(stored) != names:
        raise UserError(f"--resume {run_dir}: that run was made by another script (exp_name "
                        f"{stored.get('exp_name')!r}); its flags {sorted(set(stored) ^ names)} do not match "
                        "this one's")
    for name in sorted(names):
        if not _fits(stored[name], hints[name]):
            kind = hints[name].__name__ if isinstance(hints[name], type) else str(hints[name]).replace("typing.", "")
            raise UserError(f"--resume {run_dir}: args.json is damaged: {name} is {stored[name]!r}, which is not a "
                            f"value of {flag(name)} ({kind})")
        if isinstance(stored[name], list):
            stored[name] = tuple(stored[name])
        elif hints[name] is float:
            stored[name] = float(stored[name])
    return stored


def resume_args(args):
    """With `--resume RUN_DIR`, the run's own flags from RUN_DIR/args.json, so `python draft.py --resume DIR`
    continues the same experiment. A flag given on the command line (recorded by `cli`) may differ from the stored
    value only if it is one of RESUMABLE_CHANGES (e.g. a larger --steps); any other difference is refused, and so is
    an --output-dir other than RUN_DIR. The checkpoint and the logs are checked here, before any model loads; nothing
    is written. Without --resume, `args` unchanged."""
    if not args.resume:
        return args
    run_dir = Path(args.resume)
    given = getattr(args, GIVEN, None)
    if given is None:  # a bug, not a user's mistake: without the command line, "given" cannot be told from "default"
        raise TypeError("resume_args needs the flags given on the command line: parse them with common.cli(Args)")
    stored = _stored_args(run_dir, type(args))
    if "output_dir" in given and args.output_dir and Path(args.output_dir).resolve() != run_dir.resolve():
        raise UserError(f"--output-dir {args.output_dir}: a resumed run continues in its own directory {run_dir}; "
                        f"leave --output-dir out (to branch a run, copy its directory and --resume the copy)")
    conflicts = {n: (stored[n], getattr(args, n)) for n in sorted(given - {"output_dir", *RESUMABLE_CHANGES})
                 if stored[n] != getattr(args, n)}
    if conflicts:
        listing = ", ".join(f"{flag(n)} (run: {a!r}, given: {b!r})" for n, (a, b) in conflicts.items())
        raise UserError(f"--resume {run_dir} continues that run with its own flags; these differ: {listing}. "
                        f"Only {', '.join(flag(n) for n in RESUMABLE_CHANGES[1:])} may change.")
    merged = stored | {n: getattr(args, n) for n in given & set(RESUMABLE_CHANGES)}
    args = dataclasses.replace(args, **(merged | dict(resume=str(run_dir), output_dir=str(run_dir))))
    ckpt = find_checkpoint(run_dir)
    if ckpt.step >= args.steps:
        raise UserError(f"--resume {run_dir}: its checkpoint is at step {ckpt.step} and --steps is {args.steps}; "
                        f"pass a larger --steps to train further")
    _check_lora_rank(ckpt.path / LORA_FILE, args.lora_rank)
    for log in ("metrics.jsonl", "eval.jsonl"):  # readable up to a torn last line (dropped when the run starts)
        read_jsonl(run_dir / log, warn=distributed.launched_rank() == 0)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_running: Checkpointer | None = None  # the run this process trains: a failure saves its last complete step


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped, and holds its run directory:

        checkpointer = common.Checkpointer(run_dir, pipe, optimizer, rng, args)  # from here on, this process writes
        start, state = checkpointer.restore()                                 # (0, {}) for a new run
        for step in range(start + 1, args.steps + 1):
            ...                                                               # one update
            checkpointer.completed(step, reward_queries=reward_queries)       # what a checkpoint of this step holds
            ...                                                               # the sample grid
            checkpointer.save_or_stop(step, stop, device)                     # --save-every, the end, a stop

    Keyword arguments of `completed` (counters, the algorithm's state: tensors, numbers, strings, lists, dicts) come
    back from `restore`. DDPO-IS, GRPO and RWR make several updates from one sampled batch, which is not saved: inside
    a batch they pass `between_batches=False`, and no checkpoint is written there except at the last step. A failure
    that ends the run after `restore` (`save_on_failure`, called by `user_errors`) saves the state recorded by the last
    `completed` between batches, if no update has changed the weights since. Only rank 0 writes; every rank restores
    the same state."""

    def __init__(self, run_dir: Path, pipe, optimizer: torch.optim.Optimizer, rng: random.Random, args):
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.pipe, self.optimizer, self.rng, self.args = pipe, optimizer, rng, args
        if distributed.world().is_main:
            lock_run_dir(self.run_dir)  # one writer: refused while another process holds the directory
            if not args.resume:
                check_new_run(self.run_dir)  # a run may have finished here since make_run_dir looked
        updates = self.updates = [0]  # optimizer steps taken (the hook holds the list, not the checkpointer)
        optimizer.register_step_post_hook(lambda *_: updates.__setitem__(0, updates[0] + 1))
        self.saved = 0  # the newest checkpoint's step (0: none)
        self._done = self._good = None

    def _record(self, step: int, between_batches: bool, state: dict) -> dict:
        return dict(step=step, between_batches=between_batches, state=copy.deepcopy(state), rng=_rng_state(self.rng),
                    updates=self.updates[0])

    def restore(self) -> tuple[int, dict]:
        """Load the newest checkpoint of the `--resume` run into the model, optimizer and RNGs: (step, state); (0, {})
        for a new run. `resume_args` verified it before the model loaded; it is verified again under the lock."""
        global _running
        step, state = 0, {}
        if self.args.resume:
            ckpt = find_checkpoint(self.args.resume)
            load_lora(self.pipe, ckpt.path)
            saved = torch.load(ckpt.path / STATE_FILE, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            _set_rng_state(saved["rng"], self.rng)
            print(f"resumed {self.args.resume} from {ckpt.path.name}")
            step, state = saved["step"], saved["state"]
        self.saved = step
        self._done = self._good = self._record(step, True, state)
        _running = self
        return step, state

    def completed(self, step: int, between_batches: bool = True, **state) -> None:
        """Step `step` is complete (its update applied or skipped, logged): record what a checkpoint of it holds."""
        self._done = self._record(step, between_batches, state)
        if between_batches:
            self._good = self._done

    def save_or_stop(self, step: int, stop: StopSignal, device=None) -> None:
        """Save a checkpoint of the completed step every --save-every updates, at the last step, and when `stop` asks
        (a signal, --max-bad-steps; DDPO-IS, GRPO, RWR: once the sampled batch's updates are done), then stop.
        `stop.requested` is a collective: every rank calls this at every step."""
        global _running
        stopping = stop.requested(device)
        between, last = self._done["between_batches"], step == self.args.steps
        if (between and (self.args.save_every and step % self.args.save_every == 0 or stopping)) or last:
            self._save(self._done | dict(rng=_rng_state(self.rng)))  # the RNGs after the grid, as the run goes on
        if last or (stopping and between):
            _running = None
        if stopping and (between or last):
            stop.exit(self.run_dir, step)

    def _save(self, record: dict, sync: bool = True) -> Path:
        step = record["step"]
        final = self.root / f"step_{step}"
        if distributed.world().is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".tmp_*"):  # from a process killed while saving (.tmp_step_N.PID)
                owner = leftover.name.rpartition(".")[2]
                if not owner.isdigit() or int(owner) == os.getpid() or not _alive(int(owner)):
                    shutil.rmtree(leftover, ignore_errors=True)
            tmp = self.root / f".tmp_step_{step}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_lora(self.pipe, tmp)
            torch.save(dict(step=step, optimizer=self.optimizer.state_dict(), rng=record["rng"],
                            state=record["state"]), tmp / STATE_FILE)
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
            keep = self.args.keep_checkpoints
            for old in steps[: max(0, len(steps) - keep)] if keep > 0 else []:
                shutil.rmtree(self.root / f"step_{old}", ignore_errors=True)
        self.saved = step
        if sync:
            distributed.barrier()
        return final

    def after_failure(self) -> None:
        """Checkpoint the last complete step (between sampled batches) after a failure that ends the run, unless an
        update has changed the weights since (a failure inside DDPO-IS's, GRPO's or RWR's batch, after an update),
        and say how to continue. No collective: the other ranks may be anywhere."""
        good, main = self._good, distributed.world().is_main
        if self.updates[0] != good["updates"]:
            if main:
                print(f"stopped inside a sampled batch: its updates after step {good['step']} are not saved (a "
                      "checkpoint cannot hold the batch)", file=sys.stderr)
        elif good["step"] > self.saved:
            try:
                self._save(good, sync=False)
            except OSError as e:
                print(f"could not save a checkpoint of step {good['step']}: {e}", file=sys.stderr)
        if main and self.saved:
            more = " with a larger --steps" if self.saved >= self.args.steps else ""
            print(f"stopped; the newest checkpoint is of step {self.saved}: continue with --resume "
                  f"{self.run_dir}{more}", file=sys.stderr)


def save_on_failure() -> None:
    """After a failure that ends this process's training run (`user_errors`: a RewardError, a UserError), checkpoint
    its last complete step (`Checkpointer.after_failure`); nothing if no run is training."""
    global _running
    run, _running = _running, None
    if run is not None:
        run.after_failure()


FAILURE_HOOKS.append(save_on_failure)


class StopSignal:
    """SIGINT (Ctrl-C) or SIGTERM (pre-emption, torchrun stopping) asks the run to stop after the current
    update: the script saves a checkpoint and exits with 128 + the signal number. A second Ctrl-C aborts.
    With `guard`, its --max-bad-steps stop takes the same path (exit code 1, with the guard's message)."""

    def __init__(self, guard: UpdateGuard | None = None):
        self.signum = 0
        self.guard = guard
        if guard is not None:
            guard.defer_stop = True
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this update (DDPO-IS, GRPO, RWR: after the updates of "
              "this sampled batch) with a checkpoint; Ctrl-C again aborts without one", file=sys.stderr, flush=True)

    def _gave_up(self) -> str:
        return self.guard.stop_reason if self.guard is not None else ""

    def requested(self, device=None) -> bool:
        """Whether any rank was signalled or gave up on bad updates (a collective under torchrun: call it on every
        rank)."""
        return distributed.any_rank(bool(self.signum or self._gave_up()), device)

    def exit(self, run_dir: Path, step: int):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._gave_up():
            raise SystemExit(f"{self._gave_up()} A checkpoint of step {step} is saved: --resume {run_dir} continues "
                             "this run once the cause lies outside its flags (e.g. a reward server); other flags need "
                             "a new run.")
        print(f"stopped at step {step}; continue with --resume {run_dir}", file=sys.stderr)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))


INIT_SCALE = 2.0**24
"""The initial fp16 loss scale S (GradScaler's default: 2^16). The two ways to miss cost differently: too low is
silent (gradients below fp16's subnormals are zeros until S has doubled back, one doubling per 2000 clean updates),
too high costs one skipped update per halving, once, at the start, logged (`skipped_updates`). At SD1.4's sizes a
reward's gradient through the VAE decoder and the last step (DRaFT-1, tests/test_precision.py) kept cosine 0.93 with
float32's at 2^16, 0.9994 at 2^20, 0.9999 at 2^24: 2^24 leaves a factor 16 for rewards with smaller gradients.
Updates skipped before the first applied one, measured on `tiny` (10 steps, 4 images per update), at 2^24 / 2^20 /
2^16: DDPO-SF 1/0/0, DDPO-IS 2/0/0, GRPO 1/0/0, RWR 3/0/0 (jpeg_compressibility); DRaFT-1, DRaFT-LV, ReFL 10/6/2,
AlignProp 4/0/0 (jpeg_compressibility_diff, a reward of about 10³); on tiny-shapes with shapes_alignment at 2^24 /
2^20: DRaFT-1 6/2, DRaFT-LV 5/2, ReFL 8/4, AlignProp 2/1. The tiny models' gradients per element are far larger
than SD1.4's at the published sizes (32² pixels, not 512²; DDPO's n·T = 40, not 3200), so SD1.4 should skip fewer."""


class UpdateGuard:
    """Skip updates whose loss, gradients or rewards are not finite, stop after `max_bad_steps` bad steps in a row,
    and, with fp16 base weights, scale the loss with `torch.amp.GradScaler` so that its gradient survives half
    precision:

        guard = common.UpdateGuard(args.max_bad_steps, loss_scaling=dtype == torch.float16)
        guard.backward(loss)                                     # scaler.scale(loss).backward()
        grad_norm = guard.clip_grad_norm_(optimizer, max_norm)   # scaler.unscale_(optimizer), then clip
        if guard.ok(step, loss=loss, grad_norm=grad_norm):       # scaler.update(), and the finite check
            optimizer.step()

    The loss scaling is GradScaler's, unchanged: the loss × S before backward, the float32 LoRA gradients ÷ S before
    clipping, an update with a non-finite gradient skipped and S halved, S doubled after `growth_interval` clean
    updates. What it lacks is added here: the finite check of the loss and rewards (`ok(step, reward=...)` before
    a batch is used), the count of skipped updates, the stop after `max_bad_steps`, and the verdict agreed by all
    ranks under torchrun (the gradients are averaged over ranks before `clip_grad_norm_`, so every rank's
    GradScaler sees the same overflow and keeps the same S). bf16 has float32's exponent range and needs none.
    Overflow skips count toward `max_bad_steps` once S has fallen below 1.

    Why loss scaling (Micikevicius et al., "Mixed Precision Training", 2018): the backward pass through fp16 base
    weights carries every activation gradient in fp16, whose smallest subnormal is 6e-8. DDPO's loss is divided by
    n·T and averaged over 16,384 latent elements on SD1.4, so the gradient reaching the UNet output is about 4e-8
    per element: unscaled, fp16 trains on zeros and rounding noise while clipping and Adam still take full-size
    steps. S starts at INIT_SCALE (see there for the choice), not GradScaler's 2^16.

    `skipped` counts skipped checks (logged per step). `state_dict()` (GradScaler's with the count) goes into
    checkpoints, so a resumed run continues with the same scale."""

    def __init__(self, max_bad_steps: int, loss_scaling: bool = False, init_scale: float = INIT_SCALE,
                 growth_interval: int = 2000):
        self.max_bad_steps = max_bad_steps
        self.loss_scaling = loss_scaling
        # GradScaler's device only decides whether it disables itself without CUDA; its scale lives on the loss's.
        self.scaler = torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu", init_scale=init_scale,
                                           growth_interval=growth_interval, enabled=loss_scaling)
        self.unscaled = False  # clip_grad_norm_ recorded this update's overflow check; ok() hands it to update()
        self.skipped = 0
        self.consecutive = 0
        self.last_bad_step = -1
        self.defer_stop = False  # set by StopSignal(guard): stop through it instead of raising SystemExit here
        self.stop_reason = ""

    @property
    def scale(self) -> float:
        """The current loss scale S (1 without loss scaling)."""
        return self.scaler.get_scale()

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, with the loss multiplied by the current scale (without loss scaling: unchanged)."""
        self.scaler.scale(loss).backward()

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """Divide the optimizer's gradients by the loss scale (`GradScaler.unscale_`, which also notes an overflow),
        then clip their norm to `max_norm` (0: no clipping); returns the norm before clipping, as
        `torch.nn.utils.clip_grad_norm_` does."""
        self.scaler.unscale_(optimizer)
        self.unscaled = self.loss_scaling
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))

    def ok(self, step: int, **values) -> bool:
        bad = [name for name, v in values.items() if not torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all()]
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
        if self.unscaled:  # an update's check: GradScaler halves S after an overflow, or grows it
            self.scaler.update()
            self.unscaled = False
        if not distributed.any_rank(bool(bad), device):
            return True
        self.skipped += 1
        if self.loss_scaling and bad == ["grad_norm"] and self.scale >= 1:  # an fp16 overflow: update() lowered S
            print(f"step {step}: fp16 gradient overflow; update skipped, loss scale lowered to {self.scale:g}",
                  file=sys.stderr)
            return False
        if step != self.last_bad_step:
            self.consecutive = self.consecutive + 1 if step == self.last_bad_step + 1 else 1
            self.last_bad_step = step
        print(f"step {step}: non-finite {', '.join(bad) or 'values on another rank'}; update skipped "
              f"({self.consecutive} bad step(s) in a row, {self.skipped} skipped in total)", file=sys.stderr)
        if self.consecutive >= self.max_bad_steps:
            reason = (
                f"stopping at step {step}: {self.consecutive} consecutive steps with non-finite "
                f"{', '.join(bad) or 'values'} (--max-bad-steps {self.max_bad_steps}). Likely causes: a learning rate "
                "too high for this reward's scale (try 10x lower or --max-grad-norm 1), fp16 overflow (try "
                "--mixed-precision bf16 or no), or a reward model returning NaN/inf for these images.")
            if not self.defer_stop:
                raise SystemExit(reason)
            # a StopSignal stops the run where a signal would (after this update or sampled batch) with a checkpoint
            self.stop_reason = self.stop_reason or reason
        return False

    def charts(self) -> dict:
        """What to log every step: the skipped updates so far, and the loss scale when scaling."""
        return dict(skipped_updates=self.skipped) | (dict(loss_scale=self.scale) if self.loss_scaling else {})

    def state_dict(self) -> dict:
        return dict(skipped=self.skipped, scaler=self.scaler.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state.get("skipped", 0)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
