"""Runs that survive (issues 5, 21): exact resume, kill during a save, SIGTERM, skipped non-finite updates, a checkpoint
on every stop (a failing reward, --max-bad-steps), one writer per run directory, torchrun, and the message each bad
--resume gets before anything is written (the other bad inputs: test_refusals.py).

In-process runs call a script's `main` with its real command-line parser (`common.cli(Args, args=[...])`); the
signal, kill, lock and torchrun tests run the scripts as subprocesses, as a user would.
"""

import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import rewards
from conftest import ROOT, read_metrics, scripts

LORA = "pytorch_lora_weights.safetensors"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
# Small, fast configurations on `--model tiny`. DDPO-IS, GRPO and RWR make two updates from each sampled batch.
FLAGS = {
    "draft": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--k", "2"],
    "ddpo_sf": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--sample-batch-size", "4",
                "--train-batch-size", "2"],
    "ddpo_is": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--sample-batch-size", "4",
                "--train-batch-size", "2", "--num-minibatches", "2", "--save-every", "2"],
    "grpo": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--group-size", "2", "--sample-batch-size", "4",
             "--train-batch-size", "2", "--num-minibatches", "2", "--save-every", "2"],
    "rwr": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--images-per-prompt", "2",
            "--sample-batch-size", "4", "--train-batch-size", "2", "--num-minibatches", "2", "--num-epochs", "1",
            "--save-every", "2"],
    "draft_lv": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2"],
    "refl": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--max-step", "2"],
    "alignprop": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2"],
}
UPDATES_PER_BATCH = {"ddpo_is": 2, "grpo": 2, "rwr": 2}  # the others: 1
COMMON = ["--model", "tiny", "--num-inference-steps", "4", "--num-sample-images", "3", "--sample-seeds", "3",
          "--sample-every", "100", "--lora-rank", "4"]  # 3 grid images: no batch size of FLAGS


def run(script: str, *flags: str):
    """`python {script}.py {flags}`, in this process."""
    module = importlib.import_module(script)
    return module.main(common.cli(module.Args, args=[*COMMON, *FLAGS[script], *flags]))


def lora(run_dir):
    return load_file(str(run_dir / LORA))


