"""LoRA: zero-init, save -> diffusers load_lora_weights round trip, scale; sampler parity with the pipeline."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

import common
from common.models import tiny_components
from conftest import assert_normwise_close, rounding_tolerance, float64_scheduler, randomize_lora, roundings


def plain_pipeline(seed=0):
    """A StableDiffusionPipeline built by diffusers itself from the tiny components, without any adapter."""
    pipe = StableDiffusionPipeline(**tiny_components(seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_out(pipe, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([801, 21]), encoder_hidden_states=emb, **kwargs).sample


def test_only_lora_trains_and_is_float32(tiny_pipe):
    params = common.lora_parameters(tiny_pipe)
    assert params and all(p.dtype == torch.float32 for p in params)
    names = [n for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad]
    assert all("lora" in n for n in names)
    assert not any(p.requires_grad for p in tiny_pipe.vae.parameters())
    assert not any(p.requires_grad for p in tiny_pipe.text_encoder.parameters())
    assert any("to_q" in n for n in names) and not any("ff.net" in n for n in names)
    ff = common.load_pipeline("tiny", lora_rank=2, lora_targets=common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS)
    assert any("ff.net.2" in n for n, p in ff.unet.named_parameters() if p.requires_grad)


def test_zero_init_leaves_unet_unchanged(tiny_pipe):
    base = plain_pipeline()
    torch.testing.assert_close(unet_out(tiny_pipe), unet_out(base), rtol=0, atol=0)
    randomize_lora(tiny_pipe)
    assert (unet_out(tiny_pipe) - unet_out(base)).abs().max() > 1e-3  # the adapter is live


def test_save_then_diffusers_load_lora_weights(tiny_pipe, tmp_path):
    randomize_lora(tiny_pipe)
    path = common.save_lora(tiny_pipe, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    fresh = plain_pipeline()
    base = unet_out(fresh)
    fresh.load_lora_weights(str(tmp_path))
    # Exact: diffusers' loader and our adapter build the same peft LoRA layers, which compute the same operations in
    # the same layout; at scale 0 each adds 0·(B·A·x) to the base layer's output, which leaves it unchanged.
    torch.testing.assert_close(unet_out(fresh), unet_out(tiny_pipe), rtol=0, atol=0)
    # scale 0 is the base model, both through diffusers' cross_attention_kwargs and our set_lora_scale
    torch.testing.assert_close(unet_out(fresh, cross_attention_kwargs={"scale": 0.0}), base, rtol=0, atol=0)
    common.set_lora_scale(tiny_pipe, 0.0)
    torch.testing.assert_close(unet_out(tiny_pipe), base, rtol=0, atol=0)
    common.set_lora_scale(tiny_pipe, 0.5)
    half = unet_out(tiny_pipe)
    torch.testing.assert_close(half, unet_out(fresh, cross_attention_kwargs={"scale": 0.5}), rtol=0, atol=0)


def test_load_lora_into_trainable_adapter(tiny_pipe, tmp_path):
    randomize_lora(tiny_pipe)
    common.save_lora(tiny_pipe, tmp_path)
    other = common.load_pipeline("tiny", lora_rank=4)
    common.load_lora(other, tmp_path)
    torch.testing.assert_close(unet_out(other), unet_out(tiny_pipe), rtol=0, atol=0)
    assert all(p.requires_grad for p in common.lora_parameters(other))
    with pytest.raises(ValueError, match="does not match"):
        common.load_lora(common.load_pipeline("tiny", lora_rank=8), tmp_path)
    with pytest.raises(FileNotFoundError):
        common.load_lora(other, tmp_path / "nowhere")


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_sampler_reproduces_stable_diffusion_pipeline(tiny_pipe, tmp_path, guidance):
    randomize_lora(tiny_pipe)
    common.save_lora(tiny_pipe, tmp_path)
    reference = plain_pipeline()
    reference.load_lora_weights(str(tmp_path))
    reference.to(torch.float64)  # diffusers' pipeline in float64: ours, in float32, within float32's rounding of it
    reference.scheduler = float64_scheduler(reference.scheduler)
    prompts = ["a cat riding a bike", "an ant playing chess"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = reference(prompts, latents=latents.double(), num_inference_steps=12, guidance_scale=guidance, eta=0.0,
                         output_type="pt").images

    cond, uncond = common.encode_prompts(tiny_pipe, prompts), common.encode_prompts(tiny_pipe, [""])
    traj = common.sample_trajectory(tiny_pipe, cond, uncond, 12, guidance, eta=0.0, latents=latents)
    ours = common.decode(tiny_pipe, traj.latents[:, -1])
    assert traj.log_probs.numel() == 0  # η = 0 has no log-prob
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    assert (ours - 0.5).abs().max() > 0.05  # not a blank image
    assert expected.dtype == torch.float64
    # conftest's float32 bound: the text encoder, 12 UNet calls (guidance's gain 2w − 1 on each) and the decoder
    n = roundings(tiny_pipe.text_encoder) + 12 * roundings(tiny_pipe.unet) + roundings(tiny_pipe.vae.decoder)
    assert_normwise_close(ours, expected, rounding_tolerance(n, gain=2 * guidance - 1))


def test_tokenizer_is_clip_bpe():
    import open_clip

    tok = common.clip_tokenizer()
    prompts = ["a cat riding a bike", "An Ant, playing CHESS!!", "a photo of a 🐈 in 2024's café", "hedgehog " * 60]
    ref = open_clip.tokenize(prompts)  # OpenAI CLIP's own tokenizer, context length 77
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == ref.shape == (4, 77)
    for ours, theirs in zip(ids, ref):
        n = int((theirs != 0).sum())  # open_clip pads with 0, SD's tokenizer with <|endoftext|>
        assert ours[:n].tolist() == theirs[:n].tolist()
        assert (ours[n:] == 49407).all()
