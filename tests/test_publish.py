"""A run that publishes itself (issue 25): the model card, the kohya copy and the per-term rewards a run writes at its
end, `lora_tools.py push` (the Hub is unreachable here: the card and the files an upload would send are checked,
and the error when offline), and `accelerate launch` on the CPU.

The references are independent of the code under test: huggingface_hub's own card parser and upload filter,
diffusers' `load_lora_weights`, the rewards scored on their own."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
import tyro
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors import safe_open

import common
import lora_tools
import rewards
from common.models import tiny_components
from conftest import ROOT, read_metrics

REWARD = "shapes_alignment,jpeg_compressibility_diff:0.01"  # two differentiable terms the tiny model can be scored on
WEIGHTS = {"shapes_alignment": 1.0, "jpeg_compressibility_diff": 0.01}
# batch 2 in chunks of 1 (two reward calls per step), a sample grid before and after every step (reward calls that
# must not count), attention-only LoRA (the kind ComfyUI cannot read in diffusers' format)
DRAFT = ["--model", "tiny", "--prompts", "shapes", "--reward", REWARD, "--batch-size", "2", "--train-batch-size", "1",
         "--k", "1", "--steps", "2", "--num-inference-steps", "3", "--num-sample-images", "2", "--sample-every", "1",
         "--lora-rank", "2", "--no-lora-ff"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


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


def unet_output(pipe):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=text).sample


def diffusers_pipe(folder=None, weight_name=None):
    pipe = StableDiffusionPipeline(**tiny_components(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return pipe


# --- the end of a run: model card, kohya copy ----------------------------------------------------------------------

def test_model_card_of_a_finished_run(finished_run):
    card = ModelCard.load(finished_run / "README.md")  # huggingface_hub's parser: the YAML the Hub reads
    assert card.data.library_name == "diffusers"
    assert {"lora", "text-to-image", "draft"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.license is None  # `tiny` is on no hub and has no license
    text = card.text
    assert "`draft.py` (DRaFT: Directly Fine-Tuning Diffusion Models on Differentiable Rewards)" in text
    assert f"the reward `{REWARD}`: 2 of 2 optimizer updates, 4 reward queries" in text
    # the last sample grid, by a path relative to the card (as the Hub resolves it)
    assert "![The sample grid after 2 updates](samples/step_000002.png)" in text
    assert (finished_run / "samples" / "step_000002.png").is_file()
    # the final metrics: the last rows of metrics.jsonl and eval.jsonl
    last = read_metrics(finished_run)[-1]
    last_eval = json.loads((finished_run / "eval.jsonl").read_text().splitlines()[-1])
    assert f"| reward_mean | {last['reward_mean']:.6g} |" in text
    assert f"| reward/shapes_alignment | {last['reward/shapes_alignment']:.6g} |" in text
    assert f"| eval_reward | {last_eval['eval_reward']:.6g} |" in text and last_eval["step"] == 2
    # the run's args
    assert f"| --reward | {REWARD} |" in text and "| --lora-rank | 2 |" in text and "| --lora-ff | False |" in text
    assert "License: unknown" in text
    # the snippet runs as written: it loads the LoRA from the run directory (not the kohya copy beside it)
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    namespace = {}
    exec(snippet, namespace)
    assert isinstance(namespace["image"], Image.Image) and namespace["image"].size == (32, 32)
    assert torch.equal(unet_output(namespace["pipe"]), unet_output(diffusers_pipe(finished_run, common.LORA_FILE)))


def test_kohya_copy_of_a_finished_run(finished_run):
    path = finished_run / common.KOHYA_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert not any("_ff_" in k for k in keys)  # --no-lora-ff: attention only
    # the values kohya's sd-scripts write for an SD1 LoRA of rank 2 at scale 1 (train_network.py, sai_model_spec.py)
    assert {k: metadata[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                                     "ss_network_module", "modelspec.architecture", "modelspec.implementation",
                                     "modelspec.title", "modelspec.resolution", "modelspec.prediction_type")} == {
        "ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "ss_network_module": "networks.lora", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": finished_run.name,
        "modelspec.resolution": "32x32", "modelspec.prediction_type": "epsilon"}
    assert "modelspec.sai_model_spec" in metadata and "modelspec.date" in metadata
    # diffusers reads the kohya keys back into the same LoRA: the same factors, alpha / rank = 1 exactly, the same
    # peft layers computing the same operations, hence the same output to the bit
    kohya = unet_output(diffusers_pipe(finished_run, common.KOHYA_FILE))
    assert torch.equal(kohya, unet_output(diffusers_pipe(finished_run, common.LORA_FILE)))
    assert not torch.equal(kohya, unet_output(diffusers_pipe()))  # the LoRA changes the model: the test can fail
    # and `load_lora_weights(run_dir)` without a file name still picks diffusers' format, not the kohya copy
    assert torch.equal(unet_output(diffusers_pipe(finished_run)), kohya)


def fake_run(tmp_path, model):
    """A run directory as a script leaves it, without training: for card contents that depend on the base model."""
    run_dir = tmp_path / "run"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "reward_mean": 1.5, "reward_queries": 28}) + "\n")
    (run_dir / "args.json").write_text(json.dumps({"model": model, "reward": "aesthetic", "steps": 7,
                                                   "exp_name": "ddpo_sf", "eta": 1.0, "num_inference_steps": 50,
                                                   "guidance_scale": 5.0, "prompts": None, "prompt_file": None}))
    return run_dir


def test_model_card_license_and_base_model(tmp_path):
    run_dir = fake_run(tmp_path, common.SD14)
    common.write_model_card(run_dir, json.loads((run_dir / "args.json").read_text()))  # args.json, as push does
    card = ModelCard.load(run_dir / "README.md")
    # SD1.4's card on the Hub says `license: creativeml-openrail-m`; offline and not cached, it is known by name
    assert card.data.base_model == common.SD14 and card.data.license == "creativeml-openrail-m"
    assert "ddpo-sf" in card.data.tags and "`ddpo_sf.py`" in card.text
    assert "from_pretrained('CompVis/stable-diffusion-v1-4'" in card.text and "eta=1.0" in card.text
    assert "License: creativeml-openrail-m, the base model's." in card.text
    # a local base model folder: its own card's license; no base_model (the Hub wants a repo id there)
    folder = tmp_path / "my-sd"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my model\n")
    run_dir = fake_run(tmp_path / "local", str(folder))
    common.write_model_card(run_dir, json.loads((run_dir / "args.json").read_text()))
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.license == "mit" and card.data.base_model is None
    # another hub model, not in the cache: no license claimed
    run_dir = fake_run(tmp_path / "other", "someone/some-model")
    common.write_model_card(run_dir, json.loads((run_dir / "args.json").read_text()))
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.license is None and card.data.base_model == "someone/some-model"
    assert "License: unknown" in card.text


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


# --- lora_tools.py push ---------------------------------------------------------------------------------------------

def one_line_refusal(capsys, argv):
    with pytest.raises(SystemExit) as e:
        lora_tools.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and ": error: " in err, err
    return err


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's create_repo and upload_folder, recorded instead of called, and its offline mode (set for
    every test) off."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, **kwargs)

    def upload_folder(**kwargs):
        calls["upload_folder"] = kwargs
        return "https://huggingface.co/me/run/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def uploaded(call) -> set[str]:
    """The files upload_folder would send: huggingface_hub's own filter over the folder's files."""
    folder = call["folder_path"]
    files = [os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
             for d, _, names in os.walk(folder) for f in names]
    return set(filter_repo_objects(files, allow_patterns=call.get("allow_patterns"),
                                   ignore_patterns=call.get("ignore_patterns")))


def test_push_sends_the_lora_card_metrics_and_samples_not_checkpoints(finished_run, hub, capsys):
    lora_tools.main(["push", str(finished_run), "--repo-id", "me/draft-shapes", "--private"])
    assert hub["create_repo"] == dict(repo_id="me/draft-shapes", private=True, exist_ok=True)
    call = hub["upload_folder"]
    assert call["repo_id"] == "me/draft-shapes" and os.path.samefile(call["folder_path"], finished_run)
    events = [p.name for p in finished_run.glob("events.out.tfevents.*")]
    assert events and (finished_run / "checkpoints" / "step_2").is_dir()
    assert uploaded(call) == {"README.md", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "args.json",
                              "metrics.jsonl", "eval.jsonl", "samples/step_000000.png", "samples/step_000001.png",
                              "samples/step_000002.png", *events}
    assert "me/run/commit/0" in capsys.readouterr().out


def test_push_writes_the_card_of_an_older_run(finished_run, hub, tmp_path):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(finished_run, old)
    (old / "README.md").unlink()  # a run from before model cards
    lora_tools.main(["push", str(old), "--repo-id", "me/old"])
    assert "README.md" in uploaded(hub["upload_folder"])
    assert ModelCard.load(old / "README.md").data.library_name == "diffusers"


def test_push_refusals(finished_run, hub, tmp_path, monkeypatch, capsys):
    import httpx2
    import huggingface_hub

    assert "not the directory of a finished run" in one_line_refusal(
        capsys, ["push", str(finished_run / "checkpoints"), "--repo-id", "me/x"])
    assert "--repo-id" in one_line_refusal(capsys, ["push", str(finished_run), "--repo-id", "me/x/y"])

    def no_network(*args, **kwargs):  # what huggingface_hub's HTTP client raises without a network
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_network)
    err = one_line_refusal(capsys, ["push", str(finished_run), "--repo-id", "me/x"])
    assert "could not push" in err and "ConnectError" in err and "Name or service not known" in err
    assert "upload_folder" not in hub


def test_push_offline_is_one_line(finished_run, tmp_path):
    """HF_HUB_OFFLINE=1 (set for every test): one line, exit 2, and an older run's card is not written."""
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(finished_run, old)
    (old / "README.md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "lora_tools.py"), "push", str(old), "--repo-id", "me/x"],
                          env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "could not push" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert not (old / "README.md").exists()


# --- accelerate launch ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script, flags, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2`: on a machine without GPUs, --multi_gpu is what makes
    accelerate start two processes (through torch.distributed.run, as on GPUs); without it, one. HF_HOME: no user
    accelerate config is read."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / f"{script}.py"), *flags]
    return subprocess.run(cmd, env=dict(ENV, HF_HOME=str(tmp_path / "hf_home")), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def test_accelerate_launch_two_processes_match_one(finished_run, tmp_path):
    """The finished run (one process) again under `accelerate launch` with two processes of one image each."""
    # the script sees two processes: a global batch of 3 cannot be split between them (one process takes it)
    refused = accelerate_launch("draft", DRAFT + ["--batch-size", "3", "--output-dir", str(tmp_path / "no")], tmp_path)
    assert refused.returncode != 0 and "--batch-size 3 (the global batch) must divide among 2 processes" in \
        refused.stderr, refused.stderr[-3000:]
    two = tmp_path / "two"
    launched = accelerate_launch("draft", DRAFT + ["--output-dir", str(two)], tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    # the same images, rewards (the per-term ones gathered over both ranks) and LoRA. Each image goes through the same
    # operations (a chunk of one, a process of one) and the gradient mean (g1 + g2) / 2 = g1/2 + g2/2 exactly, so this
    # CPU gives the same bits; the torchrun test's tolerances (test_robustness.py) leave room for a CPU whose matrix
    # products round differently for the text encoder's batch of 2 and of 1
    rows_one, rows_two = read_metrics(finished_run), read_metrics(two)
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("reward_mean", "reward/shapes_alignment", "reward/jpeg_compressibility_diff"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    with safe_open(str(finished_run / common.LORA_FILE), "pt") as a, safe_open(str(two / common.LORA_FILE), "pt") as b:
        for k in a.keys():
            torch.testing.assert_close(b.get_tensor(k), a.get_tensor(k), rtol=0, atol=2e-5, msg=k)
    assert (two / "README.md").is_file() and (two / common.KOHYA_FILE).is_file()  # rank 0 finished the run
