"""The SD1.x / SD2.x room: one CLIP text encoder, a UNet conditioned by cross-attention only (`StableDiffusionPipeline`).

common/diffusion.py calls these through `family(pipe)`, beside the other families' rooms with the same names."""

from __future__ import annotations

import torch


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet


def lora_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The scripts' LoRA targets (common.ATTENTION_TARGETS, FEEDFORWARD_TARGETS) are the UNet's own layer names."""
    return targets


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """CLIP's last hidden state over 77 tokens, [B, 77, D], as `StableDiffusionPipeline.encode_prompt` computes it."""
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids.to(pipe.text_encoder.device))[0]


def predict(pipe, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The UNet's output (ε or v) for latents x [N, C, H, W], timesteps t [N] and conditioning emb [N, 77, D]."""
    return pipe.unet(x, t, encoder_hidden_states=emb).sample


# StableDiffusionPipeline decodes in the VAE's own dtype, whatever its config's `force_upcast` (which diffusers'
# AutoencoderKL sets by default, SD1.4's VAE included): common/diffusion.py's decode does the same for this family
HONOURS_FORCE_UPCAST = False
# `from_pretrained` arguments: no safety checker (the rewards judge the images; it would blank some of them)
PRETRAINED_KWARGS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def kohya_modules(pipe, modules) -> dict[str, str]:
    """kohya's sd-scripts name an SD1.x/SD2.x LoRA's modules as diffusers does."""
    return {m: m for m in modules}


def kohya_metadata(pipe) -> dict[str, str]:
    """sd-scripts' values for SD1/SD2, told apart by the text embedding's width (1024 vs 768); the CPU test models are
    SD1.4-shaped and called SD1."""
    v2 = pipe.unet.config.cross_attention_dim == 1024
    v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
    architecture = "stable-diffusion-v1"
    if v2:
        architecture = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    return {
        "ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else ""),
        "ss_v2": str(v2),
        "modelspec.architecture": architecture + "/lora",  # sd-scripts' spelling (the spec's examples use "-lora")
        "modelspec.implementation": "diffusers",  # sd-scripts' value for an SD1/SD2 LoRA: diffusers' module names
    }
