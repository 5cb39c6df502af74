"""Loading: a diffusers folder on disk goes through the real from_pretrained path; offline errors; prompts."""

import time

import pytest
import torch

import common
from conftest import randomize_lora


def test_local_folder_loads_like_tiny(tmp_path):
    """A diffusers-format folder (here: the tiny model saved with save_pretrained) loads through the same
    code path as the SD1.4 hub id, with DDIM configured as SD1.4's and a fresh zero-initialised LoRA."""
    tiny = common.load_pipeline("tiny", lora_rank=0)
    tiny.save_pretrained(tmp_path / "sd")
    pipe = common.load_pipeline(str(tmp_path / "sd"), lora_rank=4)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for key, value in common.models.SD14_SCHEDULER.items():
        assert pipe.scheduler.config[key] == value, key
    assert common.lora_parameters(pipe) and not common.lora_parameters(tiny)
    images = [common.sample_images(p, ["a cat", "a dog"], 0, 4, 7.5) for p in (tiny, pipe)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    randomize_lora(pipe)
    assert not torch.equal(common.sample_images(pipe, ["a cat", "a dog"], 0, 4, 7.5), images[0])


def test_offline_hub_id_error_names_the_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.time()
    with pytest.raises(common.UserError) as info:
        common.load_pipeline("CompVis/stable-diffusion-v1-4", lora_rank=4)
    message = str(info.value)
    assert "hf download CompVis/stable-diffusion-v1-4" in message and "--model" in message
    assert time.time() - start < 30


def test_unknown_model_name_is_refused_before_any_download():
    with pytest.raises(common.UserError, match="unknown model 'tny'"):
        common.load_pipeline("tny")


def test_local_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="not a diffusers Stable Diffusion folder"):
        common.load_pipeline(str(tmp_path / "empty"))


def test_precision_modes_on_the_cpu():
    """fp16 and bf16 run on the CPU (how the tests exercise the GPU's precision); auto is float32 there."""
    if not torch.cuda.is_available():
        assert common.device_and_dtype("auto") == (torch.device("cpu"), torch.float32)
        assert common.device_and_dtype("fp16") == (torch.device("cpu"), torch.float16)
        assert common.device_and_dtype("bf16") == (torch.device("cpu"), torch.bfloat16)
    pipe = common.load_pipeline("tiny", dtype=torch.bfloat16)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in common.lora_parameters(pipe))  # LoRA stays float32


def test_tiny_is_deterministic_and_sd_shaped():
    a, b = common.load_pipeline("tiny"), common.load_pipeline("tiny")
    for (n, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), n
    assert a.unet.config.sample_size == 16 and a.unet.config.in_channels == 4
    assert a.vae_scale_factor == 2 and a.vae.config.scaling_factor == 0.18215
    assert a.text_encoder.config.num_hidden_layers == 2
    assert any("attn2" in n for n, _ in a.unet.named_modules())  # cross-attention


