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
