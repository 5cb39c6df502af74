"""LoRA save/load in diffusers' format (`pytorch_lora_weights.safetensors`), its copy in kohya's format for the web
UIs, and LoRA scaling."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from .errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
# The run's LoRA in kohya's key format (AUTOMATIC1111, ComfyUI, Forge, InvokeAI). Its name must not end in LORA_FILE:
# diffusers' `load_lora_weights(folder)` picks the one file that does, here and on the Hub.
KOHYA_FILE = "lora_kohya.safetensors"


def denoiser_name(pipe) -> str:
    """The pipeline's component the LoRA adapts ("unet", "transformer"): its keys' prefix in diffusers' LoRA files."""
    from .diffusion import denoiser

    net = denoiser(pipe)
    return next(name for name, module in pipe.components.items() if module is net)


def has_kohya_format(pipe) -> bool:
    """Whether this family's LoRA has a kohya format (its room names the modules: SD1/SD2, SDXL; not SD3's MMDiT,
    which diffusers has no kohya converter for and ComfyUI reads in diffusers' format)."""
    from .diffusion import family

    return hasattr(family(pipe), "kohya_modules")


def _to_file_format(prefix: str, state: dict) -> dict:
    # diffusers' UNet LoRA files name the factors lora.down/lora.up; its transformer files keep peft's lora_A/lora_B
    # (diffusers' train_dreambooth_lora_sd3.py saves get_peft_model_state_dict as is)
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(state) if prefix == "unet" else state


def save_lora(pipe, directory: str | Path, weight_name: str = LORA_FILE) -> Path:
    """Write the denoiser's LoRA so that the pipeline class's `load_lora_weights(directory)` loads it as is
    (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`: "unet." keys; `StableDiffusion3Pipeline`: "transformer."
    keys); another `weight_name`: `load_lora_weights(directory, weight_name=...)`."""
    from peft.utils import get_peft_model_state_dict

    from .diffusion import denoiser

    prefix = denoiser_name(pipe)
    state = _to_file_format(prefix, get_peft_model_state_dict(denoiser(pipe)))
    type(pipe).save_lora_weights(directory, **{f"{prefix}_lora_layers": state}, weight_name=weight_name,
                                 safe_serialization=True)
    return Path(directory) / weight_name


def load_lora(pipe, directory: str | Path) -> None:
    """Load a saved LoRA into the pipeline's trainable adapter (to continue training from it).

    For inference, diffusers' own `pipe.load_lora_weights(directory)` on a plain pipeline does the same job.
    Raises if the file is missing or does not match the adapter (rank or target modules differ).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .diffusion import denoiser

    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA at {path}")
    prefix, net = denoiser_name(pipe) + ".", denoiser(pipe)
    state = {k.removeprefix(prefix): v for k, v in load_file(path).items() if k.startswith(prefix)}
    state = convert_unet_state_dict_to_peft(state)
    own = {k.replace(".default", ""): p for k, p in net.named_parameters() if p.requires_grad}
    mismatched = sorted(set(state) ^ set(own)) + [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(
            f"{path} does not match this model's LoRA adapter (rank or target modules differ): "
            f"{len(state)} tensors in the file, {len(own)} in the adapter; first mismatches: {mismatched[:3]}"
        )
    set_peft_model_state_dict(net, state)


@torch.no_grad()
def set_lora_scale(pipe, scale: float) -> None:
    """Interpolate toward the base model: 0 is the base model, 1 the trained LoRA."""
    from .diffusion import denoiser

    denoiser(pipe).set_adapters(["default"], weights=[scale])


# --- LoRA files as plain factors, for tools that edit a LoRA outside a model (lora_tools.py) ---------------------
#
# A LoRA is held as {module name: (A [r, in], B [out, r])}, float32, with ΔW = B·A: the alpha/rank scale a file
# may carry is folded into B on reading, and a written file carries alpha = rank for every module (scale 1).


def lora_file(path: str | Path) -> Path:
    """The LoRA file of a run directory (its final LoRA), a checkpoint folder (`checkpoints/step_N`), any folder
    holding `pytorch_lora_weights.safetensors`, or that file itself. Anything else raises UserError."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    steps = sorted((path / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
    hint = f"; the run has not finished: its newest checkpoint is {steps[-1]}" if steps else ""
    raise UserError(f"{path} holds no {LORA_FILE} (expected a run directory, a checkpoints/step_N folder or a LoRA "
                    f"folder){hint}")


def _matches(pattern: str, module: str) -> bool:
    # peft's rule for rank_pattern / alpha_pattern keys: the key matches the module name or a dotted suffix of it
    return re.fullmatch(rf"(.*\.)?({pattern})", module) is not None


def _prefix(state: dict) -> str:
    # the denoiser of a diffusers LoRA file: "transformer." keys (SD3) if the file has any, else "unet."
    return "transformer." if any(k.startswith("transformer.") for k in state) else "unet."