def test_prompt_sets(tmp_path):
    animals = common.load_prompts("simple_animals")
    assert len(animals) == 45 and animals[0] == "cat"
    assert len(common.load_prompts("imagenet_animals")) == 398
    pairs = common.load_prompts("animal_activities")
    assert len(pairs) == 135 and "a cat riding a bike" in pairs and "an ant playing chess" in pairs
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  a blue ball  \n")
    assert common.load_prompts("ignored", prompt_file=str(f)) == ["a red cube", "a blue ball"]
    f.write_text("\n \n")
    with pytest.raises(common.UserError, match="no prompts"):
        common.load_prompts(prompt_file=str(f))
    with pytest.raises(common.UserError, match="no such file"):
        common.load_prompts(prompt_file=str(tmp_path / "missing.txt"))
    with pytest.raises(common.UserError, match="unknown prompt set"):
        common.load_prompts("no_such_set")
    f.write_bytes("a caf\xe9\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(common.UserError, match="not UTF-8 text"):
        common.load_prompts(prompt_file=str(f))
    f.write_bytes(b"PNG\x00\x01\n")
    with pytest.raises(common.UserError, match="binary file"):
        common.load_prompts(prompt_file=str(f))


def test_prompt_file_with_a_byte_order_mark_and_unusual_separators(tmp_path):
    f = tmp_path / "p.txt"
    # a BOM (Notepad), CRLF, a lone CR, and inside lines a form feed, U+2028, U+0085 and U+001E: none of them ends a
    # line for `wc -l` or an editor, all of them did for str.splitlines
    text = "a cat\r\na dog\x0cwith a form feed\r\none\u2028line\nnext\x85line\x1eend\nlast\rmac\n"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert common.load_prompts(prompt_file=str(f)) == [
        "a cat", "a dog\x0cwith a form feed", "one\u2028line", "next\x85line\x1eend", "last", "mac"]
    f.write_bytes(b"\xef\xbb\xbfab\xff\n")
    with pytest.raises(common.UserError, match=r"not UTF-8 text \(byte 5\)"):  # counted from the file's start
        common.load_prompts(prompt_file=str(f))


def test_a_prompt_over_77_tokens_is_truncated_with_one_warning_per_pipeline(tiny_pipe, capsys):
    from open_clip.tokenizer import SimpleTokenizer

    assert len(SimpleTokenizer().encode("cat " * 75)) == 75  # CLIP's BPE, independently: one token per "cat"
    fits, long = "cat " * 75, "cat " * 76  # 75 + start and end = 77 tokens; 78
    common.encode_prompts(tiny_pipe, [fits, "a dog", ""])
    assert "warning" not in capsys.readouterr().err
    embeddings = [common.encode_prompts(tiny_pipe, ["a dog", long]), common.encode_prompts(tiny_pipe, ["x " * 500])]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "longer than the 77 tokens" in err and "cat cat" in err, err
    assert len(err.strip().splitlines()) == 1
    # still truncated exactly as before: the 76-token prompt reads as its first 75 tokens
    assert torch.equal(embeddings[0][1], common.encode_prompts(tiny_pipe, ["a dog", fits])[1])
    # another pipeline (another run in this process) warns again, once
    other = common.load_pipeline("tiny", lora_rank=0)
    common.encode_prompts(other, [long])
    common.encode_prompts(other, [long])
    assert capsys.readouterr().err.count("warning") == 1


def test_a_long_prompt_warns_once_in_a_whole_run(tmp_path, capsys):
    import draft

    (tmp_path / "prompts.txt").write_text("a dog\n" + "a very long prompt " * 30 + "\n")
    draft.main(draft.Args(model="tiny", reward="jpeg_compressibility_diff", prompt_file=str(tmp_path / "prompts.txt"),
                          output_dir=str(tmp_path / "run"), steps=2, batch_size=2, num_inference_steps=2, k=1,
                          num_sample_images=2, sample_seeds=1, sample_every=1, save_every=0))
    err = capsys.readouterr().err  # the grid (both prompts) at steps 0, 1 and 2, and the training batches
    assert err.count("longer than the 77 tokens") == 1, err


def test_run_dir_refuses_a_previous_run_but_not_a_failed_start(tmp_path):
    run = tmp_path / "run"
    assert common.make_run_dir(str(run), "draft", "aesthetic", 0) == run
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # a run that stopped before its first update (e.g. weights missing)
    assert common.make_run_dir(str(run), "draft", "aesthetic", 0) == run
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(common.UserError, match="already holds a run"):
        common.make_run_dir(str(run), "draft", "aesthetic", 0)
    default = common.make_run_dir(None, "draft", "hpsv2:1,aesthetic:0.1", 3)
    assert default.parent.name == "runs" and default.name.startswith("draft__hpsv2-1+aesthetic-0.1__3__")
    served = common.make_run_dir(None, "ddpo_sf", "http://127.0.0.1:8085,owlvit_remove[queries=a person|a face]", 0)
    assert served.parent.name == "runs" and "/" not in served.name.split("__")[1]  # one folder, not nested
