"""A run that publishes itself (issue 25): the per-term rewards of a weighted reward, against the rewards scored on
their own."""

import signal

import pytest
import torch
import tyro

import common
import rewards
from conftest import read_metrics

REWARD = "shapes_alignment,jpeg_compressibility_diff:0.01"  # two differentiable terms the tiny model can be scored on
WEIGHTS = {"shapes_alignment": 1.0, "jpeg_compressibility_diff": 0.01}
# batch 2 in chunks of 1 (two reward calls per step), a sample grid before and after every step (reward calls that
# must not count), attention-only LoRA (the kind ComfyUI cannot read in diffusers' format)
DRAFT = ["--model", "tiny", "--prompts", "shapes", "--reward", REWARD, "--batch-size", "2", "--train-batch-size", "1",
         "--k", "1", "--steps", "2", "--num-inference-steps", "3", "--num-sample-images", "2", "--sample-every", "1",
         "--lora-rank", "2", "--no-lora-ff"]


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The scripts install SIGINT/SIGTERM handlers (common.StopSignal); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run(script, argv):
    module = __import__(script)
    module.main(tyro.cli(module.Args, args=argv))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run_dir = tmp_path_factory.mktemp("publish") / "draft_run"
    run("draft", DRAFT + ["--output-dir", str(run_dir)])
    for s, handler in saved.items():
        signal.signal(s, handler)
    return run_dir


# --- weighted rewards: each term logged -----------------------------------------------------------------------------

def assert_terms_add_up(row):
    """reward_mean = Σ w_i · reward/<term_i>: the mean is linear. float32 sums and products of a few terms of size
    `scale`: each rounding is at most 2^-24 relative, and 1e-6 allows 16 of them."""
    terms = {k.removeprefix("reward/"): v for k, v in row.items() if k.startswith("reward/")}
    assert terms.keys() == WEIGHTS.keys(), row
    scale = sum(abs(WEIGHTS[t] * v) for t, v in terms.items())
    assert sum(WEIGHTS[t] * v for t, v in terms.items()) == pytest.approx(row["reward_mean"], abs=1e-6 * scale)


def test_logger_logs_each_term_of_a_weighted_reward(tmp_path):
    """Two chunks of one batch, then a sample grid's call: reward/<term> is the mean of the unweighted term over both
    chunks, against each reward scored on its own; an update without a new batch repeats the last values."""
    reward_fn = rewards.load("jpeg_compressibility:2,jpeg_incompressibility_diff:0.5")
    singles = {t: rewards.load(t) for t in ("jpeg_compressibility", "jpeg_incompressibility_diff")}
    args = tyro.cli(__import__("draft").Args, args=["--model", "tiny", "--reward", "jpeg_compressibility_diff"])
    logger = common.Logger(tmp_path / "run", args, reward_fn=reward_fn)
    g = torch.Generator().manual_seed(0)
    images, prompts = torch.rand(4, 3, 32, 32, generator=g), ["a", "b", "c", "d"]
    total = torch.cat([reward_fn(images[:2], prompts[:2]), reward_fn(images[2:], prompts[2:])])
    grid = common.SampleGrid(["x"], 2, 2, reward_fn, num_steps=2)
    grid(common.load_pipeline("tiny", lora_rank=0))  # scores two more images: not the training batch's
    row = logger.log(1, charts=dict(reward_mean=total.mean()), losses={})
    for term, fn in singles.items():
        assert row[f"reward/{term}"] == pytest.approx(float(fn(images, prompts).mean()), rel=1e-6)
    assert row["reward_mean"] == pytest.approx(2 * row["reward/jpeg_compressibility"]
                                               + 0.5 * row["reward/jpeg_incompressibility_diff"], rel=1e-6)
    again = logger.log(2, charts=dict(reward_mean=total.mean()), losses={})  # an update on the same batch
    assert {k: v for k, v in again.items() if k.startswith("reward/")} == {
        k: v for k, v in row.items() if k.startswith("reward/")}
    logger.close()
    logged = read_metrics(tmp_path / "run")
    assert [r["reward/jpeg_compressibility"] for r in logged] == [row["reward/jpeg_compressibility"]] * 2
    # one term of weight 1 is the total itself: nothing more is logged
    plain = common.Logger(tmp_path / "plain", args, reward_fn=rewards.load("jpeg_compressibility"))
    plain.log(1, charts=dict(reward_mean=1.0), losses={})
    plain.close()
    assert not [k for k in read_metrics(tmp_path / "plain")[0] if k.startswith("reward/")]


def test_weighted_reward_terms_in_a_gradient_run(finished_run):
    rows = read_metrics(finished_run)
    assert len(rows) == 2
    for row in rows:  # the two chunks of each batch, not the sample grid's images
        assert_terms_add_up(row)


def test_weighted_reward_terms_in_an_rl_run(tmp_path):
    """DDPO-IS: one sampled batch, two updates on it (two minibatches); the second update logs the batch's terms
    again, as it logs its reward_mean again."""
    run("ddpo_is", ["--model", "tiny", "--prompts", "shapes", "--reward", REWARD, "--batch-size", "4",
                    "--sample-batch-size", "4", "--train-batch-size", "2", "--num-minibatches", "2", "--steps", "2",
                    "--num-inference-steps", "3", "--num-sample-images", "2", "--sample-every", "1", "--lora-rank", "2",
                    "--output-dir", str(tmp_path / "run")])
    rows = read_metrics(tmp_path / "run")
    for row in rows:
        assert_terms_add_up(row)
    assert rows[0]["reward/shapes_alignment"] == rows[1]["reward/shapes_alignment"]
