"""The SD3.x room (`StableDiffusion3Pipeline`): three text encoders (CLIP-L, CLIP-G, T5-XXL) and an MMDiT transformer
conditioned on a token sequence and a pooled vector.

common/diffusion.py calls these through `family(pipe)`, beside the other families' rooms with the same names. The
conditioning stays ONE tensor [B, L + 1, D] (what the scripts index, shard and concatenate): the pipeline's
`prompt_embeds` [B, L, D] with the pooled embedding packed into one extra last row (its first P values, zeros after;
P = `pooled_projection_dim`, 2048 ≤ D = 4096 on SD3), unpacked in `predict`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# T5's tokens: StableDiffusion3Pipeline.encode_prompt's default max_sequence_length (Flow-GRPO's train_sd3.py uses 128)
T5_TOKENS = 256
# common.ATTENTION_TARGETS / FEEDFORWARD_TARGETS (SD1.x names) → the joint-attention blocks' layers: the image stream's
# projections and the text stream's (add_*_proj, to_add_out), Flow-GRPO's target_modules (scripts/train_sd3.py); "attn."
# leaves out SD3.5's second, image-only attention (attn2), as Flow-GRPO does. The feed-forward of both streams.
LORA_TARGETS = {
    "to_q": ("attn.to_q", "attn.add_q_proj"),
    "to_k": ("attn.to_k", "attn.add_k_proj"),
    "to_v": ("attn.to_v", "attn.add_v_proj"),
    "to_out.0": ("attn.to_out.0", "attn.to_add_out"),
    "ff.net.0.proj": ("ff.net.0.proj", "ff_context.net.0.proj"),
    "ff.net.2": ("ff.net.2", "ff_context.net.2"),
}


def denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer


def lora_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The transformer's layers for the scripts' LoRA targets (LORA_TARGETS); other names pass unchanged."""
    return tuple(name for target in targets for name in LORA_TARGETS.get(target, (target,)))


def _clip(tokenizer, text_encoder, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # the penultimate layer's states; the projected pooled output


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """As `StableDiffusion3Pipeline.encode_prompt` (no clip_skip): CLIP-L's and CLIP-G's penultimate states side by
    side, zero-padded to T5's width D, then T5's T5_TOKENS states along the sequence (zeros where the pipeline has no
    T5, as the pipeline does), [B, 77 + T5_TOKENS, D]; plus the pooled row, [B, 1, D]."""
    states_l, pooled_l = _clip(pipe.tokenizer, pipe.text_encoder, prompts)
    states_g, pooled_g = _clip(pipe.tokenizer_2, pipe.text_encoder_2, prompts)
    dtype, width = pipe.text_encoder.dtype, pipe.transformer.config.joint_attention_dim
    if pipe.text_encoder_3 is None:
        t5 = torch.zeros(len(prompts), T5_TOKENS, width, device=states_l.device, dtype=dtype)
    else:
        ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5 = pipe.text_encoder_3(ids.to(pipe.text_encoder_3.device))[0]
    clip = torch.cat([states_l, states_g], dim=-1).to(dtype)
    pooled = torch.cat([pooled_l, pooled_g], dim=-1)
    return torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(dtype),
                      F.pad(pooled, (0, t5.shape[-1] - pooled.shape[-1]))[:, None].to(dtype)], dim=1)


def predict(pipe, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for latents x [N, C, H, W], timesteps t [N] (σ·1000) and conditioning emb [N, L+1, D]
    (`encode_prompts`: the last row carries the pooled embedding)."""
    net = pipe.transformer
    pooled = emb[:, -1, : net.config.pooled_projection_dim]
    return net(hidden_states=x, timestep=t, encoder_hidden_states=emb[:, :-1], pooled_projections=pooled).sample
