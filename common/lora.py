"""LoRA save/load in diffusers' format (`pytorch_lora_weights.safetensors`) and LoRA scaling."""

from __future__ import annotations

from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(pipe, directory: str | Path) -> Path:
    """Write the UNet's LoRA so that `StableDiffusionPipeline.load_lora_weights(directory)` loads it as is."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=state, safe_serialization=True)
    return Path(directory) / LORA_FILE


def load_lora(pipe, directory: str | Path) -> None:
    """Load a saved LoRA into the pipeline's trainable adapter (to continue training from it).

    For inference, diffusers' own `pipe.load_lora_weights(directory)` on a plain pipeline does the same job.
    Raises if the file is missing or does not match the adapter (rank or target modules differ).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA at {path}")
    state = {k.removeprefix("unet."): v for k, v in load_file(path).items() if k.startswith("unet.")}
    state = convert_unet_state_dict_to_peft(state)
    own = {k.replace(".default", ""): p for k, p in pipe.unet.named_parameters() if p.requires_grad}
    mismatched = sorted(set(state) ^ set(own)) + [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(
            f"{path} does not match this model's LoRA adapter (rank or target modules differ): "
            f"{len(state)} tensors in the file, {len(own)} in the adapter; first mismatches: {mismatched[:3]}"
        )
    set_peft_model_state_dict(pipe.unet, state)


@torch.no_grad()
def set_lora_scale(pipe, scale: float) -> None:
    """Interpolate toward the base model: 0 is the base model, 1 the trained LoRA."""
    pipe.unet.set_adapters(["default"], weights=[scale])
