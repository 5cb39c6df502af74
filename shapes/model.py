"""`tiny-shapes`: the `tiny` Stable-Diffusion layout, pretrained on the shapes data (weights in `shapes/weights/`).

Same diffusers/transformers classes as SD1.4 and as `common.models.tiny_components`: UNet2DConditionModel with
`tiny`'s layout (so a sampling step costs the same), a smaller AutoencoderKL (32×32×3 images ↔ 16×16×4
latents), a 2-layer CLIPTextModel with the real CLIP tokenizer, DDIM with SD1.4's schedule. The configs are
code; the weights are stored in float16 (they are small) and loaded as float32. The VAE's `scaling_factor`
is measured on the data by `shapes.pretrain` (latents of about unit std) and read from `pretrain.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights"
FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}
REPORT = WEIGHTS / "pretrain.json"
REGENERATE = "python -m shapes.pretrain"


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def save(module: torch.nn.Module, name: str, directory: Path = WEIGHTS) -> Path:
    """Write a component's weights in float16 to `directory / FILES[name]`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILES[name]
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}, path)
    return path


def load_weights(module: torch.nn.Module, name: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = WEIGHTS / FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"tiny-shapes weights {path} are missing; regenerate them with `{REGENERATE}`")
    state = {k: v.float() for k, v in load_file(path).items()}
    module.load_state_dict(state)
    return module


def components(dtype: torch.dtype = torch.float32) -> dict:
    """The pretrained `tiny-shapes` components, as `StableDiffusionPipeline(**components, ...)` takes them."""
    from diffusers import DDIMScheduler

    from common.models import SD14_SCHEDULER, clip_tokenizer

    if not REPORT.is_file():
        raise FileNotFoundError(f"{REPORT} is missing; regenerate the tiny-shapes weights with `{REGENERATE}`")
    scaling_factor = json.loads(REPORT.read_text())["vae"]["scaling_factor"]
    unet = load_weights(build_unet(), "unet")
    vae = load_weights(build_vae(scaling_factor), "vae")
    text_encoder = load_weights(build_text_encoder(), "text_encoder")
    if dtype != torch.float32:
        unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(**SD14_SCHEDULER),
    )