def assert_same_lora(a, b, atol=0.0):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def equal(a, b) -> bool:
    """Exact equality of nested checkpoint state: dicts, lists, tuples, tensors, numbers, strings."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_checkpoint(a, b):
    """Two checkpoints hold the same LoRA and the same training state (optimizer, every RNG, counters, the
    algorithm's state), bit for bit: resuming either continues identically."""
    assert_same_lora(load_file(str(a / LORA)), load_file(str(b / LORA)))
    state_a, state_b = (torch.load(d / "training_state.pt", weights_only=True) for d in (a, b))
    assert state_a["step"] == state_b["step"]
    for key in ("optimizer", "rng", "state"):
        assert equal(state_a[key], state_b[key]), key


def snapshot(path):
    """Every file under `path` with its size and modification time (to show that nothing was written)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


# --- exact resume --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(FLAGS))
def test_resume_equals_uninterrupted_run(script, tmp_path):
    """Two sampled batches in one go == one, then --resume for the second: same LoRA (so the optimizer's moments
    and every RNG came back), same rewards and losses."""
    u = UPDATES_PER_BATCH.get(script, 1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(script, "--steps", str(2 * u), "--save-every", str(u), "--output-dir", str(whole))
    run(script, "--steps", str(u), "--save-every", str(u), "--output-dir", str(split))
    half = lora(split)
    run(script, "--resume", str(split), "--steps", str(2 * u))

    assert_same_lora(lora(whole), lora(split))
    assert any((half[k] != lora(split)[k]).any() for k in half)  # the resumed steps did train
    rows_whole, rows_split = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in rows_split] == list(range(1, 2 * u + 1))  # no step logged twice
    for key in ("reward_mean", "loss", "reward_queries"):
        assert [r[key] for r in rows_split] == [r[key] for r in rows_whole], key
    assert json.loads((split / "args.json").read_text())["steps"] == 2 * u


@pytest.mark.parametrize("script", ["draft", "ddpo_is"])
def test_resume_with_an_ema_equals_uninterrupted_run(script, tmp_path):
    """--ema-decay: the LoRA's moving average travels in the checkpoint, so the resumed run ends with the same average
    (lora_ema.safetensors) and draws the same sample grids with it as the uninterrupted run."""
    u = UPDATES_PER_BATCH.get(script, 1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    flags = ("--save-every", str(u), "--sample-every", str(u), "--ema-decay", "0.9")
    run(script, "--steps", str(2 * u), *flags, "--output-dir", str(whole))
    run(script, "--steps", str(u), *flags, "--output-dir", str(split))
    run(script, "--resume", str(split), "--steps", str(2 * u))

    assert_same_lora(lora(whole), lora(split))
    ema = "lora_ema.safetensors"
    assert_same_lora(load_file(str(whole / ema)), load_file(str(split / ema)))
    assert any((lora(whole)[k] != load_file(str(whole / ema))[k]).any() for k in lora(whole))  # an average, not θ
    grids = [[json.loads(line)["scores"] for line in (d / "eval.jsonl").read_text().splitlines()] for d in (whole, split)]
    assert grids[0] == grids[1] and len(grids[0]) == 3  # steps 0, u, 2u


# --- kill during a save, SIGTERM ---------------------------------------------------------------------------------

KILL_ON_SECOND_SAVE = """
import os, runpy, signal, sys, torch
original, calls = torch.save, []
def save(obj, f, *a, **k):  # the second checkpoint: write half a file, then die as `kill -9` would
    calls.append(f)
    if len(calls) == 2:
        open(f, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, f, *a, **k)
torch.save = save
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def script_cmd(script, *flags):
    return [sys.executable, str(ROOT / f"{script}.py"), *COMMON, *FLAGS[script], *flags]


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = script_cmd("draft", "--steps", "4", "--save-every", "1", "--output-dir", str(out))
    killed = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SAVE, *cmd[1:]], env=ENV, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = out / "checkpoints"
    tmp, step_1 = sorted(p.name for p in ckpts.iterdir())  # the half-written save is aside, named by its writer
    assert step_1 == "step_1" and re.fullmatch(r"\.tmp_step_2\.\d+", tmp), tmp
    assert (ckpts / tmp / "training_state.pt").read_bytes() == b"half a checkpoint"

    resumed = subprocess.run(script_cmd("draft", "--resume", str(out), "--steps", "4"), env=ENV, capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step_1" in resumed.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_3", "step_4"]  # leftover removed, keep 2
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]

    reference = tmp_path / "reference"
    ok = subprocess.run(script_cmd("draft", "--steps", "4", "--output-dir", str(reference)),
                        env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert_same_lora(lora(reference), lora(out))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_128_plus_signal(sig, tmp_path):
    """SIGTERM (pre-emption) exits 143, SIGINT (Ctrl-C) 130, each after saving a checkpoint that resumes."""
    out = tmp_path / "run"
    proc = subprocess.Popen(script_cmd("draft", "--steps", "1000", "--save-every", "1000", "--output-dir", str(out)),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert f"continue with --resume {out}" in stderr
    last = read_metrics(out)[-1]["step"]
    assert 2 <= last < 1000
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{last}"]

    resumed = subprocess.run(script_cmd("draft", "--resume", str(out), "--steps", str(last + 1)), env=ENV,
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_metrics(out)[-1]["step"] == last + 1


# --- non-finite updates ----------------------------------------------------------------------------------------

def nan_reward(monkeypatch, batch_size, bad_calls):
    """Make the reward return NaN on the training batches numbered in `bad_calls` (1-based; grids not counted)."""
    import rewards

    load, calls = rewards.load, []

    def patched(*a, **k):
        fn = load(*a, **k)

        def reward(images, prompts):
            r = fn(images, prompts)
            if len(prompts) == batch_size:
                calls.append(1)
                if len(calls) in bad_calls:
                    return r * float("nan")
            return r
        return reward

    monkeypatch.setattr(rewards, "load", patched)


@pytest.mark.parametrize("script, batch_size", [("draft", 2), ("ddpo_sf", 4)])
def test_nan_reward_is_skipped_and_counted(script, batch_size, tmp_path, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "nan"
    run(script, "--steps", "1", "--output-dir", str(reference))
    nan_reward(monkeypatch, batch_size, bad_calls={2})
    run(script, "--steps", "2", "--output-dir", str(out))

    rows = read_metrics(out)
    assert [r["skipped_updates"] for r in rows] == [0, 1]
    assert "step 2: non-finite" in capsys.readouterr().err
    # the skipped update left the weights exactly where step 1 put them
    assert_same_lora(lora(reference), lora(out))


def test_max_bad_steps_stops_with_the_step_and_likely_causes(tmp_path, monkeypatch):
    nan_reward(monkeypatch, 2, bad_calls=set(range(1, 100)))
    with pytest.raises(SystemExit) as e:
        run("draft", "--steps", "10", "--max-bad-steps", "3", "--output-dir", str(tmp_path / "run"))
    message = str(e.value.code)
    assert message.startswith("stopping at step 3: 3 consecutive steps with non-finite")
    assert "Likely causes" in message and "learning rate" in message


@pytest.mark.parametrize("script, batch_size, stop_at, saved", [("draft", 2, 3, 3), ("ddpo_sf", 4, 3, 3),
                                                                ("ddpo_is", 4, 3, 4)])
def test_max_bad_steps_saves_a_checkpoint_as_a_signal_does(script, batch_size, stop_at, saved, tmp_path, monkeypatch):
    """Bad from the second training batch on: the stop saves the step it stopped at (DDPO-IS: after the sampled
    batch's remaining update, as a signal does), equal to the checkpoint of a run that went on to that step."""
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    nan_reward(monkeypatch, batch_size, bad_calls=set(range(2, 100)))
    run(script, "--steps", str(saved), "--save-every", "100", "--max-bad-steps", "100", "--output-dir", str(reference))
    monkeypatch.undo()
    nan_reward(monkeypatch, batch_size, bad_calls=set(range(2, 100)))
    max_bad = stop_at - 1 if script != "ddpo_is" else 1  # DDPO-IS: one verdict on the rewards per sampled batch
    with pytest.raises(SystemExit) as e:
        run(script, "--steps", "10", "--save-every", "100", "--max-bad-steps", str(max_bad), "--output-dir", str(out))
    message = str(e.value.code)
    assert message.startswith(f"stopping at step {stop_at}: ") and "Likely causes" in message, message
    assert f"A checkpoint of step {saved} is saved: --resume {out} continues this run" in message, message
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{saved}"]
    assert_same_checkpoint(reference / "checkpoints" / f"step_{saved}", out / "checkpoints" / f"step_{saved}")


# --- a reward that fails: the last complete step is saved -------------------------------------------------------

def failing_reward(monkeypatch, run_dir, after_steps):
    """The reward raises RewardError, as the remote reward does when its server is gone, once `after_steps` steps are
    logged in `run_dir` (the next sampled batch's first reward call)."""
    load = rewards.load

    def patched(*a, **k):
        fn = load(*a, **k)

        def reward(images, prompts):
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps:
                raise rewards.RewardError("reward server http://127.0.0.1:9 did not answer POST /score (test)")
            return fn(images, prompts)
        return reward

    monkeypatch.setattr(rewards, "load", patched)


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_a_failing_reward_saves_the_last_complete_step(script, tmp_path, monkeypatch, capsys):
    """The reward fails at the second sampled batch (step 2, or 3 after DDPO-IS's, GRPO's, RWR's two updates of the
    first batch), long before --save-every: the run ends with the reward's one line and a checkpoint of the last
    complete step, equal bit for bit to the checkpoint of a run that stopped there (so it resumes exactly)."""
    done = UPDATES_PER_BATCH.get(script, 1)
    reference, out = tmp_path / "reference", tmp_path / "failed"
    run(script, "--steps", str(done), "--output-dir", str(reference))
    failing_reward(monkeypatch, out, after_steps=done)
    with pytest.raises(SystemExit) as e, common.user_errors(rewards.RewardError):
        run(script, "--steps", "10", "--save-every", "100", "--output-dir", str(out))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "did not answer POST /score (test)" in err
    assert f"the newest checkpoint is of step {done}: continue with --resume {out}" in err, err
    assert [r["step"] for r in read_metrics(out)] == list(range(1, done + 1))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{done}"]
    assert_same_checkpoint(reference / "checkpoints" / f"step_{done}", out / "checkpoints" / f"step_{done}")


def test_a_reward_failing_inside_a_sampled_batch_saves_no_inconsistent_checkpoint(tmp_path, monkeypatch, capsys):
    """DDPO-IS's sample grid after the first of a batch's two updates fails: a checkpoint of that step would lack the
    batch, and one of step 0 the update: none is written, and the message says so."""
    out = tmp_path / "failed"
    failing_reward(monkeypatch, out, after_steps=1)
    with pytest.raises(SystemExit), common.user_errors(rewards.RewardError):
        run("ddpo_is", "--steps", "10", "--save-every", "100", "--sample-every", "1", "--output-dir", str(out))
    assert "stopped inside a sampled batch" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


FAIL_AT_THIRD_STEP = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
import rewards
load = rewards.load
def patched(*a, **k):  # the reward server goes away once two steps are logged
    fn = load(*a, **k)
    def reward(images, prompts):
        if len(open(os.path.join(sys.argv[-1], "metrics.jsonl")).read().splitlines()) >= 2:
            raise rewards.RewardError("reward server http://127.0.0.1:9 did not answer POST /score (test)")
        return fn(images, prompts)
    return reward
rewards.load = patched
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_a_failing_reward_prints_one_line_and_the_resume_command_and_resumes_exactly(tmp_path):
    out, reference = tmp_path / "run", tmp_path / "reference"
    run("draft", "--steps", "3", "--output-dir", str(reference))
    cmd = script_cmd("draft", "--steps", "3", "--save-every", "100", "--output-dir", str(out))
    failed = subprocess.run([sys.executable, "-c", FAIL_AT_THIRD_STEP, *cmd[1:]], env=ENV, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if "error" in line]
    assert errors == ["draft.py: error: reward server http://127.0.0.1:9 did not answer POST /score (test)"], errors
    assert f"the newest checkpoint is of step 2: continue with --resume {out}" in failed.stderr

    resumed = subprocess.run(script_cmd("draft", "--resume", str(out)), env=ENV, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_lora(lora(reference), lora(out))
    assert [r["reward_mean"] for r in read_metrics(out)] == [r["reward_mean"] for r in read_metrics(reference)]


# --- one writer per run directory --------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
import common.run
common.run.lock_run_dir(Path(sys.argv[1]))  # as a script's Checkpointer takes it
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a run directory as a running script would; returns its Popen."""
    procs = []

    def start(run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        assert proc.stdout.readline().strip() == "holding"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


HELD_AT_FIRST_REWARD = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
import rewards
load, held = rewards.load, []
def patched(*a, **k):  # the first training batch's reward waits until the test closes stdin
    fn = load(*a, **k)
    def reward(images, prompts):
        if not held and os.path.exists(os.path.join(sys.argv[-1], "eval.jsonl")):  # after the step-0 grid
            held.append(print("holding", flush=True))
            sys.stdin.read()
        return fn(images, prompts)
    return reward
rewards.load = patched
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_second_writer_is_refused_in_one_line_naming_the_first(tmp_path):
    """A run held inside its first step, and a second one started into the same directory: the second is refused
    in one line naming the first's PID and writes nothing; the first then finishes."""
    out = tmp_path / "run"
    cmd = script_cmd("draft", "--steps", "2", "--output-dir", str(out))
    first = subprocess.Popen([sys.executable, "-c", HELD_AT_FIRST_REWARD, *cmd[1:]], env=ENV, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert first.stdout.readline().strip() == "holding"
        before = snapshot(out)
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert snapshot(out) == before  # nothing written
    finally:
        _, first_err = first.communicate("", timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"is being written by another run (PID {first.pid}," in errors[0], errors
    assert first.returncode == 0, first_err[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_the_lock_is_taken_after_loading_too_and_released_when_its_holder_dies(finished_run, tmp_path, holder,
                                                                                monkeypatch):
    """Two runs started together both pass the check made before the model loads; the second is refused when it
    takes the lock, before it writes anything. Once the holder has died, the run resumes."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    first = holder(run_dir)
    refused("draft", ["--resume", str(run_dir), "--steps", "3"], f"(PID {first.pid},", target=run_dir)
    monkeypatch.setattr(common.run, "_check_unlocked", lambda run_dir: None)  # as if it had started first
    refused("draft", ["--resume", str(run_dir), "--steps", "3"], f"(PID {first.pid},", target=run_dir)
    first.stdin.close()
    first.wait(timeout=60)
    run("draft", "--resume", str(run_dir), "--steps", "3")
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_a_save_deletes_only_stale_temporary_checkpoints(finished_run, tmp_path):
    """Temporary checkpoint folders carry their writer's PID: a save removes those of dead processes (and the old
    unnamed kind), and keeps one whose writer lives."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [".tmp_step_7", f".tmp_step_8.{int(dead.stdout)}", f".tmp_step_9.{os.getppid()}"]
    for name in names:
        (run_dir / "checkpoints" / name).mkdir()
    run("draft", "--resume", str(run_dir), "--steps", "3")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [names[2], "step_2", "step_3"]


# --- bad inputs: a message, and nothing written ------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step draft run with checkpoints at steps 1 and 2 (copied by each test that alters it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run("draft", "--steps", "2", "--save-every", "1", "--output-dir", str(out))
    for s, handler in saved.items():
        signal.signal(s, handler)
    return out


def refused(script, flags, match, target=None):
    """Running `script` with `flags` fails with a message matching `match`; `target` is left exactly as it was."""
    before = snapshot(target) if target else None
    with pytest.raises(common.UserError) as e:
        run(script, *flags)
    message = str(e.value)
    assert match in message, message
    print(f"refused: {message}")
    if target:
        assert snapshot(target) == before
    return message


def corrupt(run_dir):
    state = run_dir / "checkpoints" / "step_2" / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))


def other_rank(run_dir):
    """Swap in a rank-2 LoRA with a manifest that matches it: a consistent checkpoint of the wrong rank."""
    ckpt = run_dir / "checkpoints" / "step_2"
    state = {k: (v[:2] if "lora.down" in k else v[:, :2]).contiguous() for k, v in load_file(str(ckpt / LORA)).items()}
    save_file(state, str(ckpt / LORA))
    from common.checkpoint import _sha256

    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][LORA] = _sha256(ckpt / LORA)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def edit_json(name, **changes):
    """Alter the finished run's args.json (or another JSON file of it): `changes` replace values."""
    def alter(run_dir):
        path = run_dir / name
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return alter


def append(name, text):
    def alter(run_dir):
        with open(run_dir / name, "a") as f:
            f.write(text)
    return alter


def damage_first_line(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward_me\n' + "".join(lines[1:]))


RESUME_ERRORS = {  # (script, how the finished run is altered, flags after --resume DIR, message)
    "output dir holds another run": ("draft", None, ["--output-dir", "DIR"], "already holds a run"),
    "corrupt checkpoint": ("draft", corrupt, ["--resume", "DIR", "--steps", "3"], "is corrupt (training_state.pt"),
    "LoRA of another rank": ("draft", other_rank, ["--resume", "DIR", "--steps", "3"],
                             "holds LoRA rank(s) [2], but the run's --lora-rank is 4"),
    "another script's run": ("ddpo_sf", None, ["--resume", "DIR", "--steps", "3"], "made by another script"),
    # only flags added later (common.checkpoint.ADDED_FLAGS) may be missing from args.json
    "args.json without a flag of the script": ("draft", lambda d: (d / "args.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "args.json").read_text()).items() if k not in ("k", "ema_decay")})),
        ["--resume", "DIR", "--steps", "3"], "made by another script"),
    "changed flag": ("draft", None, ["--resume", "DIR", "--steps", "3", "--learning-rate", "0.1"],
                     "these differ: --learning-rate (run: 0.0004, given: 0.1)"),
    # the grid's sampler: eval.jsonl stays one grid's series, as with --num-sample-images or --eval-prompts
    "changed grid step count": ("draft", None, ["--resume", "DIR", "--steps", "3", "--eval-num-inference-steps", "8"],
                                "these differ: --eval-num-inference-steps (run: None, given: 8)"),
    "steps already reached": ("draft", None, ["--resume", "DIR"], "its checkpoint is at step 2 and --steps is 2"),
    "not a run directory": ("draft", lambda d: (d / "args.json").unlink(), ["--resume", "DIR", "--steps", "3"],
                            "not a run directory"),
    "no complete checkpoint": ("draft", lambda d: shutil.rmtree(d / "checkpoints"), ["--resume", "DIR", "--steps", "3"],
                               "no complete checkpoint"),
    # issue 21: a given flag equal to the script's default still differs from the run's
    "default learning rate": ("draft", edit_json("args.json", learning_rate=1e-3),
                              ["--resume", "DIR", "--steps", "3", "--learning-rate", "4e-4"],
                              "these differ: --learning-rate (run: 0.001, given: 0.0004)"),
    "default guidance scale": ("draft", edit_json("args.json", guidance_scale=5.0),
                               ["--resume", "DIR", "--steps", "3", "--guidance-scale=7.5"],
                               "these differ: --guidance-scale (run: 5.0, given: 7.5)"),
    "default boolean": ("draft", edit_json("args.json", lora_ff=False),
                        ["--resume", "DIR", "--steps", "3", "--lora-ff"],
                        "these differ: --lora-ff (run: False, given: True)"),
    "another output dir": ("draft", None, ["--resume", "DIR", "--steps", "3", "--output-dir", "DIR/../elsewhere"],
                           "a resumed run continues in its own directory"),
    "args.json of the wrong type": ("draft", edit_json("args.json", learning_rate="fast"),
                                    ["--resume", "DIR", "--steps", "3"],
                                    "args.json is damaged: learning_rate is 'fast'"),
    "args.json not an object": ("draft", lambda d: (d / "args.json").write_text("[]"), ["--resume", "DIR"],
                                "not a run directory (args.json is not a JSON object)"),
    "manifest listing no file": ("draft", edit_json("checkpoints/step_2/manifest.json", files={}),
                                 ["--resume", "DIR", "--steps", "3"], "is corrupt (manifest.json (it lists []"),
    "damaged line before the last": ("draft", damage_first_line, ["--resume", "DIR", "--steps", "3"],
                                     "metrics.jsonl: line 1 is damaged"),
}


@pytest.mark.parametrize("case", sorted(RESUME_ERRORS))
def test_bad_input_on_an_existing_run(case, finished_run, tmp_path):
    script, alter, flags, match = RESUME_ERRORS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    if alter:
        alter(run_dir)
    refused(script, [f.replace("DIR", str(run_dir)) for f in flags], match, target=run_dir)


CLI_RESUME_ERRORS = {  # the real command line: one line, exit 2, no traceback, nothing written
    "output dir is a file": (None, ["--steps", "2", "--output-dir", "DIR/args.json"], "is a file, not a directory"),
    "default learning rate": RESUME_ERRORS["default learning rate"][1:3] + ("these differ: --learning-rate",),
    "args.json of the wrong type": RESUME_ERRORS["args.json of the wrong type"][1:],
}


@pytest.mark.parametrize("case", sorted(CLI_RESUME_ERRORS))
def test_cli_bad_input_on_an_existing_run(case, finished_run, tmp_path):
    alter, flags, match = CLI_RESUME_ERRORS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    if alter:
        alter(run_dir)
    before = snapshot(run_dir)
    proc = subprocess.run(script_cmd("draft", *[f.replace("DIR", str(run_dir)) for f in flags]), env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("draft.py: error: ")]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-3000:]
    assert snapshot(run_dir) == before


def test_resume_takes_a_given_steps_even_if_it_is_the_default(finished_run, tmp_path):
    """--steps 2000 is draft.py's default: given, it is the run's new length (it used to be ignored, and the resume
    refused with "--steps is 2"); --output-dir naming the run itself is accepted."""
    import draft

    args = common.resume_args(common.cli(draft.Args, ["--resume", str(finished_run), "--steps", "2000",
                                                      "--output-dir", str(finished_run / ".." / finished_run.name)]))
    assert args.steps == 2000 and args.model == "tiny" and args.output_dir == str(finished_run)


def test_a_torn_last_log_line_is_dropped_with_one_warning(finished_run, tmp_path, capsys):
    """A full disk cut metrics.jsonl's last line: the resume drops it with one warning and continues."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    append("metrics.jsonl", '{"step": 3, "reward_mean": 1.5, "reward_std": ')(run_dir)
    run("draft", "--resume", str(run_dir), "--steps", "3")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "metrics.jsonl: its last line was cut off" in warnings[0], warnings
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (run_dir / "eval.jsonl").read_text().splitlines()] == [0, 2, 3]


def test_a_run_from_before_an_added_flag_resumes_as_it_ran(finished_run, tmp_path, capsys):
    """A run whose args.json predates --ema-decay and --eval-num-inference-steps (flags added later, inert at their
    defaults) resumes with those values, says so in one line, and continues exactly as the same run with the full
    args.json does (the LoRA after the resumed step is bit-identical)."""
    runs = {}
    for name in ("current", "older"):
        runs[name] = tmp_path / name
        shutil.copytree(finished_run, runs[name])
    stored = json.loads((runs["older"] / "args.json").read_text())
    (runs["older"] / "args.json").write_text(json.dumps({k: v for k, v in stored.items()
                                                         if k not in ("ema_decay", "eval_num_inference_steps")}))
    capsys.readouterr()
    run("draft", "--resume", str(runs["current"]), "--steps", "3")
    assert "predates" not in capsys.readouterr().err
    run("draft", "--resume", str(runs["older"]), "--steps", "3")
    notes = [line for line in capsys.readouterr().err.splitlines() if "predates" in line]
    assert len(notes) == 1 and "--ema-decay 0.0, --eval-num-inference-steps None" in notes[0], notes
    assert_same_lora(lora(runs["older"]), lora(runs["current"]))
    assert [r["step"] for r in read_metrics(runs["older"])] == [1, 2, 3]


def test_added_flags_are_inert_at_the_value_a_resume_fills_in():
    """Every flag common.checkpoint.ADDED_FLAGS fills into an older run's args is, in each script that has it, that
    script's default (the value at which the flag changes nothing; test_scripts checks the defaults' behaviour)."""
    from common.checkpoint import ADDED_FLAGS

    seen = set()
    for script in scripts():
        fields = {f.name: f.default for f in dataclasses.fields(importlib.import_module(script).Args)}
        for name, value in ADDED_FLAGS.items():
            if name in fields:
                assert fields[name] == value, (script, name)
                seen.add(name)
    assert seen == set(ADDED_FLAGS)


def test_resume_after_a_refusal_still_works(finished_run, tmp_path):
    """A refused --resume (changed flag) leaves a run that the right command continues."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    refused("draft", ["--resume", str(run_dir), "--steps", "3", "--seed", "1"], "--seed", target=run_dir)
    run("draft", "--resume", str(run_dir), "--steps", "3")
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


# --- torchrun -----------------------------------------------------------------------------------------------------

TORCHRUN = {  # per-process flags: the global batch is the same, DDPO's sampling chunk is the per-process share
    # DRaFT: one process computing each image's chain alone (--train-batch-size 1), as each rank computes its own,
    # does the ranks' operations in their layout, and (a/2 + b/2) = (a + b)/2 in binary floating point: equal LoRAs
    "draft": (["--train-batch-size", "1"], []),
    "ddpo_sf": (["--sample-batch-size", "4"], ["--sample-batch-size", "2", "--train-batch-size", "2"]),
}


@pytest.mark.parametrize("script", sorted(TORCHRUN))
def test_two_processes_under_torchrun_match_one(script, tmp_path):
    single_flags, ddp_flags = TORCHRUN[script]
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["--steps", "2", "--save-every", "2"]
    single = subprocess.run(script_cmd(script, *base, *single_flags, "--output-dir", str(one)), env=ENV,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = script_cmd(script, *base, *ddp_flags, "--output-dir", str(two))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *cmd[1:]], env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # DRaFT: the same operations, exactly. DDPO-SF: one process samples 4 images per UNet call and sums each chunk's
    # timesteps into the gradient before the next chunk's, the ranks 2 per call and sum their halves at the end: equal
    # up to rounding only, which Adam's first step (lr·g/(|g| + ε)) amplifies where an entry of g is near 0, and which
    # the JPEG-size reward (of uint8 pixels) can turn into whole bytes. No rounding bound covers that comparison; its
    # tolerance is the measured one (max difference 1.4e-7 here, each LoRA B entry moved by about 6e-4).
    exact = script == "draft"
    assert_same_lora(lora(one), lora(two), atol=0 if exact else 2e-5)
    moved = torch.cat([v.flatten() for k, v in lora(two).items() if "lora.up" in k]).abs()  # B starts at zero
    assert moved.mean() > 3e-4
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["reward_queries"] for r in rows_two] == [r["reward_queries"] for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        assert b["reward_mean"] == (a["reward_mean"] if exact else pytest.approx(a["reward_mean"], rel=1e-4, abs=1e-5))
    assert list(two.glob("events.out.tfevents.*"))  # rank 0 wrote the logs
