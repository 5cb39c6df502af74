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

from common.models import pipeline_components, tiny_text_encoder, tiny_unet, tiny_vae

WEIGHTS = Path(__file__).parent / "weights"
FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}
REPORT = WEIGHTS / "pretrain.json"
REGENERATE = "python -m shapes.pretrain"


def build_vae(scaling_factor: float = 1.0):
    """`tiny`'s VAE layout at half the channels: the shapes need less capacity."""
    return tiny_vae(channels=(16, 32), norm_groups=8, scaling_factor=scaling_factor)


def save(module: torch.nn.Module, name: str, directory: Path = WEIGHTS) -> Path:
    """Write a component's weights in float16 to `directory / FILES[name]`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILES[name]
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}, path)
    return path


def load_weights(module: torch.nn.Module, name: str, directory: Path = WEIGHTS) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = Path(directory) / FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"tiny-shapes weights {path} are missing; regenerate them with `{REGENERATE}`")
    state = {k: v.float() for k, v in load_file(path).items()}
    module.load_state_dict(state)
    return module


def components(dtype: torch.dtype = torch.float32, directory: Path = WEIGHTS) -> dict:
    """The pretrained `tiny-shapes` components, as `StableDiffusionPipeline(**components, ...)` takes them
    (`directory`: the committed weights, or another `shapes.pretrain --output-dir`)."""
    report = Path(directory) / REPORT.name
    if not report.is_file():
        raise FileNotFoundError(f"{report} is missing; regenerate the tiny-shapes weights with `{REGENERATE}`")
    scaling_factor = json.loads(report.read_text())["vae"]["scaling_factor"]
    return pipeline_components(
        load_weights(tiny_unet(), "unet", directory),
        load_weights(build_vae(scaling_factor), "vae", directory),
        load_weights(tiny_text_encoder(), "text_encoder", directory),
        dtype,
    )
