"""The SDXL room: two CLIP text encoders, a UNet conditioned by cross-attention and by "added conditions" (the pooled
text embedding and the size/crop `time_ids`), `StableDiffusionXLPipeline`.

common/diffusion.py calls these through `family(pipe)`, beside the other families' rooms with the same names. The
scripts hold the conditioning as one tensor [B, L, D]; SDXL's has two parts, so it is packed into one:

    rows 0 … 76: both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide in SDXL-base);
    row  77    : the pooled embedding of text_encoder_2 (1280 values), then zeros up to the width.

`predict` unpacks it, so the scripts index, shard and concatenate it unchanged. The time ids are not packed: they
are the pipeline's defaults, which depend only on the latents' size (below)."""

from __future__ import annotations

import torch

# `StableDiffusionXLPipeline` decodes with a float32 VAE when the weights are float16 and the VAE's config says
# `force_upcast` (SDXL's VAE overflows in fp16); `StableDiffusionPipeline` does not (common/diffusion.py, decode)
HONOURS_FORCE_UPCAST = True
# `from_pretrained` arguments: no invisible watermark (our decode never applies it, so the pipeline need not load it)
PRETRAINED_KWARGS = dict(add_watermarker=False)
# the number of time ids SDXL-base's UNet embeds: (original H, W, crop top, left, target H, W)
TIME_IDS = 6


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet


def lora_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """SDXL's UNet has SD1.x's layer names (common.ATTENTION_TARGETS, FEEDFORWARD_TARGETS)."""
    return targets


def _hidden_and_pooled(tokenizer, text_encoder, prompts: list[str]):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # out[0]: text_embeds (pooled) of a CLIPTextModelWithProjection


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """[B, 78, D] as `StableDiffusionXLPipeline.encode_prompt` computes its parts (clip_skip None): each tokenizer
    pads in its own way (SDXL-base's tokenizer_2 pads with "!", tokenizer with <|endoftext|>), each encoder's
    penultimate hidden state (hidden_states[-2]), concatenated; text_encoder_2's projected pooled output in the last
    row. The empty prompt is all zeros when the pipeline's config says `force_zeros_for_empty_prompt` (SDXL-base
    does): that is what the pipeline uses as the unconditional branch when no negative prompt is given, which is the
    scripts' case (`encode_prompts(pipe, [""])`). An empty prompt used as a condition is zeros too."""
    h1, _ = _hidden_and_pooled(pipe.tokenizer, pipe.text_encoder, prompts)
    h2, pooled = _hidden_and_pooled(pipe.tokenizer_2, pipe.text_encoder_2, prompts)
    dtype = pipe.text_encoder_2.dtype  # the pipeline casts its embeddings to text_encoder_2's dtype
    emb = torch.cat([h1, h2], dim=-1).to(dtype)
    width, p = emb.shape[-1], pooled.shape[-1]
    if p > width:
        raise ValueError(f"the pooled embedding ({p}) is wider than the conditioning ({width}): it cannot be packed")
    row = torch.zeros(emb.shape[0], 1, width, dtype=dtype, device=emb.device)
    row[:, 0, :p] = pooled.to(dtype)
    emb = torch.cat([emb, row], dim=1)
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        empty = torch.tensor([p == "" for p in prompts], device=emb.device)
        emb = torch.where(empty.view(-1, 1, 1), torch.zeros_like(emb), emb)
    return emb


def pooled_width(pipe) -> int:
    """The pooled embedding's width, as the pipeline takes it (text_encoder_2's projection_dim), checked against what
    the UNet's added-condition embedding expects, as `StableDiffusionXLPipeline._get_add_time_ids` does."""
    from .errors import UserError

    unet = pipe.unet
    p = pipe.text_encoder_2.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if unet.config.addition_time_embed_dim * TIME_IDS + p != expected:
        raise UserError(f"this SDXL UNet expects an added-condition vector of {expected} values, not the "
                        f"{TIME_IDS} time ids × {unet.config.addition_time_embed_dim} + the pooled {p} of "
                        "StableDiffusionXLPipeline (a refiner, whose time ids carry an aesthetic score, is not "
                        "supported)")
    return p


def time_ids(pipe, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, 6]: (H, W, 0, 0, H, W) in pixels, the pipeline's defaults for an image of x's size (original size = target
    size = the image's, crop at the top-left corner), for both branches of guidance (no negative_original_size)."""
    h, w = (s * pipe.vae_scale_factor for s in x.shape[-2:])
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=x.device).expand(x.shape[0], -1)


def predict(pipe, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The UNet's output (ε or v) for latents x [N, C, H, W], timesteps t [N] and packed conditioning emb [N, 78, D]."""
    p = pooled_width(pipe)
    added = {"text_embeds": emb[:, -1, :p], "time_ids": time_ids(pipe, x, emb.dtype)}
    return pipe.unet(x, t, encoder_hidden_states=emb[:, :-1], added_cond_kwargs=added).sample


# --- the kohya key format (lora_tools.py export, common/publish.py) ----------------------------------------------------
# kohya's sd-scripts, AUTOMATIC1111 and ComfyUI name an SDXL LoRA's modules after Stability AI's original UNet
# (generative-models, "SGM": input_blocks / middle_block / output_blocks), not diffusers' down_blocks / up_blocks.


def _sgm_prefixes(unet) -> dict[str, str]:
    """diffusers' attention-block prefixes → the SGM ones, from the UNet's block layout: SGM numbers the input blocks
    from 1 (0 is conv_in), one per resnet (the attention after it is its sub-module 1) and one per downsampler; the
    output blocks from 0, one per up-block resnet; the mid block's attention is middle_block.1."""
    cfg = unet.config
    n_blocks = len(cfg.down_block_types)
    layers = cfg.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * n_blocks
    prefixes, n = {"mid_block.attentions.0.": "middle_block.1."}, 1
    for i in range(n_blocks):
        for j in range(layers[i]):
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
            n += 1
        n += i < n_blocks - 1  # the downsampler
    n = 0
    for i, count in enumerate(reversed(layers)):
        for j in range(count + 1):
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
            n += 1
    return prefixes


def kohya_modules(pipe, modules) -> dict[str, str]:
    """{diffusers module name: the SGM module name kohya's keys are made of}."""
    prefixes = _sgm_prefixes(pipe.unet)
    names = {}
    for m in modules:
        prefix = next((p for p in prefixes if m.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{m} is not in an attention block of the SDXL UNet: no kohya name for it")
        names[m] = prefixes[prefix] + m[len(prefix):]
    return names


def kohya_metadata(pipe) -> dict[str, str]:
    """kohya sd-scripts' values for an SDXL-base LoRA (sdxl_train_network.py, library/sai_model_spec.py)."""
    return {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",  # SGM module names
    }
