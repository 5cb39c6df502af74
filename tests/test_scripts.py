"""Every script through its real command line on `--model tiny` for a few steps (subprocess)."""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_metrics

SMOKE = {
    "ddpo_sf.py": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--sample-batch-size", "4",
                   "--train-batch-size", "2"],
    "ddpo_is.py": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--sample-batch-size", "4",
                   "--train-batch-size", "2", "--num-minibatches", "2"],
    "rwr.py": ["--reward", "jpeg_compressibility", "--batch-size", "4", "--images-per-prompt", "2",
               "--sample-batch-size", "4", "--train-batch-size", "2", "--num-minibatches", "2", "--num-epochs", "1"],
    "draft.py": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--k", "2"],
    "draft_lv.py": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2"],
    "refl.py": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2", "--max-step", "3"],
    "alignprop.py": ["--reward", "jpeg_compressibility_diff", "--batch-size", "2"],
}
STEPS = 3


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_script_cli_on_tiny(script, tmp_path):
    from diffusers import StableDiffusionPipeline

    from common.models import tiny_components

    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / script), "--model", "tiny", "--steps", str(STEPS), "--num-inference-steps", "6",
           "--sample-every", "2", "--save-every", "2", "--num-sample-images", "4", "--output-dir", str(run_dir),
           *SMOKE[script]]
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
    res = subprocess.run([sys.executable, str(ROOT / script), "--resume", str(run_dir), "--steps", str(STEPS + 1)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 2))
    seconds = [r["seconds"] for r in resumed]
    assert seconds == sorted(seconds), seconds  # the clock continues across the resume
    for old, new in zip(rows, resumed):
        assert (old["reward_mean"], old["reward_queries"]) == (new["reward_mean"], new["reward_queries"]), old["step"]
    assert (run_dir / "checkpoints" / f"step_{STEPS + 1}" / "manifest.json").is_file()