def lora_prefix(path: str | Path) -> str:
    """"unet" or "transformer": the denoiser a diffusers-format LoRA file (`lora_file(path)`) adapts."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            return _prefix(dict.fromkeys(f.keys()))[:-1]
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e})") from e


def read_lora(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The denoiser LoRA of a diffusers-format file (`lora_file(path)`) as {module: (A, B)} with ΔW = B·A (a UNet's, or
    an SD3 transformer's: `lora_prefix` tells which).

    diffusers writes the factors as `unet.<module>.lora.down.weight` (A) and `.lora.up.weight` (B), or with peft's
    `lora_A` / `lora_B` names; alpha is stored only as peft-config metadata (`lora_adapter_metadata` in the
    safetensors header, diffusers ≥ 0.35), and without it diffusers' loader uses alpha = rank (scale 1), the
    convention of our saves (`common.load_pipeline`). Text-encoder LoRAs, biases, DoRA and kohya files raise
    UserError."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e})") from e
    prefix = _prefix(state)
    foreign = [k for k in state if not k.startswith(prefix)]
    if foreign or not state:
        raise UserError(f"{file} is not a diffusers-format UNet or transformer LoRA (key "
                        f"{foreign[0] if foreign else None!r}); kohya/A1111 files and text-encoder LoRAs are not "
                        "supported here")
    state = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state.items()})
    config = {k.removeprefix(prefix): v for k, v in json.loads(header.get("lora_adapter_metadata", "{}")).items()
              if k.startswith(prefix)}
    unsupported = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        raise UserError(f"{file} holds {unsupported[0]!r}: only plain LoRA factors (lora_A/lora_B weights) are "
                        "supported, not biases or DoRA")
    layers = {}
    for key, down in sorted(state.items()):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = state.get(module + ".lora_B.weight")
        if up is None or up.shape[1] != down.shape[0]:
            raise UserError(f"{file}: the factors of {module} do not pair up (missing B or ranks differ)")
        rank = down.shape[0]
        alpha = next((a for p, a in config.get("alpha_pattern", {}).items() if _matches(p, module)),
                     config.get("lora_alpha", rank))
        layers[module] = (down.float(), up.float() * (alpha / rank))
    return layers


def write_lora(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], directory: str | Path,
               prefix: str = "unet") -> Path:
    """Write {module: (A, B)} in the format of `save_lora`, so that `load_lora_weights(directory)` applies ΔW = B·A
    (`prefix`: the denoiser, "unet" for StableDiffusionPipeline, "transformer" for StableDiffusion3Pipeline).

    Modules may have different ranks (e.g. a mix of a rank-2 and a rank-4 LoRA). diffusers' loader then builds a
    peft config with the most common rank and a rank pattern for the rest; the alpha it assumes for those has
    varied between versions, so the file states it: peft-config metadata with alpha = rank for every module."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    state, ranks = {}, {}
    for module, (down, up) in layers.items():
        state[f"{module}.lora_A.weight"] = down.float().contiguous()
        state[f"{module}.lora_B.weight"] = up.float().contiguous()
        ranks[module] = down.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != rank}
    metadata = dict(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=pattern, target_modules=sorted(ranks))
    pipeline = StableDiffusionPipeline if prefix == "unet" else StableDiffusion3Pipeline
    pipeline.save_lora_weights(directory, **{f"{prefix}_lora_layers": _to_file_format(prefix, state),
                                             f"{prefix}_lora_adapter_metadata": metadata}, safe_serialization=True)
    return Path(directory) / LORA_FILE


def to_kohya(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], pipe) -> dict[str, torch.Tensor]:
    """The kohya-ss key format (`lora_unet_<module with _>.lora_down/lora_up.weight` and `.alpha`) through diffusers'
    own converter, whose docstring names AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI as its readers, on the module
    names those tools use for this model family (`kohya_modules` of its room: SD1/SD2 diffusers', SDXL the original
    UNet's input_blocks/…). It sets alpha = rank per module, i.e. scale 1: right, since our factors carry their scale
    in B."""
    from diffusers.utils import convert_state_dict_to_kohya

    from .diffusion import family

    names = family(pipe).kohya_modules(pipe, layers)
    peft = {}
    for m, (a, b) in layers.items():
        peft[f"unet.{names[m]}.lora_A.weight"], peft[f"unet.{names[m]}.lora_B.weight"] = a.contiguous(), b.contiguous()
    # kohya's sd-scripts store each alpha as a float scalar; the converter makes an integer one
    return {k: v.float() if k.endswith(".alpha") else v for k, v in convert_state_dict_to_kohya(peft).items()}


def kohya_metadata(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], pipe, title: str,
                   base_model: str | None = None) -> dict[str, str]:
    """The safetensors header the web UIs read, with the key names and values of kohya's sd-scripts (train_network.py,
    library/sai_model_spec.py): `ss_*` (AUTOMATIC1111 sorts LoRAs by `ss_base_model_version` / `ss_v2`) and the
    Stability AI ModelSpec (`modelspec.*`, SwarmUI). Rank and alpha are one number when every module has the same
    rank, else "Dynamic" (sd-scripts' word for per-module ranks). The base model's version, architecture and module
    naming are the family room's (`kohya_metadata`)."""
    import datetime

    from .diffusion import family

    ranks = {a.shape[0] for a, _ in layers.values()}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim if dim == "Dynamic" else str(float(dim)),  # alpha = rank (scale 1), "8.0" as sd-scripts
        **family(pipe).kohya_metadata(pipe),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if base_model:
        metadata["ss_sd_model_name"] = base_model
    return metadata


def write_kohya(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, pipe, title: str,
                base_model: str | None = None) -> Path:
    """Write {module: (A, B)} as a kohya-format LoRA file with the web UIs' metadata (`kohya_metadata`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_kohya(layers, pipe), str(path), metadata=kohya_metadata(layers, pipe, title, base_model))
    return path
