"""Runs that survive: exact resume, kill during a save, SIGTERM, skipped non-finite updates, torchrun, and
the message each bad --resume gets before anything is written (the other bad inputs: test_refusals.py).

In-process runs call a script's `main` with its real command-line parser (`tyro.cli(Args, args=[...])`); the
signal, kill and torchrun tests run the scripts as subprocesses, as a user would.
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import tyro
from safetensors.torch import load_file, save_file

import common
from conftest import SCRIPTS, read_metrics, script_args, script_cli, scripts

LORA = "pytorch_lora_weights.safetensors"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
GRID = 3  # images in the sample grid: no batch size of the registry's
# The registry's small run of each script (conftest.SCRIPTS).
COMMON = ["--num-inference-steps", "4", "--num-sample-images", str(GRID), "--sample-seeds", str(GRID), "--sample-every",
          "100", "--lora-rank", "4"]


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The scripts install SIGINT/SIGTERM handlers (common.StopSignal); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run(script: str, *flags: str):
    """`python {script}.py {flags}`, in this process."""
    module = importlib.import_module(script)
    return module.main(tyro.cli(module.Args, args=script_args(script, *COMMON, *flags)))


def lora(run_dir):
    return load_file(str(run_dir / LORA))


def assert_same_lora(a, b, atol=0.0):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def snapshot(path):
    """Every file under `path` with its size and modification time (to show that nothing was written)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


# --- exact resume --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", scripts())
def test_resume_equals_uninterrupted_run(script, tmp_path):
    """Two sampled batches in one go == one, then --resume for the second: same LoRA (so the optimizer's moments
    and every RNG came back), same rewards and losses."""
    u = SCRIPTS[script].updates_per_batch
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
    return script_cli(script, *COMMON, *flags)


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = script_cmd("draft", "--steps", "4", "--save-every", "1", "--output-dir", str(out))
    killed = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SAVE, *cmd[1:]], env=ENV, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp_step_2", "step_1"]  # the half-written save is aside
    assert (ckpts / ".tmp_step_2" / "training_state.pt").read_bytes() == b"half a checkpoint"

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

def nan_reward(monkeypatch, bad_calls=frozenset()):
    """Make the reward return NaN on the training calls numbered in `bad_calls` (1-based; the grid's calls, of
    GRID images, are not counted). Returns the list that counts the training calls."""
    import rewards

    load, calls = rewards.load, []

    def patched(*a, **k):
        fn = load(*a, **k)

        def reward(images, prompts):
            r = fn(images, prompts)
            if len(prompts) != GRID:
                calls.append(1)
                if len(calls) in bad_calls:
                    return r * float("nan")
            return r
        return reward

    monkeypatch.setattr(rewards, "load", patched)
    return calls


@pytest.mark.parametrize("script", scripts())
def test_nan_reward_is_skipped_and_counted(script, tmp_path, monkeypatch, capsys):
    """A sampled batch whose rewards are NaN is skipped whole (all of its updates), counted once, and leaves the
    weights exactly where the batch before it put them."""
    u = SCRIPTS[script].updates_per_batch
    reference, out = tmp_path / "reference", tmp_path / "nan"
    calls = nan_reward(monkeypatch)
    run(script, "--steps", str(u), "--output-dir", str(reference))  # one batch: how many reward calls it makes
    n = len(calls)
    calls.clear()
    nan_reward(monkeypatch, bad_calls=set(range(n + 1, 2 * n + 1)))  # the second batch's
    run(script, "--steps", str(2 * u), "--output-dir", str(out))

    rows = read_metrics(out)
    assert [r["skipped_updates"] for r in rows] == [0] * u + [1] * u
    assert f"step {u + 1}: non-finite" in capsys.readouterr().err
    assert_same_lora(lora(reference), lora(out))


def test_max_bad_steps_stops_with_the_step_and_likely_causes(tmp_path, monkeypatch):
    nan_reward(monkeypatch, bad_calls=set(range(1, 100)))
    with pytest.raises(SystemExit) as e:
        run("draft", "--steps", "10", "--max-bad-steps", "3", "--output-dir", str(tmp_path / "run"))
    message = str(e.value.code)
    assert message.startswith("stopping at step 3: 3 consecutive steps with non-finite")
    assert "Likely causes" in message and "learning rate" in message


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


RESUME_ERRORS = {  # (script, how the finished run is altered, flags after --resume DIR, message)
    "output dir holds another run": ("draft", None, ["--output-dir", "DIR"], "already holds a run"),
    "corrupt checkpoint": ("draft", corrupt, ["--resume", "DIR", "--steps", "3"], "is corrupt (training_state.pt"),
    "LoRA of another rank": ("draft", other_rank, ["--resume", "DIR", "--steps", "3"],
                             "holds LoRA rank(s) [2], but the run's --lora-rank is 4"),
    "another script's run": ("ddpo_sf", None, ["--resume", "DIR", "--steps", "3"], "made by another script"),
    "changed flag": ("draft", None, ["--resume", "DIR", "--steps", "3", "--learning-rate", "0.1"],
                     "these differ: --learning-rate (run: 0.0004, given: 0.1)"),
    "steps already reached": ("draft", None, ["--resume", "DIR"], "its checkpoint is at step 2 and --steps is 2"),
    "not a run directory": ("draft", lambda d: (d / "args.json").unlink(), ["--resume", "DIR", "--steps", "3"],
                            "not a run directory"),
    "no complete checkpoint": ("draft", lambda d: shutil.rmtree(d / "checkpoints"), ["--resume", "DIR", "--steps", "3"],
                               "no complete checkpoint"),
}


@pytest.mark.parametrize("case", sorted(RESUME_ERRORS))
def test_bad_input_on_an_existing_run(case, finished_run, tmp_path):
    script, alter, flags, match = RESUME_ERRORS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    if alter:
        alter(run_dir)
    refused(script, [str(run_dir) if f == "DIR" else f for f in flags], match, target=run_dir)


def test_resume_after_a_refusal_still_works(finished_run, tmp_path):
    """A refused --resume (changed flag) leaves a run that the right command continues."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    refused("draft", ["--resume", str(run_dir), "--steps", "3", "--seed", "1"], "--seed", target=run_dir)
    run("draft", "--resume", str(run_dir), "--steps", "3")
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


# --- torchrun -----------------------------------------------------------------------------------------------------

# One script of each kind (conftest.SCRIPTS): a run under torchrun starts three interpreters, about 30 s of CPU per
# test, and the rule it checks (every rank draws the global batch's randomness and keeps its share) is common/'s.
TORCHRUN = {  # per-process flags: the global batch is the same, DDPO's sampling chunk is the per-process share
    "draft": ([], []),
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
    # measured: max difference 2.5e-6 (draft), 1.4e-7 (ddpo_sf); each LoRA B entry moved by about 6e-4
    assert_same_lora(lora(one), lora(two), atol=2e-5)
    moved = torch.cat([v.flatten() for k, v in lora(two).items() if "lora.up" in k]).abs()  # B starts at zero
    assert moved.mean() > 3e-4
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["reward_queries"] for r in rows_two] == [r["reward_queries"] for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-4, abs=1e-5)
    assert list(two.glob("events.out.tfevents.*"))  # rank 0 wrote the logs
