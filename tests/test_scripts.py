"""Every script through its real command line on `--model tiny` for a few steps (subprocess), and the registry of
the scripts (conftest.SCRIPTS) that every per-script test reads."""

import ast
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SCRIPTS, read_metrics, script_cli, scripts

STEPS = 3


def test_the_registry_lists_every_training_script():
    """A top-level file with an `Args` class and a `main(args: Args)` is a training script: the per-script tests
    cover it only once it is in conftest.SCRIPTS (see tests/README.md)."""
    training = set()
    for path in ROOT.glob("*.py"):
        body = ast.parse(path.read_text()).body
        names = {node.name for node in body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        if {"Args", "main"} <= names:
            training.add(path.stem)
    assert training == set(SCRIPTS)
    assert {s.kind for s in SCRIPTS.values()} == {"rl", "gradient"}


@pytest.mark.parametrize("script", scripts())
def test_script_cli_on_tiny(script, tmp_path):
    from diffusers import StableDiffusionPipeline

    from common.models import tiny_components

    run_dir = tmp_path / "run"
    cmd = script_cli(script, "--steps", str(STEPS), "--num-inference-steps", "6", "--sample-every", "2", "--save-every",
                     "2", "--num-sample-images", "4", "--output-dir", str(run_dir))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("reward_mean", "reward_std", "reward_queries", "loss", "seconds"):
            assert math.isfinite(r[key]), (key, r)
    queries = [r["reward_queries"] for r in rows]
    assert queries == sorted(queries) and queries[0] > 0
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_000000.png", "step_000002.png",
                                                                           "step_000003.png"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "step_2" / "pytorch_lora_weights.safetensors").is_file()

    # the LoRA loads with diffusers' own loader and changes the model
    pipe = StableDiffusionPipeline(**tiny_components(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(str(run_dir))
        after = pipe.unet(x, 500, encoder_hidden_states=emb).sample
    assert (after - before).abs().max() > 0

    # --resume continues from the newest checkpoint (step 3, or step 2 where checkpoints fall between sampled
    # batches of two updates): no step twice, and a step trained again draws the same samples as the first time
    res = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--resume", str(run_dir), "--steps", str(STEPS + 1)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 2))
    seconds = [r["seconds"] for r in resumed]
    assert seconds == sorted(seconds), seconds  # the clock continues across the resume
    for old, new in zip(rows, resumed):
        assert (old["reward_mean"], old["reward_queries"]) == (new["reward_mean"], new["reward_queries"]), old["step"]
    assert (run_dir / "checkpoints" / f"step_{STEPS + 1}" / "manifest.json").is_file()
