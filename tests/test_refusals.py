"""Every bad input ends in one clear line, before any model loads, with nothing written.

In-process: the real command-line parser (`tyro.cli(Args, args=[...])`) of every script must raise a user error
(`common.UserError` or `rewards.RewardError`) whose message names the problem, in one line, without loading anything.
Subprocess: the real CLI prints that line on stderr as `script.py: error: ...`, exits with 2, prints no traceback
and creates no run directory; errors that only show once loading starts (reward weights absent offline, a hub model
that cannot be fetched, a file that cannot be read) are checked the same way.
"""

import importlib
import os
import subprocess
import sys

import pytest
import tyro

import common
import rewards
from conftest import ROOT, SCRIPTS, scripts


def base(script):
    """A valid small configuration of `script` (the registry's); each case below changes one thing."""
    return ["--model", "tiny", "--reward", SCRIPTS[script].reward, "--num-inference-steps", "6", *SCRIPTS[script].flags]


# (flags, part of the message); the same for every script
COMMON_CASES = [
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--steps", "-3"], "--steps must be > 0, got -3"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--learning-rate", "-1"], "--learning-rate must be >= 0, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "-2"], "--guidance-scale must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number"),
    (["--num-inference-steps", "0"], "--num-inference-steps must be > 0"),
    (["--eval-num-inference-steps", "0"], "--eval-num-inference-steps must be > 0, got 0"),
    (["--lora-rank", "0"], "--lora-rank must be > 0"),
    (["--sample-every", "0"], "--sample-every must be > 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--num-sample-images", "0"], "--num-sample-images must be > 0"),
    (["--sample-seeds", "0"], "--sample-seeds must be > 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be > 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--resolution", "30"], "--resolution must be a positive multiple of 8"),
    (["--model", "sd14"], "unknown model 'sd14'"),
    (["--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
    (["--reward", "jpeg_compressibility:abc"], "malformed weight 'abc'"),
    (["--reward", "jpeg_compressibility,jpeg_compressibility"], "appears twice"),
    (["--reward", "jpeg_compressibility[quality=9]"], "option"),
    (["--eval-rewards", "hpsv3"], "unknown reward 'hpsv3'"),
    (["--prompts", "animalz"], "unknown prompt set 'animalz'"),
    (["--eval-prompts", "animalz"], "unknown prompt set 'animalz'"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file /nonexistent/prompts.txt: no such file"),
    (["--prompt-file", "EMPTY"], "holds no prompts"),
    (["--prompt-file", "BINARY"], "is a binary file"),
    (["--prompt-file", "LATIN1"], "is not UTF-8 text"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such run directory"),
    (["--ema-decay", "-0.1"], "--ema-decay must be in [0, 1) (0: off), got -0.1"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1) (0: off), got 1.0"),
    (["--ema-decay", "nan"], "--ema-decay must be a finite number"),
]
SCRIPT_CASES = {  # the algorithm's own flags
    "ddpo_sf": [(["--eta", "0"], "--eta must be > 0"), (["--sample-batch-size", "3"], "--sample-batch-size 3"),
                (["--train-batch-size", "3"], "--train-batch-size 3"), (["--adv-clip-max", "-1"], ">= 0"),
                (["--stat-buffer-size", "0"], "--stat-buffer-size must be > 0"),
                (["--kl-beta", "-0.5"], "--kl-beta must be >= 0, got -0.5")],
    "ddpo_is": [(["--eta", "0"], "--eta must be > 0"), (["--clip-range", "0"], "--clip-range must be > 0"),
                (["--timestep-fraction", "0"], "--timestep-fraction must be in (0, 1]"),
                (["--timestep-fraction", "1.5"], "--timestep-fraction must be in (0, 1]"),
                (["--num-minibatches", "3"], "--num-minibatches 3"), (["--num-inner-epochs", "0"], "> 0"),
                (["--save-every", "3"], "--save-every 3 must be a multiple of"),
                (["--kl-beta", "-0.5"], "--kl-beta must be >= 0, got -0.5")],
    "rwr": [(["--percentile", "150"], "--percentile must be in [0, 100]"), (["--beta", "-1"], "--beta must be >= 0"),
            (["--images-per-prompt", "3"], "--images-per-prompt 3"), (["--num-epochs", "0"], "> 0"),
            (["--eta", "-1"], "--eta must be >= 0"), (["--save-every", "3"], "--save-every 3 must be a multiple of")],
    "grpo": [(["--eta", "0"], "--eta must be > 0"), (["--group-size", "3"], "--group-size 3"),
             (["--kl-beta", "-1"], "--kl-beta must be >= 0"), (["--clip-range", "0"], "--clip-range must be > 0")],
    "draft": [(["--k", "0"], "--k 0 must be between 1 and --num-inference-steps (6)"),
              (["--k", "60"], "--k 60 must be between 1 and"), (["--reward", "jpeg_compressibility"],
                                                                 "DRaFT backpropagates through the reward"),
              (["--train-batch-size", "3"], "--train-batch-size 3"), (["--kl-beta", "-0.5"], "--kl-beta must be >= 0, got -0.5")],
    "draft_lv": [(["--num-copies", "-1"], "--num-copies must be >= 0, got -1"),
                 (["--reward", "jpeg_compressibility"], "is not differentiable"),
                 (["--train-batch-size", "0"], "--train-batch-size must be > 0"), (["--kl-beta", "-0.5"], "--kl-beta must be >= 0, got -0.5")],
    "refl": [(["--max-step", "0"], "--max-step 0 must be between 1 and"), (["--max-step", "7"], "--max-step 7"),
             (["--grad-scale", "0"], "--grad-scale must be > 0"),
             (["--reward", "jpeg_compressibility"], "ReFL backpropagates through the reward"),
             (["--pretrain-data", "/nonexistent/images"], "--pretrain-data /nonexistent/images: no such folder"),
             (["--pretrain-data", "EMPTY_DIR"], "holds no images with captions"),
             (["--pretrain-data", "NO_CAPTION"], "a.png has no caption file a.txt"),
             (["--pretrain-data", "BAD_METADATA"], "metadata.jsonl:1: expected a JSON object with file_name and text"),
             (["--pretrain-data", "MISSING_IMAGE"], "names"),
             (["--pretrain-weight", "-1"], "--pretrain-weight must be >= 0, got -1.0"), (["--kl-beta", "-0.5"], "--kl-beta must be >= 0, got -0.5")],
    "alignprop": [(["--truncation", "fixed", "--k", "7"], "--k 7 must be between 1"), (["--k", "0"], "--k 0"),
                  (["--loss-coeff", "0"], "--loss-coeff must be > 0"),
                  (["--reward", "jpeg_compressibility"], "AlignProp backpropagates through the reward"), (["--kl-beta", "-0.5"], "--kl-beta must be >= 0, got -0.5")],
}
CASES = [(s, f, m) for s in scripts() for f, m in COMMON_CASES + SCRIPT_CASES[s]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompt_files")
    (d / "empty.txt").write_text("\n  \n")
    (d / "binary.txt").write_bytes(b"\x00\x01 not text\n")
    (d / "latin1.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    folders = {name: d / name.lower() for name in ("EMPTY_DIR", "NO_CAPTION", "BAD_METADATA", "MISSING_IMAGE")}
    for folder in folders.values():
        folder.mkdir()
    (folders["NO_CAPTION"] / "a.png").write_bytes(b"")  # refused before any image is read
    (folders["BAD_METADATA"] / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    (folders["MISSING_IMAGE"] / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n')
    return {"EMPTY": str(d / "empty.txt"), "BINARY": str(d / "binary.txt"), "LATIN1": str(d / "latin1.txt"),
            **{name: str(folder) for name, folder in folders.items()}}


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    """The flag checks run while the command line is parsed: loading anything then is a failure."""
    def fail(*args, **kwargs):
        raise AssertionError("a model or reward was loaded while the flags were checked")

    monkeypatch.setattr(common, "load_pipeline", fail)
    monkeypatch.setattr(rewards, "load", fail)


@pytest.mark.parametrize("script,flags,message", CASES, ids=[f"{s}:{' '.join(f)}" for s, f, _ in CASES])
def test_bad_flag_is_refused_while_parsing(script, flags, message, files, tmp_path):
    module = importlib.import_module(script)
    flags = [files.get(f, f) for f in flags]
    out = tmp_path / "run"
    with pytest.raises((common.UserError, rewards.RewardError)) as e:
        tyro.cli(module.Args, args=[*base(script), *flags, "--output-dir", str(out)])
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("script", scripts())
def test_an_output_dir_that_is_a_file_is_refused_while_parsing(script, tmp_path):
    """--output-dir naming a file, or a path under one, is one line (it was a FileExistsError traceback once the
    model had loaded)."""
    module = importlib.import_module(script)
    file = tmp_path / "notes.txt"
    file.write_text("not a run\n")
    for out, message in ((file, f"--output-dir {file} is a file, not a directory"),
                         (file / "run", f"--output-dir {file / 'run'}: {file} is a file, not a directory")):
        with pytest.raises(common.UserError) as e:
            tyro.cli(module.Args, args=[*base(script), "--output-dir", str(out)])
        assert str(e.value) == message
    assert file.read_text() == "not a run\n"


@pytest.mark.parametrize("script", scripts())
def test_the_valid_configuration_parses(script):
    """The baseline the cases change is itself accepted (so each case fails for its own reason)."""
    tyro.cli(importlib.import_module(script).Args, args=base(script))


# --- the real command line --------------------------------------------------------------------------------------

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
CLI_CASES = [  # (script, flags, message): at parse time, and once loading starts
    ("draft_lv", ["--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
    ("ddpo_sf", ["--prompt-file", "/nonexistent.txt"], "no such file"),
    ("rwr", ["--steps", "-3"], "--steps must be > 0"),
    ("draft", ["--reward", "aesthetic"], "hf download openai/clip-vit-large-patch14"),  # weights absent offline
    ("ddpo_is", ["--model", "someone/no-such-model"], "could not load the Stable Diffusion pipeline"),
    ("refl", ["--pretrain-data", "/nonexistent/images"], "--pretrain-data /nonexistent/images: no such folder"),
    ("grpo", ["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
]


@pytest.mark.parametrize("script,flags,message", CLI_CASES, ids=[f"{s}:{f[1]}" for s, f, _ in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(script, flags, message, tmp_path):
    out = tmp_path / "run"
    args = [a for a in base(script) if a not in ("--model", "tiny")] if "--model" in flags else base(script)
    proc = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *args, *flags, "--output-dir", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{script}.py: error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not out.exists()
