"""A local path given for a reward's weights that exists but does not load ends in one line naming the reward and
the path (a `RewardError`), never a traceback (issue 21 item 7): every path option of every reward, through
`rewards.load`, with files and folders of the wrong kind; and once through a script's real command line.

Each bad path is given with valid local copies of whatever the reward reads before it, so the bad one is reached."""

import json
import os
import subprocess
import sys

import pytest
import torch

import rewards
from conftest import ROOT

# (reward, option, kind) for every path option; `test_every_path_option_is_covered` keeps the list complete
PATH_OPTIONS = [
    ("aesthetic", "head", "file"), ("aesthetic", "clip", "folder"),
    ("hpsv2", "checkpoint", "file"), ("hpsv21", "checkpoint", "file"),
    ("pickscore", "processor", "folder"), ("pickscore", "model", "folder"),
    ("owlvit_detect", "model", "folder"), ("owlvit_remove", "model", "folder"),
    ("owlvit_count", "model", "folder"), ("owlvit_count_exact", "model", "folder"),
    ("resnet50_target", "model", "folder"),
    ("imagereward", "med_config", "file"), ("imagereward", "tokenizer", "folder"),
    ("imagereward", "checkpoint", "file"),
    ("llava_bertscore", "model", "folder"), ("llava_bertscore", "bertscore_model", "folder"),
]
# what each reward reads before the option: valid local copies (fixture keys)
BEFORE = {("aesthetic", "clip"): {"head": "head"}, ("pickscore", "model"): {"processor": "clip_tokenizer"},
          ("imagereward", "tokenizer"): {"med_config": "med_config"},
          ("imagereward", "checkpoint"): {"med_config": "med_config", "tokenizer": "bert_tokenizer"},
          ("llava_bertscore", "bertscore_model"): {"model": "llava_processor"}}
BAD = {  # what the issue tried (/etc/passwd, /proc/self/environ, /etc, /tmp) and more, made portable
    "file": ["folder", "text", "binary", "empty", "other_tensors", "list"],
    "folder": ["text", "empty_folder", "broken_config", "config_only"],
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Bad and valid local copies, small ones built here."""
    import copy

    from transformers import BertTokenizer, CLIPImageProcessor, LlavaProcessor

    from common.models import clip_tokenizer
    from rewards.aesthetic import AestheticMLP

    d = tmp_path_factory.mktemp("reward_paths")
    p = {"folder": d / "empty_folder_for_a_file", "empty_folder": d / "empty_folder", "text": d / "passwd",
         "binary": d / "environ", "empty": d / "empty.pt", "other_tensors": d / "other.pt", "list": d / "list.pt",
         "broken_config": d / "broken_config", "config_only": d / "config_only"}
    p["folder"].mkdir()
    p["empty_folder"].mkdir()
    p["text"].write_text("root:x:0:0:root:/root:/bin/bash\n")
    p["binary"].write_bytes(b"PATH=/usr/bin\0HOME=/root\0\xff\xfe")
    p["empty"].write_bytes(b"")
    torch.save({"weight": torch.zeros(2)}, p["other_tensors"])
    torch.save([1, 2], p["list"])
    p["broken_config"].mkdir()
    (p["broken_config"] / "config.json").write_text("{not json")
    p["config_only"].mkdir()  # a copy without its weights and tokenizer files: transformers builds an empty tokenizer
    (p["config_only"] / "config.json").write_text(json.dumps({"model_type": "bert"}))

    p["head"] = d / "head.pth"
    torch.save(AestheticMLP().state_dict(), p["head"])
    p["clip_tokenizer"] = d / "clip_tokenizer"
    clip_tokenizer().save_pretrained(p["clip_tokenizer"])
    p["med_config"] = d / "med_config.json"
    p["med_config"].write_text(json.dumps(dict(vocab_size=30524, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40)))
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
    p["bert_tokenizer"] = d / "bert_tokenizer"
    BertTokenizer(vocab=str(d / "vocab.txt")).save_pretrained(p["bert_tokenizer"])  # (vocab_file= is ignored)
    tokenizer = copy.deepcopy(clip_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    p["llava_processor"] = d / "llava_processor"
    LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default").save_pretrained(p["llava_processor"])
    return {key: str(path) for key, path in p.items()}


def test_every_path_option_is_covered():
    assert {(name, key) for name, key, _ in PATH_OPTIONS} == {
        (name, key) for name, entry in rewards._REGISTRY.items() for key in entry.paths}


CASES = [(name, key, bad) for name, key, kind in PATH_OPTIONS for bad in BAD[kind]]


@pytest.mark.parametrize("name, key, bad", CASES, ids=[f"{n}[{k}={b}]" for n, k, b in CASES])
def test_a_path_that_does_not_load_is_one_line_naming_it(name, key, bad, paths, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = {option: paths[copy] for option, copy in BEFORE.get((name, key), {}).items()} | {key: paths[bad]}
    with pytest.raises(rewards.RewardError) as info:
        rewards.load(f"{name}[{';'.join(f'{k}={v}' for k, v in options.items())}]")
    message = str(info.value)
    assert message.startswith(f"reward '{name}': {paths[bad]!r} is not a "), message
    assert "\n" not in message and "weights_only=False" not in message, message


def test_the_valid_copies_load_up_to_the_option(paths, monkeypatch):
    """The copies given before each bad path are themselves accepted: offline, each load gets as far as the option's
    default download, which is what fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for (name, key), before in BEFORE.items():
        options = ";".join(f"{option}={paths[copy]}" for option, copy in before.items())
        with pytest.raises(rewards.WeightsNotFound):
            rewards.load(f"{name}[{options}]")


def test_a_bad_reward_path_on_the_command_line_is_one_line_and_exit_2(paths, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ddpo_sf.py"), "--model", "tiny", "--reward",
         f"aesthetic[head={paths['head']};clip={paths['empty_folder']}]", "--steps", "1", "--batch-size", "2",
         "--sample-batch-size", "2", "--train-batch-size", "2", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddpo_sf.py: error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert f"reward 'aesthetic': {paths['empty_folder']!r} is not a valid local copy" in errors[0], errors[0]
    assert not out.exists()  # the reward loads before anything is written
